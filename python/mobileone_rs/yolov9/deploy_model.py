"""The deploy model: a YOLOv9 checkpoint's main branch rebuilt from the stripped yaml, then fused.

Every kept layer is the checkpoint's own module (moved, not re-created, so each BatchNorm's eps, each
block's options and activations stay as trained) after its parameter names and shapes were checked
against the layer that the deploy yaml builds; the single head is built by YOLOv9 and loads the dual
head's main-half tensors (``cv4/cv5/dfl2`` -> ``cv2/cv3/dfl``, as upstream's reparameterization
notebook maps them).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..modules import MobileOneBlock
from ..reparameterize import reparameterize_model
from .deploy_graph import DUAL_HEADS, DeployError, Stripped

YOLO_LOGGER = "yolov5"  # YOLOv9's LOGGER name (utils/general.py)


@contextlib.contextmanager
def quiet_yolo():
    """YOLOv9's model-building and fuse() printouts silenced (its logger does not propagate)."""
    logger = logging.getLogger(YOLO_LOGGER)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """YOLOv9's fuse_conv_and_bn builds its conv in the default dtype: fusing in float64 needs this."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_checkpoint(path: Path) -> tuple[dict, nn.Module]:
    """``(checkpoint dict, model)`` of a YOLOv9 checkpoint (its ``ema`` if set, else ``model``)."""
    if not path.is_file():
        raise DeployError(f"{path}: no such file")
    try:  # a YOLOv9 checkpoint pickles its model, as YOLOv9's own attempt_load trusts it
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:
        raise DeployError(
            f"{path}: needs the module {err.name!r} to load; run from the YOLOv9 checkout (its models/ "
            "importable), with mobileone_rs installed"
        ) from err
    except Exception as err:
        raise DeployError(f"{path}: not a torch checkpoint ({type(err).__name__}: {err})") from err
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if (
        not isinstance(model, nn.Module)
        or not isinstance(getattr(model, "yaml", None), dict)
        or not isinstance(getattr(model, "model", None), nn.Sequential)
    ):
        raise DeployError(f"{path}: not a YOLOv9 checkpoint (no 'model' or 'ema' entry with a model yaml)")
    return ckpt, model


def yolo_module(model: nn.Module):
    """The ``models.yolo`` module (upstream's, or ``yolo9.models.yolo``) that the model's class comes from."""
    module = sys.modules.get(type(model).__module__)
    if module is None or not hasattr(module, "Model") or not hasattr(module, "parse_model"):
        raise DeployError(f"the checkpoint's model is a {type(model).__name__}, not a YOLOv9 DetectionModel")
    return module


def fused_parts(model: nn.Module) -> list[str]:
    """Names of the modules that are already fused (a checkpoint written after ``fuse()``)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, MobileOneBlock) and m.inference_mode:
            out.append(name)
        elif hasattr(m, "forward_fuse") and hasattr(m, "conv") and not hasattr(m, "bn") and hasattr(m, "act"):
            out.append(name)  # YOLOv9's Conv after fuse_conv_and_bn
        elif hasattr(m, "fuse_convs") and hasattr(m, "conv") and not hasattr(m, "conv1"):
            out.append(name)  # RepConvN after fuse_convs
    return out


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _head_state(dual_head: nn.Module, renames) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in dual_head.state_dict().items():
        for old, new in renames:
            if key.startswith(old):
                state[new + key[len(old) :]] = value
    return state


def _copy_bn_settings(source: nn.Module, target: nn.Module, renames) -> None:
    bns = dict(source.named_modules())
    for name, m in target.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            for old, new in renames:
                if (name + ".").startswith(new):
                    src = bns[old + name[len(new) :]]
                    m.eps, m.momentum = src.eps, src.momentum


def build_deploy_model(dual: nn.Module, stripped: Stripped) -> nn.Module:
    """The unfused single-head model (float32 head, the kept layers' own modules) from a dual model.

    ``dual`` is consumed: its kept layers move into the result.
    """
    yolo = yolo_module(dual)
    yaml, layers = cast(dict, dual.yaml), cast(nn.Sequential, dual.model)  # as load_checkpoint checked
    dtype = next(dual.parameters()).dtype
    try:
        with quiet_yolo(), default_dtype(torch.float32):
            deploy = yolo.Model(copy.deepcopy(stripped.yaml), ch=yaml.get("ch", 3), nc=yaml["nc"])
    except Exception as err:
        raise DeployError(f"the deploy yaml does not build: {type(err).__name__}: {err}") from err
    for new, old in enumerate(stripped.kept):
        built, trained = deploy.model[new], layers[old]
        if type(built).__name__ != type(trained).__name__ or _shapes(built) != _shapes(trained):
            raise DeployError(
                f"yaml layer {old} ({type(trained).__name__}) does not rebuild as deploy layer {new}"
            )
        trained.i, trained.f = built.i, built.f
        deploy.model[new] = trained
    head = deploy.model[-1]
    dual_head: Any = layers[-1]  # YOLOv9's dual head (untyped: stride, inplace)
    state = _head_state(dual_head, stripped.renames)
    if _shapes(head) != {k: tuple(v.shape) for k, v in state.items()}:
        raise DeployError(
            f"the {stripped.head} head's main half does not fit a {DUAL_HEADS[stripped.head].single}"
        )
    head.load_state_dict(state)
    _copy_bn_settings(dual_head, head, stripped.renames)
    head.stride, head.inplace = dual_head.stride.clone(), getattr(dual_head, "inplace", True)
    deploy.stride = cast(torch.Tensor, dual.stride).clone()
    for key in ("names", "hyp", "nc", "args", "class_weights"):
        if hasattr(dual, key):
            setattr(deploy, key, copy.deepcopy(getattr(dual, key)))
    deploy.yaml_file = getattr(dual, "yaml_file", "model.yaml")
    return deploy.to(dtype)


def fuse_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype``, eval, with YOLOv9's ``fuse()`` (Conv+BN, RepConvN) and every MobileOne block
    fused (in place; the fuse is computed in ``dtype``)."""
    model = model.to(dtype).eval()
    yolo_model: Any = model  # YOLOv9's model: fuse() is untyped
    with quiet_yolo(), default_dtype(dtype), torch.no_grad():
        yolo_model.fuse()
        reparameterize_model(model, inplace=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def main_output(output, head: str) -> list[torch.Tensor]:
    """The tensors the main head infers: index 1 of a dual head's list, the whole single-head output."""
    first = output[0] if isinstance(output, tuple) else output
    if head in ("DualDetect", "DualDDetect"):
        first = first[1]
    tensors = [first]
    if head.endswith("Segment") and isinstance(output, tuple):
        tensors.append(output[1][2])  # the main head's protos (DualDSegment returns only the main's)
    return tensors
