"""INT8: the quantized ONNX runs in ONNX Runtime, its report's numbers are present and plausible, and
cross-layer equalization raises SQNR where BN statistics gave the fused kernels wide ranges."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mobileone_rs.deploy import deploy
from mobileone_rs.yolov9.deploy_int8 import worst_db

from tests.deploy.models import misequalize, randomize_batch_norms, write_checkpoint
from tests.yolov9 import helpers as h

pytestmark = [
    pytest.mark.skipif(h.installed_yolo9() is None, reason="yolo9 (YOLOv9 from PyPI) is not installed"),
    pytest.mark.slow,
]

IMG = 64


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    data = h.write_synthetic_dataset(tmp_path_factory.mktemp("int8-data"), count=6, size=2 * IMG)
    return data.parent / "images" / "train"


def eval_output(model, x):
    with torch.no_grad():
        return model.eval()(x)[0][1]  # the main head's


def int8_deploy(yolo, tmp_path, images, spread: float = 0.0, **options):
    torch.manual_seed(0)
    with h.captured_yolo_log():
        model = randomize_batch_norms(yolo.yolo.Model(str(h.SEED_YAML), ch=3, nc=1), seed=0)
    if spread:
        x = torch.rand(1, 3, IMG, IMG, dtype=torch.float64)
        before = eval_output(model.double(), x)
        misequalize(model, layers=(2, 3), spread=spread, seed=1)
        after = eval_output(model, x)
        assert ((after - before).abs().max() / before.abs().max()).item() <= 1e-9  # the same function
        model.float()
    weights = write_checkpoint(model, tmp_path / "best.pt")
    return deploy(weights, tmp_path / "out", img=IMG, runs=2, int8=images, **{"heldout": 2, **options})


@pytest.fixture(scope="module")
def plain(yolo, tmp_path_factory, images):
    tmp = tmp_path_factory.mktemp("int8")
    return int8_deploy(yolo, tmp, images), tmp / "out"


def test_int8_file_runs_in_onnxruntime(plain):
    _, out = plain
    graph = onnx.load(str(out / "best-deploy-int8.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") > 100 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    x = np.random.default_rng(0).random((1, 3, IMG, IMG), dtype=np.float32)
    (int8,) = ort.InferenceSession(str(out / "best-deploy-int8.onnx")).run(None, {"images": x})
    (fp32,) = ort.InferenceSession(str(out / "best-deploy.onnx")).run(None, {"images": x})
    assert int8.shape == fp32.shape == (1, 4 + 1, 2 * 2 + 4 * 4 + 8 * 8) and np.isfinite(int8).all()
    assert np.abs(int8[0, :4] - fp32[0, :4]).max() < 0.25 * np.abs(fp32[0, :4]).max()  # close, not equal


def test_int8_report_numbers_are_present_and_plausible(plain):
    report, out = plain
    int8 = json.loads((out / "report.json").read_text())["int8"]
    assert int8 == json.loads(json.dumps(report.int8))
    assert (int8["calibration_images"], int8["heldout_images"], int8["opset"]) == (4, 2, 13)
    assert int8["heldout_requested"] == 2 and int8["input_shape"] == [1, 3, IMG, IMG]
    assert set(int8["sqnr_db"]) == {"output0", "output0 boxes", "output0 scores", "overall"}
    assert 5 < int8["sqnr_db"]["overall"] < 60
    assert int8["map50_vs_float"] is None or 0 <= int8["map50_vs_float"] <= 1
    assert int8["latency_ms"]["int8"] > 0 and int8["latency_ratio"] == pytest.approx(
        int8["latency_ms"]["int8"] / int8["latency_ms"]["float"], rel=1e-2
    )
    widest = [row["max_abs_over_std"] for row in int8["widest_range_convs"]]
    assert len(widest) == 10 and widest == sorted(widest, reverse=True) and widest[-1] > 1
    cle = int8["cle"]
    assert cle["mode"] == "auto" and cle["float_rel_error"] <= 1e-4
    # decided on calibration images (the held-out ones only measure), by the worst output part
    assert cle["decided_on"].startswith("4 calibration images")
    assert cle["applied"] == (cle["sqnr_db_with"] > cle["sqnr_db_without"])
    chosen = cle["heldout_sqnr_db_with"] if cle["applied"] else cle["heldout_sqnr_db_without"]
    assert worst_db(int8["sqnr_db"]) == chosen


def test_equalization_pairs_are_relu_pairs_of_the_mobileone_stages(plain):
    report, _ = plain
    pairs = report.int8["cle"]["pairs"]
    stages = {p["conv1"].split("/")[1] for p in pairs}
    assert stages == {"model.1", "model.2", "model.3", "model.4"}  # the deploy model's MobileOne layers
    within_blocks = [p for p in pairs if "/se/" not in p["conv1"]]
    assert all("reparam_conv" in p["conv1"] and "reparam_conv" in p["conv2"] for p in within_blocks)
    # an SE block's gate reads the scaled tensor: no pair starts at an SE block's conv
    assert all("/se/" in p["conv2"] for p in pairs if "/se/" in p["conv1"])


def test_equalization_raises_sqnr_on_wide_fused_kernels(yolo, tmp_path, images):
    report = int8_deploy(yolo, tmp_path, images, spread=3.0)
    cle = report.int8["cle"]
    assert cle["float_rel_error"] <= 1e-4  # exact in float, up to float32 rounding
    assert cle["applied"] and cle["sqnr_db_with"] > cle["sqnr_db_without"] + 0.5  # measured: +2.1 dB
    assert cle["heldout_sqnr_db_with"] > cle["heldout_sqnr_db_without"]  # and on images it was not chosen on
    assert worst_db(report.int8["sqnr_db"]) == cle["heldout_sqnr_db_with"]
    widest_pairs = max(p["conv1_channel_range_ratio_before"] for p in cle["pairs"])
    assert widest_pairs > 50  # the kernels were wide ...
    assert (
        max(p["conv1_channel_range_ratio_after"] for p in cle["pairs"]) < widest_pairs / 2
    )  # ... and no longer


def test_dynamic_int8_onnx_takes_other_batch_and_image_sizes(yolo, tmp_path, images):
    report = int8_deploy(yolo, tmp_path, images, dynamic=True, cle="off", heldout=9)
    assert report.int8["input_shape"] == ["batch", 3, "height", "width"] and report.int8["cle"] is None
    assert (report.int8["heldout_requested"], report.int8["heldout_images"]) == (9, 3)  # at most half
    session = ort.InferenceSession(str(tmp_path / "out" / "best-deploy-int8.onnx"))
    x = np.random.default_rng(0).random((2, 3, 2 * IMG, IMG), dtype=np.float32)
    (out,) = session.run(None, {"images": x})
    assert out.shape == (2, 4 + 1, 4 * 2 + 8 * 4 + 16 * 8) and np.isfinite(out).all()


def test_worst_db_reads_the_parts_not_the_overall():
    sqnr = {"output0": 30.0, "output0 boxes": 31.0, "output0 scores": 12.0, "overall": 30.5}
    assert worst_db(sqnr) == 12.0
    assert (
        worst_db(
            {"output0": 20.0, "output1": 9.0, "output0 boxes": 25.0, "output0 scores": 18.0, "overall": 19.0}
        )
        == 9.0
    )
