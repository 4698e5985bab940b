//! Re-parameterization math (arXiv 2206.04040, RepVGG 2101.03697): fold each BatchNorm into its
//! kernel, pad kernels, build identity kernels for any `groups`, and sum every branch of a block
//! into one conv. Pure tensor math over the branch tensors; no module state, no raw memory.

use tch::{Kind, Tensor};

use crate::error::{config, device_name, Error, Result};
use crate::spec::BlockSpec;

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

/// The train-time branches of one block, as the module holds them.
#[derive(Debug)]
pub struct Branches {
    pub conv: Vec<ConvBn>,
    pub scale: Option<ConvBn>,
    pub skip: Option<BatchNorm>,
}

impl Branches {
    /// Every branch kernel: the conv branches', then the scale's.
    pub fn kernels(&self) -> impl Iterator<Item = &Tensor> {
        self.conv.iter().chain(self.scale.iter()).map(|c| &c.weight)
    }

    /// Every BatchNorm: the conv branches', the scale's, the skip.
    pub fn batch_norms(&self) -> impl Iterator<Item = &BatchNorm> {
        let branch_bns = self.conv.iter().chain(self.scale.iter()).map(|c| &c.bn);
        branch_bns.chain(self.skip.iter())
    }
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
    let width = kernel.size().last().copied().unwrap_or(size);
    let pad = (size - width) / 2;
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
    let channels = bn.running_mean.numel() as i64;
    let identity = identity_kernel(channels, groups, kernel_size, &bn.running_mean, kind)?;
    fuse_bn_into_kernel(&identity, bn, kind)
}

/// Sums `(kernel, bias)` pairs of equal shapes.
pub fn sum_branches(parts: Vec<(Tensor, Tensor)>) -> Result<(Tensor, Tensor)> {
    let mut parts = parts.into_iter();
    let Some((mut kernel, mut bias)) = parts.next() else {
        return Err(config("a block needs at least one branch to fuse"));
    };
    for (k, b) in parts {
        kernel = kernel.f_add(&k)?;
        bias = bias.f_add(&b)?;
    }
    Ok((kernel, bias))
}

