"""The deploy yaml by graph analysis: upstream's yolov9-c / yolov9-e become upstream's gelan-c / gelan-e.

The oracle is upstream's own hand-written single-head yamls (shipped in PyPI's yolo9, which is
WongKinYiu/yolov9's models/ folder), compared as YOLOv9 reads them (``yaml.safe_load``).
"""

from __future__ import annotations

import copy

import pytest
import yaml
from mobileone_rs.yolov9.deploy_graph import DeployError, strip_dual_head

from tests.yolov9 import helpers as h

pytestmark = pytest.mark.skipif(
    h.installed_yolo9() is None, reason="yolo9 (YOLOv9 from PyPI) is not installed"
)


def upstream(name: str) -> dict:
    return yaml.safe_load((h.installed_yolo9() / "models" / name).read_text())


@pytest.mark.parametrize("dual, single", [("yolov9-c", "gelan-c"), ("yolov9-e", "gelan-e")])
def test_yolov9_strips_to_upstreams_gelan_layer_for_layer(dual, single):
    stripped = strip_dual_head(upstream(f"detect/{dual}.yaml"))
    gelan = upstream(f"detect/{single}.yaml")
    assert stripped.yaml["backbone"] == gelan["backbone"]
    assert stripped.yaml["head"] == gelan["head"]
    assert stripped.yaml == gelan


def test_yolov9_c_drops_silence_and_the_auxiliary_branch():
    stripped = strip_dual_head(upstream("detect/yolov9-c.yaml"))
    assert stripped.kept == list(range(1, 23))  # layer 0 (Silence) and 23-37 (CBLinear ... auxiliary) go
    assert stripped.renames[:3] == (("cv4.", "cv2."), ("cv5.", "cv3."), ("dfl2.", "dfl."))


def test_yolov9_e_keeps_silence_where_two_layers_read_the_image():
    # layer 1 and layer 15 (the second backbone) both read the image: only an identity layer 0 can hold it
    stripped = strip_dual_head(upstream("detect/yolov9-e.yaml"))
    assert stripped.kept == [*range(29), *range(36, 49)]
    assert stripped.yaml["backbone"][0] == [-1, 1, "Silence", []]


def test_dual_segment_head_strips_to_dsegment():
    stripped = strip_dual_head(upstream("segment/yolov9-c-dseg.yaml"))
    gelan = upstream("segment/gelan-c-dseg.yaml")
    assert stripped.yaml["head"][-1] == [[15, 18, 21, 24], 1, "DSegment", ["nc", 32, 256]]
    # Upstream's two files differ in one layer's depth (the proto branch's RepNCSPELAN4: 2 in yolov9-c-dseg,
    # 1 in gelan-c-dseg); the deploy yaml keeps the trained layer. Every other layer is gelan-c-dseg's.
    assert stripped.yaml["head"][13] == [15, 1, "RepNCSPELAN4", [256, 256, 128, 2]]
    assert gelan["head"][13] == [15, 1, "RepNCSPELAN4", [256, 256, 128, 1]]
    assert [r for k, r in enumerate(stripped.yaml["head"]) if k != 13] == [
        r for k, r in enumerate(gelan["head"]) if k != 13
    ]
    assert stripped.yaml["backbone"] == gelan["backbone"]


def test_seed_yaml_strips_to_its_main_branch():
    stripped = strip_dual_head(yaml.safe_load(h.SEED_YAML.read_text()))
    rows = stripped.yaml["backbone"] + stripped.yaml["head"]
    assert stripped.kept == list(range(1, 19))
    assert [r[2] for r in rows[:5]] == ["Conv", "MobileOne", "MobileOne", "MobileOne", "MobileOne"]
    assert rows[7][0] == [-1, 3] and rows[10][0] == [-1, 2]  # the concats with backbone P4, P3, renumbered
    assert rows[-1] == [[11, 14, 17], 1, "DDetect", ["nc"]]


def test_relative_links_stay_relative_and_absolute_absolute():
    d = {
        "nc": 1,
        "backbone": [[-1, 1, "Silence", []], [-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]]],
        "head": [
            [0, 1, "Conv", [8, 3, 2]],  # 3: the auxiliary branch, dropped
            [2, 1, "Conv", [8, 3, 1]],
            [-3, 1, "Conv", [8, 3, 1]],
            [[-1, 4], 1, "Concat", [1]],
            [[3, 3, 6, 6], 1, "DualDDetect", ["nc"]],
        ],
    }
    stripped = strip_dual_head(d)
    assert stripped.kept == [1, 2, 4, 5, 6]
    assert stripped.yaml["backbone"] == [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]]]
    assert stripped.yaml["head"] == [
        [1, 1, "Conv", [8, 3, 1]],
        [-2, 1, "Conv", [8, 3, 1]],
        [[-1, 2], 1, "Concat", [1]],
        [[4, 4], 1, "DDetect", ["nc"]],
    ]


def seed_with_head(module: str, sources) -> dict:
    d = yaml.safe_load(h.SEED_YAML.read_text())
    d["head"][-1] = [sources, 1, module, ["nc"]]
    return d


@pytest.mark.parametrize(
    "module, sources, message",
    [
        (
            "TripleDDetect",
            [27, 30, 33, 12, 15, 18],
            (
                "the model's head is TripleDDetect: not covered (covered dual "
                "heads: DualDetect -> Detect, DualDDetect -> DDetect, DualDSegment -> DSegment)"
            ),
        ),
        ("DDetect", [12, 15, 18], "the model's last layer is DDetect, not a YOLOv9 dual head"),
        (
            "DualDDetect",
            [27, 30, 33, 12, 15],
            (
                "the DualDDetect head reads 5 layers [27, 30, 33, 12, 15]: "
                "DualDDetect needs 2 x levels, so its main head cannot be separated"
            ),
        ),
        (
            "DualDDetect",
            [27, 30, 33, 12, 15, 40],
            "yaml layer 34: 'from' entry 40 does not point to an earlier layer",
        ),
    ],
)
def test_heads_that_cannot_be_separated_are_refused_by_name(module, sources, message):
    with pytest.raises(DeployError) as err:
        strip_dual_head(seed_with_head(module, sources))
    assert str(err.value).startswith(message)


def test_the_input_yaml_is_left_unchanged():
    d = upstream("detect/yolov9-c.yaml")
    before = copy.deepcopy(d)
    strip_dual_head(d)
    assert d == before
