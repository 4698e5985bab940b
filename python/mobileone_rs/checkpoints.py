"""MobileOne ImageNet checkpoints from Apple, timm and mmpretrain, renamed to Apple's names.

Three schemas name the same tensors (checked against each library's code: Apple's ml-mobileone
``mobileone.py``, timm's ``byobnet.py`` and mmpretrain's ``models/backbones/mobileone.py``):

=============================  ==============================  ====================================
Apple                          timm                            mmpretrain
=============================  ==============================  ====================================
``stage0.``                    ``stem.``                       ``stage0.``
``stage{k}.{j}.`` (k = 1..4)   ``stages.{k-1}.{j}.``           ``stage{k}.{j}.``
``rbr_conv.{i}.conv.weight``   ``conv_kxk.{i}.conv.weight``    ``branch_conv_list.{i}.conv.weight``
``rbr_conv.{i}.bn.*``          ``conv_kxk.{i}.bn.*``           ``branch_conv_list.{i}.norm.*``
``rbr_scale.conv.weight``      ``conv_scale.conv.weight``      ``branch_scale.conv.weight``
``rbr_scale.bn.*``             ``conv_scale.bn.*``             ``branch_scale.norm.*``
``rbr_skip.*``                 ``identity.*``                  ``branch_norm.*``
``se.reduce.*``                ``attn.fc1.*``                  ``se.conv1.conv.*``
``se.expand.*``                ``attn.fc2.*``                  ``se.conv2.conv.*``
``reparam_conv.*`` (fused)     ``reparam_conv.*``              ``branch_reparam.*``
``linear.*``                   ``head.fc.*``                   ``head.fc.*``
=============================  ==============================  ====================================

The blocks compute the same function in all three: the same branches and paddings, squeeze-excite
as mean -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> sigmoid -> scale, with the same reduced
widths in every S0-S4 block (Apple's ``int(c * 0.0625)``, timm's and mmpretrain's
``make_divisible(c / 16, 8)`` agree for c = 896 and 2048, the only SE widths there are).
"""

from __future__ import annotations

import functools
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .backbone import VARIANTS, mobileone
from .checkpoint_files import CheckpointError, load_checkpoint, naming_the_file

__all__ = ["SOURCES", "CheckpointError", "ConvertedCheckpoint", "convert_checkpoint", "load_checkpoint"]


_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_WB = r"(weight|bias)"


@dataclass(frozen=True)
class _Schema:
    """How one library names the stem, the stage blocks, each block's tensors and the classifier."""

    name: str
    stem: str
    stage: str  # regex with one group: the stage number as the library counts it
    stage_offset: int  # added to that number to get Apple's k
    parts: tuple[tuple[str, str], ...]  # (block-local regex, Apple's name with \1 ...)
    head: str  # regex with one group: weight|bias

    def block(self, key: str) -> tuple[str, str] | None:
        """``(Apple's block prefix, block-local rest)`` of a key, or None."""
        if key.startswith(self.stem + "."):
            return "stage0.", key[len(self.stem) + 1 :]
        match = re.fullmatch(self.stage + r"\.(\d+)\.(.+)", key)
        if match is None:
            return None
        return f"stage{int(match.group(1)) + self.stage_offset}.{match.group(2)}.", match.group(3)

    def rename(self, key: str) -> str | None:
        """Apple's name of ``key``, or None when this schema has no such tensor."""
        head = re.fullmatch(self.head, key)
        if head:
            return f"linear.{head.group(1)}"
        block = self.block(key)
        if block is None:
            return None
        prefix, rest = block
        for pattern, apple in self.parts:
            match = re.fullmatch(pattern, rest)
            if match:
                return prefix + match.expand(apple)
        return None


