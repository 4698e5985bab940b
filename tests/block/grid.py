"""The block grid both the block and training tests run: every branch kind, groups, strides,
SE, batch sizes; and the assertions they share."""

import copy
import itertools
from dataclasses import dataclass

import torch

from tests._util import GRAD_TOLERANCE, TOLERANCE, assert_close, build_pair, random_input, rel_err, train_step


@dataclass(frozen=True)
class BlockCase:
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int
    use_se: bool
    num_conv_branches: int
    input_shape: tuple  # (batch, height, width)
    dilation: int = 1

    def kwargs(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.dilation * (self.kernel_size // 2),
            "dilation": self.dilation,
            "groups": self.groups,
            "use_se": self.use_se,
            "num_conv_branches": self.num_conv_branches,
        }

    def input(self, dtype, seed: int = 1) -> torch.Tensor:
        batch, height, width = self.input_shape
        return random_input((batch, self.in_channels, height, width), dtype, seed)

    def __str__(self) -> str:
        b, h, w = self.input_shape
        return (
            f"{self.in_channels}to{self.out_channels}-k{self.kernel_size}-s{self.stride}"
            f"-g{self.groups}-br{self.num_conv_branches}{'-se' if self.use_se else ''}"
            f"{f'-d{self.dilation}' if self.dilation > 1 else ''}-{b}x{h}x{w}"
        )


# (in, out, groups, use_se): in == out, in != out, dense, grouped, depthwise; SE needs out >= 16.
CHANNEL_VARIANTS = [
    (4, 4, 1, False),
    (4, 6, 1, False),
    (4, 4, 2, False),
    (4, 4, 4, False),
    (16, 16, 1, True),
    (16, 32, 2, True),
    (16, 16, 16, True),
]
INPUT_SHAPES = [(1, 7, 10), (2, 9, 9)]


def _grid() -> list[BlockCase]:
    cases = []
    axes = itertools.product([1, 3, 5], [1, 2], [1, 4], CHANNEL_VARIANTS)
    # Seven channel variants (odd) alternate with two shapes, so every variant meets both.
    for index, (kernel, stride, branches, (cin, cout, groups, se)) in enumerate(axes):
        shape = INPUT_SHAPES[index % 2]
        cases.append(BlockCase(cin, cout, kernel, stride, groups, se, branches, shape))
    return cases


GRID = _grid()
# Small subsets for the BN-hyperparameter variants and dilation.
BN_CASES = [c for c in GRID if c.kernel_size == 3 and c.num_conv_branches == 4][::2]
DILATED = [
    BlockCase(4, 4, 3, 1, 1, False, 2, (2, 9, 9), dilation=2),
    BlockCase(4, 6, 5, 1, 2, False, 1, (1, 11, 10), dilation=2),
    BlockCase(16, 16, 3, 2, 16, True, 4, (2, 13, 12), dilation=2),
    BlockCase(16, 16, 5, 1, 4, True, 3, (1, 12, 11), dilation=3),
]


def pair(case: BlockCase, dtype):
    return build_pair("MobileOneBlock", dtype=dtype, **case.kwargs())


def assert_train_step_matches(ours, reference, x, dtype, steps: int = 1) -> None:
    # float32 gradients of nearly cancelling sums (e.g. a 1x1 scale kernel) carry rounding that
    # the reference's own float32 math shares, so in float32 both are measured against a float64 run
    # of the oracle: ours must stay within the bound, or within 4x the oracle's own error.
    truth = copy.deepcopy(reference).double() if dtype == torch.float32 else None
    for _ in range(steps):
        got, expected = train_step(ours, x), train_step(reference, x)
        exact = train_step(truth, x.double()) if truth is not None else None
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            bound = TOLERANCE[dtype] if key == "output" else GRAD_TOLERANCE[dtype]
            assert got[key] is not None, f"{key} is None"
            if exact is None:
                assert_close(got[key], value, bound, key)
            else:
                own = rel_err(value, exact[key])
                assert_close(
                    got[key], exact[key], max(bound, 4 * own), f"{key} (oracle's own error {own:.1e})"
                )
    assert_buffers_match(ours, reference, dtype)


def assert_buffers_match(ours, reference, dtype) -> None:
    got = dict(ours.named_buffers())
    expected = dict(reference.named_buffers())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], value), f"{key}: {got[key]} != {value}"
        else:
            assert_close(got[key], value, TOLERANCE[dtype], key)