/// Checks that `branches` are the ones `spec` describes: branch counts, every kernel's and BN
/// tensor's shape, one floating dtype for the kernels and one device for everything, finite BN
/// eps. The error names the first tensor that differs (`rbr_conv.1.bn.running_var`, ...).
pub fn check_branches(spec: &BlockSpec, branches: &Branches) -> Result<()> {
    if branches.conv.len() as i64 != spec.num_conv_branches {
        return Err(config(format!(
            "the block has {} conv branches but num_conv_branches={}",
            branches.conv.len(),
            spec.num_conv_branches
        )));
    }
    if branches.scale.is_some() != spec.has_scale() || branches.skip.is_some() != spec.has_skip() {
        return Err(config(
            "the block's scale/skip branches do not match its spec",
        ));
    }
    let first = &branches
        .conv
        .first()
        .ok_or_else(|| config("a block needs at least one conv branch"))?
        .weight;
    let (kind, device) = (first.f_kind()?, first.device());
    if !is_float(kind) {
        return Err(config(format!(
            "rbr_conv.0.conv.weight has dtype {kind:?}, not a float"
        )));
    }
    let k = spec.kernel_size;
    let out = spec.out_channels;
    for (i, branch) in branches.conv.iter().enumerate() {
        let name = format!("rbr_conv.{i}");
        check_tensor(
            &branch.weight,
            &spec.kernel_shape(k),
            kind,
            device,
            &format!("{name}.conv.weight"),
        )?;
        check_bn(&branch.bn, out, device, &format!("{name}.bn"))?;
    }
    if let Some(scale) = &branches.scale {
        check_tensor(
            &scale.weight,
            &spec.kernel_shape(1),
            kind,
            device,
            "rbr_scale.conv.weight",
        )?;
        check_bn(&scale.bn, out, device, "rbr_scale.bn")?;
    }
    if let Some(skip) = &branches.skip {
        check_bn(skip, spec.in_channels, device, "rbr_skip")?;
    }
    Ok(())
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// Checks one tensor's shape, dtype (when `kind` is a float) and device.
pub fn check_tensor(
    t: &Tensor,
    shape: &[i64],
    kind: Kind,
    device: tch::Device,
    name: &str,
) -> Result<()> {
    let size = t.size();
    if size != shape {
        return Err(config(format!(
            "{name} has shape {size:?}, expected {shape:?}"
        )));
    }
    let k = t.f_kind()?;
    if k != kind {
        return Err(config(format!("{name} has dtype {k:?}, expected {kind:?}")));
    }
    if t.device() != device {
        return Err(config(format!(
            "{name} is on {}, expected {}",
            device_name(t.device()),
            device_name(device)
        )));
    }
    Ok(())
}

fn check_bn(bn: &BatchNorm, channels: i64, device: tch::Device, name: &str) -> Result<()> {
    let stats_kind = bn.running_mean.f_kind()?;
    if !is_float(stats_kind) {
        return Err(config(format!(
            "{name}.running_mean has dtype {stats_kind:?}, not a float"
        )));
    }
    for (field, t) in [
        ("weight", &bn.weight),
        ("bias", &bn.bias),
        ("running_mean", &bn.running_mean),
        ("running_var", &bn.running_var),
    ] {
        let kind = t.f_kind()?;
        if !is_float(kind) {
            return Err(config(format!(
                "{name}.{field} has dtype {kind:?}, not a float"
            )));
        }
        check_tensor(t, &[channels], kind, device, &format!("{name}.{field}"))?;
    }
    if !bn.eps.is_finite() || bn.eps < 0.0 {
        return Err(config(format!(
            "{name}.eps must be finite and >= 0, got {}",
            bn.eps
        )));
    }
    Ok(())
}

/// The kernel and bias of the one conv equal to every branch in eval mode, computed in at
/// least float32 and returned in the weights' dtype.
pub fn fused_kernel_bias(spec: &BlockSpec, branches: &Branches) -> Result<(Tensor, Tensor)> {
    let first = branches
        .conv
        .first()
        .ok_or_else(|| config("a block needs at least one conv branch"))?;
    let out_kind = first.weight.f_kind()?;
    let kind = compute_kind(out_kind);
    let mut parts = Vec::with_capacity(branches.conv.len() + 2);
    for branch in &branches.conv {
        parts.push(fuse_bn_into_kernel(&branch.weight, &branch.bn, kind)?);
    }
    if let Some(scale) = &branches.scale {
        let (k, b) = fuse_bn_into_kernel(&scale.weight, &scale.bn, kind)?;
        parts.push((pad_kernel_to(&k, spec.kernel_size)?, b));
    }
    if let Some(skip) = &branches.skip {
        parts.push(fuse_bn_skip(skip, spec.groups, spec.kernel_size, kind)?);
    }
    let (kernel, bias) = sum_branches(parts)?;
    Ok((kernel.f_to_kind(out_kind)?, bias.f_to_kind(out_kind)?))
}

/// [`fused_kernel_bias`] for re-parameterization: refuses, naming the tensor, a kernel or bias
/// that overflows (or is not finite in) the weights' dtype instead of writing inf.
pub fn fused_kernel_bias_checked(
    spec: &BlockSpec,
    branches: &Branches,
) -> Result<(Tensor, Tensor)> {
    let (kernel, bias) = fused_kernel_bias(spec, branches)?;
    for (name, t) in [("kernel", &kernel), ("bias", &bias)] {
        let non_finite = match has_non_finite(t) {
            Ok(non_finite) => non_finite,
            // A meta tensor (tch reports it as MPS) holds no values to check.
            Err(_) if t.device() == tch::Device::Mps => false,
            Err(err) => return Err(err),
        };
        if non_finite {
            let wide = fused_kernel_bias_wide(spec, branches)?;
            let source = if name == "kernel" { &wide.0 } else { &wide.1 };
            let max = source.f_abs()?.f_max()?.f_double_value(&[])?;
            return Err(Error::FuseOverflow(format!(
                "the fused {name} does not fit {:?}: its largest magnitude is {max:.4e} (computed in \
                 float32 or wider); fuse in float32 (model.float()) or check the BN running_var",
                t.f_kind()?
            )));
        }
    }
    Ok((kernel, bias))
}

fn fused_kernel_bias_wide(spec: &BlockSpec, branches: &Branches) -> Result<(Tensor, Tensor)> {
    let widen = |c: &ConvBn| -> Result<ConvBn> {
        Ok(ConvBn {
            weight: c.weight.f_to_kind(Kind::Double)?,
            bn: c.bn.shallow_copy(),
        })
    };
    let wide = Branches {
        conv: branches.conv.iter().map(widen).collect::<Result<_>>()?,
        scale: branches.scale.as_ref().map(widen).transpose()?,
        skip: branches.skip.as_ref().map(BatchNorm::shallow_copy),
    };
    fused_kernel_bias(spec, &wide)
}

/// Whether a tensor holds a non-finite value.
pub fn has_non_finite(t: &Tensor) -> Result<bool> {
    let finite = t.f_isfinite()?.f_all()?;
    Ok(finite.f_int64_value(&[])? == 0)
}
