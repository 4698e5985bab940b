"""Workload (c): whole MobileOne models and the shapes where a fast path could lose, timed three
ways side by side: ours, ours on the module path (``mobileone_rs.module_path()``, the block's own
module-by-module forward) and the reference (Apple's reference MobileOne, as YOLOv9-MobileOne
uses it: ``tests/oracle.py``). Each case gives two rows: ours against the module path (the cost
rule's promise: never above 1.0) and ours against the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import astuple

import mobileone_rs
import timing
import torch
import workloads
from mobileone_rs.backbone import get_variant
from report import Row
from torch import nn

VARIANTS = ("s0", "s1", "s2", "s3", "s4")
MODEL_SIZE = 224
MODEL_TRAIN_BATCH = 8


class ReferenceClassifier(nn.Module):
    """Apple's MobileOne classifier built from the reference's blocks, with our module names."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        spec, lib = get_variant(variant), workloads.ORACLE
        self.stage0 = lib.MobileOneBlock(3, spec.stem_channels, 3, stride=2, padding=1)
        for k, args in enumerate(spec.stages(), start=1):
            self.add_module(f"stage{k}", lib.MobileOne(*astuple(args)).stage)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(spec.features, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(5):
            x = getattr(self, f"stage{k}")(x)
        return self.linear(torch.flatten(self.gap(x), 1))


def model_pair(variant: str, device: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The reference classifier and ``mobileone_rs.mobileone(variant)`` with identical weights."""
    torch.manual_seed(seed)
    ref, ours = ReferenceClassifier(variant), mobileone_rs.mobileone(variant)
    workloads.share_weights(ref, ours, seed)
    return ref.to(device), ours.to(device)


def block_pair(device: str, *args, seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    """The reference block and ours for ``MobileOneBlock(*args, **kwargs)``, identical weights."""
    torch.manual_seed(seed)
    ref = workloads.ORACLE.MobileOneBlock(*args, **kwargs)
    ours = mobileone_rs.MobileOneBlock(*args, **kwargs)
    workloads.share_weights(ref, ours, seed)
    return ref.to(device), ours.to(device)


def fused(pair: tuple[nn.Module, nn.Module]) -> tuple[nn.Module, nn.Module]:
    ref, ours = pair
    return workloads.ORACLE.reparameterize_model(ref.eval()), mobileone_rs.reparameterize_model(ours.eval())


def channels_last(pair: tuple[nn.Module, nn.Module]) -> tuple[nn.Module, nn.Module]:
    return tuple(m.to(memory_format=torch.channels_last) for m in pair)


def on_module_path(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with mobileone_rs.module_path():
            return fn()

    return run


def alternate3(fns: list[Callable[[], object]], repeats: int, device: str) -> list[list[float]]:
    """Wall seconds per call of each callable, taken round-robin after one warm-up each."""
    timing.synchronize(device)
    start = timing.time.perf_counter()
    for fn in fns:
        fn()
    timing.synchronize(device)
    number = max(1, math.ceil(timing.MIN_SAMPLE_S / max(timing.time.perf_counter() - start, 1e-9)))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            out.append(timing.time_call(fn, device, number)[0])
    return samples


def _cases(device: str):
    """(workload, metric, pair builder, input, step) for every case."""

    def image(batch, size=MODEL_SIZE, channels=3):
        return workloads.make_input(batch, channels, size, device)

    train, infer = timing.train_step, timing.eval_forward
    for v in VARIANTS:
        yield (
            f"mobileone {v} {MODEL_SIZE} b{MODEL_TRAIN_BATCH}",
            "training step",
            lambda v=v: model_pair(v, device),
            image(MODEL_TRAIN_BATCH),
            train,
        )
    for v in VARIANTS:
        yield (
            f"mobileone {v} {MODEL_SIZE} b1",
            "fused inference",
            lambda v=v: fused(model_pair(v, device)),
            image(1),
            infer,
        )
    yield (
        f"mobileone s0 {MODEL_SIZE} b1 channels_last",
        "fused inference",
        lambda: channels_last(fused(model_pair("s0", device))),
        image(1).to(memory_format=torch.channels_last),
        infer,
    )
    yield (
        "S4 P5 pw 896->2048 20x20 b2",
        "training step",
        lambda: block_pair(device, 896, 2048, 1),
        image(2, 20, 896),
        train,
    )
    for k in (5, 7):
        yield (
            f"dw{k}x{k} c128 28x28 b8",
            "training step",
            lambda k=k: block_pair(device, 128, 128, k, padding=k // 2, groups=128),
            image(8, 28, 128),
            train,
        )
    yield (
        "dw3x3 c64 56x56 b1 channels_last",
        "fused inference",
        lambda: channels_last(
            fused(block_pair(device, 64, 64, 3, padding=1, groups=64, num_conv_branches=4))
        ),
        image(1, 56, 64).to(memory_format=torch.channels_last),
        infer,
    )


def model_rows(args, log) -> list[Row]:
    """Workload (c): per case, ours vs the module path and ours vs the reference."""
    rows = []
    for workload, metric, build, x, step in _cases(args.device):
        log(f"(c) {workload}: {metric}")
        ref, ours = build()
        ref_s, module_s, ours_s = alternate3(
            [step(ref, x), on_module_path(step(ours, x)), step(ours, x)], args.repeats, args.device
        )
        block = next(m for m in ours.modules() if isinstance(m, mobileone_rs.MobileOneBlock))
        notes = {"first_block_path": block.forward_path(x)}
        rows.append(Row(workload, f"{metric} vs module path", "s", module_s, ours_s, 1.0, dict(notes)))
        rows.append(Row(workload, f"{metric} vs reference", "s", ref_s, ours_s, 1.0, notes))
    return rows