_SCHEMAS = (
    _Schema(
        "apple",
        "stage0",
        r"stage([1-4])",
        0,
        (
            (r"rbr_conv\.(\d+)\.conv\.weight", r"rbr_conv.\1.conv.weight"),
            (rf"rbr_conv\.(\d+)\.bn\.{_BN}", r"rbr_conv.\1.bn.\2"),
            (r"rbr_scale\.conv\.weight", r"rbr_scale.conv.weight"),
            (rf"rbr_scale\.bn\.{_BN}", r"rbr_scale.bn.\1"),
            (rf"rbr_skip\.{_BN}", r"rbr_skip.\1"),
            (rf"se\.reduce\.{_WB}", r"se.reduce.\1"),
            (rf"se\.expand\.{_WB}", r"se.expand.\1"),
            (rf"reparam_conv\.{_WB}", r"reparam_conv.\1"),
        ),
        rf"linear\.{_WB}",
    ),
    _Schema(
        "timm",
        "stem",
        r"stages\.([0-3])",
        1,
        (
            (r"conv_kxk\.(\d+)\.conv\.weight", r"rbr_conv.\1.conv.weight"),
            (rf"conv_kxk\.(\d+)\.bn\.{_BN}", r"rbr_conv.\1.bn.\2"),
            (r"conv_scale\.conv\.weight", r"rbr_scale.conv.weight"),
            (rf"conv_scale\.bn\.{_BN}", r"rbr_scale.bn.\1"),
            (rf"identity\.{_BN}", r"rbr_skip.\1"),
            (rf"attn\.fc1\.{_WB}", r"se.reduce.\1"),
            (rf"attn\.fc2\.{_WB}", r"se.expand.\1"),
            (rf"reparam_conv\.{_WB}", r"reparam_conv.\1"),
        ),
        rf"head\.fc\.{_WB}",
    ),
    _Schema(
        "mmpretrain",
        "stage0",
        r"stage([1-4])",
        0,
        (
            (r"branch_conv_list\.(\d+)\.conv\.weight", r"rbr_conv.\1.conv.weight"),
            (rf"branch_conv_list\.(\d+)\.norm\.{_BN}", r"rbr_conv.\1.bn.\2"),
            (r"branch_scale\.conv\.weight", r"rbr_scale.conv.weight"),
            (rf"branch_scale\.norm\.{_BN}", r"rbr_scale.bn.\1"),
            (rf"branch_norm\.{_BN}", r"rbr_skip.\1"),
            (rf"se\.conv1\.conv\.{_WB}", r"se.reduce.\1"),
            (rf"se\.conv2\.conv\.{_WB}", r"se.expand.\1"),
            (rf"branch_reparam\.{_WB}", r"reparam_conv.\1"),
        ),
        rf"head\.fc\.{_WB}",
    ),
)
SOURCES = tuple(s.name for s in _SCHEMAS)
# Wrappers in front of the model's own names: DistributedDataParallel, mmpretrain's ImageClassifier.
_WRAPPER_PREFIXES = ("module.", "backbone.")
_NESTING_KEYS = ("state_dict", "model")


class ConvertedCheckpoint(OrderedDict):
    """Apple-named tensors (a plain ``OrderedDict`` for ``load_state_dict`` and pickling) plus what
    :func:`convert_checkpoint` found out.

    Attributes:
        source: the schema the keys were in: ``"apple"``, ``"timm"`` or ``"mmpretrain"``.
        fused: True when every block is re-parameterized (``reparam_conv``), False when none is,
            None when the checkpoint mixes both.
        variant: ``"s0"`` .. ``"s4"`` when every tensor has the name and shape of that variant of
            Apple's network (the classifier may have any number of classes, or be absent), else None.
        num_classes: the classifier's outputs, None without a classifier.
    """

    source: str = ""
    fused: bool | None = None
    variant: str | None = None
    num_classes: int | None = None

    def __reduce_ex__(self, protocol):  # saved as a plain OrderedDict (loads with weights_only=True)
        return (OrderedDict, (list(self.items()),))

    def summary(self) -> str:
        """One line: schema, train-time or fused, variant, classes, tensor count."""
        mode = {True: "fused (inference)", False: "train-time", None: "partly fused"}[self.fused]
        arch = f"MobileOne-{self.variant.upper()}" if self.variant else "not one of Apple's S0-S4"
        head = f"{self.num_classes}-class classifier" if self.num_classes is not None else "no classifier"
        return f"{self.source} schema, {mode}, {arch}, {head}, {len(self)} tensors"


def _state_dict(obj) -> Mapping:
    """The tensor mapping inside a checkpoint: the mapping itself, or what it nests under
    ``state_dict`` / ``model`` (a module's state_dict), level after level."""
    for _ in range(8):
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"expected a state dict (a mapping of tensors), got {type(obj).__name__}")
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        nested = next((obj[k] for k in _NESTING_KEYS if k in obj), None)
        if nested is None:
            others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise CheckpointError(
                "no state dict found: the mapping holds non-tensor entries "
                f"{sorted(map(str, others))[:8]} and no 'state_dict' or 'model' entry"
            )
        obj = nested
    raise CheckpointError("no state dict found within 8 levels of 'state_dict' / 'model' nesting")


def _strip_wrappers(state: Mapping) -> OrderedDict:
    out = OrderedDict()
    for key, value in state.items():
        name = str(key)
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise CheckpointError(f"two tensors are named {name!r} once 'module.'/'backbone.' are removed")
        out[name] = value
    return out


