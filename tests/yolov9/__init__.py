"""YOLOv9 integration: the patch command and the real YOLOv9 code (PyPI yolo9)."""
