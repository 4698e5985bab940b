"""From a trained YOLOv9(-MobileOne) checkpoint to a verified single-head fused model, ONNX and INT8.

``python -m mobileone_rs.deploy WEIGHTS --out DIR [--int8 IMAGES] [--img 640] [--half]``, run in the
YOLOv9 checkout, or :func:`deploy` in Python. In DIR: ``<stem>-deploy.yaml`` (the main branch by graph
analysis, :mod:`.deploy_graph`), ``<stem>-deploy.pt`` (YOLOv9's checkpoint format, fused: every MobileOne
block, RepConvN and Conv+BN), ``<stem>-deploy.onnx``, with ``--int8`` ``<stem>-deploy-int8.onnx``, and
``report.json``. Nothing is written unless the deploy model equals the training model's main head (float64
and float32) and ONNX Runtime equals torch; every file appears whole or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path
from typing import cast

import torch
from torch import nn

from .._native import MobileOneError
from ..files import WriteError, replacing, write_text
from . import deploy_check as check
from .deploy_graph import (
    DUAL_HEADS,
    SINGLE_HEADS,
    DeployError,
    Stripped,
    check_dual_head,
    head_kind,
    strip_dual_head,
)
from .deploy_model import build_deploy_model, fuse_model, fused_parts, load_checkpoint, main_output
from .deploy_report import DeployReport, yaml_text

__all__ = ["DeployError", "DeployReport", "deploy", "deploy_model", "main"]


def _main_outputs(model, x, head):
    with torch.no_grad():
        return main_output(model(x), head)


def _deploy_model(model, stripped, dtype):
    """The fused single-head model in ``dtype`` (fusing computed in ``dtype``, at least float32)."""
    source = copy.deepcopy(model).to(dtype)
    single = source if stripped is None else build_deploy_model(source, stripped)
    return fuse_model(single, dtype)


def deploy_model(model, dtype: torch.dtype = torch.float32):
    """The fused single-head model of a YOLOv9 training model (left unchanged), fused in ``dtype``.

    What :func:`deploy` saves, without the files and the checks: the main branch by graph analysis of
    ``model.yaml``, the kept layers' own modules, every MobileOne block, RepConvN and Conv+BN fused.
    A model without an auxiliary head is fused only. Raises ``DeployError`` on a head it does not cover.
    """
    head = head_kind(model.yaml)
    stripped = None
    if head not in SINGLE_HEADS:
        check_dual_head(head)
        stripped = strip_dual_head(model.yaml)
    return _deploy_model(model, stripped, dtype)


def _verify(model, stripped, head, img) -> tuple[nn.Module, dict[str, float]]:
    """The float32 deploy model and its errors against the training model's main head."""
    single_head = head if stripped is None else DUAL_HEADS[head].single
    stride = int(model.stride.max())
    errors = {}
    reference64 = copy.deepcopy(model).double().eval()
    deploy64 = _deploy_model(model, stripped, torch.float64)
    for seed, size in enumerate(check.check_sizes(img, stride)):
        x = check.random_input(size, torch.float64, seed)
        errors[f"float64 {size[0]}x{size[1]}"] = check.rel_error(
            _main_outputs(deploy64, x, single_head), _main_outputs(reference64, x, head)
        )
    del reference64, deploy64
    deploy32 = _deploy_model(model, stripped, torch.float32)
    x = check.random_input((img, img), torch.float32, 0)
    errors[f"float32 {img}x{img}"] = check.rel_error(
        _main_outputs(deploy32, x, single_head), _main_outputs(copy.deepcopy(model).float().eval(), x, head)
    )
    return deploy32, errors


def _bounds(errors: dict) -> dict[str, float]:
    return {k: check.FLOAT64_BOUND if k.startswith("float64") else check.FLOAT32_BOUND for k in errors}


def _refuse_failures(errors: dict, bounds: dict) -> None:
    failed = [f"{k}: {v:.3e} > {bounds[k]:.0e}" for k, v in errors.items() if not v <= bounds[k]]
    if failed:
        raise DeployError("verification failed, nothing written: " + "; ".join(failed))


def _half(deploy32: nn.Module) -> tuple[nn.Module, dict]:
    half = copy.deepcopy(deploy32).half()
    overflow = [
        name
        for (name, a), b in zip(deploy32.state_dict().items(), half.state_dict().values(), strict=True)
        if a.is_floating_point() and torch.isfinite(a).all() and not torch.isfinite(b).all()
    ]
    if overflow:
        raise DeployError(
            f"--half: {len(overflow)} fused tensors overflow float16 ({', '.join(overflow[:5])}); "
            "deploy without --half"
        )
    x = check.random_input((64, 64), torch.float32, 0)
    err = check.rel_error(
        check.torch_export_outputs(copy.deepcopy(half).float(), x), check.torch_export_outputs(deploy32, x)
    )
    return half, {"overflow": [], "rel_error": err}


