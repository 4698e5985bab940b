"""YOLOv9 with MobileOne, end to end, on a patched copy of the real YOLOv9 code (PyPI ``yolo9``).

The reference's yolov9-c-mobileone.yaml is built by YOLOv9's own ``Model``; the numbers it must reproduce are
the reference's printed table and summary (independent of this package). Then: YOLOv9's fuse(), its training
pieces (initialize_weights, smart_optimizer, ComputeLoss, ModelEMA), its checkpoint format and
attempt_load, and an ONNX export as export.py does it. YOLOv9's own scripts (train_dual.py, val_dual.py,
detect_dual.py, export.py) run in test_journey.py, as docs/yolov9.md has a newcomer run them.
"""

from __future__ import annotations

import importlib
import re
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import mobileone_rs
import pytest
import torch
import yaml
from torch import nn

from tests import oracle
from tests.yolov9 import helpers as h

pytestmark = pytest.mark.skipif(
    h.installed_yolo9() is None, reason="yolo9 (YOLOv9 from PyPI) is not installed"
)

IMG = 64  # two cells at stride 32: the smallest input the detector takes, to keep CPU time down
TRAIN_IMG = 128
SEED_PARAMS, SEED_GFLOPS = 45_970_870, 212.0
SEED_FUSED_PARAMS, SEED_FUSED_GFLOPS = 42_920_310, 196.3
FUSED_BOUND = {torch.float64: 1e-9, torch.float32: 1e-3}


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    """A copy of the installed yolo9 package, patched by the real command line."""
    return h.patched_copy(tmp_path_factory.mktemp("yolo9-copy"))


@pytest.fixture(scope="module")
def yolo(patched):
    """YOLOv9's modules, imported from the patched copy."""
    with h.imported_copy(patched):
        names = ["models.yolo", "utils.torch_utils", "utils.loss_tal_dual"]
        modules = {n.split(".")[-1]: importlib.import_module(f"yolo9.{n}") for n in names}
        yield SimpleNamespace(**modules)


@pytest.fixture(scope="module")
def built(yolo):
    """The reference's model as ``Model(cfg, ch=3, nc=1)`` builds it, with what YOLOv9 printed meanwhile."""
    with h.captured_yolo_log() as log:
        model = yolo.yolo.Model(str(h.SEED_YAML), ch=3, nc=1)
    return SimpleNamespace(model=model, log="\n".join(log))


def mobileone_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, mobileone_rs.MobileOneBlock)]


def fused(model: nn.Module, dtype=torch.float32) -> nn.Module:
    """``model.fuse()`` on an eval-mode copy; YOLOv9 builds its fused Conv2d in the default dtype."""
    with h.default_dtype(dtype), torch.no_grad():
        return deepcopy(model).eval().fuse()


# ----------------------------------------------------------------------------------------------
# The reference's numbers.


def test_seed_yaml_is_the_shared_contract():
    assert h.file_sha256(h.SEED_YAML) == h.SEED_YAML_SHA256
    shared = h.SHARED_SEED / "yolov9-c-mobileone.yaml"
    if shared.exists():
        assert h.file_sha256(shared) == h.SEED_YAML_SHA256
    seed_text = h.SHARED_SEED / "mobileone-yolov9.seed.txt"
    if seed_text.exists():  # our transcription of the printed table is the reference's
        seed_rows = h.parse_model_table(
            seed_text.read_text(encoding="utf-8").split("yolov9-c-mobileone:")[-1]
        )
        assert seed_rows == h.parse_model_table(h.SEED_TABLE)


def test_every_layer_matches_the_seed_table(built):
    expected = h.parse_model_table(h.SEED_TABLE)
    printed = h.parse_model_table(built.log)
    assert len(expected) == len(printed) == len(built.model.model) == 35
    for want, got, layer in zip(expected, printed, built.model.model):
        assert got == want, f"layer {want[0]}"
        assert sum(p.numel() for p in layer.parameters()) == want[3], f"layer {want[0]}"
    mobileone_rows = [row for row in printed if row[4] == "MobileOne"]
    assert [row[5] for row in mobileone_rows] == [
        "[64, 64, 2, 4, False, 0]",
        "[64, 128, 8, 4, False, 0]",
        "[128, 256, 10, 4, True, 1]",
        "[256, 512, 1, 4, True, 1]",
    ]


def test_model_info_totals_match_the_reference(built):
    params, _, gflops = h.parse_summary(built.log)[-1]
    assert (params, gflops) == (SEED_PARAMS, SEED_GFLOPS)


