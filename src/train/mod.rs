//! Exact train-time forward and backward of a block's branch sum, without storing any branch
//! output.
//!
//! Every branch is linear in the input, so its BatchNorm batch statistics follow from the input's
//! moments, and the sum of the normalized branches is one conv with kernel `sum_b a_b K_b`. The
//! forward runs that one conv and updates each BN's running statistics as `nn.BatchNorm2d` does
//! (its own momentum, eps and batch counter); the backward is analytic. `gram` serves pointwise
//! blocks (one Gram matrix of the input); `depthwise` serves depthwise blocks (the CPU kernel's
//! patch moments, or elsewhere each branch recomputed one at a time). This module holds what both
//! share: the branch list and the BatchNorm algebra. Which blocks and states may take these paths
//! is decided by `forward`'s dispatcher, not here.

mod depthwise;
mod gram;

use tch::Tensor;

use crate::error::Result;
use crate::fuse::{BatchNorm, Branches};
use crate::spec::BlockSpec;

/// An exact train-time path without branch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainPath {
    /// 1x1, stride 1, dense: statistics and gradients from the input's Gram matrix.
    Gram,
    /// Depthwise on the CPU kernel: statistics and gradients from per-channel patch moments.
    DepthwiseCpu,
    /// Depthwise elsewhere: statistics from each branch's output, dropped at once; the backward
    /// recomputes one branch at a time.
    DepthwiseRecompute,
}

impl TrainPath {
    /// The path's name, as `MobileOneBlock.forward_path` reports it.
    pub fn name(self) -> &'static str {
        match self {
            TrainPath::Gram => "train_gram",
            TrainPath::DepthwiseCpu => "train_depthwise_cpu",
            TrainPath::DepthwiseRecompute => "train_depthwise",
        }
    }
}

/// Counts one training batch on `bn` and returns its running-statistics factor: the momentum,
/// or `1 / num_batches_tracked` (a cumulative average) when momentum is `None`.
pub fn count_batch(bn: &BatchNorm) -> Result<f64> {
    let mut factor = bn.momentum.unwrap_or(0.0);
    if let Some(count) = &bn.num_batches_tracked {
        let _guard = tch::no_grad_guard();
        let one = Tensor::f_ones_like(count)?;
        let _ = count.shallow_clone().f_add_(&one)?;
        if bn.momentum.is_none() {
            factor = 1.0 / count.f_double_value(&[])?;
        }
    }
    Ok(factor)
}

/// The trainable tensors of `branches`, in the order of [`backward`]'s gradients after the
/// input's: per conv branch then the scale branch its kernel, BN weight and BN bias; the skip's
/// BN weight and bias.
pub fn parameters(branches: &Branches) -> Vec<&Tensor> {
    let mut params = Vec::new();
    for c in branches.conv.iter().chain(branches.scale.iter()) {
        params.extend([&c.weight, &c.bn.weight, &c.bn.bias]);
    }
    if let Some(skip) = &branches.skip {
        params.extend([&skip.weight, &skip.bias]);
    }
    params
}

/// One branch seen uniformly: its kernel (`None` for the BN skip) and its BatchNorm.
pub(crate) struct Branch<'a> {
    pub weight: Option<&'a Tensor>,
    pub scale: bool,
    pub bn: &'a BatchNorm,
}

pub(crate) fn branch_list(branches: &Branches) -> Vec<Branch<'_>> {
    let mut list: Vec<Branch<'_>> = branches
        .conv
        .iter()
        .map(|c| Branch {
            weight: Some(&c.weight),
            scale: false,
            bn: &c.bn,
        })
        .collect();
    if let Some(s) = &branches.scale {
        list.push(Branch {
            weight: Some(&s.weight),
            scale: true,
            bn: &s.bn,
        });
    }
    if let Some(bn) = &branches.skip {
        list.push(Branch {
            weight: None,
            scale: false,
            bn,
        });
    }
    list
}