def _prepare_out(out: Path, stem: str, int8: bool) -> dict[str, Path]:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DeployError(f"cannot create {out}: {err.strerror or err}") from err
    names = {"yaml": f"{stem}-deploy.yaml", "pt": f"{stem}-deploy.pt", "onnx": f"{stem}-deploy.onnx"}
    if int8:
        names["int8"] = f"{stem}-deploy-int8.onnx"
    names["report"] = "report.json"
    paths = {k: out / v for k, v in names.items()}
    try:
        from ..files import check_writable

        check_writable(paths.values())
    except WriteError as err:
        raise DeployError(str(err)) from err
    return paths


def _check_arguments(*, img, opset, calib, heldout, runs, cle) -> None:
    """Refuses, with the option's name, a value deploy cannot use (before any work is done)."""
    for name, value in (
        ("img", img),
        ("opset", opset),
        ("calib", calib),
        ("heldout", heldout),
        ("runs", runs),
    ):
        if type(value) is not int:
            raise DeployError(f"--{name} {value!r}: must be an integer")
    if img % 32 or img <= 0:
        raise DeployError(f"--img {img}: must be a positive multiple of 32 (the detector's largest stride)")
    for name, value in (("calib", calib), ("heldout", heldout), ("runs", runs)):
        if value < 1:
            raise DeployError(f"--{name} {value}: must be at least 1")
    if opset < MIN_OPSET:
        raise DeployError(f"--opset {opset}: must be at least {MIN_OPSET} (export.py's default is 12)")
    if cle not in ("auto", "on", "off"):
        raise DeployError(f"--cle {cle!r}: must be auto, on or off")


MIN_OPSET = 9  # torch's TorchScript exporter folds constants from 9 on (its highest: the installed torch's)


