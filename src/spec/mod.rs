//! What a block or stage *is*, before any tensor: the constructor arguments of a `MobileOneBlock`
//! and their validation, the stage plan of `MobileOne` (`stage`), and the YOLO model yaml
//! (`yaml`, the only code that reads YAML). Also the input checks that only need the spec.

pub mod stage;
pub mod yaml;

use tch::Tensor;

use crate::error::{config, device_name, Error, Result};

/// Largest channel count or group count accepted; larger ones are rejected, not allocated.
pub const MAX_CHANNELS: i64 = 1 << 16;
/// Largest kernel size, stride, dilation or branch count accepted.
pub const MAX_GEOMETRY: i64 = 255;
/// The reference's squeeze-excite reduction ratio.
pub const SE_RD_RATIO: f64 = 0.0625;

/// The constructor arguments of a `MobileOneBlock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

fn check_range(name: &str, value: i64, min: i64, max: i64) -> Result<()> {
    if value < min || value > max {
        return Err(config(format!(
            "{name} must be in [{min}, {max}], got {value}"
        )));
    }
    Ok(())
}

impl BlockSpec {
    /// Whether the block has a BN skip branch (the reference's rule).
    pub fn has_skip(&self) -> bool {
        self.in_channels == self.out_channels && self.stride == 1
    }

    /// Whether the block has a 1x1 conv+BN scale branch.
    pub fn has_scale(&self) -> bool {
        self.kernel_size > 1
    }

    /// Whether every conv filters one channel (`groups == in == out`, more than one channel).
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.in_channels == self.out_channels
    }

    /// Whether the block is a dense 1x1 conv without stride or padding.
    pub fn is_pointwise(&self) -> bool {
        self.kernel_size == 1 && self.groups == 1 && self.stride == 1 && self.padding == 0
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
            se_reduced_channels(self.out_channels, SE_RD_RATIO)?;
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
    pub fn output_size(&self, size: i64) -> Option<i64> {
        let span = size + 2 * self.padding - self.dilation * (self.kernel_size - 1) - 1;
        (span >= 0).then(|| span / self.stride + 1)
    }

    /// The `(out, in / groups, k, k)` shape of a kxk branch kernel.
    pub fn kernel_shape(&self, k: i64) -> [i64; 4] {
        [self.out_channels, self.in_channels / self.groups, k, k]
    }

    /// Checks an input against this block: rank, channels, dtype and device (against `weight`),
    /// spatial size. Reads only metadata, so any tensor kind may be checked.
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
}

impl From<&BlockSpec> for crate::cpu::Conv {
    fn from(spec: &BlockSpec) -> Self {
        crate::cpu::Conv {
            kernel_size: spec.kernel_size,
            stride: spec.stride,
            padding: spec.padding,
            dilation: spec.dilation,
        }
    }
}

/// Rejects an input whose dtype (outside autocast) or device differs from the weights'.
fn check_input_type(x: &Tensor, weight: &Tensor, autocast: bool) -> Result<()> {
    if x.device() != weight.device() {
        return Err(Error::InputType(format!(
            "input is on {} but the block's weights are on {}",
            device_name(x.device()),
            device_name(weight.device())
        )));
    }
    let (xk, wk) = (x.f_kind()?, weight.f_kind()?);
    if !autocast && xk != wk {
        return Err(Error::InputType(format!(
            "input dtype {xk:?} differs from the block's weight dtype {wk:?}; convert one with .to()"
        )));
    }
    Ok(())
}

/// `int(channels * rd_ratio)`, the reference's SE reduced width, which must be at least 1.
pub fn se_reduced_channels(channels: i64, rd_ratio: f64) -> Result<i64> {
    if !(rd_ratio.is_finite() && rd_ratio > 0.0 && rd_ratio <= 1.0) {
        return Err(config(format!(
            "SE rd_ratio must be in (0, 1], got {rd_ratio}"
        )));
    }
    if !(1..=MAX_CHANNELS).contains(&channels) {
        return Err(config(format!(
            "SE in_channels must be in [1, {MAX_CHANNELS}], got {channels}"
        )));
    }
    let reduced = (channels as f64 * rd_ratio) as i64;
    if reduced < 1 {
        return Err(config(format!(
            "SE on {channels} channels with rd_ratio={rd_ratio} would reduce to int({channels} * {rd_ratio}) = 0 \
             channels; use_se needs at least {} channels",
            (1.0 / rd_ratio).ceil() as i64
        )));
    }
    Ok(reduced)
}