def test_fuse_reparameterizes_and_matches_the_seed_totals(built):
    with h.captured_yolo_log() as log:
        model = fused(built.model)
    params, _, gflops = h.parse_summary("\n".join(log))[-1]
    assert (params, gflops) == (SEED_FUSED_PARAMS, SEED_FUSED_GFLOPS)
    blocks = mobileone_blocks(model)
    assert len(blocks) == len(mobileone_blocks(built.model)) == 2 * (2 + 8 + 10 + 1)
    for block in blocks:
        names = {name for name, _ in block.named_children()}
        assert "reparam_conv" in names and not names & {"rbr_conv", "rbr_scale", "rbr_skip"}, names
    assert not any(hasattr(m, "bn") for m in model.modules() if type(m).__name__ == "Conv")
    with h.captured_yolo_log() as log:  # attempt_load(fuse=True) on a fused checkpoint fuses again
        model.fuse()
    assert h.parse_summary("\n".join(log))[-1][0] == SEED_FUSED_PARAMS


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_unfused_fused_and_reparameterized_match_the_oracle(built, dtype):
    """The whole detector in eval mode, against a twin whose MobileOne layers are the reference's code."""
    model = oracle.randomize_bn_stats(deepcopy(built.model), torch.Generator().manual_seed(0))
    model = model.to(dtype).eval()
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    x = h.random_images(2, IMG, dtype=dtype)
    with torch.no_grad():
        reference = h.oracle_twin(model).eval()(x)
        unfused = model(x)
        by_fuse = fused(model, dtype)(x)
        by_function = mobileone_rs.reparameterize_model(model)(x)
        after = model(x)
    for name, output in [
        ("unfused", unfused),
        ("model.fuse()", by_fuse),
        ("reparameterize_model", by_function),
    ]:
        err = h.max_rel_err(output, reference)
        assert err <= FUSED_BOUND[dtype], f"{name}: relative error {err:.2e}"
    assert h.max_rel_err(after, unfused) == 0.0  # reparameterize_model copied: the model is untouched
    assert all(hasattr(b, "rbr_conv") for b in mobileone_blocks(model))


# ----------------------------------------------------------------------------------------------
# Training as YOLOv9 does it.


@pytest.fixture(scope="module")
def trained(built, yolo, patched):
    """A few optimizer steps on one fixed batch under CPU bfloat16 autocast, with YOLOv9's own pieces.

    Adam (``train_dual.py --optimizer Adam``) rather than the default SGD: at initialization the
    gradient norm of the MobileOne backbone is ~10^3 times the head's, so after train_dual.py's
    ``clip_grad_norm_(10)`` a few SGD steps barely move the head, and at 64 px the loss jumps by
    ~15% from one tiny step to the next (the assigner flips on so few anchors). Adam's per-parameter
    step at 128 px gives a loss that falls steadily within six steps.
    """
    model = deepcopy(built.model).train()
    hyp = yaml.safe_load((patched / "data" / "hyps" / "hyp.scratch-high.yaml").read_text())
    model.hyp, model.nc = hyp, 1
    optimizer = yolo.torch_utils.smart_optimizer(model, "Adam", 3e-4, hyp["momentum"], hyp["weight_decay"])
    ema = yolo.torch_utils.ModelEMA(model)
    compute_loss = yolo.loss_tal_dual.ComputeLoss(model)
    images = h.random_images(2, TRAIN_IMG, seed=3)
    # (image, class, x, y, w, h), normalized
    targets = torch.tensor(
        [[0, 0, 0.5, 0.5, 0.5, 0.4], [1, 0, 0.35, 0.6, 0.3, 0.5], [1, 0, 0.75, 0.3, 0.3, 0.3]]
    )
    initial = deepcopy(model.state_dict())
    losses, missing_grads = [], None
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = compute_loss(model(images), targets)
        loss.backward()
        if missing_grads is None:
            missing_grads = [
                name
                for block in mobileone_blocks(model)
                for name, p in block.named_parameters()
                if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum()
            ]
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        losses.append(loss.item())
    return SimpleNamespace(
        model=model, optimizer=optimizer, ema=ema, losses=losses, initial=initial, missing_grads=missing_grads
    )


