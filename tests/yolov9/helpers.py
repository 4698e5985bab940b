"""Helpers for the YOLOv9 tests: a patched copy of the installed ``yolo9`` package, imported in isolation.

``yolo9`` (PyPI) is WongKinYiu/yolov9 as a package: its files import each other as ``yolo9.models...``
and, through the ``sys.path`` entry that ``models/yolo.py`` appends, as ``utils...``. A copy of it under a
temporary folder that comes first on ``sys.path`` (or ``PYTHONPATH`` in a subprocess) shadows the
installed one, which is left untouched.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import torch
from mobileone_rs.yolov9 import deploy_model
from torch import nn

REPO = Path(__file__).resolve().parents[2]
SEED_YAML = REPO / "python" / "mobileone_rs" / "data" / "yolov9-c-mobileone.yaml"
SEED_YAML_SHA256 = "48425549059563d26188decd86b063589d4625a26f3acf9c6646740e55766e8f"
SHARED_SEED = REPO.parent / "shared" / "seed"

# The model table the reference prints for yolov9-c-mobileone (nc=1), copied from the reference text verbatim.
SEED_TABLE = """
  0 -1 1 0 models.common.Silence []
  1 -1 1 1856 models.common.Conv [3, 64, 3, 2]
  2 -1 1 40192 models.common.MobileOne [64, 64, 2, 4, False, 0]
  3 -1 1 548416 models.common.MobileOne [64, 128, 8, 4, False, 0]
  4 -1 1 2651296 models.common.MobileOne [128, 256, 10, 4, True, 1]
  5 -1 1 582192 models.common.MobileOne [256, 512, 1, 4, True, 1]
  6 -1 1 656896 models.common.SPPELAN [512, 512, 256]
  7 -1 1 0 torch.nn.modules.upsampling.Upsample [None, 2, 'nearest']
  8 [-1, 4] 1 0 models.common.Concat [1]
  9 -1 1 2988544 models.common.RepNCSPELAN4 [768, 512, 512, 256, 1]
 10 -1 1 0 torch.nn.modules.upsampling.Upsample [None, 2, 'nearest']
 11 [-1, 3] 1 0 models.common.Concat [1]
 12 -1 1 814336 models.common.RepNCSPELAN4 [640, 256, 256, 128, 1]
 13 -1 1 164352 models.common.ADown [256, 256]
 14 [-1, 9] 1 0 models.common.Concat [1]
 15 -1 1 2988544 models.common.RepNCSPELAN4 [768, 512, 512, 256, 1]
 16 -1 1 656384 models.common.ADown [512, 512]
 17 [-1, 6] 1 0 models.common.Concat [1]
 18 -1 1 3119616 models.common.RepNCSPELAN4 [1024, 512, 512, 256, 1]
 19 3 1 33024 models.common.CBLinear [128, [256]]
 20 4 1 197376 models.common.CBLinear [256, [256, 512]]
 21 5 1 656640 models.common.CBLinear [512, [256, 512, 512]]
 22 0 1 1856 models.common.Conv [3, 64, 3, 2]
 23 -1 1 73984 models.common.Conv [64, 128, 3, 2]
 24 -1 1 212864 models.common.RepNCSPELAN4 [128, 256, 128, 64, 1]
 25 -1 1 164352 models.common.ADown [256, 256]
 26 [19, 20, 21, -1] 1 0 models.common.CBFuse [[0, 0, 0]]
 27 -1 1 847616 models.common.RepNCSPELAN4 [256, 512, 256, 128, 1]
 28 -1 1 656384 models.common.ADown [512, 512]
 29 [20, 21, -1] 1 0 models.common.CBFuse [[1, 1]]
 30 -1 1 2857472 models.common.RepNCSPELAN4 [512, 512, 512, 256, 1]
 31 -1 1 656384 models.common.ADown [512, 512]
 32 [21, -1] 1 0 models.common.CBFuse [[2]]
 33 -1 1 2857472 models.common.RepNCSPELAN4 [512, 512, 512, 256, 1]
 34[27, 30, 33, 12, 15, 18] 1 21542822 DualDDetect [1, [512, 512, 512, 256, 512, 512]]
