"""Peak memory of one training step of the chained stages, each measurement in a fresh process.

The parent (``peak_samples``) runs this file as a script, alternating the reference and ours. The
child builds one side's chain and input, runs a tiny warm-up step (so lazily initialized library
state is not charged to the step), then measures one full training step:

* CPU: the peak RSS during the step minus the resident set just before it (model, input and
  warm-up leftovers already counted there). The peak is ``VmHWM`` of /proc/self/status, reset to
  the current RSS right before the step: ``getrusage().ru_maxrss`` cannot be used, because Linux
  carries the parent's high-water mark into ``ru_maxrss`` across fork+exec, so a child of this
  (large) benchmark process would report the parent's peak;
* CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus the allocation before it.

glibc's malloc raises its mmap threshold as large blocks are freed, after which freed tensors stay
in fragmented heaps and the peak RSS of the very same code varies by 10-20% between runs. The child
therefore runs with a fixed ``MALLOC_MMAP_THRESHOLD_`` (glibc's initial 128 KiB): every large
tensor is its own mapping, returned on free, and the peak RSS tracks the live tensor bytes (the
same setting for both sides; repeated runs then agree to well under 1%).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

WARMUP_SIZE = 32
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def current_rss_bytes() -> int:
    """The resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Resets this process's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_bytes() -> int:
    """The peak resident set size of this process's own address space (``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def one_step(model, x) -> None:
    """Zero grads, forward, mean-square loss, backward (the timed training step, once)."""
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def step_increment(model, x, device: str) -> int:
    """Bytes one training step needs beyond what is held before it."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        one_step(model, x)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = current_rss_bytes()
    reset_peak_rss()
    one_step(model, x)
    return peak_rss_bytes() - before


def child_main(argv: list[str]) -> None:
    """Entry point of the measuring process: prints one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("impl", choices=("ref", "ours"))
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import workloads  # this file's folder is sys.path[0] when run as a script

    torch.manual_seed(0)
    model = workloads.build_chain(args.impl).to(args.device).train()
    x = workloads.make_input(args.batch, workloads.CHAIN_IN_CHANNELS, args.size, args.device)
    one_step(model, workloads.make_input(1, workloads.CHAIN_IN_CHANNELS, WARMUP_SIZE, args.device))
    model.zero_grad(set_to_none=True)
    increment = step_increment(model, x, args.device)
    print(json.dumps({"impl": args.impl, "increment_bytes": increment}))


def measure_once(impl: str, batch: int, size: int, device: str, threads: int | None = None) -> int:
    """Runs one fresh child process and returns its step's memory increment in bytes."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        impl,
        "--batch",
        str(batch),
        "--size",
        str(size),
        "--device",
        device,
    ] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **CHILD_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"memory child {impl} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["increment_bytes"])


def peak_samples(
    repeats: int, batch: int, size: int, device: str, threads: int | None = None
) -> tuple[list[int], list[int]]:
    """Per-step memory increments of the reference and ours, measured alternately in fresh processes."""
    ref, ours = [], []
    for _ in range(repeats):
        ref.append(measure_once("ref", batch, size, device, threads))
        ours.append(measure_once("ours", batch, size, device, threads))
    return ref, ours


if __name__ == "__main__":
    child_main(sys.argv[1:])
