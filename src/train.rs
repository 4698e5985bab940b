//! Exact train-time forward and backward of a block's branch sum without storing a branch output.
//!
//! Every branch is linear in the input, so its BatchNorm batch statistics follow from the input's
//! moments and the sum of normalized branches is one conv with kernel `sum_b a_b K_b`. The
//! forward runs that one conv; the backward is either analytic (pointwise blocks: one Gram
//! matrix of the input, here) or recomputes the branches one at a time (depthwise blocks,
//! `depthwise.rs`).

use tch::{Kind, Tensor};

use crate::block::{check_batch_size, count_batch, BlockSpec, Branches};
use crate::error::Result;
use crate::fusion::{self, BatchNorm};

/// Which exact train-time path a block takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainPath {
    /// 1x1, stride 1, dense: statistics and gradients from the input's Gram matrix.
    Gram,
    /// Depthwise: statistics from each branch's output, recomputed one by one in the backward.
    Depthwise,
    /// Anything else: the branches one by one, under autograd.
    Branches,
}

/// The path a block with this spec takes in training.
pub fn train_path(spec: &BlockSpec) -> TrainPath {
    let depthwise = spec.groups == spec.in_channels && spec.in_channels == spec.out_channels;
    if spec.kernel_size == 1 && spec.groups == 1 && spec.stride == 1 && spec.padding == 0 {
        TrainPath::Gram
    } else if depthwise && spec.groups > 1 {
        TrainPath::Depthwise
    } else {
        TrainPath::Branches
    }
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
        let kind = b.bn.running_mean.kind();
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

/// The train-time branch sum (before SE and ReLU): BN on batch statistics, running statistics
/// updated. `path` must not be [`TrainPath::Branches`]. `raw` allows the CPU kernel that reads
/// tensor memory directly (see [`crate::depthwise::forward`]).
pub fn forward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    path: TrainPath,
    raw: bool,
) -> Result<TrainForward> {
    let _guard = tch::no_grad_guard();
    match path {
        TrainPath::Gram => gram_forward(spec, branches, x),
        _ => crate::depthwise::forward(spec, branches, x, raw),
    }
}

/// The gradients of a training step: input first, then for every branch in order (conv..., scale,
/// skip) its kernel (none for the skip), BN weight and BN bias.
pub fn backward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    saved: &[Tensor],
    grad: &Tensor,
    path: TrainPath,
) -> Result<Vec<Tensor>> {
    match path {
        TrainPath::Gram => {
            let _guard = tch::no_grad_guard();
            gram_backward(spec, branches, x, saved, grad)
        }
        _ => crate::depthwise::backward(spec, branches, x, saved, grad),
    }
}

// ---- pointwise blocks: the Gram path ----

/// The `(out, in)` matrix of a 1x1 branch; for the skip the identity, on the device of `like`
/// (a per-channel vector).
fn gram_kernel(b: &Branch<'_>, like: &Tensor) -> Result<Tensor> {
    match b.weight {
        Some(w) => Ok(w.f_flatten(1, -1)?),
        None => Ok(
            fusion::identity_kernel(like.size()[0], 1, 1, like, like.kind())?.f_flatten(1, -1)?,
        ),
    }
}

fn batched(t: &Tensor) -> Result<Tensor> {
    let s = t.size();
    Ok(t.f_reshape([s[0], s[1], s[2] * s[3]])?)
}

