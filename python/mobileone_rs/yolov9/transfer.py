"""A warning when a training script starts from fused MobileOne weights, which it cannot use.

YOLOv9's training scripts load ``--weights`` partially: ``intersect_dicts`` keeps the checkpoint's
tensors whose names and shapes the new (train-time) model has. A fused (re-parameterized) MobileOne
block holds one ``reparam_conv``; the train-time block has ``rbr_conv`` / ``rbr_scale`` / ``rbr_skip``
branches instead, so none of its weights transfer, and the script only reports
``Transferred 183/2359 items``. The patch's runtime edit makes ``intersect_dicts`` call
:func:`warn_fused_mobileone` first, which says so.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Mapping

from .source_text import end_lineno, indent_of, insert_after_line

WARNING_FUNCTION = "warn_fused_mobileone"
_TRAIN_TIME = ".rbr_conv.0.conv.weight"
_FUSED = ".reparam_conv.weight"


class FusedWeightsWarning(UserWarning):
    """A checkpoint's fused MobileOne blocks meet a train-time model: their weights are not loaded."""


def fused_blocks(checkpoint: Mapping, model: Mapping) -> list[str]:
    """Block prefixes that are fused in ``checkpoint`` and train-time in ``model`` (two state dicts)."""
    blocks = [key[: -len(_TRAIN_TIME)] for key in model if key.endswith(_TRAIN_TIME)]
    return [p for p in blocks if p + _FUSED in checkpoint and p + _TRAIN_TIME not in checkpoint]


def warn_fused_mobileone(checkpoint: Mapping, model: Mapping) -> None:
    """Warns when ``checkpoint`` holds fused MobileOne blocks where ``model`` trains unfused ones."""
    blocks = fused_blocks(checkpoint, model)
    if not blocks:
        return
    layers = sorted({p.split(".")[1] for p in blocks if p.startswith("model.")}, key=lambda x: (len(x), x))
    where = f" (layers {', '.join(layers)})" if layers else ""
    warnings.warn(
        f"the checkpoint's {len(blocks)} MobileOne blocks{where} are fused (re-parameterized: one "
        "reparam_conv each) but the model trains unfused blocks: their weights are NOT transferred and those "
        "layers start from scratch. Start training from a train-time checkpoint (last.pt / best.pt as "
        "training saved them, or python -m mobileone_rs.pretrained); a fused model is for inference only.",
        FusedWeightsWarning,
        stacklevel=3,
    )


def warn_in_intersect_dicts(text: str) -> str:
    """``utils/general.py``: ``intersect_dicts(da, db, ...)`` first calls :func:`warn_fused_mobileone`."""
    if "def intersect_dicts" not in text:
        return text
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    function = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "intersect_dicts"), None
    )
    if function is None or len(function.args.args) < 2 or WARNING_FUNCTION in ast.unparse(function):
        return text
    da, db = (a.arg for a in function.args.args[:2])
    first = function.body[0]
    if first.lineno == function.lineno:  # a one-line function: left alone
        return text
    docstring = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
    after = end_lineno(first) if docstring else first.lineno - 1
    indent = indent_of(text, first.lineno)
    return insert_after_line(
        text,
        after,
        [
            f"{indent}from mobileone_rs.yolov9.transfer import {WARNING_FUNCTION}  # fused weights: warn",
            f"{indent}{WARNING_FUNCTION}({da}, {db})",
        ],
    )
