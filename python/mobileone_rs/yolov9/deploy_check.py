"""Measurements of the deploy step: output errors, ONNX export and its ONNX Runtime check, sizes, latency."""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

FLOAT64_BOUND = 1e-9  # float64 rounding after ~100 chained layers
FLOAT32_BOUND = (
    1e-3  # float32 rounding: fused vs unfused, ONNX Runtime vs torch (the docs' bound; ~1e-5 seen)
)


def rel_error(actual: list, expected: list) -> float:
    """Largest ``max|a - b| / max|b|`` over the tensors; a detection output's boxes (pixels, its first four
    channels) and scores (0..1, the rest) are measured apart, so neither hides the other's error."""
    errs = []
    for a, b in zip(actual, expected, strict=True):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        if a.shape != b.shape:
            return float("inf")
        parts = [(a[:, :4], b[:, :4]), (a[:, 4:], b[:, 4:])] if a.dim() == 3 and a.shape[1] > 4 else [(a, b)]
        for x, y in parts:
            if not torch.isfinite(x).all():
                return float("inf")
            errs.append(((x - y).abs().max() / y.abs().max().clamp_min(1e-300)).item())
    return max(errs)


def check_sizes(img: int, stride: int) -> list[tuple[int, int]]:
    """Two input sizes (height, width): the deploy size and a non-square one a stride away."""
    other = img - stride if img > 2 * stride else img + stride
    return [(img, img), (other, img)]


def random_input(size: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *size, generator=gen, dtype=torch.float64).to(dtype)


def model_size(model: nn.Module, img: int = 640) -> dict:
    """Layers (modules), parameters and GFLOPs at ``img`` x ``img`` (640: as YOLOv9's model_info prints
    them), counted as model_info does."""
    params = sum(p.numel() for p in model.parameters())
    return {"layers": len(list(model.modules())), "params": params, "gflops": _gflops(model, img)}


def _gflops(model: nn.Module, img: int) -> float | None:
    try:
        import thop
    except ImportError:
        return None
    p = next(model.parameters())
    stride = max(int(cast(torch.Tensor, model.stride).max()), 32)  # YOLOv9 models hold a stride tensor
    im = torch.zeros((1, 3, stride, stride), dtype=p.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flops = thop.profile(copy.deepcopy(model), inputs=(im,), verbose=False)[0] / 1e9 * 2
    return round(flops * img / stride * img / stride, 1)


def export_mode(model: nn.Module, dynamic: bool = False) -> nn.Module:
    """A copy whose head returns plain tensors, as export.py sets it up before exporting."""
    model = copy.deepcopy(model).float().eval()
    for m in model.modules():
        if hasattr(m, "export") and hasattr(m, "nl"):
            head: Any = m  # YOLOv9's detection head: untyped
            head.export, head.dynamic = True, dynamic
    return model


def output_names(model: nn.Module) -> list[str]:
    segment = hasattr(cast(nn.Sequential, model.model)[-1], "proto")  # a YOLOv9 model's layers
    return ["output0", "output1"] if segment else ["output0"]


def export_onnx(model: nn.Module, path: Path, img: int, opset: int, dynamic: bool) -> None:
    """``model`` (export mode, float32) to ONNX as upstream's export.py writes it (TorchScript exporter)."""
    model = export_mode(model, dynamic)
    names = output_names(model)
    axes = None
    if dynamic:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}}
        axes.update(
            {name: {0: "batch", 2: "anchors"} if name == "output0" else {0: "batch"} for name in names}
        )
    im = torch.zeros(1, 3, img, img)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (im,),
            str(path),
            opset_version=opset,
            do_constant_folding=True,
            input_names=["images"],
            output_names=names,
            dynamic_axes=axes,
            dynamo=False,
        )


def ort_session(path: Path, spinning: bool = False):
    """A CPU session. Only a timed one spins its threads between runs (ORT's default): an idle spinning
    session slows whatever runs next, torch included."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_export_outputs(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = export_mode(model)(x.float())
    out = [out] if isinstance(out, torch.Tensor) else list(out)
    return [t.numpy() for t in out]


def median_ms(run, runs: int) -> float:
    """Median wall time of ``run()`` in milliseconds, after one warm-up call."""
    run()
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


def torch_latency(model: nn.Module, img: int, runs: int) -> float:
    model = export_mode(model)
    x = torch.rand(1, 3, img, img)

    def run():
        with torch.inference_mode():
            model(x)

    return median_ms(run, runs)


def ort_latency(path: Path, img: int, runs: int) -> float:
    """Median ONNX Runtime CPU latency of the model at ``path`` (a fresh session, ORT's default options)."""
    session = ort_session(path, spinning=True)
    x = np.random.default_rng(0).random((1, 3, img, img), dtype=np.float32)
    return median_ms(lambda: session.run(None, {"images": x}), runs)  # the session ends with this call