fn gram_forward(spec: &BlockSpec, branches: &Branches, x: &Tensor) -> Result<TrainForward> {
    let size = x.size();
    check_batch_size(&size)?;
    let (c, count) = (spec.in_channels, size[0] * size[2] * size[3]);
    let list = branch_list(branches);
    let mu = x.f_mean_dim([0i64, 2, 3].as_slice(), false, None::<Kind>)?;
    let centred = batched(&x.f_sub(&mu.f_reshape([1, c, 1, 1])?)?)?;
    let sigma = centred
        .f_bmm(&centred.f_transpose(1, 2)?)?
        .f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?
        .f_div_scalar(count as f64)?;
    drop(centred);
    let kernels = list
        .iter()
        .map(|b| gram_kernel(b, &mu))
        .collect::<Result<Vec<_>>>()?;
    let means = kernels
        .iter()
        .map(|k| k.f_mv(&mu))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let vars = kernels
        .iter()
        .map(|k| {
            k.f_mm(&sigma)?
                .f_mul(k)?
                .f_sum_dim_intlist([1i64].as_slice(), false, None::<Kind>)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let (mean, var) = (Tensor::f_stack(&means, 0)?, Tensor::f_stack(&vars, 0)?);
    update_running(&list, &mean, &var, count)?;
    let a = bn_scale(&list, &var)?;
    let beta = stack_bn(&list, |bn| &bn.bias)?;
    let bias =
        beta.f_sub(&a.f_mul(&mean)?)?
            .f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?;
    let mut w_eff = kernels[0].f_mul(&a.f_get(0)?.f_unsqueeze(1)?)?;
    for (i, k) in kernels.iter().enumerate().skip(1) {
        w_eff = w_eff.f_add(&k.f_mul(&a.f_get(i as i64)?.f_unsqueeze(1)?)?)?;
    }
    let o = spec.out_channels;
    let output = x.f_conv2d(
        &w_eff.f_reshape([o, c, 1, 1])?,
        Some(&bias),
        [1, 1],
        [0, 0],
        [1, 1],
        1,
    )?;
    Ok(TrainForward {
        output,
        saved: vec![mu, sigma, var, a, w_eff],
    })
}

fn gram_backward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    saved: &[Tensor],
    grad: &Tensor,
) -> Result<Vec<Tensor>> {
    let [mu, sigma, var, a, w_eff] = saved else {
        return Err(crate::error::config("gram backward needs 5 saved tensors"));
    };
    let size = x.size();
    let (c, o, count) = (
        spec.in_channels,
        spec.out_channels,
        (size[0] * size[2] * size[3]) as f64,
    );
    let list = branch_list(branches);
    let g_sum = grad.f_sum_dim_intlist([0i64, 2, 3].as_slice(), false, None::<Kind>)?;
    let p = batched(grad)?
        .f_bmm(&batched(x)?.f_transpose(1, 2)?)?
        .f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?;
    let p_centred = p.f_sub(&g_sum.f_outer(mu)?)?;
    let std = add_eps(&list, var)?.f_sqrt()?;
    let mut q = sigma.f_zeros_like()?;
    let mut grads = Vec::with_capacity(3 * list.len() + 1);
    let scaled_sigma = sigma.f_mul_scalar(count)?;
    for (i, b) in list.iter().enumerate() {
        let k = gram_kernel(b, mu)?;
        let (a_b, std_b) = (a.f_get(i as i64)?, std.f_get(i as i64)?);
        let s_b = k
            .f_mul(&p_centred)?
            .f_sum_dim_intlist([1i64].as_slice(), false, None::<Kind>)?;
        let c_b = a_b
            .f_mul(&s_b)?
            .f_div(&std_b.f_square()?.f_mul_scalar(count)?)?;
        let ck = k.f_mul(&c_b.f_unsqueeze(1)?)?;
        q = q.f_add(&k.f_transpose(0, 1)?.f_mm(&ck)?)?;
        if let Some(w) = b.weight {
            let dw = p_centred
                .f_mul(&a_b.f_unsqueeze(1)?)?
                .f_sub(&ck.f_mm(&scaled_sigma)?)?;
            grads.push(dw.f_reshape(w.size())?);
        }
        grads.push(s_b.f_div(&std_b)?);
        grads.push(g_sum.shallow_clone());
    }
    let w_t = w_eff.f_transpose(0, 1)?.f_contiguous()?;
    let shift = q.f_mv(mu)?.f_sub(&w_t.f_mv(&g_sum.f_div_scalar(count)?)?)?;
    let from_grad = grad.f_conv2d(
        &w_t.f_reshape([c, o, 1, 1])?,
        None::<&Tensor>,
        [1, 1],
        [0, 0],
        [1, 1],
        1,
    )?;
    let dx = x
        .f_conv2d(
            &q.f_neg()?.f_reshape([c, c, 1, 1])?,
            Some(&shift),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        )?
        .f_add_(&from_grad)?;
    grads.insert(0, dx);
    Ok(grads)
}