"""

# One row of parse_model's table: index, from, repeats, params, module path, arguments.
_ROW = re.compile(r"^\s*(\d+)\s*(\[[^\]]*\]|-?\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(.*?)\s*$")
_SUMMARY = re.compile(r"summary: (\d+) layers, (\d+) parameters, (\d+) gradients(?:, ([\d.]+) GFLOPs)?")


def parse_model_table(text: str) -> list[tuple[int, str, int, int, str, str]]:
    """Rows ``(i, from, n, params, class name, args)`` of a parse_model printout, in order."""
    rows = []
    for line in text.splitlines():
        match = _ROW.match(line)
        if match:
            i, f, n, params, module, args = match.groups()
            rows.append((int(i), f, int(n), int(params), module.rsplit(".", 1)[-1], args))
    return rows


def parse_summary(text: str) -> list[tuple[int, int, float | None]]:
    """``(parameters, gradients, GFLOPs or None)`` of every model_info summary line in ``text``."""
    return [(int(p), int(g), float(fl) if fl else None) for _, p, g, fl in _SUMMARY.findall(text)]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# The installed yolo9 package, copied and patched.


def installed_yolo9() -> Path | None:
    """The installed ``yolo9`` package directory, found without importing it."""
    spec = importlib.util.find_spec("yolo9")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def copy_yolo9(destination: Path) -> Path:
    """Copy the installed package to ``destination/yolo9`` and return that directory."""
    source = installed_yolo9()
    assert source is not None, "yolo9 is not installed"
    target = destination / "yolo9"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "weights", "runs"))
    return target


def subprocess_env(copy_root: Path) -> dict[str, str]:
    """Environment in which ``import yolo9`` finds the copy under ``copy_root`` first."""
    import mobileone_rs

    package_parent = str(Path(mobileone_rs.__file__).resolve().parents[1])
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy_root), *inherited, package_parent])
    env.setdefault("MPLBACKEND", "Agg")
    return env


def patched_copy(destination: Path) -> Path:
    """A copy of the installed yolo9 package in ``destination``, patched by the real command line."""
    copy = copy_yolo9(destination)
    result = run_patch(copy)
    assert result.returncode == 0, result.stderr
    return copy


def run_patch(path: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m mobileone_rs.yolov9 patch PATH FLAGS`` in a subprocess, text captured."""
    command = [sys.executable, "-m", "mobileone_rs.yolov9", "patch", str(path), *flags]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)


def cli(*positional: object, **options: object) -> list[str]:
    """Command-line arguments: ``cli(a, batch_size=2, noplots=True)`` is
    ``[a, "--batch-size", "2", "--noplots"]``."""
    args = [str(p) for p in positional]
    for key, value in options.items():
        args.append("--" + key.replace("_", "-"))
        if value is not True:
            args.append(str(value))
    return args