def test_initialize_weights_reached_the_mobileone_batchnorms(built):
    bns = [m for b in mobileone_blocks(built.model) for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and {(m.eps, m.momentum) for m in bns} == {(1e-3, 0.03)}


def test_smart_optimizer_groups_mobileone_parameters(trained):
    groups = trained.optimizer.param_groups
    biases, decayed, no_decay = (group["params"] for group in groups)
    assert [group["weight_decay"] for group in groups[1:]] == [trained.model.hyp["weight_decay"], 0.0]
    everything = [id(p) for p in trained.model.parameters()]
    grouped = [id(p) for p in biases + decayed + no_decay]
    assert sorted(grouped) == sorted(everything)  # each parameter exactly once
    bns = [m for m in trained.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(no_decay) == len(bns)
    for block in mobileone_blocks(trained.model):
        for name, p in block.named_parameters():
            group = no_decay if ".bn." in f".{name}" or name.startswith("rbr_skip.") else decayed
            if name.endswith(".bias"):
                group = biases
            assert any(p is q for q in group), name


def test_loss_falls_on_a_fixed_batch(trained):
    assert trained.missing_grads == []  # every MobileOne parameter got a finite, non-zero gradient
    assert all(torch.isfinite(torch.tensor(trained.losses))), trained.losses
    assert trained.losses[-1] < 0.9 * trained.losses[0], trained.losses


def test_ema_followed_the_training(trained):
    assert trained.ema.updates == len(trained.losses)
    ema_state, model_state = trained.ema.ema.state_dict(), trained.model.state_dict()
    key = next(k for k in model_state if k.startswith("model.3.") and k.endswith("rbr_conv.0.conv.weight"))
    assert not torch.equal(ema_state[key], trained.initial[key])
    assert not torch.equal(ema_state[key], model_state[key])


CHECKPOINT_PROBE = """
import sys, torch, mobileone_rs
from yolo9.models.experimental import attempt_load
model = attempt_load(sys.argv[1], device='cpu', fuse=True)
blocks = [m for m in model.modules() if isinstance(m, mobileone_rs.MobileOneBlock)]
assert blocks and all(hasattr(b, 'reparam_conv') and not hasattr(b, 'rbr_conv') for b in blocks)
with torch.no_grad():
    out = model(torch.load(sys.argv[2]))
flat = lambda o: [o] if isinstance(o, torch.Tensor) else [t for x in o for t in flat(x)]
torch.save(flat(out), sys.argv[3])
"""


def test_checkpoint_reloads_fused_in_a_fresh_process(trained, patched, tmp_path):
    """train_dual.py's checkpoint through attempt_load(fuse=True), as val/detect/export load it."""
    ckpt = {
        "epoch": 0,
        "best_fitness": 0.0,
        "model": deepcopy(trained.model).half(),
        "ema": deepcopy(trained.ema.ema).half(),
        "updates": trained.ema.updates,
        "optimizer": trained.optimizer.state_dict(),
        "opt": {},
        "git": None,
        "date": datetime.now().isoformat(),
    }
    torch.save(ckpt, tmp_path / "last.pt")
    x = h.random_images(1, IMG, seed=5)
    torch.save(x, tmp_path / "x.pt")
    # The same half-rounded EMA weights, made float and fused in this process, as attempt_load does.
    expected_model = fused(deepcopy(trained.ema.ema).half().float())
    with torch.no_grad():
        expected = expected_model(x)
    args = ["-c", CHECKPOINT_PROBE, str(tmp_path / "last.pt"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    h.run_python(args, cwd=tmp_path, env=h.subprocess_env(patched.parent))
    assert h.max_rel_err(torch.load(tmp_path / "y.pt"), expected) <= 1e-6


# ----------------------------------------------------------------------------------------------
# ONNX, as export.py exports.


def test_onnx_export_runs_in_onnxruntime(built, yolo, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = fused(built.model)
    for m in model.modules():  # export.py's "Update model"
        if isinstance(m, (yolo.yolo.Detect, yolo.yolo.DDetect, yolo.yolo.DualDetect, yolo.yolo.DualDDetect)):
            m.inplace, m.dynamic, m.export = False, False, True
    im = h.random_images(1, IMG, seed=7)
    with torch.no_grad():
        expected = model(im)
    path = tmp_path / "model.onnx"
    # export.py's call; torch >= 2.9 defaults to the dynamo exporter, export.py's is the TorchScript one.
    torch.onnx.export(
        model,
        im,
        str(path),
        verbose=False,
        opset_version=12,
        do_constant_folding=True,
        input_names=["images"],
        output_names=["output0"],
        dynamic_axes=None,
        dynamo=False,
    )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": im.numpy()})
    assert len(outputs) == len(expected) == 2
    assert h.max_rel_err([torch.from_numpy(o) for o in outputs], expected) <= 1e-4
    convs: dict[int, int] = {}
    for node in graph.graph.node:
        layer = re.search(r"/model\.(\d+)/", node.name)
        if node.op_type == "Conv" and layer:
            convs[int(layer.group(1))] = convs.get(int(layer.group(1)), 0) + 1
    expected_convs = h.mobileone_conv_counts(yaml.safe_load(h.SEED_YAML.read_text()))
    assert expected_convs == {2: 4, 3: 16, 4: 24, 5: 6}
    assert {i: convs.get(i, 0) for i in expected_convs} == expected_convs
