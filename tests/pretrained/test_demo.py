"""``python -m mobileone_rs.demo`` takes the pretrained S yamls (by packaged name or path)."""

from __future__ import annotations

from dataclasses import astuple

from mobileone_rs import demo
from mobileone_rs.backbone import VARIANTS


def test_demo_runs_the_s0_yaml_stages(capsys):
    assert (
        demo.main(["--yaml", "yolov9-c-mobileone-s0.yaml", "--img", "64", "--steps", "1", "--repeats", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert (  # after the stride-2, 48-wide stem
        "4 MobileOne stages from layer 2; stage input (2, 48, 32, 32) (batch, channels, height, width: a "
        "64x64 image after the stride-2 layers before layer 2)"
    ) in out
    for layer, stage in enumerate(VARIANTS["s0"].stages(), start=2):
        assert f"\n    {layer} {list(astuple(stage))}" in out
    assert "fused == unfused: OK" in out
