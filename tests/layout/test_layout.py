"""The structural rules hold: acyclic src/ modules, unsafe code only in src/cpu, files under the
size limit, folder docs, one copy of the user's yaml, tests in area folders (tools/check_layout.py); and the
native module matches its stub (mypy.stubtest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import check_layout


def test_layout_rules_hold():
    assert check_layout.check() == []


def test_a_module_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert check_layout.cycle(graph) == ["a", "b", "c", "a"]
    assert check_layout.cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.slow  # mypy loads torch's stubs: ~40 s
def test_native_module_matches_its_stub():
    pytest.importorskip("mypy")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "mobileone_rs._native",
            "--allowlist",
            str(ROOT / "tools" / "stubtest-allowlist.txt"),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
