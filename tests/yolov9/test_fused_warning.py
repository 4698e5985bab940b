"""A training script that starts from fused MobileOne weights warns that they do not transfer.

YOLOv9's training scripts load ``--weights`` through ``intersect_dicts`` (names and shapes that match);
a fused block's ``reparam_conv`` matches nothing of a train-time block, so its weights are dropped and
the script only prints ``Transferred N/M items``. The patched ``intersect_dicts`` warns first.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mobileone_rs.yolov9.transfer import warn_in_intersect_dicts

from tests.yolov9 import helpers as h
from tests.yolov9.upstream_tree import make_upstream_tree

PROBE = textwrap.dedent(
    """
    import copy, warnings
    import mobileone_rs
    from torch import nn
    from utils.general import intersect_dicts

    root = nn.Module()
    root.model = nn.Sequential(nn.Conv2d(3, 8, 3), mobileone_rs.MobileOne(8, 16, 1, 2, False, 0))
    fused = mobileone_rs.reparameterize_model(copy.deepcopy(root).eval())
    for name, source in (("unfused", root), ("fused", fused)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kept = intersect_dicts(source.state_dict(), root.state_dict())
        print(name, len(kept), len(root.state_dict()), [str(w.message) for w in caught])
    """
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    if h.installed_yolo9() is None:
        pytest.skip("yolo9 (YOLOv9 from PyPI) is not installed")
    root = make_upstream_tree(tmp_path_factory.mktemp("upstream"))
    assert h.run_patch(root).returncode == 0
    return root


def test_loading_fused_weights_for_training_warns(tree: Path):
    result = h.run_python(["-c", PROBE], cwd=tree, env=h.subprocess_env(tree))
    unfused, fused = result.stdout.strip().splitlines()
    assert unfused.startswith("unfused ") and unfused.endswith(" []")
    _, kept, total, message = fused.split(" ", 3)
    assert int(kept) == 2 < int(total)  # only the plain conv transferred
    assert message.startswith("[\"the checkpoint's 2 MobileOne blocks (layers 1) are fused")
    assert "NOT transferred" in message


def test_the_training_scripts_load_weights_through_intersect_dicts(tree: Path):
    """The warning sits where the detection and segmentation training scripts load --weights."""
    found = [p for p in tree.rglob("train*.py") if p.parent.name != "classify"]
    scripts = sorted(p.relative_to(tree).as_posix() for p in found)
    assert "train_dual.py" in scripts and len(scripts) >= 5
    for script in scripts:
        assert "csd = intersect_dicts(csd, model.state_dict()" in (tree / script).read_text(), script


def test_the_edit_goes_first_in_intersect_dicts_and_only_once():
    text = textwrap.dedent(
        '''\
        def intersect_dicts(da, db, exclude=()):
            """Matching keys and shapes."""
            return {k: v for k, v in da.items() if k in db}
        '''
    )
    edited = warn_in_intersect_dicts(text)
    assert edited.splitlines()[2:4] == [
        "    from mobileone_rs.yolov9.transfer import warn_fused_mobileone  # fused weights: warn",
        "    warn_fused_mobileone(da, db)",
    ]
    assert warn_in_intersect_dicts(edited) == edited
    one_line = "def intersect_dicts(da, db): return da\n"
    assert warn_in_intersect_dicts(one_line) == one_line
    compile(edited, "general.py", "exec")


def test_a_second_patch_run_keeps_a_single_warning(tree: Path):
    result = subprocess.run(
        [sys.executable, "-m", "mobileone_rs.yolov9", "patch", str(tree), "--check"],
        check=False,
        capture_output=True,
        text=True,
        env=h.subprocess_env(tree),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tree / "utils" / "general.py").read_text().count("warn_fused_mobileone(da, db)") == 1