def _renamed(schema: _Schema, state: Mapping) -> tuple[OrderedDict, list[str]]:
    """Apple-named tensors and the keys this schema cannot map."""
    out, unmapped = OrderedDict(), []
    for key, value in state.items():
        apple = schema.rename(key)
        if apple is None:
            unmapped.append(key)
        else:
            out[apple] = value
    return out, unmapped


def _list(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _convert(state: Mapping, source: str) -> tuple[str, OrderedDict]:
    if source != "auto":
        schema = next((s for s in _SCHEMAS if s.name == source), None)
        if schema is None:
            raise CheckpointError(f"source must be 'auto' or one of {', '.join(SOURCES)}, got {source!r}")
        out, unmapped = _renamed(schema, state)
        if unmapped:
            raise CheckpointError(f"{len(unmapped)} keys are not {source} MobileOne names: {_list(unmapped)}")
        return source, out
    results = [(s.name, *_renamed(s, state)) for s in _SCHEMAS]
    complete = [r for r in results if not r[2]]
    if len(complete) == 1:
        return complete[0][0], complete[0][1]
    if len(complete) > 1:
        names = " and ".join(r[0] for r in complete)
        raise CheckpointError(f"the keys fit both the {names} schemas; pass source= to choose")
    name, out, unmapped = min(results, key=lambda r: len(r[2]))
    raise CheckpointError(
        f"not a MobileOne checkpoint in Apple's, timm's or mmpretrain's names: read as {name} "
        f"(the closest), {len(unmapped)} of {len(state)} keys have no Apple name: {_list(unmapped)}"
    )


def _block_prefixes(state: Mapping) -> dict[str, bool]:
    """Each block's prefix and whether it is fused."""
    blocks: dict[str, bool] = {}
    for key in state:
        match = re.match(r"(stage0\.|stage\d\.\d+\.)(\w+)", key)
        if match and match.group(2) != "se":
            blocks[match.group(1)] = blocks.get(match.group(1), False) or match.group(2) == "reparam_conv"
    return blocks


@functools.cache
def _variant_shapes(name: str, fused: bool) -> dict[str, tuple[int, ...]]:
    """Apple's names and shapes of one variant, classifier and num_batches_tracked left out."""
    with torch.device("meta"):
        model = mobileone(name, inference_mode=fused)
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not k.startswith("linear.") and not k.endswith("num_batches_tracked")
    }


def _find_variant(state: Mapping, fused: bool | None) -> str | None:
    if fused is None:
        return None
    shapes = {
        k: tuple(v.shape)
        for k, v in state.items()
        if not k.startswith("linear.") and not k.endswith("num_batches_tracked")
    }
    for name, spec in VARIANTS.items():
        if shapes != _variant_shapes(name, fused):
            continue
        weight = state.get("linear.weight")
        if weight is None or (weight.ndim == 2 and weight.shape[1] == spec.features):
            return name
    return None


def convert_checkpoint(obj, source: str = "auto", weights_only: bool = True) -> ConvertedCheckpoint:
    """A MobileOne checkpoint's tensors under Apple's names (``mobileone(variant)`` loads them strictly).

    Args:
        obj: a path (``torch.load`` with ``weights_only=True``, or ``.safetensors``), a state dict, a
            dict nesting one under ``state_dict`` / ``model`` (at any depth), or a module. Keys may carry
            ``module.`` (DDP) and ``backbone.`` (mmpretrain's ImageClassifier) prefixes.
        source: ``"auto"`` (detect), ``"apple"``, ``"timm"`` or ``"mmpretrain"``.
        weights_only: for a path, ``torch.load``'s: pass False only for a file you trust.

    Returns:
        A :class:`ConvertedCheckpoint`: the tensors (not copied) in the checkpoint's order, with the
        detected ``source``, ``fused``, ``variant`` and ``num_classes``.

    Raises:
        CheckpointError: the file cannot be read, or any key has no Apple name (all such keys are
            listed: nothing is dropped). For a path, the message starts with it.
    """
    if isinstance(obj, (str, os.PathLike)):
        with naming_the_file(obj):
            return _converted(load_checkpoint(obj, weights_only=weights_only), source)
    return _converted(obj, source)


def _converted(obj, source: str) -> ConvertedCheckpoint:
    state = _strip_wrappers(_state_dict(obj))
    if not state:
        raise CheckpointError("the state dict is empty")
    name, renamed = _convert(state, source)
    out = ConvertedCheckpoint(renamed)
    blocks = _block_prefixes(out)
    fused_count = sum(blocks.values())
    out.source = name
    out.fused = True if blocks and fused_count == len(blocks) else False if fused_count == 0 else None
    out.variant = _find_variant(out, out.fused)
    out.num_classes = out["linear.weight"].shape[0] if "linear.weight" in out else None
    return out
