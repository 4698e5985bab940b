"""convert_checkpoint: Apple, timm and mmpretrain dicts (train-time and fused) round-trip to Apple's names.

The timm and mmpretrain dicts here are written from the schema table by plain string replacement
(tests/pretrained/helpers.py), not by the code under test; timm's real names are checked in
test_classifier.py against timm's own modules.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict

import mobileone_rs
import pytest
import torch
from mobileone_rs.checkpoints import CheckpointError, ConvertedCheckpoint, convert_checkpoint

from tests.pretrained.helpers import VARIANTS, images, rel_err, to_mmpretrain, to_timm


def apple_state(variant: str, fused: bool = False, num_classes: int = 1000) -> OrderedDict:
    """Apple-named tensors of one variant as shapes only (meta tensors: the names and shapes are
    the point)."""
    with torch.device("meta"):
        return mobileone_rs.mobileone(variant, num_classes=num_classes, inference_mode=fused).state_dict()


def assert_same_tensors(converted: ConvertedCheckpoint, expected: OrderedDict) -> None:
    assert list(converted) == list(expected)
    assert all(converted[k] is expected[k] for k in expected)  # renamed, not copied


@pytest.mark.parametrize("fused", [False, True], ids=["train-time", "fused"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_schema_round_trips(variant, fused):
    apple = apple_state(variant, fused)
    for source, state in [("apple", apple), ("timm", to_timm(apple)), ("mmpretrain", to_mmpretrain(apple))]:
        converted = convert_checkpoint(state)
        assert_same_tensors(converted, apple)
        assert (converted.source, converted.fused, converted.variant, converted.num_classes) == (
            source,
            fused,
            variant,
            1000,
        ), source
        assert convert_checkpoint(state, source=source).source == source


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "meta": {"epoch": 300}},  # mmpretrain / mmengine
        lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},  # DDP under "model"
        lambda sd: {"epoch": 3, "state_dict": {"model": sd}},  # nested twice
        lambda sd: {"module." + k: v for k, v in sd.items()},
    ],
    ids=["state_dict", "model+module.", "nested", "module."],
)
def test_nesting_and_prefixes(wrap):
    apple = apple_state("s1")
    for state in (apple, to_mmpretrain(apple), to_timm(apple)):
        assert_same_tensors(convert_checkpoint(wrap(state)), apple)


def test_a_module_is_read_through_its_state_dict():
    model = mobileone_rs.mobileone("s2", num_classes=7)
    converted = convert_checkpoint({"model": model})
    assert (converted.variant, converted.num_classes) == ("s2", 7)


def test_files_pth_tar_and_safetensors(tmp_path):
    model = mobileone_rs.mobileone("s0", inference_mode=True, num_classes=5).double().eval()
    state = model.state_dict()
    torch.save(state, tmp_path / "mobileone_s0.pth.tar")
    converted = convert_checkpoint(tmp_path / "mobileone_s0.pth.tar")
    assert (converted.source, converted.fused, converted.variant) == ("apple", True, "s0")
    assert all(torch.equal(converted[k], v) for k, v in state.items())
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(to_timm(state), str(tmp_path / "model.safetensors"))
    converted = convert_checkpoint(str(tmp_path / "model.safetensors"))
    assert (converted.source, converted.variant) == ("timm", "s0")
    fresh = mobileone_rs.mobileone("s0", inference_mode=True, num_classes=5).double().eval()
    fresh.load_state_dict(converted, strict=True)
    x = images(n=1)
    with torch.no_grad():
        assert rel_err(fresh(x), model(x)) == 0.0


def test_apple_fused_checkpoint_loads_strictly_into_an_inference_model():
    """Apple's fused layout (our reparameterize_model of a trained model) into inference_mode=True."""
    from tests import oracle

    model = oracle.randomize_bn_stats(mobileone_rs.mobileone("s4")).double().eval()
    fused = mobileone_rs.reparameterize_model(model)
    inference = mobileone_rs.mobileone("s4", inference_mode=True).double().eval()
    inference.load_state_dict(convert_checkpoint(fused.state_dict()), strict=True)
    x = images(n=1)
    with torch.no_grad():
        assert rel_err(inference(x), model(x)) <= 1e-10