def run_python(
    args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``python ARGS``; on failure the assertion message carries the output's tail."""
    result = subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"python {' '.join(args)} exited {result.returncode}:\n{tail}"
    return result


def _is_yolo9_module(name: str, module, roots: list[Path]) -> bool:
    if name == "yolo9" or name.startswith("yolo9."):
        return True
    file = getattr(module, "__file__", None)
    return bool(file) and any(Path(file).resolve().is_relative_to(root) for root in roots)


def _forget_yolo9_modules(roots: list[Path]) -> None:
    for name, module in list(sys.modules.items()):
        if _is_yolo9_module(name, module, roots):
            del sys.modules[name]


@contextlib.contextmanager
def imported_copy(copy_dir: Path):
    """Import ``yolo9`` from ``copy_dir`` (a copied package) for the duration of the block.

    Any yolo9 modules already imported (installed or copied) are forgotten before and after, and the
    ``sys.path`` entries added (the copy's parent, and ``copy_dir`` that ``models/yolo.py`` appends)
    are removed again.
    """
    roots = [copy_dir.resolve()] + ([installed_yolo9().resolve()] if installed_yolo9() else [])
    saved_path = list(sys.path)
    _forget_yolo9_modules(roots)
    sys.path.insert(0, str(copy_dir.parent))
    importlib.invalidate_caches()
    try:
        yolo = importlib.import_module("yolo9.models.yolo")
        assert Path(yolo.__file__).resolve().is_relative_to(copy_dir.resolve()), yolo.__file__
        yield
    finally:
        _forget_yolo9_modules(roots)
        sys.path[:] = saved_path


@contextlib.contextmanager
def captured_yolo_log():
    """Collect what YOLOv9's ``LOGGER`` (logger name ``yolov5``, propagate=False) prints."""
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("yolov5")
    handler = _Collect(level=logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------------------------------------
# Models and tensors.


default_dtype = deploy_model.default_dtype  # one definition: the package's


def seed_mobileone_args() -> dict[int, list]:
    """``{layer: arguments}`` of the reference table's MobileOne rows, as parse_model passes them."""
    rows = parse_model_table(SEED_TABLE)
    return {i: ast.literal_eval(args) for i, _, _, _, name, args in rows if name == "MobileOne"}


def oracle_twin(model: nn.Module) -> nn.Module:
    """A copy of a YOLOv9 model whose MobileOne layers are the oracle's (the reference's code), same weights.

    The oracle's blocks run branch by branch in plain PyTorch: the twin's eval output is the
    independent reference for the package's unfused and fused outputs.
    """
    from tests import oracle

    twin = deepcopy(model)
    for i, args in seed_mobileone_args().items():
        ours = twin.model[i]
        reference = oracle.MobileOne(*args).to(next(ours.parameters()).dtype)
        oracle.copy_weights(ours, reference)
        our_modules = dict(ours.named_modules())
        for name, m in reference.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = our_modules[name].eps, our_modules[name].momentum
        reference.i, reference.f, reference.type, reference.np = ours.i, ours.f, ours.type, ours.np
        twin.model[i] = reference.train(ours.training)
    return twin


def flat_tensors(output) -> list[torch.Tensor]:
    """The tensors of a nested model output (DualDDetect eval returns ``([y1, y2], [d1, d2])``)."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in flat_tensors(item)]


def max_rel_err(actual, expected) -> float:
    """Largest ``max|a - b| / max|b|`` over the paired tensors of two outputs."""
    pairs = list(zip(flat_tensors(actual), flat_tensors(expected), strict=True))
    errs = []
    for a, b in pairs:
        assert a.shape == b.shape, (a.shape, b.shape)
        a, b = a.detach().double(), b.detach().double()
        errs.append(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item())
    return max(errs)


def random_images(n: int, size: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen).to(dtype)


def mobileone_conv_counts(yaml_dict: dict) -> dict[int, int]:
    """Convs each backbone MobileOne layer has once fused: one per block, two per SE block.

    A stage of ``num_blocks`` pairs has ``2 * num_blocks`` blocks; with ``use_se`` its last ``num_se``
    pairs (``2 * num_se`` blocks) carry an SE module of two 1x1 convs.
    """
    counts = {}
    for i, (_, _, module, args) in enumerate(yaml_dict["backbone"]):
        if module == "MobileOne":
            _, num_blocks, _, use_se, num_se = args
            counts[i] = 2 * num_blocks + (2 * 2 * num_se if use_se else 0)
    return counts


# ----------------------------------------------------------------------------------------------
# YOLOv9's scripts: a dataset.


def write_synthetic_dataset(root: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` noisy images with one or two filled boxes each, YOLO labels, and the data yaml.

    Layout as YOLOv9 expects: ``images/train/*.jpg`` beside ``labels/train/*.txt`` (class x y w h,
    normalized); the same images serve as the validation set. Returns the data yaml's path.
    """
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for i in range(count):
        image = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
        labels = []
        for _ in range(1 + i % 2):
            w, h = rng.integers(size // 4, size // 2, size=2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            image[y : y + h, x : x + w] = rng.integers(150, 256, size=3, dtype=np.uint8)
            labels.append(
                f"0 {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}"
            )
        cv2.imwrite(str(root / "images" / "train" / f"img{i}.jpg"), image)
        (root / "labels" / "train" / f"img{i}.txt").write_text("\n".join(labels) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnc: 1\nnames: ['box']\n")
    return data


def script_env(copy_root: Path, config_dir: Path) -> dict[str, str]:
    """:func:`subprocess_env` for YOLOv9's scripts on a fully patched copy (the runtime edits make them
    run offline): an empty YOLOv9 config folder, no GUI backend, one OpenMP thread (the scripts' own
    threads compete with the tests' otherwise)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    env = subprocess_env(copy_root)
    env.update(YOLOV5_CONFIG_DIR=str(config_dir), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return env
