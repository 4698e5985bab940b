"""Checkpoints cross-load with the oracle; whole modules survive deepcopy, pickle, torch.save."""

import copy
import io
import pickle

import mobileone_rs
import pytest
import torch

from tests import oracle
from tests._util import TOLERANCE, assert_close, build_pair, eval_output, random_input

F64 = TOLERANCE[torch.float64]
MODELS = {
    "block": ("MobileOneBlock", (16, 16, 3, 1, 1, 1, 4, True, 2)),
    "block-wider-k5": ("MobileOneBlock", (8, 16, 5, 2, 2, 1, 1, False, 3)),
    "stage": ("MobileOne", (16, 32, 2, 2, True, 1)),
}


def _input(key: str, seed: int = 1) -> torch.Tensor:
    channels = MODELS[key][1][0]
    return random_input((2, channels, 10, 9), seed=seed)


def _fresh(module, key: str, fused: bool):
    name, args = MODELS[key]
    return getattr(module, name)(*args, inference_mode=fused).double()


def _reference(key: str, fused: bool):
    model = oracle.randomize_bn_stats(_fresh(oracle, key, fused=False))
    return oracle.reparameterize_model(model) if fused else model


@pytest.mark.parametrize("fused", [False, True], ids=["train-time", "fused"])
@pytest.mark.parametrize("key", list(MODELS))
def test_oracle_checkpoint_loads_into_ours(key, fused):
    reference = _reference(key, fused)
    ours = _fresh(mobileone_rs, key, fused)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = _input(key)
    assert_close(eval_output(ours, x), eval_output(reference, x), F64, "after loading")


@pytest.mark.parametrize("key", list(MODELS))
def test_oracle_fused_checkpoint_loads_into_reparameterized_ours(key):
    reference = _reference(key, fused=True)
    ours = mobileone_rs.reparameterize_model(_fresh(mobileone_rs, key, fused=False))
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = _input(key)
    assert_close(eval_output(ours, x), eval_output(reference, x), F64, "after loading")


@pytest.mark.parametrize("fused", [False, True], ids=["train-time", "fused"])
@pytest.mark.parametrize("key", list(MODELS))
def test_our_checkpoint_loads_into_oracle(key, fused):
    source = _reference(key, fused=False)
    ours = oracle.copy_weights(source, _fresh(mobileone_rs, key, fused=False))
    if fused:
        ours = mobileone_rs.reparameterize_model(ours)
        source = oracle.reparameterize_model(source)
    reference = _fresh(oracle, key, fused)
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = _input(key)
    assert_close(eval_output(reference, x), eval_output(source, x), F64, "oracle after loading")


def _pickle_round_trip(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "round_trip",
    [copy.deepcopy, _pickle_round_trip, _torch_save_round_trip],
    ids=["deepcopy", "pickle", "torch.save"],
)
@pytest.mark.parametrize("fused", [False, True], ids=["train-time", "fused"])
@pytest.mark.parametrize("key", ["block", "stage"])
def test_whole_module_round_trip_gives_identical_outputs(key, fused, round_trip):
    name, args = MODELS[key]
    ours, reference = build_pair(name, *args)
    if fused:
        mobileone_rs.reparameterize_model(ours, inplace=True)
    x = _input(key)
    expected = eval_output(ours, x)
    restored = round_trip(ours)
    assert type(restored) is type(ours)
    assert torch.equal(eval_output(restored, x), expected)
    assert_close(eval_output(restored, x), eval_output(reference, x), F64, "restored vs oracle")
    # The restored copy owns its tensors: changing them leaves the original alone.
    with torch.no_grad():
        for param in restored.parameters():
            param.add_(1.0)
    assert torch.equal(eval_output(ours, x), expected)


@pytest.mark.parametrize("stored", ["tuple", "dict"])
def test_pickles_from_earlier_releases_still_load(stored):
    # Earlier releases pickled the spec as a 9-tuple and had no fast/low_memory/cpu_kernel attributes.
    ours, reference = build_pair("MobileOneBlock", 16, 16, 3, 1, 1, 1, 1, True, 2)
    state = ours.__getstate__()
    spec = state["_spec"]
    assert list(spec) == list(mobileone_rs.BlockSpec.FIELDS)
    state["_spec"] = tuple(spec.values()) if stored == "tuple" else dict(spec)
    for option in ("fast", "low_memory", "cpu_kernel"):
        del state[option]
    restored = type(ours).__new__(type(ours))
    restored.__setstate__(state)
    assert restored._spec == ours._spec
    assert (restored.fast, restored.low_memory, restored.cpu_kernel) == (True, False, True)
    x = random_input((2, 16, 9, 9))
    assert_close(eval_output(restored, x), eval_output(reference, x), F64, "restored vs oracle")
