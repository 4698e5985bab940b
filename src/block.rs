//! The MobileOne block (arXiv 2206.04040): spec and validation, train-time and eval-time branch
//! forwards, the fused forward, and the kernel/bias that re-parameterization writes.

use tch::{Kind, Tensor};

use crate::error::{config, Error, Result};
use crate::fusion::{self, BatchNorm, ConvBn};
use crate::se::{self, SqueezeExcite};

/// Largest channel count or group count accepted; larger ones are rejected, not allocated.
pub const MAX_CHANNELS: i64 = 1 << 16;
/// Largest kernel size, stride, dilation or branch count accepted.
pub const MAX_GEOMETRY: i64 = 255;

/// The constructor arguments of a `MobileOneBlock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    pub in_channels: i64,
    pub out_channels: i64,
    pub kernel_size: i64,
    pub stride: i64,
    pub padding: i64,
    pub dilation: i64,
    pub groups: i64,
    pub use_se: bool,
    pub num_conv_branches: i64,
}

impl Default for BlockSpec {
    fn default() -> Self {
        Self {
            in_channels: 1,
            out_channels: 1,
            kernel_size: 3,
            stride: 1,
            padding: 1,
            dilation: 1,
            groups: 1,
            use_se: false,
            num_conv_branches: 1,
        }
    }
}

/// The train-time branches of one block, as the module holds them.
#[derive(Debug)]
pub struct Branches {
    pub conv: Vec<ConvBn>,
    pub scale: Option<ConvBn>,
    pub skip: Option<BatchNorm>,
}

fn check_range(name: &str, value: i64, min: i64, max: i64) -> Result<()> {
    if value < min || value > max {
        return Err(config(format!(
            "{name} must be in [{min}, {max}], got {value}"
        )));
    }
    Ok(())
}

impl BlockSpec {
    /// Whether the block has a BN skip branch (the seed's rule).
    pub fn has_skip(&self) -> bool {
        self.in_channels == self.out_channels && self.stride == 1
    }

    /// Whether the block has a 1x1 conv+BN scale branch.
    pub fn has_scale(&self) -> bool {
        self.kernel_size > 1
    }

    /// Checks every argument; the error names the first one that is wrong.
    pub fn validate(&self) -> Result<()> {
        check_range("in_channels", self.in_channels, 1, MAX_CHANNELS)?;
        check_range("out_channels", self.out_channels, 1, MAX_CHANNELS)?;
        check_range("kernel_size", self.kernel_size, 1, MAX_GEOMETRY)?;
        check_range("stride", self.stride, 1, MAX_GEOMETRY)?;
        check_range("padding", self.padding, 0, MAX_GEOMETRY * MAX_GEOMETRY)?;
        check_range("dilation", self.dilation, 1, MAX_GEOMETRY)?;
        check_range("groups", self.groups, 1, MAX_CHANNELS)?;
        check_range("num_conv_branches", self.num_conv_branches, 1, MAX_GEOMETRY)?;
        self.validate_groups()?;
        self.validate_geometry()?;
        if self.use_se {
            se::reduced_channels(self.out_channels, se::DEFAULT_RD_RATIO)?;
        }
        Ok(())
    }

    fn validate_groups(&self) -> Result<()> {
        if self.in_channels % self.groups != 0 || self.out_channels % self.groups != 0 {
            return Err(config(format!(
                "groups={} must divide in_channels={} and out_channels={}",
                self.groups, self.in_channels, self.out_channels
            )));
        }
        Ok(())
    }

    /// The scale branch is padded to the kernel's centre and the skip branch keeps the input's
    /// size, so both need an odd kernel with "same" padding.
    fn validate_geometry(&self) -> Result<()> {
        if self.has_scale() && self.kernel_size % 2 == 0 {
            return Err(config(format!(
                "kernel_size must be odd (the 1x1 scale branch is fused at the kernel centre), got {}",
                self.kernel_size
            )));
        }
        let same = self.dilation * (self.kernel_size - 1);
        if (self.has_scale() || self.has_skip()) && 2 * self.padding != same {
            return Err(config(format!(
                "padding must be dilation * (kernel_size // 2) = {} so that every branch has the same \
                 output size (kernel_size={}, dilation={}), got padding={}",
                same / 2,
                self.kernel_size,
                self.dilation,
                self.padding
            )));
        }
        Ok(())
    }

    /// Output spatial size for an input of `size`, or `None` when the input is too small.
    fn output_size(&self, size: i64) -> Option<i64> {
        let span = size + 2 * self.padding - self.dilation * (self.kernel_size - 1) - 1;
        (span >= 0).then(|| span / self.stride + 1)
    }

