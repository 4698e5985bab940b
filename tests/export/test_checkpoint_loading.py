"""torch.load(weights_only=True): state_dicts load as is; whole modules need exactly SAFE_GLOBALS.

torch >= 2.6 loads with ``weights_only=True`` by default, which unpickles tensors and plain
containers only. A state_dict needs nothing more. A pickled module needs its classes allowed with
``torch.serialization.add_safe_globals`` (or the ``safe_globals`` context manager used here, which
leaves the process-wide allow-list untouched).
"""

from __future__ import annotations

import io
import pickle

import mobileone_rs
import pytest
import torch
from torch import nn

from tests import oracle
from tests._util import (
    TOLERANCE,
    assert_close,
    assert_state_dicts_equal,
    build_pair,
    eval_output,
    random_input,
    train_step,
)

F64 = TOLERANCE[torch.float64]
# The minimal allow-list for every pickled MobileOne module, train-time or fused, with or without SE.
SAFE_GLOBALS = [
    mobileone_rs.MobileOne,
    mobileone_rs.MobileOneBlock,
    mobileone_rs.SEBlock,
    nn.Sequential,
    nn.ModuleList,
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.Identity,
]
MODELS = {
    "stage": ("MobileOne", (16, 32, 2, 2, True, 1)),
    "stage-no-se": ("MobileOne", (16, 32, 2, 3, False, 0)),
    "block": ("MobileOneBlock", (16, 16, 3, 1, 1, 1, 4, True, 2)),
}
STATES = ["train-time", "fused"]


def _pair(key: str, state: str):
    """(ours, oracle) with random BN statistics; fused copies when ``state`` is "fused"."""
    name, args = MODELS[key]
    ours, reference = build_pair(name, *args)
    if state == "fused":
        return mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
    return ours, reference


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _input() -> torch.Tensor:
    return random_input((2, 16, 10, 9), seed=4)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("key", list(MODELS))
def test_state_dict_loads_with_weights_only(key, state):
    ours, reference = _pair(key, state)
    loaded = torch.load(_saved(ours.state_dict()), weights_only=True)
    assert_state_dicts_equal(loaded, ours.state_dict())
    target = _pair(key, state)[0]  # different random weights until loaded
    target.load_state_dict(loaded, strict=True)
    x = _input()
    assert_close(eval_output(target, x), eval_output(reference, x), F64, "loaded state_dict vs oracle")


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("key", list(MODELS))
def test_whole_module_is_refused_by_default(key, state):
    ours, _ = _pair(key, state)
    with pytest.raises(pickle.UnpicklingError, match=r"(?i)weights[_ ]only"):
        torch.load(_saved(ours), weights_only=True)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("key", list(MODELS))
def test_whole_module_loads_with_the_safe_globals(key, state):
    ours, reference = _pair(key, state)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        loaded = torch.load(_saved(ours), weights_only=True)
    assert type(loaded) is type(ours)
    assert_state_dicts_equal(loaded.state_dict(), ours.state_dict())
    x = _input()
    assert_close(eval_output(loaded, x), eval_output(reference, x), F64, "loaded module vs oracle (eval)")
    if state == "train-time":
        got, expected = train_step(loaded, x), train_step(reference, x)
        for name, value in expected.items():
            assert_close(got[name], value, F64, f"loaded module vs oracle: {name}")


def _unsafe_globals(model) -> set[str]:
    return set(torch.serialization.get_unsafe_globals_in_checkpoint(_saved(model)))


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_safe_globals_is_exactly_what_the_checkpoints_need():
    """Minimal: the union over every model and state of the globals torch reports as needed."""
    needed = set()
    for key in MODELS:
        for state in STATES:
            needed |= _unsafe_globals(_pair(key, state)[0])
    needed |= _unsafe_globals(mobileone_rs.SEBlock(16))
    assert needed == {_qualname(cls) for cls in SAFE_GLOBALS}


@pytest.mark.parametrize("missing", SAFE_GLOBALS, ids=lambda cls: cls.__name__)
def test_every_safe_global_is_needed(missing):
    """Dropping any one class from the list makes some checkpoint fail to load."""
    model = _pair("stage", "train-time")[0]  # holds every class of the list
    fewer = [cls for cls in SAFE_GLOBALS if cls is not missing]
    with (
        torch.serialization.safe_globals(fewer),
        pytest.raises(pickle.UnpicklingError, match=missing.__name__),
    ):
        torch.load(_saved(model), weights_only=True)


def test_add_safe_globals_recipe():
    """The documented process-wide recipe; the allow-list is restored afterwards."""
    ours, reference = _pair("stage", "fused")
    previous = torch.serialization.get_safe_globals()
    try:
        torch.serialization.add_safe_globals(SAFE_GLOBALS)
        loaded = torch.load(_saved(ours), weights_only=True)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(previous)
    x = _input()
    assert_close(eval_output(loaded, x), eval_output(reference, x), F64, "loaded module vs oracle")


def test_exported_safe_globals_load_a_whole_module(tmp_path):
    import mobileone_rs

    path = tmp_path / "stage.pt"
    torch.save(mobileone_rs.MobileOne(16, 32, 2, 2, True, 1), path)
    with torch.serialization.safe_globals(mobileone_rs.safe_globals()):
        loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded, mobileone_rs.MobileOne)
