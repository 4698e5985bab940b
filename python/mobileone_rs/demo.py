"""The main job: build the MobileOne stages of a YOLOv9 model yaml, train, fuse, check, report.

Run ``python -m mobileone_rs.demo`` (the reference's ``yolov9-c-mobileone.yaml`` by default). The yaml is
parsed in Rust (serde_yaml); channels are resolved by YOLOv9's rule
``make_divisible(c2 * width_multiple, 8)``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import astuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._native import MobileOneError
from .backbone import yaml_stages
from .modules import MobileOne
from .reparameterize import reparameterize_model
from .verify import verify_reparameterization
from .yolov9.yamls import packaged_yaml, read_yaml

SEED_YAML = "yolov9-c-mobileone.yaml"
MIN_OUTPUT = 2  # smallest stage output (pixels per side) the demo trains and checks


def build_stages(text: str) -> list[tuple[int, tuple, int, MobileOne]]:
    """``(layer, args, input_stride, stage)`` for every MobileOne row of the yaml (the pretrained S
    yamls' MobileOneBlock stem row resolved too)."""
    return [
        (index, astuple(args), stride, MobileOne(*astuple(args))) for index, args, stride in yaml_stages(text)
    ]


def train(model: nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    """A few SGD steps on a fixed random batch; returns the losses."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def conv_gflops(model: nn.Module, x: torch.Tensor) -> float:
    """GFLOPs of one forward, counting every conv that runs (train-time branches included)."""
    probe = copy.deepcopy(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(x)
    return counter.get_total_flops() / 1e9


def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median eval-forward time in milliseconds."""
    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def params(model: nn.Module) -> int:
    """The number of parameters."""
    return sum(p.numel() for p in model.parameters())


def report_stage(layer, args, stage, x, repeats, flops_input) -> dict:
    """Fuses one trained stage and measures it before and after."""
    fused = reparameterize_model(stage.eval())
    check32 = verify_reparameterization(stage, x)
    check64 = verify_reparameterization(copy.deepcopy(stage).double(), x.double())
    return {
        "layer": layer,
        "args": list(args),
        "params": (params(stage), params(fused)),
        "gflops": (conv_gflops(stage.train(), flops_input), conv_gflops(fused, flops_input)),
        "rel_err": (check32.max_rel, check64.max_rel),
        "ms": (latency_ms(stage, x, repeats), latency_ms(fused, x, repeats)),
    }


def print_table(rows: list[dict], batch: int) -> None:
    """Prints one row per stage."""
    print(f"\nPer stage (params; conv GFLOPs of a 640x640 image; eval latency at batch {batch}, median):")
    head = (
        f"{'layer':>5} {'args':<26} {'params':>19} {'GFLOPs':>15} {'max rel err f32':>16} "
        f"{'f64':>9} {'ms unfused':>11} {'ms fused':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        p, g, e, t = r["params"], r["gflops"], r["rel_err"], r["ms"]
        print(
            f"{r['layer']:>5} {r['args']!s:<26} {p[0]:>9,}->{p[1]:>8,} {g[0]:>7.2f}->{g[1]:>6.2f} "
            f"{e[0]:>16.2e} {e[1]:>9.1e} {t[0]:>11.1f} {t[1]:>9.1f}"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mobileone_rs.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--yaml",
        help="model yaml, a path or a packaged name such as yolov9-c-mobileone-s0.yaml "
        "(default: the reference's yolov9-c-mobileone.yaml)",
    )
    parser.add_argument("--img", type=int, default=320, help="image size in pixels (default 320)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="latency repeats per stage (default 5)")
    return parser


class UsageError(MobileOneError):
    """An argument the demo cannot run with; the message says which and why."""


def output_sizes(img: int, first_stride: int, stages: int) -> list[int]:
    """Spatial size after each stage: the first pair of a stage has stride 2 (3x3, padding 1)."""
    sizes, size = [], img // first_stride
    for _ in range(stages):
        size = (size + 1) // 2
        sizes.append(size)
    return sizes


def check_arguments(args, first_stride: int, stages: int, last_layer: int) -> None:
    """Refuses what the demo cannot run or check, instead of failing later with a misleading error.

    A stage whose output is smaller than 2x2 leaves its last BatchNorms a handful of values per channel
    in training: the few steps drive their statistics to extremes, the float32 eval outputs overflow,
    and the fused-vs-unfused comparison would report a mismatch that is not one.
    """
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.steps < 0:
        raise UsageError(f"--steps must be 0 or more, got {args.steps}")
    if output_sizes(args.img, first_stride, stages)[-1] < MIN_OUTPUT:
        smallest = next(
            i for i in range(1, 1 << 16) if output_sizes(i, first_stride, stages)[-1] >= MIN_OUTPUT
        )
        size = output_sizes(args.img, first_stride, stages)[-1]
        raise UsageError(
            f"--img {args.img} leaves the last MobileOne stage (layer {last_layer}) a {size}x{size} output, "
            f"too small to train and check (at least {MIN_OUTPUT}x{MIN_OUTPUT}): use --img {smallest} or more"
        )


def run(args) -> int:
    """Runs the demo and prints its table; exit 1 if fused != unfused."""
    torch.manual_seed(0)
    stages = build_stages(read_yaml(args.yaml) if args.yaml else packaged_yaml(SEED_YAML))
    if not stages:
        raise UsageError(f"{args.yaml or SEED_YAML} has no MobileOne layer")
    first_layer, _, first_stride, _ = stages[0]
    check_arguments(args, first_stride, len(stages), stages[-1][0])
    x = torch.randn(args.batch, stages[0][1][0], args.img // first_stride, args.img // first_stride)
    chain = nn.Sequential(*[s for *_, s in stages])
    print(
        f"{len(stages)} MobileOne stages from layer {first_layer}; stage input {tuple(x.shape)} (batch, "
        f"channels, height, width: a {args.img}x{args.img} image after the stride-{first_stride} "
        "layers before "
        f"layer {first_layer})"
    )
    losses = train(chain, x, args.steps)
    print("training losses:", " ".join(f"{v:.4f}" for v in losses))
    rows = []
    h, probe = x, torch.zeros(1, x.shape[1], 640 // first_stride, 640 // first_stride)
    for layer, stage_args, _, stage in stages:
        rows.append(report_stage(layer, stage_args, stage, h, args.repeats, probe))
        with torch.no_grad():
            h, probe = stage.eval()(h), stage(probe)
    print_table(rows, args.batch)
    whole = verify_reparameterization(copy.deepcopy(chain).double(), x.double())
    print(f"\nchained stages, float64: fused vs unfused max rel err {whole.end_to_end.max_rel:.2e}")
    ok = whole.end_to_end.max_rel <= 1e-10 and all(r["rel_err"][1] <= 1e-10 for r in rows)
    print("fused == unfused:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


def main(argv=None) -> int:
    """Command-line entry point: exit 0 if fused == unfused, 1 if not, 2 on a usage or input error."""
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except MobileOneError as err:  # UsageError, YamlError, ConfigError, ...
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:
        print(f"error: cannot read {err.filename or args.yaml}: {err.strerror or err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
