"""Per-call overhead of a block where the math is negligible: batch 1, 8x8 input, 16 channels.

Prints the median time of one call (microseconds) for a training step (forward + backward), an
unfused eval forward and a fused forward, for a depthwise and a pointwise block, and the same for
the module path (``module_path()``), so that the shells' Python-side cost is visible. Not a test.

    python bench/overhead.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mobileone_rs as mo
import torch


def _median_us(fn, repeat: int) -> float:
    for _ in range(50):
        fn()
    samples = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(repeat // 7):
            fn()
        samples.append((time.perf_counter() - start) / (repeat // 7) * 1e6)
    return statistics.median(samples)


def _cases():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 8, 8)
    for name, block in (
        ("depthwise 3x3", mo.MobileOneBlock(16, 16, 3, padding=1, groups=16, num_conv_branches=4)),
        ("pointwise 1x1", mo.MobileOneBlock(16, 16, 1, num_conv_branches=4)),
    ):
        xg = x.clone().requires_grad_()

        def train(block=block, xg=xg):
            block(xg).sum().backward()

        block.train()
        yield f"{name} train step", train, block
        eval_block = mo.MobileOneBlock(
            16,
            16,
            block.kernel_size,
            padding=block.kernel_size // 2,
            groups=block.groups,
            num_conv_branches=4,
        ).eval()
        with torch.no_grad():
            yield f"{name} eval unfused", lambda b=eval_block: b(x), eval_block
            fused = mo.reparameterize_model(eval_block)
            yield f"{name} fused", lambda b=fused: b(x), fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'case':32} {'fast (us)':>10} {'module (us)':>12}  path")
    for name, fn, block in _cases():
        with torch.no_grad() if "train" not in name else torch.enable_grad():
            fast = _median_us(fn, args.repeat)
            with mo.module_path():
                module = _median_us(fn, args.repeat)
            path = block.forward_path(torch.randn(1, 16, 8, 8))
        print(f"{name:32} {fast:10.1f} {module:12.1f}  {path}")


if __name__ == "__main__":
    main()
