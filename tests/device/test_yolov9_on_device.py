"""The whole YOLOv9-C MobileOne detector on a device, where its dependency is present (the ``yolo9``
package, YOLOv9 from PyPI, patched in a copy): a training step and fused inference against its oracle
twin (the same detector whose MobileOne layers run the reference's code), in float64.
"""

from __future__ import annotations

import copy
import importlib
import importlib.resources
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("yolo9") is None, reason="yolo9 (YOLOv9 from PyPI) is not installed"
)

BOUND = 1e-9  # float64, ~40 chained blocks and the neck


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    from tests.yolov9 import helpers as h

    patched = h.patched_copy(tmp_path_factory.mktemp("yolo9-device"))
    with h.imported_copy(patched):
        yield importlib.import_module("yolo9.models.yolo"), h


def _model(yolo):
    module, h = yolo
    yaml = importlib.resources.files("mobileone_rs") / "data" / "yolov9-c-mobileone.yaml"
    torch.manual_seed(0)
    with h.captured_yolo_log():
        model = module.Model(str(yaml), ch=3, nc=1).double()
    return model, h.oracle_twin(model), h


def test_yolov9_mobileone_training_step_and_fused_inference(yolo, device):
    model, twin, h = _model(yolo)
    model, twin = model.to(device), twin.to(device)
    x = h.random_images(2, 64, dtype=torch.float64).to(device)
    grads = []
    for m in (model, twin):
        m.train()
        out = h.flat_tensors(m(x))
        sum(o.square().mean() for o in out).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 1000
    # Relative to each gradient's largest value, floored at 1e-9 of the largest of all: some are zero
    # up to rounding (the auxiliary CBLinear biases, ~1e-17), where only absolute agreement means anything.
    floor = 1e-9 * max(g.abs().max().item() for g in grads[1].values())
    worst = max(
        ((grads[0][n] - g).abs().max() / max(g.abs().max().item(), floor)).item() for n, g in grads[1].items()
    )
    assert worst <= BOUND, f"parameter gradients: {worst:.3e}"
    buffers = dict(twin.named_buffers())
    for name, b in model.named_buffers():
        if b.dtype.is_floating_point:
            assert h.max_rel_err(b, buffers[name]) <= BOUND, name
    with torch.no_grad():
        model.eval(), twin.eval()
        with h.default_dtype(torch.float64):  # YOLOv9's fuse_conv_and_bn builds its conv in it
            fused = copy.deepcopy(model).fuse()
        want = twin(x)
        assert h.max_rel_err(model(x), want) <= BOUND
        assert h.max_rel_err(fused(x), want) <= BOUND
