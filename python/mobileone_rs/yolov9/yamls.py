"""The S0-S4 YOLOv9 model yamls: YOLOv9-C with Apple's MobileOne variant as its backbone, layer for layer.

``yolov9-c-mobileone-s0.yaml`` .. ``-s4.yaml`` (package data, written by :func:`yolov9_yaml`): layer 1 is
the variant's stem (``stage0``, a MobileOneBlock), layers 2-5 its ``stage1`` .. ``stage4`` (MobileOne
stages); YOLOv9-C's neck and head (with its auxiliary branch) take P3/P4/P5 from layers 3, 4, 5.

Each file carries the SHA-256 of its own text (the marker line left out): :func:`write_yamls`
replaces a file only while it is the text we wrote, so a yaml a user edited is never overwritten
silently.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

from .._native import YamlError
from ..backbone import VARIANTS, get_variant
from ..checkpoints import CheckpointError
from ..files import WriteError, check_writable, write_text

__all__ = ["YAML_NAMES", "packaged_yaml", "read_yaml", "write_yamls", "yolov9_yaml"]

YAML_NAMES = {name: f"yolov9-c-mobileone-{name}.yaml" for name in VARIANTS}

# YOLOv9-C's neck and head (models/detect/yolov9-c.yaml, layers 10-38), with each backbone index moved
# to ours: its P3/P4/P5 (layers 5/7/9) are our stages 2/3/4 (layers 3/4/5); its head layers sit 4 earlier.
_HEAD = """\
# YOLOv9-C head (models/detect/yolov9-c.yaml), fed from P3/P4/P5 = layers 3/4/5
head:
  [
   # elan-spp block
   [-1, 1, SPPELAN, [512, 256]],  # 6

   # up-concat merge
   [-1, 1, nn.Upsample, [None, 2, 'nearest']],  # 7
   [[-1, 4], 1, Concat, [1]],  # 8 cat backbone P4

   # elan-2 block
   [-1, 1, RepNCSPELAN4, [512, 512, 256, 1]],  # 9

   # up-concat merge
   [-1, 1, nn.Upsample, [None, 2, 'nearest']],  # 10
   [[-1, 3], 1, Concat, [1]],  # 11 cat backbone P3

   # elan-2 block
   [-1, 1, RepNCSPELAN4, [256, 256, 128, 1]],  # 12 (P3/8-small)

   # avg-conv-down merge
   [-1, 1, ADown, [256]],  # 13
   [[-1, 9], 1, Concat, [1]],  # 14 cat head P4

   # elan-2 block
   [-1, 1, RepNCSPELAN4, [512, 512, 256, 1]],  # 15 (P4/16-medium)

   # avg-conv-down merge
   [-1, 1, ADown, [512]],  # 16
   [[-1, 6], 1, Concat, [1]],  # 17 cat head P5

   # elan-2 block
   [-1, 1, RepNCSPELAN4, [512, 512, 256, 1]],  # 18 (P5/32-large)

   # multi-level reversible auxiliary branch

   # routing
   [3, 1, CBLinear, [[256]]],  # 19
   [4, 1, CBLinear, [[256, 512]]],  # 20
   [5, 1, CBLinear, [[256, 512, 512]]],  # 21

   # conv down
   [0, 1, Conv, [64, 3, 2]],  # 22-P1/2

   # conv down
   [-1, 1, Conv, [128, 3, 2]],  # 23-P2/4

   # elan-1 block
   [-1, 1, RepNCSPELAN4, [256, 128, 64, 1]],  # 24

   # avg-conv down fuse
   [-1, 1, ADown, [256]],  # 25-P3/8
   [[19, 20, 21, -1], 1, CBFuse, [[0, 0, 0]]],  # 26

   # elan-2 block
   [-1, 1, RepNCSPELAN4, [512, 256, 128, 1]],  # 27

   # avg-conv down fuse
   [-1, 1, ADown, [512]],  # 28-P4/16
   [[20, 21, -1], 1, CBFuse, [[1, 1]]],  # 29

   # elan-2 block
   [-1, 1, RepNCSPELAN4, [512, 512, 256, 1]],  # 30

   # avg-conv down fuse
   [-1, 1, ADown, [512]],  # 31-P5/32
   [[21, -1], 1, CBFuse, [[2]]],  # 32

   # elan-2 block
   [-1, 1, RepNCSPELAN4, [512, 512, 256, 1]],  # 33

   # detection head

   # detect
   [[27, 30, 33, 12, 15, 18], 1, DualDDetect, [nc]],  # 34 DualDDetect(A3, A4, A5, P3, P4, P5)
  ]
