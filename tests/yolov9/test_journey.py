"""docs/yolov9.md's journey, run as written: patch, model file, train, validate, detect, export, deploy.

The tree is upstream-shaped (:mod:`tests.yolov9.upstream_tree`: upstream's layout and upstream's text
wherever the patch's runtime edits apply). Every block of the guide marked ``<!-- test: run -->`` runs
in order in the tree's root, each command as the guide prints it except the flags that size the run
(:data:`SCALED_DOWN`: a CPU and a 4-image dataset). No environment variable changes what YOLOv9 or
torch do: the commands run with the caller's environment minus any ``TORCH_FORCE_*`` / ``YOLO*``
variable, plus an empty YOLOv9 config folder (no font cached) and a ``sitecustomize`` that refuses
every internet connection, so offline is what is tested, whatever the machine's network.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.docs.blocks import REPO, code_blocks, shell_commands
from tests.yolov9 import helpers as h
from tests.yolov9.upstream_tree import make_upstream_tree

pytestmark = [
    pytest.mark.skipif(h.installed_yolo9() is None, reason="yolo9 (YOLOv9 from PyPI) is not installed"),
    pytest.mark.slow,
]

GUIDE = REPO / "docs" / "yolov9.md"
IMG = 64
SCALED_DOWN = {"--device": "cpu", "--img": str(IMG), "--batch": "2", "--epochs": "1", "--workers": "0"}
RUNTIME_EDITS = [
    "torch.load weights_only=False",
    "fonts offline",
    "Pillow 10 text size",
    "NumPy 2 trapezoid",
    "ONNX TorchScript exporter",
    "requirements pins",
]
MODEL_EDITS = ["import mobileone_rs", "parse_model channel set", "fuse reparameterize"]
OFFLINE = '''"""Installed by tests/yolov9/test_journey.py: this interpreter has no internet."""
import socket

_connect = socket.socket.connect


def _refuse(*args, **kwargs):
    raise OSError("no network (tests/yolov9/test_journey.py)")


def _local_only(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse()
    return _connect(self, address)


socket.getaddrinfo = _refuse
socket.socket.connect = _local_only
'''
WEIGHTS = Path("runs/train/yolov9-c-mobileone/weights/best.pt")


def journey_env(tmp: Path) -> dict[str, str]:
    """The caller's environment, offline, without anything that changes torch's or YOLOv9's behaviour."""
    offline = tmp / "offline"
    offline.mkdir()
    (offline / "sitecustomize.py").write_text(OFFLINE)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("TORCH_FORCE", "YOLO"))}
    env["PYTHONPATH"] = str(offline)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["YOLOV5_CONFIG_DIR"] = str(tmp / "config")  # an empty config folder: no Arial.ttf cached
    return env


def scaled_down(command: str, data: Path) -> list[str]:
    """The guide's ``python SCRIPT ...`` with the sizing flags of :data:`SCALED_DOWN` and the tiny data."""
    words = shlex.split(command, comments=True)
    assert words[0] == "python", command
    args = [sys.executable, *words[1:]]
    for i, word in enumerate(args[:-1]):
        if word in SCALED_DOWN:
            args[i + 1] = SCALED_DOWN[word]
        elif word == "--data":
            args[i + 1] = str(data)
    return args


