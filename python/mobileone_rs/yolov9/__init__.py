"""YOLOv9 tooling: patch a YOLOv9 tree (``patch``, ``runtime``), the packaged yamls (``yamls``), the
pretrained-backbone command (``pretrained``) and the yaml-layer hint of ``parse_model`` errors
(``hints``).

``python -m mobileone_rs.yolov9 patch PATH`` patches a checkout (see :mod:`mobileone_rs.yolov9.patch`).
"""

from .patch import FileChange, apply_patch, main, plan_patch, summary

__all__ = ["FileChange", "apply_patch", "main", "plan_patch", "summary"]
