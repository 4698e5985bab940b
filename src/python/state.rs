//! The shells' observations, read by name (the dicts `mobileone_rs/state.py` types), and turned
//! into the dispatcher's types: one `TryFrom` per kind of child. Reading is strict where the
//! schema is broken (a missing key or a non-tensor where a tensor belongs: `TypeError`) and
//! lenient where the dispatcher decides (an attribute of an unexpected type becomes a value the
//! fast paths refuse).

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString};
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::spec::PyBlockSpec;
use crate::cpu::check_metadata;
use crate::forward::state::{
    BlockState, BnState, Body, BranchState, ConvState, Env, Momentum, Options, SeState,
};

/// A tensor field; a tensor whose metadata libtorch cannot read (nested) makes its owner not
/// plain.
fn tensor(t: Option<PyTensor>, plain: &mut bool) -> Option<Tensor> {
    let t = t?.0;
    if check_metadata(&t, "a module tensor").is_err() {
        *plain = false;
    }
    Some(t)
}

/// Integers of a tuple attribute, or an empty vector (which matches no geometry).
fn ints(ob: &Bound<'_, PyAny>) -> Vec<i64> {
    ob.extract::<Vec<i64>>().unwrap_or_default()
}

/// A number that is not a bool.
fn number(ob: &Bound<'_, PyAny>) -> Option<f64> {
    let numeric = (ob.is_instance_of::<PyInt>() || ob.is_instance_of::<PyFloat>())
        && !ob.is_instance_of::<PyBool>();
    numeric.then(|| ob.extract::<f64>().ok()).flatten()
}

/// `ConvState`: an `nn.Conv2d` child.
#[derive(FromPyObject)]
pub struct PyConvState<'py> {
    #[pyo3(item)]
    weight: Option<PyTensor>,
    #[pyo3(item)]
    bias: Option<PyTensor>,
    #[pyo3(item)]
    stride: Bound<'py, PyAny>,
    #[pyo3(item)]
    padding: Bound<'py, PyAny>,
    #[pyo3(item)]
    dilation: Bound<'py, PyAny>,
    #[pyo3(item)]
    groups: Bound<'py, PyAny>,
    #[pyo3(item)]
    padding_mode: Bound<'py, PyAny>,
    #[pyo3(item)]
    plain: bool,
}

impl TryFrom<PyConvState<'_>> for ConvState {
    type Error = PyErr;

    fn try_from(c: PyConvState<'_>) -> PyResult<Self> {
        let mut plain = c.plain;
        let weight = tensor(c.weight, &mut plain)
            .ok_or_else(|| PyTypeError::new_err("a conv weight must be a tensor"))?;
        Ok(ConvState {
            weight,
            bias: tensor(c.bias, &mut plain),
            stride: ints(&c.stride),
            padding: (!c.padding.is_instance_of::<PyString>()).then(|| ints(&c.padding)),
            dilation: ints(&c.dilation),
            groups: c.groups.extract::<i64>().unwrap_or(0),
            zeros_padding: c
                .padding_mode
                .extract::<String>()
                .is_ok_and(|m| m == "zeros"),
            plain,
        })
    }
}

/// `BnState`: an `nn.BatchNorm2d` child.
#[derive(FromPyObject)]
pub struct PyBnState<'py> {
    #[pyo3(item)]
    weight: Option<PyTensor>,
    #[pyo3(item)]
    bias: Option<PyTensor>,
    #[pyo3(item)]
    running_mean: Option<PyTensor>,
    #[pyo3(item)]
    running_var: Option<PyTensor>,
    #[pyo3(item)]
    num_batches_tracked: Option<PyTensor>,
    #[pyo3(item)]
    momentum: Bound<'py, PyAny>,
    #[pyo3(item)]
    eps: Bound<'py, PyAny>,
    #[pyo3(item)]
    training: Bound<'py, PyAny>,
    #[pyo3(item)]
    track_running_stats: Bound<'py, PyAny>,
    #[pyo3(item)]
    plain: bool,
}

/// A `bool` attribute's value, `None` when it holds something else (torch's forward reads it
/// as truthy; only the module path models that).
fn flag(ob: &Bound<'_, PyAny>) -> Option<bool> {
    ob.downcast::<PyBool>().ok().map(|b| b.is_true())
}

impl From<PyBnState<'_>> for BnState {
    fn from(b: PyBnState<'_>) -> Self {
        let mut plain = b.plain;
        let momentum = if b.momentum.is_none() {
            Momentum::Cumulative
        } else {
            number(&b.momentum).map_or(Momentum::Other, Momentum::Value)
        };
        BnState {
            weight: tensor(b.weight, &mut plain),
            bias: tensor(b.bias, &mut plain),
            running_mean: tensor(b.running_mean, &mut plain),
            running_var: tensor(b.running_var, &mut plain),
            num_batches_tracked: tensor(b.num_batches_tracked, &mut plain),
            momentum,
            eps: number(&b.eps),
            training: flag(&b.training),
            track_running_stats: flag(&b.track_running_stats),
            plain,
        }
    }
}

/// `BranchState`: an `nn.Sequential` of `conv` and `bn`.
#[derive(FromPyObject)]
pub struct PyBranchState<'py> {
    #[pyo3(item)]
    conv: PyConvState<'py>,
    #[pyo3(item)]
    bn: PyBnState<'py>,
    #[pyo3(item)]
    plain: bool,
}

