//! Pointwise blocks (1x1, stride 1, dense): every branch's batch statistics from one Gram matrix
//! of the centred input, the forward as one 1x1 conv with the folded kernel, and an analytic
//! backward.

use tch::{Kind, Tensor};

use super::{
    add_eps, all_finite, bn_scale, branch_list, saved_fit, stack_bn, update_running, Branch,
    TrainForward,
};
use crate::error::Result;
use crate::fuse::{self, Branches};
use crate::spec::BlockSpec;

/// The `(out, in)` matrix of a 1x1 branch; for the skip the identity, on the device of `like`
/// (a per-channel vector).
fn gram_kernel(b: &Branch<'_>, like: &Tensor) -> Result<Tensor> {
    match b.weight {
        Some(w) => Ok(w.f_flatten(1, -1)?),
        None => Ok(
            fuse::identity_kernel(like.numel() as i64, 1, 1, like, like.f_kind()?)?
                .f_flatten(1, -1)?,
        ),
    }
}

fn batched(t: &Tensor) -> Result<Tensor> {
    let s = t.size();
    Ok(t.f_reshape([s[0], s[1], s[2] * s[3]])?)
}

pub(super) fn forward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
) -> Result<Option<TrainForward>> {
    let size = x.size();
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
    if !all_finite(&[&mean, &var])? {
        return Ok(None);
    }
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
    let (c, o, nb) = (
        spec.in_channels,
        spec.out_channels,
        branch_list(branches).len() as i64,
    );
    let expected = [
        (mu, vec![c]),
        (sigma, vec![c, c]),
        (var, vec![nb, o]),
        (a, vec![nb, o]),
        (w_eff, vec![o, c]),
    ];
    if !saved_fit(spec, x, grad, &expected)? {
        return Ok(None);
    }
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
    Ok(Some(grads))
}
