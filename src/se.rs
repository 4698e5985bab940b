//! The squeeze-excite module of MobileOne blocks (arXiv 1709.01507), as the seed computes it.

use tch::Tensor;

use crate::error::{config, Error, Result};

/// The seed's reduction ratio.
pub const DEFAULT_RD_RATIO: f64 = 0.0625;

/// The parameters of one SE module: two 1x1 convs with bias.
#[derive(Debug)]
pub struct SqueezeExcite {
    pub reduce_weight: Tensor,
    pub reduce_bias: Tensor,
    pub expand_weight: Tensor,
    pub expand_bias: Tensor,
}

/// `int(channels * rd_ratio)`, the seed's reduced width, which must be at least 1.
pub fn reduced_channels(channels: i64, rd_ratio: f64) -> Result<i64> {
    if !(rd_ratio.is_finite() && rd_ratio > 0.0 && rd_ratio <= 1.0) {
        return Err(config(format!(
            "SE rd_ratio must be in (0, 1], got {rd_ratio}"
        )));
    }
    if !(1..=crate::block::MAX_CHANNELS).contains(&channels) {
        return Err(config(format!(
            "SE in_channels must be in [1, {}], got {channels}",
            crate::block::MAX_CHANNELS
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

/// Global average pool, reduce, ReLU, expand, sigmoid, then scale the input channels.
pub fn forward(se: &SqueezeExcite, x: &Tensor) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 4 || size[1] != se.expand_weight.size()[0] {
        return Err(Error::InputShape(format!(
            "SEBlock expects a 4-D input with {} channels, got shape {size:?}",
            se.expand_weight.size()[0]
        )));
    }
    // A global mean (the seed's avg_pool2d over the whole map) keeps traced graphs shape-generic.
    let pooled = x.f_mean_dim([2i64, 3].as_slice(), true, None::<tch::Kind>)?;
    let reduced = pointwise(&pooled, &se.reduce_weight, &se.reduce_bias)?.f_relu()?;
    let gate = pointwise(&reduced, &se.expand_weight, &se.expand_bias)?.f_sigmoid()?;
    Ok(x.f_mul(&gate)?)
}

fn pointwise(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.f_conv2d(weight, Some(bias), [1, 1], [0, 0], [1, 1], 1)?)
}
