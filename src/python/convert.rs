//! Argument conversion: the tuples the nn.Module shells pass, turned into core types.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyFloat, PyInt, PyTuple};
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::errors::not_a_tensor;
use crate::cpu::check_metadata;
use crate::error::Error;
use crate::fuse::{BatchNorm, Branches, ConvBn};
use crate::spec::BlockSpec;

/// `(weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)`.
#[derive(FromPyObject)]
pub struct PyBatchNorm(
    PyTensor,
    PyTensor,
    PyTensor,
    PyTensor,
    Option<PyTensor>,
    Option<f64>,
    f64,
);

impl From<PyBatchNorm> for BatchNorm {
    fn from(bn: PyBatchNorm) -> Self {
        let PyBatchNorm(weight, bias, running_mean, running_var, count, momentum, eps) = bn;
        BatchNorm {
            weight: weight.0,
            bias: bias.0,
            running_mean: running_mean.0,
            running_var: running_var.0,
            num_batches_tracked: count.map(|c| c.0),
            momentum,
            eps,
        }
    }
}

/// `(conv_weight, batch_norm)`.
#[derive(FromPyObject)]
pub struct PyConvBn(PyTensor, PyBatchNorm);

impl From<PyConvBn> for ConvBn {
    fn from(branch: PyConvBn) -> Self {
        ConvBn {
            weight: branch.0 .0,
            bn: branch.1.into(),
        }
    }
}

/// `(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, use_se, num_conv_branches)`.
pub struct PyBlockSpec(BlockSpec);

const SPEC_NAMES: [&str; 9] = [
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "use_se",
    "num_conv_branches",
];

impl<'py> FromPyObject<'py> for PyBlockSpec {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let items = ob.downcast::<PyTuple>()?;
        if items.len() != SPEC_NAMES.len() {
            return Err(PyTypeError::new_err(format!(
                "a block spec has {} fields, got {}",
                SPEC_NAMES.len(),
                items.len()
            )));
        }
        let mut ints = [0i64; 9];
        for (i, name) in SPEC_NAMES.iter().enumerate() {
            if *name != "use_se" {
                ints[i] = int_arg(&items.get_item(i)?, name)?;
            }
        }
        let use_se = items.get_item(7)?.is_truthy()?;
        Ok(PyBlockSpec(BlockSpec {
            in_channels: ints[0],
            out_channels: ints[1],
            kernel_size: ints[2],
            stride: ints[3],
            padding: ints[4],
            dilation: ints[5],
            groups: ints[6],
            use_se,
            num_conv_branches: ints[8],
        }))
    }
}

impl PyBlockSpec {
    /// The spec, after every check of [`BlockSpec::validate`] (a `ConfigError` otherwise).
    pub fn validated(self) -> PyResult<BlockSpec> {
        self.0.validate()?;
        Ok(self.0)
    }
}

/// An integer argument, or a `TypeError` (not an int) / `ConfigError` (beyond int64) naming it.
pub fn int_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<i64> {
    if let Ok(value) = obj.extract::<i64>() {
        return Ok(value);
    }
    if obj.is_instance_of::<PyInt>() {
        return Err(Error::Config(format!("{name} is out of range, got {obj}")).into());
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be an integer, got {} {}",
        type_name(obj),
        obj.repr()?
    )))
}

/// The name of `obj`'s type, for error messages.
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A float argument, or a `TypeError` naming it.
pub fn float_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
    let is_number = obj.is_instance_of::<PyInt>() || obj.is_instance_of::<PyFloat>();
    match obj.extract::<f64>() {
        Ok(value) if is_number => Ok(value),
        _ => Err(PyTypeError::new_err(format!(
            "{name} must be a number, got {}",
            type_name(obj)
        ))),
    }
}

/// A block spec as the tuple `MobileOneBlock.__init__` would pass (in the order above).
pub type SpecTuple = (i64, i64, i64, i64, i64, i64, i64, bool, i64);

/// The tuple form of a spec.
pub fn spec_tuple(s: &BlockSpec) -> SpecTuple {
    (
        s.in_channels,
        s.out_channels,
        s.kernel_size,
        s.stride,
        s.padding,
        s.dilation,
        s.groups,
        s.use_se,
        s.num_conv_branches,
    )
}

/// The branches of an unfused block, every tensor's metadata checked.
pub fn branches(
    conv: Vec<PyConvBn>,
    scale: Option<PyConvBn>,
    skip: Option<PyBatchNorm>,
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

/// The input tensor, or an `InputTypeError` naming what was passed instead.
pub fn input_tensor(x: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let t = x
        .extract::<PyTensor>()
        .map(|t| t.0)
        .map_err(|_| not_a_tensor("input", x))?;
    check_metadata(&t, "the input")?;
    Ok(t)
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
