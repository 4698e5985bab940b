"""YOLOv9 tooling: patch a YOLOv9 tree (``patch``, ``runtime``), the packaged yamls (``yamls``), the
pretrained-backbone command (``pretrained``) and the yaml-layer hint that the patched ``parse_model``
adds to a ``ConfigError`` (``hints``).

``python -m mobileone_rs.yolov9 patch PATH`` patches a checkout (see :mod:`mobileone_rs.yolov9.patch`).
"""

from .cli import main, summary
from .patch import plan_patch
from .tree import FileChange, NotYolov9Error, apply_patch

__all__ = ["FileChange", "NotYolov9Error", "apply_patch", "main", "plan_patch", "summary"]
