"""Side-by-side wall-clock timing: one warm-up each, then the reference and ours alternately."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

# A sample shorter than this repeats its call in a loop, so timer and scheduler jitter stay small.
MIN_SAMPLE_S = 0.05


def synchronize(device: str) -> None:
    """Waits for queued CUDA work, so a timer stops when the work is done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: str, number: int = 1) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per call of ``fn``, averaged over ``number`` calls.

    The CPU time (all threads of this process) is a second view for noisy machines: other
    processes' load inflates wall time much more than it inflates this process's CPU time.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(number):
        fn()
    synchronize(device)
    return (time.perf_counter() - wall) / number, (time.process_time() - cpu) / number


class Samples(NamedTuple):
    """Per-call seconds of both sides, in the order they were taken, and the warm-up results."""

    ref_wall: list[float]
    ours_wall: list[float]
    ref_cpu: list[float]
    ours_cpu: list[float]
    warm: tuple[object, object]


def alternate(
    ref_fn: Callable[[], object], ours_fn: Callable[[], object], repeats: int, device: str
) -> Samples:
    """Times ``ref_fn`` and ``ours_fn`` alternately (ref, ours, ref, ours, ...) after one warm-up each.

    The warm-up results come back for an equivalence check. Both sides use the same inner-loop
    count, chosen from the two warm-ups' total time.
    """
    synchronize(device)
    start = time.perf_counter()
    warm = (ref_fn(), ours_fn())
    synchronize(device)
    number = max(1, math.ceil(MIN_SAMPLE_S / max(time.perf_counter() - start, 1e-9)))
    samples = Samples([], [], [], [], warm)
    for _ in range(repeats):
        for fn, wall, cpu in (
            (ref_fn, samples.ref_wall, samples.ref_cpu),
            (ours_fn, samples.ours_wall, samples.ours_cpu),
        ):
            wall_s, cpu_s = time_call(fn, device, number)
            wall.append(wall_s)
            cpu.append(cpu_s)
    return samples


def train_step(model: nn.Module, x: torch.Tensor, frozen_bn: bool = False) -> Callable[[], torch.Tensor]:
    """One training step without the optimizer: zero grads, forward, mean-square loss, backward.
    ``frozen_bn``: the fine-tuning idiom, ``model.train()`` then every BatchNorm in eval mode."""

    def step() -> torch.Tensor:
        model.train()
        if frozen_bn:
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        model.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach()

    return step


def eval_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """An inference forward: eval mode, no autograd."""

    def forward() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(x)

    return forward


def reparameterize(lib, model: nn.Module) -> Callable[[], nn.Module]:
    """``lib.reparameterize_model(model)`` as users call it (it deep-copies the model)."""
    return lambda: lib.reparameterize_model(model)