def run_step(block_code: str, language: str, root: Path, env: dict, data: Path) -> list[tuple[str, str]]:
    """Run one marked block; ``(command, output)`` of each of its commands."""
    if language == "python":
        result = h.run_python(["-c", block_code], cwd=root, env=env)
        return [("<python block>", result.stdout + result.stderr)]
    outputs = []
    for command in shell_commands(block_code):
        started = time.perf_counter()
        if command.startswith("python ") and (
            " -m " not in command.split("#")[0] or "mobileone_rs.deploy" in command
        ):
            result = h.run_python(scaled_down(command, data)[1:], cwd=root, env=env)
        else:
            result = subprocess.run(
                ["bash", "-c", command],
                check=False,
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, f"{command}\n{(result.stdout + result.stderr)[-4000:]}"
        outputs.append((command, result.stdout + result.stderr))
        print(f"{time.perf_counter() - started:6.1f} s  {command[:90]}")  # pytest -s shows where time goes
    return outputs


def _script(command: str) -> str:
    """The key of a command's output: its script (``val.py``, ``-m mobileone_rs.deploy``), ``val.py onnx``
    for val.py on the INT8 ONNX file, the command itself for a non-Python one."""
    if not command.startswith("python "):
        return command
    words = shlex.split(command, comments=True)
    if words[1] == "-m":
        return f"-m {words[2]}"
    return f"{words[1]} onnx" if any(w.endswith(".onnx") for w in words) else words[1]


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """The guide's marked blocks, run in order on a fresh upstream-shaped tree."""
    tmp = tmp_path_factory.mktemp("journey")
    root = make_upstream_tree(tmp)
    data = h.write_synthetic_dataset(tmp / "data", count=4, size=2 * IMG)
    images = root / "data" / "images"  # upstream ships data/images/horses.jpg
    images.mkdir(parents=True)
    for name in ("img0.jpg", "img1.jpg"):  # deploy's --int8 needs two: one to calibrate, one held out
        shutil.copy(data.parent / "images" / "train" / name, images / name)
    env = journey_env(tmp)
    steps = [b for b in code_blocks(GUIDE) if b.marked]
    assert [b.language for b in steps] == ["bash", "bash", "bash", "bash", "python", "bash"]
    outputs = [out for block in steps for out in run_step(block.code, block.language, root, env, data)]
    by_script = {_script(c): out for c, out in outputs}
    return SimpleNamespace(root=root, env=env, outputs=outputs, log=by_script)


def test_every_command_of_the_guide_ran(journey):
    scripts = [shlex.split(c)[1] for c, _ in journey.outputs if c.startswith("python ")]
    assert scripts == [
        "-m",
        "models/yolo.py",
        "train_dual.py",
        "val_dual.py",
        "detect_dual.py",
        "export.py",
        "-m",
        "val.py",
        "detect.py",
        "val.py",
    ]
    assert journey.outputs[-5][0] == "<python block>"
    for command, output in journey.outputs:
        assert "Traceback" not in output, f"{command}:\n{output[-4000:]}"
        assert "attempting AutoUpdate" not in output, f"{command} tried to pip-install:\n{output[-4000:]}"


def test_patch_made_the_model_and_runtime_edits(journey):
    out = journey.log["-m mobileone_rs.yolov9"]
    assert "patched:" in out
    for edit in MODEL_EDITS + RUNTIME_EDITS:
        assert edit in out, edit
    check = subprocess.run(
        [sys.executable, "-m", "mobileone_rs.yolov9", "patch", ".", "--check"],
        check=False,
        cwd=journey.root,
        env=journey.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0 and "already patched" in check.stdout


def test_model_file_builds_with_the_seed_table(journey):
    rows = [row for row in h.parse_model_table(journey.log["models/yolo.py"]) if row[4] == "MobileOne"]
    assert [row[3] for row in rows] == [40192, 548416, 2651296, 582192]


CHECKPOINT_PROBE = """
import sys, torch, mobileone_rs
model = torch.load(sys.argv[1], map_location='cpu', weights_only=False)['model']
blocks = [m for m in model.modules() if isinstance(m, mobileone_rs.MobileOneBlock)]
print(next(model.parameters()).dtype, len(blocks), sum(hasattr(b, 'rbr_conv') for b in blocks),
      sum(p.numel() for p in model.parameters()))
"""


def test_training_ran_offline_and_validated_best_pt(journey):
    out = journey.log["train_dual.py"]
    assert out.count("not downloaded") == 1 and "plots use Pillow's built-in font" in out
    assert "getsize" not in out and "Weights only load failed" not in out
    assert "Optimizer stripped from" in out and "Validating" in out and "Fusing layers" in out
    run = journey.root / WEIGHTS.parents[1]
    assert (run / "train_batch0.jpg").is_file() and (run / "labels.jpg").is_file()
    assert not (Path(journey.env["YOLOV5_CONFIG_DIR"]) / "Arial.ttf").exists()
    probe = h.run_python(["-c", CHECKPOINT_PROBE, str(WEIGHTS)], journey.root, journey.env)
    # strip_optimizer's EMA, half, every MobileOne block still with its train-time branches
    assert probe.stdout.split() == ["torch.float16", "42", "42", "45970870"]


def test_val_dual_fuses_and_validates(journey):
    out = journey.log["val_dual.py"]
    assert "Fusing layers" in out
    assert h.parse_summary(out)[-1][:2] == (42_920_310, 926_720)
    assert re.search(r"^\s+all\s+4\s+6\s", out, re.MULTILINE), out[-3000:]


def test_detect_dual_saves_annotated_images(journey):
    assert "Fusing layers" in journey.log["detect_dual.py"]
    assert list((journey.root / "runs" / "detect" / "exp").glob("*.jpg"))


EXPORT_PROBE = """
import sys, numpy as np, onnx, onnxruntime as ort, torch
from models.experimental import attempt_load
graph = onnx.load(sys.argv[1])
onnx.checker.check_model(graph)
print('opset', graph.opset_import[0].version)
model = attempt_load(sys.argv[2], device='cpu', fuse=True)
for m in model.modules():
    if hasattr(m, 'export'):
        m.export = True
im = torch.rand(1, 3, int(sys.argv[3]), int(sys.argv[3]), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    want = model(im)
want = [want] if isinstance(want, torch.Tensor) else list(want)
got = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']).run(None, {'images': im.numpy()})
err = max(float(np.abs(g - w.numpy()).max() / np.abs(w.numpy()).max()) for g, w in zip(got, want))
print('outputs', len(got), len(want), 'max rel err', err)
"""


def test_export_writes_one_opset_12_onnx_file_that_runs(journey):
    pytest.importorskip("onnxruntime")
    out = journey.log["export.py"]
    assert "export success" in out and "export failure" not in out
    onnx_file = journey.root / WEIGHTS.with_suffix(".onnx")
    assert onnx_file.is_file() and not onnx_file.with_suffix(".onnx.data").exists()
    probe = h.run_python(
        ["-c", EXPORT_PROBE, str(onnx_file), str(WEIGHTS), str(IMG)], journey.root, journey.env
    )
    words = probe.stdout.split()
    assert words[words.index("opset") + 1] == "12"
    assert float(words[-1]) <= 1e-4, probe.stdout


def test_the_guides_python_export_snippet(journey):
    import onnx

    path = journey.root / "yolov9-c-mobileone.onnx"
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version == 12 and not Path(f"{path}.data").exists()


DEPLOY = Path("deploy")


def test_deploy_writes_a_verified_single_head_model_onnx_and_int8(journey):
    import json

    out = journey.log["-m mobileone_rs.deploy"]
    assert out.startswith(f"{WEIGHTS}: DualDDetect -> DDetect")
    names = {"best-deploy.yaml", "best-deploy.pt", "best-deploy.onnx", "best-deploy-int8.onnx", "report.json"}
    assert {p.name for p in (journey.root / DEPLOY).iterdir()} == names
    report = json.loads((journey.root / DEPLOY / "report.json").read_text())
    assert report["models"]["deploy"]["params"] == 17_744_803  # the hand conversion's count (nc=1)
    assert max(v for k, v in report["errors"].items() if k.startswith("float64")) <= 1e-9
    assert (report["int8"]["calibration_images"], report["int8"]["heldout_images"]) == (1, 1)


def test_val_and_detect_run_single_head_on_the_deploy_checkpoint(journey):
    val = journey.log["val.py"]
    assert "Fusing layers" in val and h.parse_summary(val)[-1][0] == 17_744_803
    assert re.search(r"^\s+all\s+4\s+6\s", val, re.MULTILINE), val[-3000:]
    assert list((journey.root / "runs" / "detect" / "exp2").glob("*.jpg"))  # exp: detect_dual.py's


def test_val_runs_the_int8_onnx_in_onnxruntime(journey):
    out = journey.log["val.py onnx"]
    assert "best-deploy-int8.onnx for ONNX Runtime inference" in out
    assert re.search(r"^\s+all\s+4\s+6\s", out, re.MULTILINE), out[-3000:]
