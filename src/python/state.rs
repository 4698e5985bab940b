//! The state tuples the nn.Module shells pass, turned into the dispatcher's types. Conversion is
//! lenient where the dispatcher decides (an attribute of an unexpected type becomes a value the
//! fast paths refuse) and strict where the tuple itself is malformed (a `TypeError`).

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString, PyTuple};
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::convert::PyBlockSpec;
use crate::cpu::check_metadata;
use crate::forward::state::{
    BlockState, BnState, Body, BranchState, ConvState, Env, Momentum, Options, SeState,
};

fn tuple<'py>(ob: &Bound<'py, PyAny>, len: usize, what: &str) -> PyResult<Bound<'py, PyTuple>> {
    let items = ob
        .downcast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err(format!("{what} must be a tuple")))?;
    if items.len() != len {
        return Err(PyTypeError::new_err(format!(
            "{what} has {} fields, expected {len}",
            items.len()
        )));
    }
    Ok(items.clone())
}

/// A tensor field: `Ok(None)` for `None`; a tensor whose metadata libtorch cannot read (nested)
/// counts as not plain.
fn tensor(ob: &Bound<'_, PyAny>, plain: &mut bool) -> PyResult<Option<Tensor>> {
    if ob.is_none() {
        return Ok(None);
    }
    let t = ob
        .extract::<PyTensor>()
        .map_err(|_| PyTypeError::new_err("a state field must be a tensor or None"))?
        .0;
    if check_metadata(&t, "a module tensor").is_err() {
        *plain = false;
    }
    Ok(Some(t))
}

fn required(t: Option<Tensor>) -> PyResult<Tensor> {
    t.ok_or_else(|| PyTypeError::new_err("a conv weight must be a tensor"))
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

/// `(weight, bias, stride, padding, dilation, groups, padding_mode, plain)`.
fn conv(ob: &Bound<'_, PyAny>) -> PyResult<ConvState> {
    let t = tuple(ob, 8, "a conv state")?;
    let mut plain = t.get_item(7)?.is_truthy()?;
    let weight = required(tensor(&t.get_item(0)?, &mut plain)?)?;
    let bias = tensor(&t.get_item(1)?, &mut plain)?;
    let padding = t.get_item(3)?;
    let zeros = t.get_item(6)?;
    Ok(ConvState {
        weight,
        bias,
        stride: ints(&t.get_item(2)?),
        padding: (!padding.is_instance_of::<PyString>()).then(|| ints(&padding)),
        dilation: ints(&t.get_item(4)?),
        groups: t.get_item(5)?.extract::<i64>().unwrap_or(0),
        zeros_padding: zeros.extract::<String>().is_ok_and(|m| m == "zeros"),
        plain,
    })
}

/// `(weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, training,
/// track_running_stats, plain)`.
fn bn(ob: &Bound<'_, PyAny>) -> PyResult<BnState> {
    let t = tuple(ob, 10, "a BatchNorm state")?;
    let mut plain = t.get_item(9)?.is_truthy()?;
    let momentum = t.get_item(5)?;
    let momentum = if momentum.is_none() {
        Momentum::Cumulative
    } else {
        number(&momentum).map_or(Momentum::Other, Momentum::Value)
    };
    Ok(BnState {
        weight: tensor(&t.get_item(0)?, &mut plain)?,
        bias: tensor(&t.get_item(1)?, &mut plain)?,
        running_mean: tensor(&t.get_item(2)?, &mut plain)?,
        running_var: tensor(&t.get_item(3)?, &mut plain)?,
        num_batches_tracked: tensor(&t.get_item(4)?, &mut plain)?,
        momentum,
        eps: number(&t.get_item(6)?),
        training: t.get_item(7)?.is_truthy()?,
        track_running_stats: t.get_item(8)?.is_truthy()?,
        plain,
    })
}

/// `(conv, bn, plain)`.
fn branch(ob: &Bound<'_, PyAny>) -> PyResult<BranchState> {
    let t = tuple(ob, 3, "a branch state")?;
    Ok(BranchState {
        conv: conv(&t.get_item(0)?)?,
        bn: bn(&t.get_item(1)?)?,
        plain: t.get_item(2)?.is_truthy()?,
    })
}

/// `("none", plain)`, `("se", reduce, expand, plain)` or `("opaque",)`.
pub fn se(ob: &Bound<'_, PyAny>) -> PyResult<SeState> {
    let t = ob
        .downcast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err("an SE state must be a tuple"))?;
    let kind: String = t.get_item(0)?.extract()?;
    match (kind.as_str(), t.len()) {
        ("none", 2) => Ok(SeState::Absent {
            plain: t.get_item(1)?.is_truthy()?,
        }),
        ("se", 4) => Ok(SeState::Present {
            reduce: Box::new(conv(&t.get_item(1)?)?),
            expand: Box::new(conv(&t.get_item(2)?)?),
            plain: t.get_item(3)?.is_truthy()?,
        }),
        ("opaque", 1) => Ok(SeState::Opaque),
        _ => Err(PyTypeError::new_err(format!("unknown SE state {kind:?}"))),
    }
}

