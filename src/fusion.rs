//! Re-parameterization math: fold each BatchNorm into its kernel, pad kernels, build identity
//! kernels for any `groups`, and sum branches into one conv (arXiv 2206.04040, RepVGG 2101.03697).

use tch::{Kind, Tensor};

use crate::error::Result;

/// The statistics and affine parameters of one `BatchNorm2d`, as read at call time.
#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    /// `num_batches_tracked`, incremented on every training step.
    pub num_batches_tracked: Option<Tensor>,
    /// `None` means a cumulative moving average, as in `nn.BatchNorm2d`.
    pub momentum: Option<f64>,
    pub eps: f64,
}

impl BatchNorm {
    /// Another handle on the same tensors.
    pub fn shallow_copy(&self) -> Self {
        BatchNorm {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            running_mean: self.running_mean.shallow_clone(),
            running_var: self.running_var.shallow_clone(),
            num_batches_tracked: self.num_batches_tracked.as_ref().map(Tensor::shallow_clone),
            momentum: self.momentum,
            eps: self.eps,
        }
    }
}

/// One conv (no bias) followed by its BatchNorm.
#[derive(Debug)]
pub struct ConvBn {
    pub weight: Tensor,
    pub bn: BatchNorm,
}

/// The dtype fusion computes in: at least float32, so half and bfloat16 weights do not lose
/// precision (or overflow) while branches are summed.
pub fn compute_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        other => other,
    }
}

/// `gamma / sqrt(var + eps)` and `beta - mean * gamma / sqrt(var + eps)`, in `kind`.
pub fn bn_scale_shift(bn: &BatchNorm, kind: Kind) -> Result<(Tensor, Tensor)> {
    let gamma = bn.weight.f_to_kind(kind)?;
    let std = bn
        .running_var
        .f_to_kind(kind)?
        .f_add_scalar(bn.eps)?
        .f_sqrt()?;
    let scale = gamma.f_div(&std)?;
    let shift = bn
        .bias
        .f_to_kind(kind)?
        .f_sub(&bn.running_mean.f_to_kind(kind)?.f_mul(&scale)?)?;
    Ok((scale, shift))
}

/// Folds `bn` into the preceding bias-free `kernel`: returns the kernel and bias of one conv
/// equal to conv followed by BN in eval mode.
pub fn fuse_bn_into_kernel(
    kernel: &Tensor,
    bn: &BatchNorm,
    kind: Kind,
) -> Result<(Tensor, Tensor)> {
    let (scale, shift) = bn_scale_shift(bn, kind)?;
    let folded = kernel
        .f_to_kind(kind)?
        .f_mul(&scale.f_reshape([-1, 1, 1, 1])?)?;
    Ok((folded, shift))
}

/// Zero-pads a square odd kernel to `size` x `size`, keeping it centred.
pub fn pad_kernel_to(kernel: &Tensor, size: i64) -> Result<Tensor> {
    let pad = (size - kernel.size()[3]) / 2;
    if pad == 0 {
        return Ok(kernel.shallow_clone());
    }
    Ok(kernel.f_constant_pad_nd([pad, pad, pad, pad])?)
}

/// The kernel of a grouped conv that copies its input: channel `i` takes input `i % (C / groups)`
/// of its group at the centre tap. `like` (of `channels` elements, e.g. a BN's running mean) gives
/// the device: the kernel is built from its own ops, so meta and CUDA need no host copy.
pub fn identity_kernel(
    channels: i64,
    groups: i64,
    kernel_size: i64,
    like: &Tensor,
    kind: Kind,
) -> Result<Tensor> {
    let input_dim = channels / groups;
    let ones = like.f_ones_like()?.f_to_kind(kind)?.f_reshape([channels])?;
    let eye = ones.f_diag_embed(0, 0, 1)?;
    let folded = eye
        .f_reshape([channels, groups, input_dim])?
        .f_sum_dim_intlist([1i64].as_slice(), false, kind)?;
    pad_kernel_to(&folded.f_reshape([channels, input_dim, 1, 1])?, kernel_size)
}

/// Folds a BN used as a skip branch into an identity kernel times the BN scale.
pub fn fuse_bn_skip(
    bn: &BatchNorm,
    groups: i64,
    kernel_size: i64,
    kind: Kind,
) -> Result<(Tensor, Tensor)> {
    let channels = bn.running_mean.size()[0];
    let identity = identity_kernel(channels, groups, kernel_size, &bn.running_mean, kind)?;
    fuse_bn_into_kernel(&identity, bn, kind)
}

/// Sums `(kernel, bias)` pairs of equal shapes.
pub fn sum_branches(parts: Vec<(Tensor, Tensor)>) -> Result<(Tensor, Tensor)> {
    let mut parts = parts.into_iter();
    let Some((mut kernel, mut bias)) = parts.next() else {
        return Err(crate::error::config(
            "a block needs at least one branch to fuse",
        ));
    };
    for (k, b) in parts {
        kernel = kernel.f_add(&k)?;
        bias = bias.f_add(&b)?;
    }
    Ok((kernel, bias))
}
