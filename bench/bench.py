"""Side-by-side benchmark of mobileone_rs against the pure-PyTorch reference (the reference's code).

Run as ``.venv/bin/python bench/bench.py`` (``make bench``); ``--help`` lists the options and
bench/README.md explains the workloads and how to read the output. Every figure is a ratio
ours / reference of medians measured alternately in this one run; nothing here gates CI.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import memory
import mobileone_rs
import models
import report
import timing
import torch
import workloads
from report import Row

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# ours / reference ratios the chained workload (a) should reach.
TARGETS = {
    "training step": 0.5,
    "unfused eval forward": 0.25,
    "fused forward": 1.02,
    "reparameterize_model": 0.5,
    "training-step peak memory": 0.6,
}
BLOCK_BATCH = 2
# The chain's forward-only metrics take a fraction of a second per sample, so they get more
# samples than --repeats: their medians are then as steady as the training step's.
FORWARD_REPEATS = 15
# float32 outputs of both sides should agree far below this; above it the comparison is suspect.
EQUIVALENCE_WARN = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, input 160 (unless set)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=int, help="timed runs per side (default 5, --quick 3)")
    parser.add_argument(
        "--only",
        choices=("a", "b", "c"),
        help="a: the chained stages; b: the single blocks; c: the models and cost-rule shapes",
    )
    parser.add_argument("--size", type=int, help="chain input height=width (default 320, --quick 160)")
    parser.add_argument("--batch", type=int, help="chain batch (default 2 on CPU, 16 on CUDA)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for bench.json and bench.png")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: print the table and redraw the plot of a saved bench.json",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.size is None:
        args.size = 160 if args.quick else 320
    if args.batch is None:
        args.batch = 16 if args.device.startswith("cuda") else 2
    if min(args.repeats, args.size, args.batch) < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats, --size, --batch and --threads must be positive")
    return args


def log(message: str, start: float) -> None:
    """Progress on stderr, so stdout holds only the results."""
    print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref| in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def compare(workload: str, metric: str, ref_fn, ours_fn, args, target=None, repeats=None) -> Row:
    """Times the two callables alternately and checks that their warm-up outputs agree."""
    samples = timing.alternate(ref_fn, ours_fn, repeats or args.repeats, args.device)
    notes = {
        "ref_cpu_s": samples.ref_cpu,
        "ours_cpu_s": samples.ours_cpu,
        "cpu_time_ratio": statistics.median(samples.ours_cpu) / statistics.median(samples.ref_cpu),
    }
    warm_ref, warm_ours = samples.warm
    if isinstance(warm_ref, torch.Tensor):
        notes["rel_err_vs_ref"] = rel_err(warm_ours, warm_ref)
        if notes["rel_err_vs_ref"] > EQUIVALENCE_WARN:
            print(
                f"WARNING: {workload} {metric}: outputs differ by {notes['rel_err_vs_ref']:.2e}",
                file=sys.stderr,
            )
    return Row(workload, metric, "s", samples.ref_wall, samples.ours_wall, target, notes)


def chain_timings(args, name: str, start: float) -> list[Row]:
    """Workload (a), timed: training step, unfused eval, fused forward, reparameterize_model."""
    ref, ours = workloads.chain_pair(args.device)
    x = workloads.make_input(args.batch, workloads.CHAIN_IN_CHANNELS, args.size, args.device)
    log("(a) training step", start)
    rows = [
        compare(
            name,
            "training step",
            timing.train_step(ref, x),
            timing.train_step(ours, x),
            args,
            TARGETS["training step"],
        )
    ]
    # Each side's training steps moved its BN running statistics by its own float32 rounding, which
    # the 42 chained blocks amplify; the eval metrics start again from identical state.
    ours.load_state_dict(ref.state_dict())
    log("(a) frozen-BN training step", start)
    rows.append(
        compare(
            name,
            "frozen-BN training step",
            timing.train_step(ref, x, frozen_bn=True),
            timing.train_step(ours, x, frozen_bn=True),
            args,
        )
    )
    log("(a) unfused eval forward", start)
    forward_repeats = args.repeats if args.quick else max(args.repeats, FORWARD_REPEATS)
    rows.append(
        compare(
            name,
            "unfused eval forward",
            timing.eval_forward(ref, x),
            timing.eval_forward(ours, x),
            args,
            TARGETS["unfused eval forward"],
            forward_repeats,
        )
    )
    ref.eval()
    ours.eval()
    log("(a) fused forward", start)
    ref_fused = workloads.ORACLE.reparameterize_model(ref)
    ours_fused = mobileone_rs.reparameterize_model(ours)
    rows.append(
        compare(
            name,
            "fused forward",
            timing.eval_forward(ref_fused, x),
            timing.eval_forward(ours_fused, x),
            args,
            TARGETS["fused forward"],
            forward_repeats,
        )
    )
    log("(a) reparameterize_model", start)
    rows.append(
        compare(
            name,
            "reparameterize_model",
            timing.reparameterize(workloads.ORACLE, ref),
            timing.reparameterize(mobileone_rs, ours),
            args,
            TARGETS["reparameterize_model"],
        )
    )
    return rows


def chain_memory(args, name: str, start: float) -> Row:
    """Workload (a), memory: one training step's peak increment, each in a fresh process."""
    log("(a) training-step peak memory (fresh processes)", start)
    ref, ours = memory.peak_samples(args.repeats, args.batch, args.size, args.device, args.threads)
    metric = "training-step peak memory"
    return Row(name, metric, "bytes", ref, ours, TARGETS[metric])