    /// Checks an input against this block's weights: rank, channels, dtype, device, size.
    pub fn check_input(&self, x: &Tensor, weight: &Tensor, autocast: bool) -> Result<()> {
        let shape = x.size();
        if shape.len() != 4 {
            return Err(Error::InputShape(format!(
                "MobileOneBlock expects a 4-D (N, C, H, W) input, got a {}-D tensor of shape {shape:?}",
                shape.len()
            )));
        }
        if shape[1] != self.in_channels {
            return Err(Error::InputShape(format!(
                "input has {} channels but the block expects in_channels={} (input shape {shape:?})",
                shape[1], self.in_channels
            )));
        }
        check_input_type(x, weight, autocast)?;
        if self.output_size(shape[2]).is_none() || self.output_size(shape[3]).is_none() {
            return Err(Error::InputShape(format!(
                "input of spatial size {}x{} is too small for kernel_size={} padding={} dilation={}",
                shape[2], shape[3], self.kernel_size, self.padding, self.dilation
            )));
        }
        Ok(())
    }

    fn conv(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let s = self.stride;
        let (p, d) = (self.padding, self.dilation);
        Ok(x.f_conv2d(weight, bias, [s, s], [p, p], [d, d], self.groups)?)
    }

    /// The input at the output positions of a 1x1 conv with this block's stride.
    pub fn strided(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.stride;
        if s == 1 {
            return Ok(x.shallow_clone());
        }
        Ok(x.f_slice(2, 0, None, s)?.f_slice(3, 0, None, s)?)
    }

    fn conv_scale(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let s = self.stride;
        if self.groups == self.in_channels && self.in_channels == self.out_channels {
            // A depthwise 1x1 conv is a per-channel scale of the strided input (same single
            // product per element); libtorch's grouped 1x1 conv backward is a slow per-group loop.
            return Ok(self.strided(x)?.f_mul(&weight.f_reshape([1, -1, 1, 1])?)?);
        }
        Ok(x.f_conv2d(weight, None::<&Tensor>, [s, s], [0, 0], [1, 1], self.groups)?)
    }
}

/// Rejects an input whose dtype (outside autocast) or device differs from the weights'.
pub fn check_input_type(x: &Tensor, weight: &Tensor, autocast: bool) -> Result<()> {
    if x.device() != weight.device() {
        return Err(Error::InputType(format!(
            "input is on {:?} but the block's weights are on {:?}",
            x.device(),
            weight.device()
        )));
    }
    if !autocast && x.kind() != weight.kind() {
        return Err(Error::InputType(format!(
            "input dtype {:?} differs from the block's weight dtype {:?}; convert one with .to()",
            x.kind(),
            weight.kind()
        )));
    }
    Ok(())
}

/// Refuses a training batch with one value per channel, as `F.batch_norm` does.
pub fn check_batch_size(size: &[i64]) -> Result<()> {
    if size[0] * size[2] * size[3] == 1 {
        return Err(Error::InputShape(format!(
            "Expected more than 1 value per channel when training, got input size {size:?}"
        )));
    }
    Ok(())
}

/// Counts one training batch on `bn` and returns its running-statistics factor: the momentum,
/// or `1 / num_batches_tracked` (a cumulative average) when momentum is `None`.
pub fn count_batch(bn: &BatchNorm) -> Result<f64> {
    let mut factor = bn.momentum.unwrap_or(0.0);
    if let Some(count) = &bn.num_batches_tracked {
        let _guard = tch::no_grad_guard();
        let _ = count.shallow_clone().f_add_scalar_(1i64)?;
        if bn.momentum.is_none() {
            factor = 1.0 / count.f_double_value(&[])?;
        }
    }
    Ok(factor)
}

/// BatchNorm as `nn.BatchNorm2d.forward` runs it: in training, counts the batch and updates the
/// running statistics with the module's own momentum (cumulative average when `None`).
pub fn batch_norm(x: &Tensor, bn: &BatchNorm, training: bool) -> Result<Tensor> {
    let mut factor = bn.momentum.unwrap_or(0.0);
    if training {
        check_batch_size(&x.size())?;
        factor = count_batch(bn)?;
    }
    let (w, b) = (Some(&bn.weight), Some(&bn.bias));
    let (rm, rv) = (Some(&bn.running_mean), Some(&bn.running_var));
    Ok(x.f_batch_norm(w, b, rm, rv, training, factor, bn.eps, true)?)
}

fn conv_bn(
    spec: &BlockSpec,
    x: &Tensor,
    branch: &ConvBn,
    training: bool,
    scale: bool,
) -> Result<Tensor> {
    let y = if scale {
        spec.conv_scale(x, &branch.weight)?
    } else {
        spec.conv(x, &branch.weight, None)?
    };
    batch_norm(&y, &branch.bn, training)
}