/// `(spec, body, se, activation_plain)` with body `("branches", [branch...], scale, skip)` or
/// `("fused", conv)`.
pub fn block(ob: &Bound<'_, PyAny>) -> PyResult<BlockState> {
    let t = tuple(ob, 4, "a block state")?;
    let spec = t.get_item(0)?.extract::<PyBlockSpec>()?.validated()?;
    let body = t.get_item(1)?;
    let body = body
        .downcast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err("a block body must be a tuple"))?;
    let kind: String = body.get_item(0)?.extract()?;
    let body = match (kind.as_str(), body.len()) {
        ("branches", 4) => {
            let convs = body.get_item(1)?;
            let optional = |i: usize| -> PyResult<Option<Bound<'_, PyAny>>> {
                let item = body.get_item(i)?;
                Ok((!item.is_none()).then_some(item))
            };
            Body::Branches {
                conv: convs
                    .try_iter()?
                    .map(|b| branch(&b?))
                    .collect::<PyResult<_>>()?,
                scale: optional(2)?.map(|b| branch(&b).map(Box::new)).transpose()?,
                skip: optional(3)?.map(|b| bn(&b).map(Box::new)).transpose()?,
            }
        }
        ("fused", 2) => Body::Fused(Box::new(conv(&body.get_item(1)?)?)),
        ("opaque", 2) => Body::Opaque(body.get_item(1)?.extract()?),
        _ => return Err(PyTypeError::new_err(format!("unknown block body {kind:?}"))),
    };
    Ok(BlockState {
        spec,
        body,
        se: se(&t.get_item(2)?)?,
        activation_plain: t.get_item(3)?.is_truthy()?,
    })
}

/// The 14 flags of the call, in the order of the `Env` fields and then the three options.
pub fn env(ob: &Bound<'_, PyAny>) -> PyResult<Env> {
    let t = tuple(ob, 14, "a call environment")?;
    let mut flags = [false; 14];
    for (i, flag) in flags.iter_mut().enumerate() {
        *flag = t.get_item(i)?.is_truthy()?;
    }
    let [grad_enabled, inference_mode, autocast, jit_tracing, functorch, dispatch_mode, function_mode, saved_tensor_hooks, forward_ad, global_hooks, input_subclass, fast, low_memory, cpu_kernel] =
        flags;
    Ok(Env {
        grad_enabled,
        inference_mode,
        autocast,
        jit_tracing,
        functorch,
        dispatch_mode,
        function_mode,
        saved_tensor_hooks,
        forward_ad,
        global_hooks,
        input_subclass,
        options: Options {
            fast,
            low_memory,
            cpu_kernel,
        },
    })
}