/// Stacks one per-branch vector (e.g. each BN's weight) into a `(branches, channels)` tensor.
pub(crate) fn stack_bn(
    list: &[Branch<'_>],
    field: impl Fn(&BatchNorm) -> &Tensor,
) -> Result<Tensor> {
    let parts: Vec<&Tensor> = list.iter().map(|b| field(b.bn)).collect();
    Ok(Tensor::f_stack(&parts, 0)?)
}

/// `var + eps` with each branch's own eps on its row of a `(branches, C)` tensor.
pub(crate) fn add_eps(list: &[Branch<'_>], var: &Tensor) -> Result<Tensor> {
    let rows = list
        .iter()
        .enumerate()
        .map(|(i, b)| var.f_get(i as i64)?.f_add_scalar(b.bn.eps))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Tensor::f_stack(&rows, 0)?)
}

/// Counts the batch on every BN and moves its running statistics towards the batch's.
pub(crate) fn update_running(
    list: &[Branch<'_>],
    mean: &Tensor,
    var: &Tensor,
    count: i64,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let unbias = count as f64 / (count - 1).max(1) as f64;
    for (i, b) in list.iter().enumerate() {
        let factor = count_batch(b.bn)?;
        let kind = b.bn.running_mean.f_kind()?;
        let m = mean.f_get(i as i64)?.f_to_kind(kind)?;
        let v = var.f_get(i as i64)?.f_mul_scalar(unbias)?.f_to_kind(kind)?;
        let _ = b.bn.running_mean.shallow_clone().f_lerp_(&m, factor)?;
        let _ = b.bn.running_var.shallow_clone().f_lerp_(&v, factor)?;
    }
    Ok(())
}

/// `a = gamma / sqrt(var + eps)` per branch and channel.
pub(crate) fn bn_scale(list: &[Branch<'_>], var: &Tensor) -> Result<Tensor> {
    let gamma = stack_bn(list, |bn| &bn.weight)?;
    Ok(gamma.f_div(&add_eps(list, var)?.f_sqrt()?)?)
}

/// The branch-sum output of a training step, and what the backward needs.
pub struct TrainForward {
    pub output: Tensor,
    pub saved: Vec<Tensor>,
}

/// The train-time branch sum (before SE and ReLU) on batch statistics, with every BN's running
/// statistics updated. `None` when the batch statistics are not finite (NaN or inf in the input):
/// nothing was updated, and the caller runs the reference's module path, whose NaNs land where the
/// reference's do.
pub fn forward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    path: TrainPath,
) -> Result<Option<TrainForward>> {
    let _guard = tch::no_grad_guard();
    match path {
        TrainPath::Gram => gram::forward(spec, branches, x),
        TrainPath::DepthwiseCpu => depthwise::forward_cpu(spec, branches, x),
        TrainPath::DepthwiseRecompute => depthwise::forward(spec, branches, x),
    }
}

/// The gradients of a training step: input first, then for every branch in order (conv..., scale,
/// skip) its kernel (none for the skip), BN weight and BN bias. `None` when the saved tensors
/// or `grad` do not fit (the caller differentiates the reference's math instead).
pub fn backward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    saved: &[Tensor],
    grad: &Tensor,
    path: TrainPath,
) -> Result<Option<Vec<Tensor>>> {
    let fits = grad.device() == x.device() && grad.f_kind()? == x.f_kind()?;
    if !fits {
        return Ok(None);
    }
    match path {
        TrainPath::Gram => {
            let _guard = tch::no_grad_guard();
            gram::backward(spec, branches, x, saved, grad)
        }
        TrainPath::DepthwiseCpu => depthwise::backward_cpu(spec, branches, x, saved, grad),
        TrainPath::DepthwiseRecompute => depthwise::backward(spec, branches, x, saved, grad),
    }
}

/// The `(N, out, H', W')` output size of the block on `x` (a 4-D input).
pub(crate) fn output_shape(spec: &BlockSpec, x: &Tensor) -> [i64; 4] {
    let size = x.size();
    let out = |d: usize| spec.output_size(size[d]).unwrap_or(0);
    [size[0], spec.out_channels, out(2), out(3)]
}

/// Whether a backward's inputs fit its forward: each saved tensor has its expected shape, the
/// dtype `kind` and `x`'s device, and `grad` the block's output size.
pub(crate) fn saved_fit(
    spec: &BlockSpec,
    x: &Tensor,
    grad: &Tensor,
    kind: tch::Kind,
    saved: &[(&Tensor, Vec<i64>)],
) -> Result<bool> {
    for (t, shape) in saved {
        if t.size() != *shape || t.f_kind()? != kind || t.device() != x.device() {
            return Ok(false);
        }
    }
    Ok(grad.size() == output_shape(spec, x))
}

/// Whether every value of the statistics is finite.
pub(crate) fn all_finite(stats: &[&Tensor]) -> Result<bool> {
    for t in stats {
        if crate::fuse::has_non_finite(t)? {
            return Ok(false);
        }
    }
    Ok(true)
}
