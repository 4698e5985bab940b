//! The two eval forwards: a fused block (one conv, SE, ReLU) and an unfused block whose BNs all
//! use running statistics, folded on the fly into that one conv (differentiable: gradients reach
//! every branch's kernel and BN affine parameters through the fold, as through the branches).

use tch::Tensor;

use super::se::{activate, SqueezeExcite};
use crate::cpu;
use crate::error::Result;
use crate::fuse::{self, Branches};
use crate::spec::BlockSpec;

/// One conv with the block's geometry, then SE and ReLU. With `cpu_kernel`, a float32 depthwise
/// conv runs on the CPU kernel (the caller allows it only when no gradient is wanted); a tensor
/// the kernel cannot read takes libtorch's conv.
pub fn forward_fused(
    spec: &BlockSpec,
    weight: &Tensor,
    bias: &Tensor,
    se: Option<&SqueezeExcite>,
    x: &Tensor,
    cpu_kernel: bool,
) -> Result<Tensor> {
    let mut y = None;
    if cpu_kernel {
        y = cpu::inference_conv(&spec.into(), x, weight, bias)?;
    }
    let y = match y {
        Some(y) => y,
        None => {
            let (s, p, d) = (spec.stride, spec.padding, spec.dilation);
            x.f_conv2d(weight, Some(bias), [s, s], [p, p], [d, d], spec.groups)?
        }
    };
    activate(y, se)
}

/// The branches folded with their running statistics into one conv, then [`forward_fused`].
pub fn forward_folded(
    spec: &BlockSpec,
    branches: &Branches,
    se: Option<&SqueezeExcite>,
    x: &Tensor,
    cpu_kernel: bool,
) -> Result<Tensor> {
    let (kernel, bias) = fuse::fused_kernel_bias(spec, branches)?;
    forward_fused(spec, &kernel, &bias, se, x, cpu_kernel)
}
