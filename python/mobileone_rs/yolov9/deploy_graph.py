"""The single-head model of a dual-head YOLOv9 yaml, found by graph analysis of the yaml's ``from`` links.

YOLOv9's PGI training models (``yolov9-*.yaml``) end in a dual head: an auxiliary head fed by a
reversible auxiliary branch and the main head, the one ``val_dual.py`` / ``detect_dual.py`` use. Only
the main head matters for inference. :func:`strip_dual_head` keeps the layers the main head depends on,
drops the rest, renumbers the ``from`` links and turns the dual head into its single counterpart; for
upstream's ``yolov9-c.yaml`` / ``yolov9-e.yaml`` the result is, layer for layer, ``gelan-c.yaml`` /
``gelan-e.yaml`` (what upstream's ``tools/reparameterization.ipynb`` maps by hand, per model).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .._native import MobileOneError


class DeployError(MobileOneError, ValueError):
    """A checkpoint, yaml, image folder or output folder that deploy cannot work with; the message
    says why."""


@dataclass(frozen=True)
class DualHead:
    """How a dual head's main half becomes a single head: its inputs and its parameter names."""

    single: str
    renames: tuple[tuple[str, str], ...]  # dual head's parameter prefix -> single head's
    extra_inputs: int  # trailing inputs after the 2 * nl detection levels (main's is the last)


# The dual heads of upstream's models/yolo.py whose eval output is the main half's alone (index 1 of the
# inference list, or the whole output for DualDSegment), computed by modules the single head has too.
DUAL_HEADS = {
    "DualDetect": DualHead("Detect", (("cv4.", "cv2."), ("cv5.", "cv3."), ("dfl2.", "dfl.")), 0),
    "DualDDetect": DualHead("DDetect", (("cv4.", "cv2."), ("cv5.", "cv3."), ("dfl2.", "dfl.")), 0),
    "DualDSegment": DualHead(
        "DSegment",
        (("cv4.", "cv2."), ("cv5.", "cv3."), ("dfl2.", "dfl."), ("cv7.", "cv4."), ("proto2.", "proto.")),
        2,
    ),
}
SINGLE_HEADS = {"Detect", "DDetect", "Segment", "DSegment", "Panoptic"}
NOT_COVERED = {"TripleDetect", "TripleDDetect"}  # three heads: which one is "main" is no graph fact
IDENTITY = {"Silence"}  # modules whose forward returns their input unchanged
INPUT = -1  # the image, as a resolved source


@dataclass(frozen=True)
class Stripped:
    """The deploy yaml and how its layers map to the training yaml's."""

    yaml: dict
    kept: list[int]  # kept[new index] = old index
    head: str  # the dual head's class name
    renames: tuple[tuple[str, str], ...]


def _layers(d: dict) -> list[list]:
    try:
        layers = [list(row) for row in d["backbone"] + d["head"]]
    except (KeyError, TypeError) as err:
        raise DeployError(f"the model yaml has no backbone/head layer lists ({err})") from err
    for i, row in enumerate(layers):
        if len(row) != 4:
            raise DeployError(f"yaml layer {i} is {row!r}, not [from, number, module, args]")
    return layers


def _sources(i: int, f) -> list[int]:
    """Old indices a layer reads, ``INPUT`` for the image; raises on a link that is not backwards."""
    out = []
    for x in f if isinstance(f, list) else [f]:
        if not isinstance(x, int):
            raise DeployError(f"yaml layer {i}: 'from' entry {x!r} is not a layer index")
        j = i + x if x < 0 else x
        if j >= i or (x >= 0 and j < 0):
            raise DeployError(f"yaml layer {i}: 'from' entry {x} does not point to an earlier layer")
        out.append(INPUT if j < 0 else j)
    return out


def head_kind(d: dict) -> str:
    """The class name of the yaml's last layer (its detection head)."""
    module = _layers(d)[-1][2]
    return str(module).rsplit(".", 1)[-1]


def main_inputs(f: list, head: str) -> list:
    """The main half of a dual head's ``from`` list (the single head's ``from``)."""
    spec = DUAL_HEADS[head]
    if not isinstance(f, list):
        raise DeployError(f"the {head} head reads one layer ({f!r}): its main head cannot be separated")
    levels = len(f) - spec.extra_inputs
    if levels < 2 or levels % 2:
        raise DeployError(
            f"the {head} head reads {len(f)} layers {f}: {head} needs 2 x levels"
            + (f" + {spec.extra_inputs}" if spec.extra_inputs else "")
            + ", so its main head cannot be separated"
        )
    nl = levels // 2
    return f[nl:levels] + ([f[-1]] if spec.extra_inputs else [])


