"""INT8: ONNX Runtime static quantization (QDQ, per-channel int8 weights) of the deploy ONNX, measured.

Only ``Conv`` nodes are quantized, with symmetric int8 activations (the QDQ layout TensorRT reads): the
head's box decoding (DFL softmax, anchor arithmetic, the concat of pixel boxes with 0..1 scores) stays
float, where one per-tensor int8 scale would erase the scores. Measured on held-out images: SQNR of the
INT8 outputs against float, detection agreement (mAP@0.5 of INT8 detections scored against the float
model's own), the INT8/float latency, and the fused convs with the widest weight range.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import deploy_check as check
from .deploy_detections import detections, map50
from .deploy_graph import DeployError

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm"}
CLE_EXACT_BOUND = 1e-4  # equalization is exact in real arithmetic: float32 rounding only


def find_images(folder: Path, heldout: int) -> list[Path]:
    """The folder's images (sorted), checked readable; at least two (calibration and held-out)."""
    if not folder.is_dir():
        raise DeployError(f"--int8 {folder}: not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise DeployError(
            f"--int8 {folder}: {len(paths)} images (jpg, png, ...); INT8 needs at least 2, "
            "some to calibrate and some held out to measure"
        )
    if heldout < 1:
        raise DeployError(f"--heldout {heldout}: at least one image must be held out")
    import cv2

    for path in paths:
        if cv2.imread(str(path)) is None:
            raise DeployError(f"--int8 {folder}: cannot read {path.name} as an image")
    return paths


def letterbox(path: Path, img: int) -> np.ndarray:
    """``(1, 3, img, img)`` float32 RGB in 0..1, resized keeping the aspect and padded with 114 as YOLOv9."""
    import cv2

    image = cv2.imread(str(path))
    if image is None:  # the image folder was checked readable; the file changed since
        raise DeployError(f"cannot read {path} as an image")
    h, w = image.shape[:2]
    r = img / max(h, w)
    nh, nw = max(round(h * r), 1), max(round(w * r), 1)
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    out = np.full((img, img, 3), 114, dtype=np.uint8)
    top, left = (img - nh) // 2, (img - nw) // 2
    out[top : top + nh, left : left + nw] = image
    return np.ascontiguousarray(out[:, :, ::-1].transpose(2, 0, 1))[None].astype(np.float32) / 255.0


def _split(paths: list[Path], calib: int, heldout: int) -> tuple[list[Path], list[Path]]:
    """The first images calibrate, the last are held out: at most half of them (the report gives
    both the count requested and the count used)."""
    held = min(heldout, len(paths) // 2)
    return paths[: min(calib, len(paths) - held)], paths[len(paths) - held :]


def _quantize(src: Path, dst: Path, inputs: list[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(inputs)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"images": x}

    root = logging.getLogger()  # quantize_static logs a pre-processing hint on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        _quantize_static(quantize_static, src, dst, Reader())
    finally:
        root.setLevel(level)


def _quantize_static(quantize_static, src, dst, reader) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    quantize_static(
        str(src),
        str(dst),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv"],
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True},
    )  # MinMax keeps two numbers per tensor and image


def _run(session, inputs: list[np.ndarray]) -> list[list[np.ndarray]]:
    return [session.run(None, {"images": x}) for x in inputs]


def sqnr_db(reference: list[list[np.ndarray]], test: list[list[np.ndarray]], names: list[str]) -> dict:
    """Signal to quantization noise in dB, per output (a detection output's boxes and scores apart too)."""

    def db(pairs):
        signal = sum(float(np.square(a.astype(np.float64)).sum()) for a, _ in pairs)
        noise = sum(float(np.square(a.astype(np.float64) - b).sum()) for a, b in pairs)
        return round(float(10 * np.log10(signal / noise)), 2) if noise > 0 else float("inf")

    out = {}
    for k, name in enumerate(names):
        pairs = [(r[k], t[k]) for r, t in zip(reference, test, strict=True)]
        out[name] = db(pairs)
        if name == "output0":
            out["output0 boxes"] = db([(a[:, :4], b[:, :4]) for a, b in pairs])
            out["output0 scores"] = db([(a[:, 4:], b[:, 4:]) for a, b in pairs])
    out["overall"] = db(
        [(a, b) for r, t in zip(reference, test, strict=True) for a, b in zip(r, t, strict=True)]
    )
    return out


def widest_ranges(model, worst: int = 10) -> list[dict]:
    """Conv weights with the largest max|w| / std(w) over one output channel, worst first."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        w = w.reshape(w.shape[0], -1)
        if w.shape[1] < 2:
            continue
        ratio = np.abs(w).max(1) / np.maximum(w.std(1), 1e-30)
        c = int(ratio.argmax())
        rows.append(
            {
                "conv": node.name,
                "channel": c,
                "max_abs_over_std": round(float(ratio[c]), 2),
                "max_abs": float(np.abs(w).max()),
            }
        )
    return sorted(rows, key=lambda r: -r["max_abs_over_std"])[:worst]


def worst_db(sqnr: dict) -> float:
    """The lowest SQNR over the outputs' parts (a detection output's boxes and scores apart): what
    equalization is judged by. The overall figure is dominated by the boxes' pixel values, so it
    would miss a change that only hurts the scores."""
    split = {k.split(" ")[0] for k in sqnr if " " in k}
    return min(v for k, v in sqnr.items() if k != "overall" and k not in split)


def _quantized_outputs(src: Path, dst: Path, calib_inputs, input_sets):
    """Quantizes ``src`` into ``dst`` and runs it on each list of inputs."""
    _quantize(src, dst, calib_inputs)
    session = check.ort_session(dst)
    return [_run(session, inputs) for inputs in input_sets]


def _equalized(src: Path, work: Path, reference, held_inputs) -> tuple[Path, list[dict], float]:
    import onnx

    from .deploy_cle import equalize

    model = onnx.load(str(src))
    records = equalize(model)
    path = work / "equalized.onnx"
    onnx.save(model, str(path))
    outputs = _run(check.ort_session(path), held_inputs)
    error = max(check.rel_error(o, r) for o, r in zip(outputs, reference, strict=True))
    return path, records, error


DECISION_IMAGES = 8  # calibration images that equalization is judged on (the held-out ones only measure)


def _with_equalization(src, dst, work, cle, plain, references, calib_inputs, inputs, names):
    """Equalizes, checks it exact in float, quantizes; keeps it in ``dst`` where it raises the worst
    part's SQNR on calibration images (or ``on``). ``references``, ``plain`` and ``inputs`` are
    (decision, held-out) pairs. Returns the report entry and the chosen model's held-out outputs."""
    (ref_decide, ref_held), (decide_inputs, held_inputs) = references, inputs
    path, records, error = _equalized(src, work, ref_held, held_inputs)
    info: dict = {
        "mode": cle,
        "float_rel_error": error,
        "decided_on": f"{len(decide_inputs)} calibration images, worst output part's SQNR",
        "sqnr_db_without": None,
        "sqnr_db_with": None,
        "heldout_sqnr_db_without": None,
        "heldout_sqnr_db_with": None,
    }
    if plain is not None:
        info["sqnr_db_without"] = worst_db(sqnr_db(ref_decide, plain[0], names))
        info["heldout_sqnr_db_without"] = worst_db(sqnr_db(ref_held, plain[1], names))
    if not error <= CLE_EXACT_BOUND:  # never expected: equalization is exact up to rounding
        info.update(applied=False, pairs=records, reason=f"not exact in float ({error:.3e})")
        if plain is None:
            plain = _quantized_outputs(src, dst, calib_inputs, inputs)
        return info, plain[1]
    equalized = _quantized_outputs(path, work / "equalized-int8.onnx", calib_inputs, inputs)
    info["sqnr_db_with"] = worst_db(sqnr_db(ref_decide, equalized[0], names))
    info["heldout_sqnr_db_with"] = worst_db(sqnr_db(ref_held, equalized[1], names))
    applied = bool(cle == "on" or plain is None or info["sqnr_db_with"] > info["sqnr_db_without"])
    info.update(applied=applied, pairs=[{**r, "applied": applied} for r in records])
    if not applied:
        return info, plain[1]
    shutil.copyfile(work / "equalized-int8.onnx", dst)  # dst: a temporary name in DIR
    return info, equalized[1]


