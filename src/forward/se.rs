//! The squeeze-excite module of MobileOne blocks (arXiv 1709.01507), with the reference's ops.

use tch::Tensor;

use crate::error::Result;

/// The parameters of one SE module: two 1x1 convs with bias.
#[derive(Debug)]
pub struct SqueezeExcite {
    pub reduce_weight: Tensor,
    pub reduce_bias: Tensor,
    pub expand_weight: Tensor,
    pub expand_bias: Tensor,
}

/// The reference's SE: average pool over the whole map, reduce, ReLU, expand, sigmoid, then scale
/// the input's channels. The caller has checked the shapes.
pub fn forward(se: &SqueezeExcite, x: &Tensor) -> Result<Tensor> {
    let size = x.size();
    let window = [size[2], size[3]];
    let pooled = x.f_avg_pool2d(window, window, [0, 0], false, true, None)?;
    let reduced = pointwise(&pooled, &se.reduce_weight, &se.reduce_bias)?.f_relu()?;
    let gate = pointwise(&reduced, &se.expand_weight, &se.expand_bias)?.f_sigmoid()?;
    Ok(x.f_mul(&gate.f_view([-1, size[1], 1, 1])?)?)
}

fn pointwise(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.f_conv2d(weight, Some(bias), [1, 1], [0, 0], [1, 1], 1)?)
}

/// SE (when given) then ReLU, in place where autograd allows.
pub fn activate(y: Tensor, se: Option<&SqueezeExcite>) -> Result<Tensor> {
    let mut y = match se {
        Some(se) => forward(se, &y)?,
        None => y,
    };
    Ok(y.f_relu_()?)
}
