//! Argument conversion: the tuples the nn.Module shells pass, turned into core types.

use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::errors::not_a_tensor;
use crate::block::{BlockSpec, Branches};
use crate::fusion::{BatchNorm, ConvBn};
use crate::se::SqueezeExcite;

/// `(weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)`.
#[derive(FromPyObject)]
pub struct PyBatchNorm(PyTensor, PyTensor, PyTensor, PyTensor, Option<PyTensor>, Option<f64>, f64);

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
        ConvBn { weight: branch.0 .0, bn: branch.1.into() }
    }
}

/// `(reduce_weight, reduce_bias, expand_weight, expand_bias)`.
#[derive(FromPyObject)]
pub struct PySqueezeExcite(PyTensor, PyTensor, PyTensor, PyTensor);

impl From<PySqueezeExcite> for SqueezeExcite {
    fn from(se: PySqueezeExcite) -> Self {
        SqueezeExcite {
            reduce_weight: se.0 .0,
            reduce_bias: se.1 .0,
            expand_weight: se.2 .0,
            expand_bias: se.3 .0,
        }
    }
}

/// `(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, use_se, num_conv_branches)`.
#[derive(FromPyObject)]
pub struct PyBlockSpec(i64, i64, i64, i64, i64, i64, i64, bool, i64);

impl From<PyBlockSpec> for BlockSpec {
    fn from(s: PyBlockSpec) -> Self {
        BlockSpec {
            in_channels: s.0,
            out_channels: s.1,
            kernel_size: s.2,
            stride: s.3,
            padding: s.4,
            dilation: s.5,
            groups: s.6,
            use_se: s.7,
            num_conv_branches: s.8,
        }
    }
}

/// A block spec as the tuple `MobileOneBlock.__init__` would pass (in the order above).
pub type SpecTuple = (i64, i64, i64, i64, i64, i64, i64, bool, i64);

/// The tuple form of a spec.
pub fn spec_tuple(s: &BlockSpec) -> SpecTuple {
    (s.in_channels, s.out_channels, s.kernel_size, s.stride, s.padding, s.dilation, s.groups, s.use_se, s.num_conv_branches)
}

/// The branches of an unfused block.
pub fn branches(conv: Vec<PyConvBn>, scale: Option<PyConvBn>, skip: Option<PyBatchNorm>) -> Branches {
    Branches {
        conv: conv.into_iter().map(ConvBn::from).collect(),
        scale: scale.map(ConvBn::from),
        skip: skip.map(BatchNorm::from),
    }
}

/// The input tensor, or an `InputTypeError` naming what was passed instead.
pub fn input_tensor(x: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    x.extract::<PyTensor>().map(|t| t.0).map_err(|_| not_a_tensor("input", x))
}