impl TryFrom<PyBranchState<'_>> for BranchState {
    type Error = PyErr;

    fn try_from(b: PyBranchState<'_>) -> PyResult<Self> {
        Ok(BranchState {
            conv: b.conv.try_into()?,
            bn: b.bn.into(),
            plain: b.plain,
        })
    }
}

/// The value of a `kind` key, for the states that have variants.
fn kind_of(ob: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    ob.get_item("kind")
        .and_then(|k| k.extract::<String>())
        .map_err(|_| PyTypeError::new_err(format!("{what} needs a 'kind' string")))
}

/// `SeState`: `{"kind": "none", "plain"}`, `{"kind": "se", "reduce", "expand", "plain"}` or
/// `{"kind": "opaque", "reason"}`.
pub fn se(ob: &Bound<'_, PyAny>) -> PyResult<SeState> {
    let plain = || ob.get_item("plain")?.extract::<bool>();
    let conv = |key: &str| -> PyResult<Box<ConvState>> {
        let state: PyConvState<'_> = ob.get_item(key)?.extract()?;
        Ok(Box::new(state.try_into()?))
    };
    match kind_of(ob, "an SE state")?.as_str() {
        "none" => Ok(SeState::Absent { plain: plain()? }),
        "se" => Ok(SeState::Present {
            reduce: conv("reduce")?,
            expand: conv("expand")?,
            plain: plain()?,
        }),
        "opaque" => Ok(SeState::Opaque(ob.get_item("reason")?.extract()?)),
        kind => Err(PyTypeError::new_err(format!("unknown SE state {kind:?}"))),
    }
}

/// The body of a block: `{"kind": "branches", "convs", "scale", "skip"}`, `{"kind": "fused",
/// "conv"}` or `{"kind": "opaque", "reason"}`.
fn body(ob: &Bound<'_, PyAny>) -> PyResult<Body> {
    let branch = |b: Bound<'_, PyAny>| -> PyResult<BranchState> {
        b.extract::<PyBranchState<'_>>()?.try_into()
    };
    match kind_of(ob, "a block body")?.as_str() {
        "branches" => {
            let scale = ob.get_item("scale")?;
            let skip = ob.get_item("skip")?;
            Ok(Body::Branches {
                conv: ob
                    .get_item("convs")?
                    .try_iter()?
                    .map(|b| branch(b?))
                    .collect::<PyResult<_>>()?,
                scale: (!scale.is_none())
                    .then(|| branch(scale).map(Box::new))
                    .transpose()?,
                skip: (!skip.is_none())
                    .then(|| skip.extract::<PyBnState<'_>>().map(|b| Box::new(b.into())))
                    .transpose()?,
            })
        }
        "fused" => {
            let conv: PyConvState<'_> = ob.get_item("conv")?.extract()?;
            Ok(Body::Fused(Box::new(conv.try_into()?)))
        }
        "opaque" => Ok(Body::Opaque(ob.get_item("reason")?.extract()?)),
        kind => Err(PyTypeError::new_err(format!("unknown block body {kind:?}"))),
    }
}

/// `BlockState`: `{"spec", "body", "se", "activation_plain"}`. The call's spec counts the conv
/// branches the shell read (`rbr_conv[:num_conv_branches]`, as the reference's forward loops).
pub fn block(ob: &Bound<'_, PyAny>) -> PyResult<BlockState> {
    let spec = ob.get_item("spec")?.downcast::<PyBlockSpec>()?.get().0;
    let body = body(&ob.get_item("body")?)?;
    let spec = match &body {
        Body::Branches { conv, .. } => crate::spec::BlockSpec {
            num_conv_branches: conv.len() as i64,
            ..spec
        },
        _ => spec,
    };
    Ok(BlockState {
        spec,
        body,
        se: se(&ob.get_item("se")?)?,
        activation_plain: ob.get_item("activation_plain")?.extract()?,
    })
}

/// `CallEnv`: the facts of the call and the block's options.
#[derive(FromPyObject)]
pub struct PyCallEnv {
    #[pyo3(item)]
    grad_enabled: bool,
    #[pyo3(item)]
    inference_mode: bool,
    #[pyo3(item)]
    autocast: bool,
    #[pyo3(item)]
    jit_tracing: bool,
    #[pyo3(item)]
    functorch: bool,
    #[pyo3(item)]
    dispatch_mode: bool,
    #[pyo3(item)]
    function_mode: bool,
    #[pyo3(item)]
    saved_tensor_hooks: bool,
    #[pyo3(item)]
    forward_ad: bool,
    #[pyo3(item)]
    global_hooks: bool,
    #[pyo3(item)]
    patched_torch: bool,
    #[pyo3(item)]
    input_subclass: bool,
    #[pyo3(item)]
    fast: bool,
    #[pyo3(item)]
    low_memory: bool,
    #[pyo3(item)]
    cpu_kernel: bool,
}

impl From<PyCallEnv> for Env {
    fn from(e: PyCallEnv) -> Self {
        Env {
            grad_enabled: e.grad_enabled,
            inference_mode: e.inference_mode,
            autocast: e.autocast,
            jit_tracing: e.jit_tracing,
            functorch: e.functorch,
            dispatch_mode: e.dispatch_mode,
            function_mode: e.function_mode,
            saved_tensor_hooks: e.saved_tensor_hooks,
            forward_ad: e.forward_ad,
            global_hooks: e.global_hooks,
            patched_torch: e.patched_torch,
            input_subclass: e.input_subclass,
            options: Options {
                fast: e.fast,
                low_memory: e.low_memory,
                cpu_kernel: e.cpu_kernel,
            },
        }
    }
}