def test_result_pickles_as_a_plain_ordered_dict(tmp_path):
    converted = convert_checkpoint(mobileone_rs.mobileone("s1").state_dict())
    torch.save(converted, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert type(loaded) is OrderedDict and list(loaded) == list(converted)
    assert type(pickle.loads(pickle.dumps(converted))) is OrderedDict
    assert "timm" not in converted.summary() and "MobileOne-S1" in converted.summary()


def test_headless_partly_fused_and_foreign_shapes():
    apple = apple_state("s3")
    headless = OrderedDict((k, v) for k, v in apple.items() if not k.startswith("linear."))
    converted = convert_checkpoint(to_mmpretrain(headless))
    assert (converted.variant, converted.num_classes) == ("s3", None)
    mixed = OrderedDict(apple)
    for key in [k for k in mixed if k.startswith("stage0.")]:
        del mixed[key]
    mixed["stage0.reparam_conv.weight"] = torch.empty(64, 3, 3, 3, device="meta")
    mixed["stage0.reparam_conv.bias"] = torch.empty(64, device="meta")
    converted = convert_checkpoint(mixed)
    assert (converted.fused, converted.variant) == (None, None)
    assert "partly fused" in converted.summary()
    other = OrderedDict(apple)
    other["linear.weight"] = torch.empty(1000, 10, device="meta")
    assert convert_checkpoint(other).variant is None


def test_unmappable_keys_are_listed_not_dropped():
    state = to_timm(apple_state("s0"))
    state["stages.0.0.conv_kxk.0.extra"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"read as timm .* 2 of \d+ keys .*pos_embed") as err:
        convert_checkpoint(state)
    assert "stages.0.0.conv_kxk.0.extra" in str(err.value)
    assert isinstance(err.value, mobileone_rs.MobileOneError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "obj, source, message",
    [
        ({"head.fc.weight": torch.zeros(2, 2)}, "auto", "both the timm and mmpretrain schemas"),
        ({"stage0.reparam_conv.weight": torch.zeros(1)}, "timm", "1 keys are not timm MobileOne names"),
        ({"stage0.reparam_conv.weight": torch.zeros(1)}, "caffe", "source must be 'auto' or one of"),
        ({}, "auto", "the state dict is empty"),
        ({"epoch": 3, "optimizer": {}}, "auto", "no 'state_dict' or 'model' entry"),
        ([torch.zeros(1)], "auto", "expected a state dict"),
        (
            {"module.stage0.rbr_skip.weight": torch.zeros(1), "stage0.rbr_skip.weight": torch.zeros(1)},
            "auto",
            "two tensors are named",
        ),
    ],
    ids=[
        "ambiguous",
        "wrong-source",
        "unknown-source",
        "empty",
        "no-state-dict",
        "not-a-mapping",
        "duplicate",
    ],
)
def test_errors(obj, source, message):
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(obj, source=source)


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        convert_checkpoint(tmp_path / "missing.pth.tar")
    torch.save(
        {"state_dict": mobileone_rs.mobileone("s1").state_dict(), "cfg": _Opaque()}, tmp_path / "p.pth"
    )
    with pytest.raises(CheckpointError, match="weights_only=True.*--trust-pickle"):
        convert_checkpoint(tmp_path / "p.pth")
    from mobileone_rs.checkpoints import load_checkpoint

    assert convert_checkpoint(load_checkpoint(tmp_path / "p.pth", weights_only=False)).variant == "s1"


class _Opaque:
    """A pickled object weights_only loading refuses (like a training script's config object)."""


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_bytes(b"not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pth: a text file starting 'not a checkpoint', not a"):
        convert_checkpoint(tmp_path / "notes.pth")
