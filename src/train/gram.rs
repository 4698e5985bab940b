//! Pointwise blocks (1x1, stride 1, dense): every branch's batch statistics from one Gram matrix
//! of the centred input, the forward as one 1x1 conv with the folded kernel, and an analytic
//! backward.
//!
//! Precision: these are differences of large sums wherever channels are strongly correlated or
//! share an offset (a branch's batch variance `k^T Sigma k` lies far below `|k|^T |Sigma| |k|`,
//! and the input gradient is the difference of two nearly equal maps). So every long sum runs in
//! float64 on the input minus its channel means, whatever the input's dtype, as `F.batch_norm`'s
//! CPU kernels accumulate in float64; only the results (and the folded conv, on the centred
//! input) are in the input's dtype.

use tch::{Kind, Tensor};

use super::{
    add_eps, all_finite, bn_scale, branch_list, saved_fit, stack_bn, update_running, Branch,
    TrainForward,
};
use crate::error::Result;
use crate::fuse::{self, Branches};
use crate::spec::BlockSpec;

const DIMS: [i64; 3] = [0, 2, 3];

/// The `(out, in)` float64 matrix of a 1x1 branch; for the skip the identity, on the device of
/// `like` (a float64 per-channel vector).
fn gram_kernel(b: &Branch<'_>, like: &Tensor) -> Result<Tensor> {
    match b.weight {
        Some(w) => Ok(w.f_flatten(1, -1)?.f_to_kind(Kind::Double)?),
        None => Ok(
            fuse::identity_kernel(like.numel() as i64, 1, 1, like, Kind::Double)?
                .f_flatten(1, -1)?,
        ),
    }
}

fn batched(t: &Tensor) -> Result<Tensor> {
    let s = t.size();
    Ok(t.f_reshape([s[0], s[1], s[2] * s[3]])?)
}

/// A float64 copy of `t` (never an alias, even when `t` is float64).
fn wide_copy(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_to_dtype(Kind::Double, false, true)?)
}

/// `x - mu` in float64, `mu` the float64 channel means.
fn centred(x: &Tensor, mu: &Tensor) -> Result<Tensor> {
    let mut xc = wide_copy(x)?;
    let _ = xc.f_sub_(&mu.f_reshape([1, -1, 1, 1])?)?;
    Ok(xc)
}

/// `sum_n a_n b_n^T` over the batch of two `(N, rows, H, W)` tensors: a `(rows_a, rows_b)` matrix.
fn product_sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(batched(a)?
        .f_bmm(&batched(b)?.f_transpose(1, 2)?)?
        .f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?)
}

pub(super) fn forward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
) -> Result<Option<TrainForward>> {
    let size = x.size();
    let (c, count, kind) = (spec.in_channels, size[0] * size[2] * size[3], x.f_kind()?);
    let list = branch_list(branches);
    let mu = wide_copy(x)?.f_mean_dim(DIMS.as_slice(), false, None::<Kind>)?;
    let xc = centred(x, &mu)?;
    let sigma = product_sum(&xc, &xc)?.f_div_scalar(count as f64)?;
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
    if !all_finite(&[&mean, &var])? {
        return Ok(None);
    }
    update_running(&list, &mean, &var, count)?;
    let a = bn_scale(&list, &var)?.f_to_kind(Kind::Double)?;
    let beta = stack_bn(&list, |bn| &bn.bias)?.f_to_kind(Kind::Double)?;
    let bias =
        beta.f_sub(&a.f_mul(&mean)?)?
            .f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?;
    let mut w_eff = kernels[0].f_mul(&a.f_get(0)?.f_unsqueeze(1)?)?;
    for (i, k) in kernels.iter().enumerate().skip(1) {
        w_eff = w_eff.f_add(&k.f_mul(&a.f_get(i as i64)?.f_unsqueeze(1)?)?)?;
    }
    // The conv reads the centred input, so the means' share moves into the bias; the bias is
    // added after the conv, as BN adds its shift after the branch convs: a conv that starts its
    // sums from a large bias rounds every small term at the bias's scale.
    let shifted_bias = bias.f_add(&w_eff.f_mv(&mu)?)?;
    let o = spec.out_channels;
    let output = xc
        .f_to_kind(kind)?
        .f_conv2d(
            &w_eff.f_to_kind(kind)?.f_reshape([o, c, 1, 1])?,
            None::<&Tensor>,
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        )?
        .f_add_(&shifted_bias.f_to_kind(kind)?.f_reshape([1, o, 1, 1])?)?;
    Ok(Some(TrainForward {
        output,
        saved: vec![mu, sigma, var, a, w_eff],
    }))
}

pub(super) fn backward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    saved: &[Tensor],
    grad: &Tensor,
) -> Result<Option<Vec<Tensor>>> {
    let [mu, sigma, var, a, w_eff] = saved else {
        return Ok(None);
    };
    let list = branch_list(branches);
    let (c, o, nb) = (spec.in_channels, spec.out_channels, list.len() as i64);
    let expected = [
        (mu, vec![c]),
        (sigma, vec![c, c]),
        (var, vec![nb, o]),
        (a, vec![nb, o]),
        (w_eff, vec![o, c]),
    ];
    if !saved_fit(spec, x, grad, Kind::Double, &expected)? {
        return Ok(None);
    }
    let size = x.size();
    let (count, kind) = ((size[0] * size[2] * size[3]) as f64, x.f_kind()?);
    let xc = centred(x, mu)?;
    let mut gc = wide_copy(grad)?;
    let g_sum = gc.f_sum_dim_intlist(DIMS.as_slice(), false, None::<Kind>)?;
    let _ = gc.f_sub_(&g_sum.f_div_scalar(count)?.f_reshape([1, -1, 1, 1])?)?;
    let p_centred = product_sum(&gc, &xc)?;
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
            grads.push(dw.f_reshape(w.size())?.f_to_kind(kind)?);
        }
        grads.push(s_b.f_div(&std_b)?.f_to_kind(kind)?);
        grads.push(g_sum.f_to_kind(kind)?);
    }
    // dx = W^T (g - mean g) - Q (x - mu): two nearly equal maps where BN removes most of the
    // gradient, so both are formed and subtracted in float64.
    let mut from_grad = w_eff.f_transpose(0, 1)?.f_matmul(&batched(&gc)?)?;
    drop(gc);
    let dx = from_grad
        .f_sub_(&q.f_matmul(&batched(&xc)?)?)?
        .f_reshape(size.as_slice())?
        .f_to_kind(kind)?;
    grads.insert(0, dx);
    Ok(Some(grads))
}
