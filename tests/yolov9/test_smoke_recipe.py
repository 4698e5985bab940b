"""docs/yolov9.md's one-epoch CPU smoke test (section 5.1), run as written on an upstream-shaped tree.

The block marked ``<!-- test: smoke -->`` runs verbatim with bash in the tree's root, after the
guide's patch and model-file steps, offline (the journey's environment).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.docs.blocks import code_blocks
from tests.yolov9 import helpers as h
from tests.yolov9.test_journey import GUIDE, journey_env
from tests.yolov9.upstream_tree import make_upstream_tree

pytestmark = [
    pytest.mark.skipif(h.installed_yolo9() is None, reason="yolo9 (YOLOv9 from PyPI) is not installed"),
    pytest.mark.slow,
]
SMOKE_MARK = "<!-- test: smoke -->"


def smoke_block() -> str:
    lines = GUIDE.read_text(encoding="utf-8").splitlines()
    marked = [b for b in code_blocks(GUIDE) if lines[b.line - 2].strip() == SMOKE_MARK]
    assert len(marked) == 1 and marked[0].language == "bash"
    return marked[0].code


def test_the_guides_smoke_test_trains_one_epoch_on_cpu(tmp_path):
    root = make_upstream_tree(tmp_path)
    assert h.run_patch(root).returncode == 0
    shutil.copy(h.SEED_YAML, root / "models" / "detect")
    result = subprocess.run(
        ["bash", "-e", "-c", smoke_block()],
        check=False,
        cwd=root,
        env=journey_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "1 epochs completed" in out and "Fusing layers" in out
    assert len(list((root / "tiny" / "images" / "train").glob("*.jpg"))) == 8
    assert (root / "runs" / "train" / "smoke" / "weights" / "best.pt").is_file()
