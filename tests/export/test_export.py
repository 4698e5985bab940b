"""Graph capture of fused stages: jit.trace, torch.export, ONNX (onnxruntime) and torch.compile.

Every captured graph is run on an input shape it was NOT captured with and compared with the
oracle's eager output: a capture that baked in the example's sizes must fail loudly, never return
numbers for the wrong shape.
"""

from __future__ import annotations

import io
import warnings

import mobileone_rs
import pytest
import torch
from torch.export import Dim

from tests import oracle
from tests._util import GRAD_TOLERANCE, TOLERANCE, assert_close, build_pair, random_input, train_step

F64 = TOLERANCE[torch.float64]
ONNX_F32 = 1e-4
# aot_eager runs dynamo capture, functionalisation and AOT autograd (where opaque native calls and
# missing fake kernels fail) without inductor's C++ code generation, which takes minutes on 2 cores.
COMPILE_BACKEND = "aot_eager"
STAGES = {
    "no-se": (16, 32, 2, 2, False, 0),
    "se": (16, 32, 2, 2, True, 1),
}
EXAMPLE_SHAPE = (2, 16, 12, 10)
# One pair of blocks (depthwise stride 2, pointwise 16->16 with a BN skip branch), SE on both: a
# small graph keeps dynamo's capture (and its recapture for a new shape) to a few seconds.
COMPILE_STAGE = (16, 16, 1, 2, True, 1)
NEW_SHAPES = {"new-batch": (3, 16, 12, 10), "new-spatial": (3, 16, 17, 9)}


def _fused_pair(key: str, dtype=torch.float64):
    """(our fused stage, the oracle's fused stage), both in eval mode, from the same weights."""
    ours, reference = build_pair("MobileOne", *STAGES[key], dtype=dtype)
    return (mobileone_rs.reparameterize_model(ours).eval(), oracle.reparameterize_model(reference).eval())


def _expected(reference, x):
    with torch.no_grad():
        return reference(x)


# ------------------------------------------------------------------------------------------------
# torch.jit.trace


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_oracle_jit_trace_runs_on_a_new_shape():
    """The reference's SE traces its pooling size from the input, so its traced graph is shape-generic."""
    _, reference = _fused_pair("se")
    with torch.no_grad():
        traced = torch.jit.trace(reference, random_input(EXAMPLE_SHAPE))
        x = random_input(NEW_SHAPES["new-spatial"], seed=3)
        assert_close(traced(x), _expected(reference, x), F64, "traced oracle")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("shape", list(NEW_SHAPES))
@pytest.mark.parametrize("key", list(STAGES))
def test_jit_trace_of_fused_stage_runs_on_a_new_shape(key, shape):
    ours, reference = _fused_pair(key)
    with torch.no_grad():
        traced = torch.jit.trace(ours, random_input(EXAMPLE_SHAPE))
        x = random_input(NEW_SHAPES[shape], seed=3)
        assert_close(traced(x), _expected(reference, x), F64, f"traced {key} on {NEW_SHAPES[shape]}")


# ------------------------------------------------------------------------------------------------
# torch.export (non-strict). The reference's SE pools with kernel_size=[h, w] taken from the input, which
# torch.export specialises, so a stage with SE exports with a dynamic batch only (as the oracle's).

DYNAMIC_DIMS = {"no-se": (0, 2, 3), "se": (0,)}


def _export(model, key: str):
    dynamic = {dim: Dim.AUTO for dim in DYNAMIC_DIMS[key]}
    return torch.export.export(model, (random_input(EXAMPLE_SHAPE),), strict=False, dynamic_shapes=(dynamic,))


@pytest.mark.parametrize("key", list(STAGES))
def test_oracle_exports_with_the_same_dynamic_dims(key):
    """The test's dynamic dims are what the reference's code supports, so ours is held to no more."""
    _, reference = _fused_pair(key)
    x = random_input(NEW_SHAPES["new-spatial" if key == "no-se" else "new-batch"], seed=3)
    assert_close(_export(reference, key).module()(x), _expected(reference, x), F64, "oracle export")


