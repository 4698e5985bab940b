"""``python -m mobileone_rs.demo``: refuses what it cannot run or check, one error line, exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mobileone_rs import demo


def run_demo(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mobileone_rs.demo", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)


def test_output_sizes_follow_the_stride_2_pairs():
    # 34 px -> 17 at layer 2 (input stride 2), then ceil(s / 2) per stage: 9, 5, 3, 2
    assert demo.output_sizes(34, 2, 4) == [9, 5, 3, 2]
    assert demo.output_sizes(30, 2, 4) == [8, 4, 2, 1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--img", "30"], "--img 30 leaves the last MobileOne stage (layer 5) a 1x1 output"),
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--steps", "-1"], "--steps must be 0 or more, got -1"),
        (["--yaml", "/nonexistent/model.yaml"], "cannot read /nonexistent/model.yaml"),
    ],
    ids=["img-too-small", "batch-0", "repeats-0", "steps-negative", "missing-yaml"],
)
def test_refusals_are_one_line_with_exit_status_2(args, message, capsys):
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: [[")
    result = run_demo("--yaml", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def test_help_names_the_module_and_every_option():
    result = run_demo("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m mobileone_rs.demo")
    for option in ("--yaml", "--img", "--batch", "--steps", "--repeats"):
        assert option in result.stdout


@pytest.mark.slow
def test_the_smallest_accepted_size_checks_ok():
    """The smallest image the demo accepts trains, fuses and compares without a false mismatch."""
    result = run_demo("--img", "34", "--batch", "1", "--steps", "1", "--repeats", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fused == unfused: OK" in result.stdout
