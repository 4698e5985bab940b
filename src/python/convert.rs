//! Argument conversion: constructor arguments (strict: a bool is a bool, an int an int), input
//! tensors, and the named branch tensors that re-parameterization folds.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt};
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::errors::{not_a_tensor, type_name};
use crate::cpu::check_metadata;
use crate::error::Error;
use crate::fuse::{BatchNorm, Branches, ConvBn};

fn wrong_type(obj: &Bound<'_, PyAny>, name: &str, wanted: &str) -> PyErr {
    let repr = obj.repr().map(|r| r.to_string()).unwrap_or_default();
    Error::ArgumentType(format!(
        "{name} must be {wanted}, got {} {repr}",
        type_name(obj)
    ))
    .into()
}

/// An integer argument (a bool is not one), or a `ConfigError` naming it.
pub fn int_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<i64> {
    if obj.is_instance_of::<PyBool>() {
        return Err(wrong_type(obj, name, "an integer"));
    }
    if let Ok(value) = obj.extract::<i64>() {
        return Ok(value);
    }
    if obj.is_instance_of::<PyInt>() {
        return Err(Error::Config(format!("{name} is out of range, got {obj}")).into());
    }
    Err(wrong_type(obj, name, "an integer"))
}

/// A bool argument (`True` or `False`; not a string such as `"False"`), or a `ConfigError`.
pub fn bool_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    obj.extract::<bool>()
        .map_err(|_| wrong_type(obj, name, "a bool (True or False)"))
}

/// A float argument, or a `ConfigError` naming it.
pub fn float_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
    let is_number = (obj.is_instance_of::<PyInt>() || obj.is_instance_of::<PyFloat>())
        && !obj.is_instance_of::<PyBool>();
    match obj.extract::<f64>() {
        Ok(value) if is_number => Ok(value),
        _ => Err(wrong_type(obj, name, "a number")),
    }
}

/// The input tensor, or an `InputTypeError` naming what was passed instead.
pub fn input_tensor(x: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    tensor_arg(x, "input")
}

/// A tensor argument, its metadata checked.
pub fn tensor_arg(x: &Bound<'_, PyAny>, what: &str) -> PyResult<Tensor> {
    let t = x
        .extract::<PyTensor>()
        .map(|t| t.0)
        .map_err(|_| not_a_tensor(what, x))?;
    check_metadata(&t, what)?;
    Ok(t)
}

/// `FoldBn`: the tensors of a BatchNorm that re-parameterization folds.
#[derive(FromPyObject)]
pub struct PyFoldBn {
    #[pyo3(item)]
    weight: PyTensor,
    #[pyo3(item)]
    bias: PyTensor,
    #[pyo3(item)]
    running_mean: PyTensor,
    #[pyo3(item)]
    running_var: PyTensor,
    #[pyo3(item)]
    eps: f64,
}

impl From<PyFoldBn> for BatchNorm {
    fn from(bn: PyFoldBn) -> Self {
        BatchNorm {
            weight: bn.weight.0,
            bias: bn.bias.0,
            running_mean: bn.running_mean.0,
            running_var: bn.running_var.0,
            num_batches_tracked: None,
            momentum: None,
            eps: bn.eps,
        }
    }
}

/// `FoldBranch`: a conv kernel and its BatchNorm.
#[derive(FromPyObject)]
pub struct PyFoldBranch {
    #[pyo3(item)]
    weight: PyTensor,
    #[pyo3(item)]
    bn: PyFoldBn,
}

impl From<PyFoldBranch> for ConvBn {
    fn from(branch: PyFoldBranch) -> Self {
        ConvBn {
            weight: branch.weight.0,
            bn: branch.bn.into(),
        }
    }
}

/// The branches of an unfused block, every tensor's metadata checked.
pub fn branches(
    conv: Vec<PyFoldBranch>,
    scale: Option<PyFoldBranch>,
    skip: Option<PyFoldBn>,
) -> PyResult<Branches> {
    let branches = Branches {
        conv: conv.into_iter().map(ConvBn::from).collect(),
        scale: scale.map(ConvBn::from),
        skip: skip.map(BatchNorm::from),
    };
    for t in branches.kernels() {
        check_metadata(t, "a branch kernel")?;
    }
    for bn in branches.batch_norms() {
        for t in [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var] {
            check_metadata(t, "a BatchNorm tensor")?;
        }
    }
    Ok(branches)
}