INT8_MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (their axis attribute)


def int8_report(
    model32,
    dst: Path,
    images: list[Path],
    *,
    img: int,
    opset: int,
    calib: int,
    heldout: int = 8,
    cle: str = "auto",
    runs: int = 20,
    float_ms: float | None = None,
    dynamic: bool = False,
) -> dict:
    """Exports ``model32`` (at opset 13 or above; dynamic batch and image size with ``dynamic``, as the
    float ONNX), quantizes it into ``dst`` with cross-layer equalization per ``cle`` (decided on
    calibration images), and measures it on the held-out images."""
    import onnx

    calib_paths, held_paths = _split(images, calib, heldout)
    calib_inputs = [letterbox(p, img) for p in calib_paths]
    held_inputs = [letterbox(p, img) for p in held_paths]
    inputs = (calib_inputs[:DECISION_IMAGES], held_inputs)
    with tempfile.TemporaryDirectory(prefix="mobileone-deploy-") as work_dir:
        work = Path(work_dir)
        src = work / "float.onnx"
        check.export_onnx(model32, src, img, max(opset, INT8_MIN_OPSET), dynamic=dynamic)
        session = check.ort_session(src)
        names = [o.name for o in session.get_outputs()]
        references = (_run(session, inputs[0]), _run(session, inputs[1]))
        cle_info, chosen = None, None
        plain = None if cle == "on" else _quantized_outputs(src, dst, calib_inputs, inputs)
        if cle != "off":
            cle_info, chosen = _with_equalization(
                src, dst, work, cle, plain, references, calib_inputs, inputs, names
            )
        elif plain is not None:
            chosen = plain[1]
        if chosen is None:  # "on" quantizes in _with_equalization, "off" and "auto" above
            raise AssertionError("the int8 model was not run on the held-out images")
        widest = widest_ranges(onnx.load(str(src)))
        float_ms = float_ms if float_ms is not None else check.ort_latency(src, img, runs)
    int8_ms = check.ort_latency(dst, img, runs)
    nc = int(model32.yaml["nc"])
    float_dets = [detections(r[0], nc, conf=0.25) for r in references[1]]
    return {
        "format": "QDQ, Conv only, int8 per-channel symmetric weights, int8 symmetric activations (MinMax)",
        "input_shape": ["batch", 3, "height", "width"] if dynamic else [1, 3, img, img],
        "calibration_images": len(calib_paths),
        "heldout_images": len(held_paths),
        "heldout_requested": heldout,
        "sqnr_db": sqnr_db(references[1], chosen, names),
        "map50_vs_float": map50(float_dets, [detections(o[0], nc, conf=0.001) for o in chosen]),
        "float_detections": int(sum(len(d) for d in float_dets)),
        "latency_ms": {"float": float_ms, "int8": int8_ms},
        "latency_ratio": round(int8_ms / float_ms, 3),
        "opset": max(opset, INT8_MIN_OPSET),
        "widest_range_convs": widest,
        "cle": cle_info,
    }
