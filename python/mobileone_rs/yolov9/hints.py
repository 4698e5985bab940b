"""Errors raised while YOLOv9's ``parse_model`` builds a layer: which yaml layer, and what is missing.

``MobileOne(...)`` does not know it is being built from a yaml row. When a ``ConfigError`` comes out
of it under YOLOv9's ``parse_model`` (found on the call stack by its name and locals, without
importing YOLOv9), the message gains the yaml layer (index, module, the row's arguments) and, when
the stage got the row's arguments without the input channels prepended, the patch edit that is missing.
"""

from __future__ import annotations

import sys

from .._native import ConfigError

PATCH_COMMAND = "python -m mobileone_rs.yolov9 patch PATH"


def _parse_model_frame():
    """The innermost frame of a function named ``parse_model`` with YOLOv9's loop locals, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        names = frame.f_locals
        if frame.f_code.co_name == "parse_model" and {"i", "args", "d"} <= names.keys():
            return frame
        frame = frame.f_back
    return None


def _yaml_row(layers: dict, index: int):
    """Row ``index`` of the model dict's backbone + head (``[from, number, module, args]``), or None."""
    try:
        rows = list(layers.get("backbone", [])) + list(layers.get("head", []))
        return rows[index]
    except (AttributeError, IndexError, TypeError):
        return None


def reraise_with_yaml_layer(error: ConfigError, module: str) -> None:
    """Raises ``error`` again with the yaml layer it came from, when YOLOv9's parse_model is building.

    Does nothing (the caller re-raises ``error`` as it is) outside ``parse_model``.
    """
    frame = _parse_model_frame()
    if frame is None:
        return
    index, passed = frame.f_locals["i"], frame.f_locals["args"]
    row = _yaml_row(frame.f_locals["d"], index)
    yaml_args = row[3] if isinstance(row, (list, tuple)) and len(row) == 4 else None
    where = f"{module} {list(yaml_args)}" if yaml_args is not None else module
    message = f"yaml layer {index} ({where}): {error}"
    if yaml_args is not None and len(passed) <= len(yaml_args):
        message += (
            f". parse_model called {module}({', '.join(map(repr, passed))}): the yaml row's arguments without "
            f"the input channels in front, so every argument shifted by one. models/yolo.py's parse_model "
            f"lacks {module} in its channel set (model edit 2): run `{PATCH_COMMAND}`"
        )
    raise ConfigError(message) from error