def check_dual_head(head: str) -> None:
    """Raises ``DeployError`` unless ``head`` is a covered dual head (naming what is covered)."""
    if head in DUAL_HEADS:
        return
    covered = ", ".join(f"{k} -> {v.single}" for k, v in DUAL_HEADS.items())
    if head in NOT_COVERED:
        raise DeployError(f"the model's head is {head}: not covered (covered dual heads: {covered})")
    raise DeployError(f"the model's last layer is {head}, not a YOLOv9 dual head (covered: {covered})")


def _needed(layers: list[list], roots: list[int]) -> set[int]:
    needed, stack = set(), [j for j in roots if j != INPUT]
    while stack:
        j = stack.pop()
        if j not in needed:
            needed.add(j)
            stack.extend(s for s in _sources(j, layers[j][0]) if s != INPUT)
    return needed


def _through_identity(layers: list[list], j: int) -> int:
    while j != INPUT and _module_name(layers[j]) in IDENTITY:
        (j,) = _sources(j, layers[j][0])
    return j


def _module_name(row: list) -> str:
    return str(row[2]).rsplit(".", 1)[-1]


def _relink(f, i: int, new_i: int, resolve, new_index: dict[int, int]):
    """``f`` of old layer ``i`` for its new position: relative links stay relative, absolute absolute."""
    out = []
    for x, src in zip(f if isinstance(f, list) else [f], _sources(i, f), strict=True):
        target = new_index[resolve(src)]
        out.append(target - new_i if x < 0 or target < 0 else target)
    return out if isinstance(f, list) else out[0]


def strip_dual_head(d: dict) -> Stripped:
    """The single-head yaml of a dual-head yaml dict (YOLOv9's ``model.yaml``); see the module docstring.

    Identity layers (``Silence``) are bypassed; one stays at index 0 only where more than one kept layer
    reads the image (YOLOv9's ``from`` can name the image only as ``-1`` of the first layer).
    """
    layers = _layers(d)
    head_row = layers[-1]
    head = _module_name(head_row)
    check_dual_head(head)
    spec = DUAL_HEADS[head]
    last = len(layers) - 1
    main = _sources(last, main_inputs(head_row[0], head))
    resolve = {j: _through_identity(layers, j) for j in range(last)}
    resolve[INPUT] = INPUT
    needed = {j for j in _needed(layers, main) if _module_name(layers[j]) not in IDENTITY}
    readers = [j for j in needed if INPUT in {resolve[s] for s in _sources(j, layers[j][0])}]
    holder = None
    if len(readers) > 1 or (readers and readers[0] != min(needed)):
        holder = next(
            (j for j in range(last) if resolve.get(j) == INPUT and _module_name(layers[j]) in IDENTITY), None
        )
        if holder is None or holder != 0:
            raise DeployError("more than one kept layer reads the image and no identity layer 0 holds it")
        resolve = {k: (holder if v == INPUT and k != holder else v) for k, v in resolve.items()}
        resolve[holder] = holder
        needed.add(holder)
    kept = sorted(needed)
    new_index = {old: new for new, old in enumerate(kept)}
    new_index[INPUT] = -1
    rows = []
    for new_i, old in enumerate(kept):
        f, n, m, args = copy.deepcopy(layers[old])
        rows.append([-1 if old == holder else _relink(f, old, new_i, resolve.get, new_index), n, m, args])
    new_head = [
        _relink(main_inputs(head_row[0], head), last, len(kept), resolve.get, new_index),
        head_row[1],
        spec.single,
        copy.deepcopy(head_row[3]),
    ]
    n_backbone = len(d["backbone"])
    out = {k: copy.deepcopy(v) for k, v in d.items() if k not in ("backbone", "head")}
    out["backbone"] = [row for row, old in zip(rows, kept, strict=True) if old < n_backbone]
    out["head"] = [row for row, old in zip(rows, kept, strict=True) if old >= n_backbone] + [new_head]
    return Stripped(yaml=out, kept=kept, head=head, renames=spec.renames)