def block_rows(args, start: float) -> list[Row]:
    """Workload (b): every block configuration of the chain on its own, training step and eval."""
    rows = []
    for case in workloads.block_cases(args.size):
        log(f"(b) {case.name}", start)
        ref, ours = workloads.block_pair(case, args.device)
        x = workloads.make_input(BLOCK_BATCH, case.in_channels, case.size, args.device)
        rows.append(
            compare(case.name, "training step", timing.train_step(ref, x), timing.train_step(ours, x), args)
        )
        ours.load_state_dict(ref.state_dict())  # as in (a): eval starts from identical state
        rows.append(
            compare(
                case.name, "eval forward", timing.eval_forward(ref, x), timing.eval_forward(ours, x), args
            )
        )
    return rows


def git_revision() -> str:
    """The commit under test, with ``-dirty`` when the tree has changes; in a GPU bundle, the commit it
    was built from (its REVISION file), not that of the tree the bundle was copied into."""
    stamped = workloads.REPO_ROOT / "REVISION"
    if stamped.is_file():
        return stamped.read_text().strip()

    def git(*cmd: str) -> str:
        done = subprocess.run(
            ["git", *cmd], cwd=workloads.REPO_ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} x{len(names)}" if names else platform.processor() or platform.machine()


def machine_load() -> dict:
    """Load average and CPU pressure now: how much other work shared the machine."""
    load = {"loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    try:
        with open("/proc/pressure/cpu") as pressure:
            load["cpu_pressure_some_avg60"] = float(pressure.readline().split()[2].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return load


def run_meta(args, seconds: float, load_before: dict) -> dict:
    """What the numbers were measured on."""
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()
    return {
        "mobileone_rs": mobileone_rs.__version__,
        "git": git_revision(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": args.device,
        "device_name": device,
        "torch_threads": torch.get_num_threads(),
        "chain_input": [args.batch, workloads.CHAIN_IN_CHANNELS, args.size, args.size],
        "block_batch": BLOCK_BATCH,
        "repeats": args.repeats,
        "threads_arg": args.threads,
        "quick": args.quick,
        "only": args.only,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runtime_s": round(seconds, 1),
        "load_before": load_before,
        "load_after": machine_load(),
        "memory_child_env": memory.CHILD_ENV,
    }


def run_workloads(args, start: float) -> list[Row]:
    """Workload (a) then (b), as ``--only`` selects."""
    rows = []
    if args.only in (None, "a"):
        name = f"chain {args.batch}x{workloads.CHAIN_IN_CHANNELS}x{args.size}x{args.size}"
        rows += chain_timings(args, name, start)
        gc.collect()
        rows.append(chain_memory(args, name, start))
    if args.only in (None, "b"):
        rows += block_rows(args, start)
    if args.only in (None, "c"):
        rows += models.model_rows(args, lambda message: log(message, start))
    return rows


def measure(args) -> tuple[dict, list[Row]]:
    """Runs the selected workloads and returns the run's metadata and rows."""
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = machine_load()
    start = time.perf_counter()
    rows = run_workloads(args, start)
    return run_meta(args, time.perf_counter() - start, load_before), rows


def publish(meta: dict, rows: list[Row], out: Path) -> None:
    """Writes the plot and prints the table, the load and CPU-time notes."""
    model_rows = [row for row in rows if row.metric.endswith((" vs module path", " vs reference"))]
    rows = [row for row in rows if row not in model_rows]
    chain = [row for row in rows if row.workload.startswith("chain ")]
    blocks = [row for row in rows if not row.workload.startswith("chain ")]
    title = f"mobileone_rs {meta['git']} vs reference, {meta['device_name']}, {meta['torch_threads']} threads"
    if chain or blocks:
        report.write_plot(out / "bench.png", chain, blocks, title)
    print(
        f"# {title}; torch {meta['torch']}; median of {meta['repeats']} runs each (chain forwards: "
        f"{max(meta['repeats'], FORWARD_REPEATS) if not meta['quick'] else meta['repeats']}), alternated\n"
    )
    print(report.markdown_table(rows))
    if model_rows:
        print("\n(c) models and cost-rule shapes: ours vs the module path and vs the reference (<= 1.0)\n")
        print(report.markdown_table(model_rows))
    print(f"\n{report.load_note(meta['load_before'], meta['load_after'])}")
    print(report.cpu_time_note(chain))
    print(f"\ntotal runtime {meta['runtime_s']:.0f} s; results in {out}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        meta, rows = report.read_json(args.render)
    else:
        meta, rows = measure(args)
        report.write_json(args.out / "bench.json", meta, rows)
    publish(meta, rows, args.out)


if __name__ == "__main__":
    main()