"""


_MARKER = "# mobileone_rs sha256 of this text without this line: {sha256}"
_MARKER_LINE = re.compile(
    "^" + re.escape(_MARKER).replace(r"\{sha256\}", "([0-9a-f]{64})") + "\n", re.MULTILINE
)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_ours_unedited(text: str) -> bool:
    """Whether ``text`` is a yaml this module wrote (any version), unedited: it hashes to its marker."""
    match = _MARKER_LINE.search(text)
    if match is None:
        return False
    return _sha256(text[: match.start()] + text[match.end() :]) == match.group(1)


def yolov9_yaml(variant: str) -> str:
    """The text of ``yolov9-c-mobileone-{variant}.yaml`` (the package data files are this text)."""
    text = _yolov9_yaml(variant)
    marker = _MARKER.format(sha256="0" * 64) + "\n"
    return text.replace(marker, _MARKER.format(sha256=_sha256(text.replace(marker, ""))) + "\n")


def _yolov9_yaml(variant: str) -> str:
    spec = get_variant(variant)
    name = spec.name.upper()
    stage_rows = "".join(
        f"   [-1, 1, MobileOne, [{s.out_channels}, {s.num_blocks}, {s.num_conv_branches}, "
        f"{s.use_se}, {s.num_se}]],"
        f"  # {k + 1}-P{k + 1}/{2 ** (k + 1)} stage{k}\n"
        for k, s in enumerate(spec.stages(), start=1)
    )
    marker = _MARKER.format(sha256="0" * 64)
    return f"""\
# YOLOv9-C with Apple's MobileOne-{name} backbone (https://arxiv.org/abs/2206.04040), layer for layer:
# layer 1 is its stem (stage0), layers 2-5 its stages 1-4, so its ImageNet weights initialize them:
#   python -m mobileone_rs.pretrained --weights mobileone_{spec.name}_unfused.pth.tar --cfg THIS --out init.pt
# Written by mobileone_rs.yolov9.yamls.yolov9_yaml("{spec.name}"); needs the mobileone_rs YOLOv9 patch.
{marker}

# parameters
nc: 80  # number of classes
depth_multiple: 1.0  # model depth multiple
width_multiple: 1.0  # layer channel multiple (keep 1.0: the backbone widths are MobileOne-{name}'s)

# anchors
anchors: 3

# MobileOne-{name} backbone
#   MobileOneBlock: [out_channels, kernel_size, stride, padding]
#   MobileOne:      [out_channels, block pairs, conv branches, use_se, SE pairs]
backbone:
  [
   [-1, 1, Silence, []],  # 0
   [-1, 1, MobileOneBlock, [{spec.stem_channels}, 3, 2, 1]],  # 1-P1/2 stage0
{stage_rows}  ]

{_HEAD}"""


def packaged_yaml(name: str) -> str:
    """The text of a yaml shipped with the package (``yolov9-c-mobileone.yaml``, the S0-S4 yamls)."""
    return resources.files("mobileone_rs").joinpath("data", name).read_text(encoding="utf-8")


def read_yaml(name_or_path: str | Path) -> str:
    """A yaml file's text; a bare packaged name (``yolov9-c-mobileone-s0.yaml``) not found as a file
    reads the package's copy."""
    path = Path(name_or_path)
    packaged = resources.files("mobileone_rs").joinpath("data", path.name)
    if not path.exists() and path.name == str(name_or_path) and packaged.is_file():
        return packaged_yaml(path.name)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise YamlError(f"cannot read {name_or_path}: {reason}") from exc


def _edited(path: Path, text: str) -> bool:
    """Whether writing ``text`` to ``path`` would lose something: the file is there, differs, and
    is not a yaml this module wrote and nobody edited."""
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError):
        return True
    before_marker = _MARKER_LINE.sub("", text)  # what mobileone_rs 0.1.0 wrote, with no marker yet
    return old not in (text, before_marker) and not _is_ours_unedited(old)


def write_yamls(root: str | Path, force: bool = False) -> list[tuple[Path, bool]]:
    """Write the five S yamls into ``root/models/detect/`` (a YOLOv9 tree).

    A file that is already there is replaced only when it is a yaml this module wrote and nobody
    edited since (its marker hash holds), or with ``force``; an up-to-date file is left as it is.

    Returns:
        ``(path, written)`` for each yaml: ``written`` is False for a file already up to date.

    Raises:
        CheckpointError: ``root/models/detect`` is not a folder.
        WriteError: a yaml was edited (without ``force``) or cannot be written; no yaml was written.
    """
    detect = Path(root) / "models" / "detect"
    if not detect.is_dir():
        raise CheckpointError(f"{detect} is not a folder: {root} does not look like a YOLOv9 tree")
    texts = {detect / filename: yolov9_yaml(name) for name, filename in YAML_NAMES.items()}
    edited = [path for path, text in texts.items() if _edited(path, text)]
    if edited and not force:
        names = ", ".join(str(path) for path in edited)
        raise WriteError(
            f"not overwriting {names}: {'it differs' if len(edited) == 1 else 'they differ'} from the yaml "
            "mobileone_rs writes (edited?); no yaml was written. Move the file away or pass --force"
        )
    stale = {
        path: text for path, text in texts.items() if not path.is_file() or path.read_bytes() != text.encode()
    }
    check_writable(stale)
    for path, text in stale.items():
        write_text(path, text)
    return [(path, path in stale) for path in texts]
