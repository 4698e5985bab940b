"""The S0-S4 YOLOv9 yamls, built by the real YOLOv9 code (PyPI ``yolo9``, patched by our command).

Each yaml's backbone is Apple's variant layer for layer, so converted timm weights make its layers 1-5
reproduce timm's stem and stage outputs; its neck and head are YOLOv9-C's.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from types import SimpleNamespace

import mobileone_rs
import pytest
import torch
import yaml
from mobileone_rs.pretrained import yolov9_backbone
from mobileone_rs.yolov9.yamls import YAML_NAMES, yolov9_yaml
from torch import nn

from tests.pretrained.helpers import VARIANTS, images, rel_err, timm, timm_features, timm_model
from tests.yolov9 import helpers as h

pytestmark = pytest.mark.skipif(
    h.installed_yolo9() is None, reason="yolo9 (YOLOv9 from PyPI) is not installed"
)

DATA = Path(mobileone_rs.__file__).parent / "data"
# What YOLOv9's model_info prints for each yaml (nc=80, 640x640), as trained and after model.fuse();
# README.md "Pretrained backbones" shows the same table.
SUMMARIES = {
    "s0": ((47_384_112, 213.0), (43_955_520, 197.7)),
    "s1": ((47_413_696, 210.9), (47_139_520, 208.4)),
    "s2": ((51_081_408, 220.7), (50_791_104, 218.0)),
    "s3": ((53_563_968, 231.6), (53_257_856, 228.7)),
    "s4": ((58_573_992, 252.4), (58_247_272, 249.1)),
}
# YOLOv9-C's backbone layers that feed its head (0: the image, 5/7/9: P3/P4/P5) and ours.
YOLOV9_C_TAPS = {0: 0, 5: 3, 7: 4, 9: 5}


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    """YOLOv9's models.yolo and utils.general from a patched copy of the installed package."""
    copy = h.copy_yolo9(tmp_path_factory.mktemp("yolo9-s"))
    assert h.run_patch(copy).returncode == 0
    with h.imported_copy(copy):
        yield SimpleNamespace(
            root=copy,
            yolo=importlib.import_module("yolo9.models.yolo"),
            general=importlib.import_module("yolo9.utils.general"),
        )


@pytest.fixture(scope="module")
def built(yolo):
    """``{variant: (model, printed log)}``, each built once by YOLOv9's ``Model``."""
    cache = {}

    def build(variant):
        if variant not in cache:
            with h.captured_yolo_log() as log:
                model = yolo.yolo.Model(str(DATA / YAML_NAMES[variant]), ch=3, nc=80)
            cache[variant] = (model, "\n".join(log))
        return cache[variant]

    return build


@pytest.mark.parametrize("variant", VARIANTS)
def test_packaged_yaml_is_the_generated_text(variant):
    assert (DATA / YAML_NAMES[variant]).read_text(encoding="utf-8") == yolov9_yaml(variant)


def test_neck_and_head_are_yolov9_c(yolo):
    """Row for row YOLOv9-C's head, each backbone index moved to ours, other indices 4 earlier."""
    reference = yaml.safe_load((yolo.root / "models" / "detect" / "yolov9-c.yaml").read_text())

    def moved(f):
        if isinstance(f, list):
            return [moved(x) for x in f]
        return f if f < 0 else YOLOV9_C_TAPS[f] if f < 10 else f - 4

    expected = [[moved(f), *rest] for f, *rest in reference["head"]]
    for variant in VARIANTS:
        ours = yaml.safe_load(yolov9_yaml(variant))
        assert ours["head"] == expected
        assert {k: ours[k] for k in ("nc", "depth_multiple", "width_multiple", "anchors")} == {
            k: reference[k] for k in ("nc", "depth_multiple", "width_multiple", "anchors")
        }


@pytest.mark.parametrize("variant", VARIANTS)
def test_yolov9_builds_apples_backbone_and_prints_the_readme_numbers(built, variant):
    model, log = built(variant)
    rows = h.parse_model_table(log)
    widths = [f["num_chs"] for f in timm.create_model(f"mobileone_{variant}", pretrained=False).feature_info]
    assert [r[4] for r in rows[:6]] == ["Silence", "MobileOneBlock"] + ["MobileOne"] * 4
    assert rows[1][5] == f"[3, {widths[0]}, 3, 2, 1]"
    spec = mobileone_rs.backbone.VARIANTS[variant]
    for row, stage, c_in, c_out in zip(rows[2:6], spec.stages(), widths, widths[1:]):
        args = [c_in, c_out, stage.num_blocks, stage.num_conv_branches, stage.use_se, stage.num_se]
        assert row[5] == str(args)
    params, _, gflops = h.parse_summary(log)[-1]
    assert (params, gflops) == SUMMARIES[variant][0]
    with h.captured_yolo_log() as fuse_log, torch.no_grad():
        mobileone_rs.reparameterize_model(model).eval().fuse()  # on a copy; fuse() prints the summary
    params, _, gflops = h.parse_summary("\n".join(fuse_log))[-1]
    assert (params, gflops) == SUMMARIES[variant][1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_timm_weights_reproduce_timms_features(built, yolo, variant):
    """Layers 1-5 of the detector, initialized as train_dual.py does from our init checkpoint, give
    timm's stem and stage outputs in float64."""
    reference = timm_model(variant, seed=7)
    converted = mobileone_rs.convert_checkpoint(reference.state_dict())
    backbone, _ = yolov9_backbone(converted, yolov9_yaml(variant))
    model = copy.deepcopy(built(variant)[0])
    model_state = model.state_dict()
    # train_dual.py: csd = intersect_dicts(ckpt['model'].float().state_dict(), model.state_dict())
    csd = yolo.general.intersect_dicts(backbone.float().state_dict(), model_state)
    assert (
        len(csd)
        == len(backbone.state_dict())
        == sum(k.startswith(tuple(f"model.{i}." for i in range(1, 6))) for k in model_state)
    )
    model.load_state_dict(csd, strict=False)
    layers = [model.model[i].double().eval() for i in range(6)]
    # YOLOv9's initialize_weights set every BatchNorm's eps to 1e-3; timm's (and Apple's) are 1e-5.
    for bn in (m for layer in layers for m in layer.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.eps = 1e-5
    x = images(seed=8)
    with torch.no_grad():
        expected = timm_features(reference, x)
        out = layers[0](x)
        for layer, want in zip(layers[1:], expected):
            out = layer(out)
            assert rel_err(out, want) <= 1e-10


def test_patch_adds_mobileoneblock_to_a_tree_patched_before_it(tmp_path):
    """A tree patched when the channel set got MobileOne only gets MobileOneBlock, nothing else."""
    copy = h.copy_yolo9(tmp_path)
    assert h.run_patch(copy).returncode == 0
    yolo_py = copy / "models" / "yolo.py"
    old = yolo_py.read_text().replace(", MobileOneBlock}", "}")
    yolo_py.write_text(old)
    result = h.run_patch(copy)
    assert result.returncode == 0, result.stderr
    added = [
        line[1:].strip() for line in result.stdout.splitlines() if line.startswith("+") and "+++" not in line
    ]
    assert added == ["ELAN1, RepNCSPELAN4, SPPELAN, MobileOne, MobileOneBlock}:"]
    assert "parse_model channel set" in result.stdout and "import" not in result.stdout.split("patched (")[-1]
