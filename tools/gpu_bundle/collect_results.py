"""Writes the GPU checks' one JSON (stdout): the environment, the device tests' counts, failures and
the forward paths the blocks took, and the quick benchmark's bench.json.

Usage: collect_results.py OUT DEVICE TESTS_EXIT BENCH_EXIT SECONDS (run by run_gpu_checks.sh).
"""

from __future__ import annotations

import collections
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def environment(device: str) -> dict:
    import mobileone_rs
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mobileone_rs": mobileone_rs.__version__,
        "built_for_torch": mobileone_rs.TORCH_BUILT_FOR,
        "native": Path(mobileone_rs._native.__file__).name,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if cuda and device != "cpu" else cpu_name(),
        "cuda": torch.version.cuda if cuda else None,
    }


def tests(xml: Path) -> dict:
    if not xml.exists():
        return {"error": f"{xml.name} was not written (see tests.log)"}
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    paths, failed = collections.Counter(), []
    for case in suite.iter("testcase"):
        for prop in case.iter("property"):
            paths[f"{prop.get('name')} = {prop.get('value')}"] += 1
        for bad in [*case.findall("failure"), *case.findall("error")]:
            failed.append(
                {
                    "test": f"{case.get('classname')}::{case.get('name')}",
                    "message": (bad.get("message") or "")[:300],
                }
            )
    return {
        **counts,
        "seconds": float(suite.get("time", 0)),
        "forward_paths": dict(sorted(paths.items())),
        "failed": failed,
    }


def main(out: str, device: str, tests_rc: str, bench_rc: str, seconds: str) -> None:
    out_dir = Path(out)
    bench = out_dir / "bench" / "bench.json"
    result = {
        "environment": environment(device),
        "tests": {"exit": int(tests_rc), **tests(out_dir / "tests.xml")},
        "bench": {"exit": int(bench_rc), **(json.loads(bench.read_text()) if bench.exists() else {})},
        "seconds": int(seconds),
    }
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
