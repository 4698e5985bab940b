"""Native calls release the GIL, and concurrent threads compute what one thread computes (float64)."""

from __future__ import annotations

import copy
import sys
import threading
import time

import mobileone_rs
import pytest
import torch

from tests import oracle
from tests._util import TOLERANCE, assert_close, build_pair, eval_output, random_input, train_step

F64 = TOLERANCE[torch.float64]
# Threads must agree with one thread to rounding: each runs the same kernels on the same data.
SAME = 1e-12
NUM_THREADS = 4
STAGE_ARGS = (16, 32, 2, 3, True, 1)


# ------------------------------------------------------------------------------------------------
# GIL release, observed without a clock: with a huge switch interval, a thread that holds the GIL
# keeps it until it blocks, so the main thread (which yields the GIL at every step) can count
# during a worker's call only if that call releases it.


def _progress_during(fn) -> int:
    """How many steps the main thread made while a worker ran ``fn`` (after a warm-up run)."""
    fn()  # warm-up: first-call allocations and lazy initialisation are not what we observe
    counter = [0]
    seen: dict[str, int] = {}

    def work():
        seen["before"] = counter[0]
        fn()
        seen["after"] = counter[0]

    previous = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        while worker.is_alive():
            counter[0] += 1
            time.sleep(0)  # releases the GIL for a moment, so a returning worker can take it
        worker.join()
    finally:
        sys.setswitchinterval(previous)
    return seen["after"] - seen["before"]


def _no_grad(model, x):
    def run():
        with torch.no_grad():
            model(x)

    return run


def _gil_case(case: str):
    """The workload of ``case``: native calls long enough for the main thread to be scheduled."""
    if case in ("eval", "fused"):
        dense = mobileone_rs.MobileOneBlock(32, 32, 3, padding=1, num_conv_branches=2).double().eval()
        model = mobileone_rs.reparameterize_model(dense) if case == "fused" else dense
        return _no_grad(model, random_input((4, 32, 96, 96)))
    depthwise = mobileone_rs.MobileOneBlock(32, 32, 3, padding=1, groups=32, num_conv_branches=4).double()
    x = random_input((8, 32, 160, 160)).requires_grad_(True)

    def train():
        out = depthwise.train()(x)
        if case == "train-forward-backward":
            out.backward(torch.ones_like(out))

    return train


def test_observer_sees_a_gil_holding_call():
    """The instrument works: a C call that keeps the GIL (builtin sum) lets the main thread make
    no step at all."""
    assert _progress_during(lambda: sum(range(4_000_000))) == 0


@pytest.mark.parametrize("case", ["eval", "fused", "train-forward", "train-forward-backward"])
def test_native_calls_release_the_gil(case):
    assert _progress_during(_gil_case(case)) > 0, f"{case}: the main thread never ran during the call"


# ------------------------------------------------------------------------------------------------
# Concurrency: NUM_THREADS threads start together and repeat their work; every result must equal
# the single-threaded one, which itself matches the oracle.


def _run_concurrently(job, repeats: int = 3) -> list:
    """Runs ``job(thread_index)`` on NUM_THREADS threads at once, ``repeats`` times each."""
    barrier = threading.Barrier(NUM_THREADS)
    results: list = [None] * NUM_THREADS
    errors: list = []

    def run(index):
        try:
            barrier.wait()
            results[index] = [job(index) for _ in range(repeats)]
        except BaseException as error:  # noqa: BLE001 - re-raised on the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(NUM_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [r for per_thread in results for r in per_thread]


def _assert_same(results: list[dict], expected: dict, bound: float) -> None:
    for result in results:
        assert list(result) == list(expected)
        for name, value in expected.items():
            assert_close(result[name], value, bound, name)


def _train_result(model, x) -> dict:
    result = train_step(model, x)
    result.update({name: b.clone() for name, b in model.named_buffers()})
    return result


def test_concurrent_training_on_copies_matches_one_thread():
    ours, reference = build_pair("MobileOne", *STAGE_ARGS)
    x = random_input((3, 16, 11, 9))
    expected = _train_result(copy.deepcopy(ours), x)
    _assert_same([expected], _train_result(reference, x), F64)
    results = _run_concurrently(lambda _: _train_result(copy.deepcopy(ours), x))
    _assert_same(results, expected, SAME)


def test_concurrent_eval_and_fused_forward_on_shared_models():
    ours, reference = build_pair("MobileOne", *STAGE_ARGS)
    ours.eval()
    fused = mobileone_rs.reparameterize_model(ours).eval()
    inputs = [random_input((2, 16, 9 + i, 12 - i), seed=10 + i) for i in range(NUM_THREADS)]
    expected = [{"eval": eval_output(ours, x), "fused": eval_output(fused, x)} for x in inputs]
    for x, want in zip(inputs, expected):
        reference_out = eval_output(reference, x)
        assert_close(want["eval"], reference_out, F64, "eval vs oracle")
        assert_close(want["fused"], reference_out, F64, "fused vs oracle")

    def job(index):
        with torch.no_grad():
            return index, {"eval": ours(inputs[index]), "fused": fused(inputs[index])}

    for index, result in _run_concurrently(job):
        _assert_same([result], expected[index], SAME)


def test_concurrent_reparameterize_model_of_a_shared_model():
    ours, reference = build_pair("MobileOne", *STAGE_ARGS)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = random_input((2, 16, 10, 10))
    expected = eval_output(oracle.reparameterize_model(reference), x)
    fused_models = _run_concurrently(lambda _: mobileone_rs.reparameterize_model(ours))
    for fused in fused_models:
        assert_close(eval_output(fused, x), expected, F64, "fused copy vs oracle")
    after = ours.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the shared source model changed"


# ------------------------------------------------------------------------------------------------
# The depthwise training kernel splits channels over torch's intra-op threads: any thread count
# gives exactly the same numbers (each channel is computed whole by one thread).


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_training_step_is_the_same_on_torch_threads(stride):
    ours, reference = build_pair(
        "MobileOneBlock", 24, 24, 3, stride=stride, padding=1, groups=24, num_conv_branches=3
    )
    x = random_input((2, 24, 48, 48))  # above the size the kernel parallelizes from
    expected = train_step(reference, x)
    previous = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = train_step(copy.deepcopy(ours), x)
    finally:
        torch.set_num_threads(previous)
    for threads in (2, 3):
        for key, value in results[1].items():
            assert torch.equal(results[threads][key], value), f"{key} with {threads} threads"
    for key, value in expected.items():
        assert_close(results[1][key], value, F64, key)