/// The seed's multi-branch forward (scale + skip, then each conv branch), then SE and ReLU.
/// In training mode BN uses batch statistics and updates the running ones.
pub fn forward_branches(
    spec: &BlockSpec,
    branches: &Branches,
    se: Option<&SqueezeExcite>,
    x: &Tensor,
    training: bool,
) -> Result<Tensor> {
    let mut out: Option<Tensor> = None;
    if let Some(scale) = &branches.scale {
        out = Some(conv_bn(spec, x, scale, training, true)?);
    }
    if let Some(skip) = &branches.skip {
        let y = batch_norm(x, skip, training)?;
        out = Some(match out {
            Some(o) => o.f_add(&y)?,
            None => y,
        });
    }
    for branch in &branches.conv {
        let y = conv_bn(spec, x, branch, training, false)?;
        out = Some(match out {
            Some(o) => o.f_add(&y)?,
            None => y,
        });
    }
    let out = out.ok_or_else(|| config("a block needs at least one conv branch"))?;
    activate(out, se)
}

/// The single-conv forward of a re-parameterized block: conv, SE, ReLU.
///
/// `raw` allows depthwise float32 blocks the CPU kernel, which reads and writes tensor memory
/// directly and is not differentiable: callers pass it only for plain tensors, outside
/// tracing, when no gradient is wanted.
pub fn forward_fused(
    spec: &BlockSpec,
    weight: &Tensor,
    bias: &Tensor,
    se: Option<&SqueezeExcite>,
    x: &Tensor,
    raw: bool,
) -> Result<Tensor> {
    let y = match crate::depthwise::inference_conv(spec, x, weight, bias, raw)? {
        Some(y) => y,
        None => spec.conv(x, weight, Some(bias))?,
    };
    activate(y, se)
}

/// The eval-mode forward of an unfused block: the branches are linear with running statistics,
/// so fold them into one kernel on the fly and run one conv.
pub fn forward_folded(
    spec: &BlockSpec,
    branches: &Branches,
    se: Option<&SqueezeExcite>,
    x: &Tensor,
    raw: bool,
) -> Result<Tensor> {
    let (kernel, bias) = fused_kernel_bias(spec, branches)?;
    forward_fused(spec, &kernel, &bias, se, x, raw)
}

/// SE (when given) then ReLU, in place where autograd allows.
pub fn activate(y: Tensor, se: Option<&SqueezeExcite>) -> Result<Tensor> {
    let mut y = match se {
        Some(se) => se::forward(se, &y)?,
        None => y,
    };
    Ok(y.f_relu_()?)
}

/// The kernel and bias of the one conv equal to every branch in eval mode, computed in at
/// least float32 and returned in the weights' dtype.
pub fn fused_kernel_bias(spec: &BlockSpec, branches: &Branches) -> Result<(Tensor, Tensor)> {
    let first = branches
        .conv
        .first()
        .ok_or_else(|| config("a block needs at least one conv branch"))?;
    let out_kind = first.weight.kind();
    let kind = fusion::compute_kind(out_kind);
    let mut parts = Vec::with_capacity(branches.conv.len() + 2);
    for branch in &branches.conv {
        parts.push(fusion::fuse_bn_into_kernel(
            &branch.weight,
            &branch.bn,
            kind,
        )?);
    }
    if let Some(scale) = &branches.scale {
        let (k, b) = fusion::fuse_bn_into_kernel(&scale.weight, &scale.bn, kind)?;
        parts.push((fusion::pad_kernel_to(&k, spec.kernel_size)?, b));
    }
    if let Some(skip) = &branches.skip {
        parts.push(fusion::fuse_bn_skip(
            skip,
            spec.groups,
            spec.kernel_size,
            kind,
        )?);
    }
    let (kernel, bias) = fusion::sum_branches(parts)?;
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
        if has_non_finite(t)? {
            let wide = fused_kernel_bias_wide(spec, branches)?;
            let source = if name == "kernel" { &wide.0 } else { &wide.1 };
            let max = source.f_abs()?.f_max()?.f_double_value(&[])?;
            return Err(Error::FuseOverflow(format!(
                "the fused {name} does not fit {:?}: its largest magnitude is {max:.4e} (computed in \
                 float32 or wider); fuse in float32 (model.float()) or check the BN running_var",
                t.kind()
            )));
        }
    }
    Ok((kernel, bias))
}

fn fused_kernel_bias_wide(spec: &BlockSpec, branches: &Branches) -> Result<(Tensor, Tensor)> {
    let widen = |c: &ConvBn| ConvBn {
        weight: c.weight.to_kind(Kind::Double),
        bn: c.bn.shallow_copy(),
    };
    let wide = Branches {
        conv: branches.conv.iter().map(widen).collect(),
        scale: branches.scale.as_ref().map(widen),
        skip: branches.skip.as_ref().map(BatchNorm::shallow_copy),
    };
    fused_kernel_bias(spec, &wide)
}

/// Whether a tensor holds a non-finite value.
pub fn has_non_finite(t: &Tensor) -> Result<bool> {
    let finite = t.f_isfinite()?.f_all()?;
    Ok(finite.f_int64_value(&[])? == 0)
}
