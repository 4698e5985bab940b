"""A patched copy of PyPI's yolo9 (WongKinYiu/yolov9 packaged), imported for the module's tests."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest

from tests.yolov9 import helpers as h


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    return h.patched_copy(tmp_path_factory.mktemp("yolo9-copy"))


@pytest.fixture(scope="module")
def yolo(patched):
    """YOLOv9's ``models.yolo`` and ``models.experimental`` from the patched copy."""
    with h.imported_copy(patched):
        yield SimpleNamespace(
            yolo=importlib.import_module("yolo9.models.yolo"),
            experimental=importlib.import_module("yolo9.models.experimental"),
            root=patched,
        )