@pytest.mark.parametrize("key", list(STAGES))
def test_torch_export_of_fused_stage_runs_on_a_new_shape(key):
    ours, reference = _fused_pair(key)
    program = _export(ours, key)
    for name, shape in NEW_SHAPES.items():
        if name == "new-spatial" and key == "se":
            continue
        x = random_input(shape, seed=3)
        assert_close(program.module()(x), _expected(reference, x), F64, f"exported {key} on {shape}")


# ------------------------------------------------------------------------------------------------
# ONNX through the TorchScript-based exporter (dynamo=False): the dynamo exporter needs onnxscript.


def _onnx_session(model, dynamic_axes: dict):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (random_input(EXAMPLE_SHAPE, torch.float32),),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            opset_version=17,
            dynamic_axes={"x": dynamic_axes, "y": dynamic_axes},
        )
    return ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])


def _onnx_run(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("key", list(STAGES))
def test_onnx_export_of_fused_stage_runs_in_onnxruntime(key):
    ours, reference = _fused_pair(key, torch.float32)
    session = _onnx_session(ours, {0: "batch"})
    for shape in (EXAMPLE_SHAPE, NEW_SHAPES["new-batch"]):
        x = random_input(shape, torch.float32, seed=3)
        assert_close(
            _onnx_run(session, x), _expected(reference, x), ONNX_F32, f"onnxruntime {key} on {shape}"
        )


@pytest.mark.parametrize("key", list(STAGES))
def test_onnx_spatially_dynamic_export_is_right_or_refused(key):
    """With dynamic H and W the export must either fail (as the oracle's SE does) or be right."""
    ours, reference = _fused_pair(key, torch.float32)
    try:
        session = _onnx_session(ours, {0: "batch", 2: "height", 3: "width"})
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as error:
        assert key == "se", f"the stage without SE must export spatially dynamic: {error}"
        return
    x = random_input(NEW_SHAPES["new-spatial"], torch.float32, seed=3)
    assert_close(_onnx_run(session, x), _expected(reference, x), ONNX_F32, f"onnxruntime {key} on {x.shape}")


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break anywhere, same numbers as the oracle in eager mode.


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_compile_fullgraph_eval(fused):
    ours, reference = build_pair("MobileOne", *COMPILE_STAGE)
    ours.eval()
    reference.eval()
    if fused:
        ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
    compiled = torch.compile(ours, fullgraph=True, backend=COMPILE_BACKEND)
    for shape in (EXAMPLE_SHAPE, NEW_SHAPES["new-spatial"]):
        x = random_input(shape, seed=3)
        with torch.no_grad():
            assert_close(compiled(x), _expected(reference, x), F64, f"compiled eval on {shape}")


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_fullgraph_training_step():
    ours, reference = build_pair("MobileOne", *COMPILE_STAGE)
    compiled = torch.compile(ours, fullgraph=True, backend=COMPILE_BACKEND)
    x = random_input(EXAMPLE_SHAPE, seed=3)
    got, expected = train_step(compiled, x), train_step(reference, x)
    got = {name.removeprefix("_orig_mod."): value for name, value in got.items()}
    for name, value in expected.items():
        assert_close(got[name], value, GRAD_TOLERANCE[torch.float64], name)
    buffers = dict(reference.named_buffers())
    for name, value in ours.named_buffers():
        assert_close(value.double(), buffers[name].double(), F64, name)


# ------------------------------------------------------------------------------------------------
# The meta device: shape propagation without data (FLOP counters, deferred initialisation).


@pytest.mark.parametrize("state", ["train", "eval", "fused"])
def test_meta_device_forward_gives_the_oracle_shape(state):
    ours, reference = build_pair("MobileOne", *STAGES["se"])
    if state == "fused":
        ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
    for model in (ours, reference):
        model.train(state == "train").to("meta")
    x = torch.empty(NEW_SHAPES["new-spatial"], dtype=torch.float64, device="meta")
    got = ours(x)
    assert got.device.type == "meta"
    assert got.shape == reference(x).shape
