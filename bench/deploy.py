"""Latency of a deployed model side by side: torch (fused .pt), ONNX Runtime float and ONNX Runtime INT8.

    python bench/deploy.py DIR [--img 640] [--rounds 7] [--runs 10] [--threads N]

DIR is what ``python -m mobileone_rs.deploy WEIGHTS --out DIR --int8 IMAGES`` wrote; run with the YOLOv9
checkout as the working directory (the .pt unpickles its ``models`` classes) and this file's path
(``python /path/to/mobileone-rs/bench/deploy.py DIR``); the JSON goes to this repository's
bench/results. CPU, batch 1. The three run in interleaved rounds (each round: ``--runs`` timed calls of
each, after one warm-up) so that machine load hits all three alike; the table gives the median over
every timed call and the ratios to torch. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mobileone_rs.yolov9 import deploy_check as check


def _timed(run, runs: int) -> list[float]:
    run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _runners(folder: Path, img: int) -> dict:
    (pt,) = [p for p in folder.glob("*-deploy.pt")]
    model = check.export_mode(torch.load(pt, map_location="cpu", weights_only=False)["model"].float())
    x = torch.rand(1, 3, img, img)
    xn = x.numpy()

    def torch_run():
        with torch.inference_mode():
            model(x)

    runners = {"torch fused": torch_run}
    for label, pattern in (("ORT float", "*-deploy.onnx"), ("ORT INT8", "*-deploy-int8.onnx")):
        paths = list(folder.glob(pattern))
        if paths:
            session = check.ort_session(paths[0], spinning=False)
            runners[label] = lambda s=session: s.run(None, {"images": xn})
    return runners


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--img", type=int, default=640)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "deploy.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runners = _runners(args.folder, args.img)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.rounds):
        for label, run in runners.items():
            samples[label] += _timed(run, args.runs)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = medians["torch fused"]
    print(
        f"| model ({args.img}x{args.img}, batch 1, CPU, {torch.get_num_threads()} torch threads) "
        "| median ms | / torch fused |\n|---|---:|---:|"
    )
    for label, ms in medians.items():
        print(f"| {label} | {ms:.1f} | {ms / base:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "img": args.img,
                "medians_ms": medians,
                "samples_ms": samples,
                "iqr_ms": {k: float(np.subtract(*np.percentile(v, [75, 25]))) for k, v in samples.items()},
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