def _require_packages(int8: bool) -> None:
    """One clear line, before any work, when a package deploy needs is not installed."""
    import importlib.util

    needed = ["onnx", "onnxruntime"] + (["cv2"] if int8 else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join("opencv-python (cv2)" if m == "cv2" else m for m in missing)
        raise DeployError(
            f"deploy needs {names}, not installed: pip install 'mobileone-rs[deploy]' "
            "(onnx, onnxruntime; YOLOv9's requirements.txt installs opencv-python)"
        )


def _load(weights: Path) -> tuple[dict, nn.Module, str, Stripped | None]:
    ckpt, model = load_checkpoint(weights)
    fused = fused_parts(model)
    if fused:
        raise DeployError(
            f"{weights} holds a fused model ({len(fused)} fused modules, e.g. {fused[0]}): deploy "
            "needs the training checkpoint that train_dual.py / train.py wrote (last.pt, best.pt)"
        )
    yaml = cast(dict, model.yaml)  # load_checkpoint checked it is a dict
    head = head_kind(yaml)
    if head in SINGLE_HEADS:
        return ckpt, model, head, None
    check_dual_head(head)
    return ckpt, model, head, strip_dual_head(yaml)


def deploy(
    weights,
    out,
    *,
    img: int = 640,
    half: bool = False,
    int8=None,
    opset: int = 12,
    dynamic: bool = False,
    calib: int = 100,
    heldout: int = 8,
    cle: str = "auto",
    runs: int = 20,
) -> DeployReport:
    """Deploys a YOLOv9 training checkpoint into ``out``; see the module docstring. Returns the report.

    Raises ``DeployError`` (a ``MobileOneError``) with one clear line on any input it cannot deploy.
    """
    weights, out = Path(weights), Path(out)
    _check_arguments(img=img, opset=opset, calib=calib, heldout=heldout, runs=runs, cle=cle)
    _require_packages(int8 is not None)
    ckpt, model, head, stripped = _load(weights)
    images = None
    if int8 is not None:
        from .deploy_int8 import find_images

        images = find_images(Path(int8), heldout)
    paths = _prepare_out(out, weights.stem, images is not None)
    model = model.float().eval()
    deploy32, errors = _verify(model, stripped, head, img)
    bounds = _bounds(errors)
    _refuse_failures(errors, bounds)
    report = DeployReport(
        weights=str(weights),
        out=str(out),
        head=head,
        deploy_head=head if stripped is None else DUAL_HEADS[head].single,
        note="no auxiliary branch: fused and verified only" if stripped is None else "",
        models={
            "training": check.model_size(model),
            "fused_dual": check.model_size(fuse_model(copy.deepcopy(model), torch.float32)),
            "deploy": check.model_size(deploy32),
        },
        errors=errors,
        bounds=bounds,
    )
    saved = deploy32
    if half:
        saved, report.half = _half(deploy32)
    _write(
        paths,
        ckpt,
        saved,
        deploy32,
        stripped,
        model,
        report,
        img=img,
        opset=opset,
        dynamic=dynamic,
        images=images,
        int8={"calib": calib, "heldout": heldout, "cle": cle, "dynamic": dynamic},
        runs=runs,
    )
    return report


def _write(
    paths, ckpt, saved, deploy32, stripped, model, report, *, img, opset, dynamic, images, int8, runs
) -> None:
    """Every file to a temporary name, checked, then moved into place (the report last)."""
    torch_ms = check.torch_latency(deploy32, img, runs)  # first: no ONNX Runtime threads around yet
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(replacing(p)) for k, p in paths.items() if k != "report"}
        d = stripped.yaml if stripped is not None else model.yaml
        tmp["yaml"].write_text(
            yaml_text(
                d,
                getattr(model, "yaml_file", "the model"),
                stripped.kept if stripped else list(range(len(d["backbone"] + d["head"]))),
            )
        )
        meta = {k: v for k, v in ckpt.items() if k in ("date", "git", "opt")}
        torch.save(
            {
                "model": saved,
                "ema": None,
                "optimizer": None,
                "updates": None,
                "epoch": -1,
                **meta,
                "deploy": {"source": report.weights, "head": report.deploy_head},
            },
            tmp["pt"],
        )
        try:
            check.export_onnx(deploy32, tmp["onnx"], img, opset, dynamic)
        except (RuntimeError, ValueError) as err:  # e.g. an opset this torch's exporter lacks
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DeployError(f"ONNX export at --opset {opset} failed, nothing written: {first}") from err
        session = check.ort_session(tmp["onnx"])
        x = check.random_input((img, img), torch.float32, 2)
        report.errors["onnxruntime vs torch float32"] = check.rel_error(
            session.run(None, {"images": x.numpy()}), check.torch_export_outputs(deploy32, x)
        )
        report.bounds["onnxruntime vs torch float32"] = check.FLOAT32_BOUND
        _refuse_failures(report.errors, report.bounds)
        del session
        report.latency_ms = {"torch": torch_ms, "onnxruntime": check.ort_latency(tmp["onnx"], img, runs)}
        if images is not None:
            from .deploy_int8 import int8_report

            report.int8 = int8_report(
                deploy32,
                tmp["int8"],
                images,
                img=img,
                opset=opset,
                runs=runs,
                **int8,
                float_ms=report.latency_ms["onnxruntime"],
            )
        report.files = {k: str(p) for k, p in paths.items()}
        write_text(paths["report"], report.to_json())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mobileone_rs.deploy", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "weights", help="a checkpoint that YOLOv9's train_dual.py / train.py wrote (last.pt, best.pt)"
    )
    p.add_argument("--out", required=True, help="folder for the deploy files (created if absent)")
    p.add_argument(
        "--img", type=int, default=640, help="image size of the checks, ONNX and INT8 (default 640)"
    )
    p.add_argument("--half", action="store_true", help="save the .pt in float16 (fusing runs in float32)")
    p.add_argument(
        "--int8", metavar="IMAGES", help="a folder of images: write an INT8 ONNX (QDQ) and measure it"
    )
    p.add_argument(
        "--calib", type=int, default=100, help="at most this many calibration images (default 100)"
    )
    p.add_argument("--heldout", type=int, default=8, help="images held out to measure INT8 (default 8)")
    p.add_argument(
        "--cle",
        choices=["auto", "on", "off"],
        default="auto",
        help="cross-layer equalization before INT8: where it raises SQNR (auto), always, never",
    )
    p.add_argument("--opset", type=int, default=12, help="ONNX opset (default 12, as export.py)")
    p.add_argument(
        "--dynamic", action="store_true", help="ONNX with dynamic batch and image size, as export.py"
    )
    p.add_argument("--runs", type=int, default=20, help="timed runs per latency median (default 20)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = deploy(
            args.weights,
            args.out,
            img=args.img,
            half=args.half,
            int8=args.int8,
            opset=args.opset,
            dynamic=args.dynamic,
            calib=args.calib,
            heldout=args.heldout,
            cle=args.cle,
            runs=args.runs,
        )
    except (MobileOneError, WriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0
