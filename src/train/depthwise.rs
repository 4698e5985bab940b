//! The exact training path of depthwise blocks.
//!
//! On the CPU (float32/float64) the statistics and gradients come from each channel's patch
//! moments (`crate::cpu`): no branch is run or stored. Elsewhere (CUDA) each branch's batch
//! statistics come from its own output (a depthwise conv, or the input scaled), which is dropped
//! at once; the forward then runs one conv, and the backward recomputes one branch at a time,
//! applies its BN backward analytically and lets libtorch's conv backward map it to the input
//! and kernel.

use tch::{Kind, Tensor};

use super::{
    add_eps, all_finite, bn_scale, branch_list, output_shape, saved_fit, stack_bn, update_running,
    Branch, TrainForward,
};
use crate::cpu::{self, Affine, BranchScales, Kernels, Moments};
use crate::error::Result;
use crate::fuse::{self, Branches};
use crate::spec::BlockSpec;

const DIMS: [i64; 3] = [0, 2, 3];

/// One branch's output minus `shift`: a depthwise conv, the scale times the strided input, or the
/// input itself (the skip). Always a fresh tensor.
fn branch_output(
    spec: &BlockSpec,
    b: &Branch<'_>,
    weight: Option<&Tensor>,
    x: &Tensor,
    shift: &Tensor,
) -> Result<Tensor> {
    let c = spec.in_channels;
    let column = shift.f_reshape([1, c, 1, 1])?;
    Ok(match weight {
        Some(w) if b.scale => strided(spec, x)?
            .f_mul(&w.f_reshape([1, c, 1, 1])?)?
            .f_sub(&column)?,
        Some(w) => {
            let (s, p, d) = (spec.stride, spec.padding, spec.dilation);
            x.f_conv2d(
                w,
                Some(&shift.f_neg()?),
                [s, s],
                [p, p],
                [d, d],
                spec.groups,
            )?
        }
        None => x.f_sub(&column)?,
    })
}

/// The input at the output positions of a 1x1 conv with the block's stride.
fn strided(spec: &BlockSpec, x: &Tensor) -> Result<Tensor> {
    let s = spec.stride;
    if s == 1 {
        return Ok(x.shallow_clone());
    }
    Ok(x.f_slice(2, 0, None, s)?.f_slice(3, 0, None, s)?)
}

/// Per-channel mean and biased variance over (N, H, W): two-pass so float32 does not cancel, and
/// accumulated in float64 as `F.batch_norm`'s CPU kernels do. Consumes `y`.
fn centred_moments(mut y: Tensor, count: f64) -> Result<(Tensor, Tensor)> {
    let kind = y.f_kind()?;
    let mean = wide_sum(&y)?.f_div_scalar(count)?;
    let _ = y.f_sub_(&mean.f_reshape([1, -1, 1, 1])?)?;
    let var = y
        .f_norm_scalaropt_dim_dtype(2, DIMS, false, Kind::Double)?
        .f_square()?
        .f_div_scalar(count)?;
    Ok((mean, var.f_to_kind(kind)?))
}

/// Per-channel sum over (N, H, W), accumulated in float64 as `F.batch_norm`'s CPU kernels do.
fn wide_sum(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_sum_dim_intlist(DIMS.as_slice(), false, Kind::Double)?
        .f_to_kind(t.f_kind()?)?)
}

/// The number of values each branch's BN averages: batch times output positions.
fn output_count(spec: &BlockSpec, x: &Tensor) -> Result<i64> {
    let [n, _, h, w] = output_shape(spec, x);
    Ok(n * h * w)
}

/// The `(C, 1, k, k)` kernel of a branch: the scale padded to the centre, the skip an identity.
fn full_kernel(spec: &BlockSpec, b: &Branch<'_>, like: &Tensor) -> Result<Tensor> {
    match b.weight {
        Some(w) if b.scale => fuse::pad_kernel_to(w, spec.kernel_size),
        Some(w) => Ok(w.shallow_clone()),
        None => fuse::identity_kernel(
            spec.in_channels,
            spec.groups,
            spec.kernel_size,
            &b.bn.running_mean,
            like.f_kind()?,
        ),
    }
}

/// The train-time branch sum by branch outputs: statistics per branch, running statistics
/// updated, one conv. `None` (nothing updated) when a statistic is not finite.
pub(super) fn forward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
) -> Result<Option<TrainForward>> {
    let list = branch_list(branches);
    let count = output_count(spec, x)?;
    let zero = list[0]
        .bn
        .running_mean
        .f_zeros_like()?
        .f_to_kind(x.f_kind()?)?;
    let mut means = Vec::with_capacity(list.len());
    let mut vars = Vec::with_capacity(list.len());
    for b in &list {
        let (m, v) = centred_moments(branch_output(spec, b, b.weight, x, &zero)?, count as f64)?;
        means.push(m);
        vars.push(v);
    }
    let (mean, var) = (Tensor::f_stack(&means, 0)?, Tensor::f_stack(&vars, 0)?);
    if !all_finite(&[&mean, &var])? {
        return Ok(None);
    }
    update_running(&list, &mean, &var, count)?;
    let a = bn_scale(&list, &var)?;
    let bias = stack_bn(&list, |bn| &bn.bias)?
        .f_sub(&a.f_mul(&mean)?)?
        .f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?;
    let mut kernel = zero.f_reshape([-1, 1, 1, 1])?;
    for (i, b) in list.iter().enumerate() {
        let a_b = a.f_get(i as i64)?.f_reshape([-1, 1, 1, 1])?;
        kernel = kernel.f_add(&full_kernel(spec, b, x)?.f_mul(&a_b)?)?;
    }
    let output = centred_conv(spec, x, &kernel, &bias)?;
    Ok(Some(TrainForward {
        output,
        saved: vec![mean, var, a],
    }))
}

/// The folded conv `conv(x, kernel) + bias`, run on the input minus its channel means `mu`: the
/// means' share (`conv` of the constant planes `mu`, which differs from `mu * sum(kernel)` only
/// where the kernel overlaps the padding) and the bias are formed in float64 on one image and
/// added last. On inputs with a common offset, a conv of the raw input would sum terms far larger
/// than the output; and one that starts from the bias rounds every term at the bias's scale.
fn centred_conv(spec: &BlockSpec, x: &Tensor, kernel: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let [n, c, h, w] = x.size()[..] else {
        return Ok(x.f_conv2d(kernel, Some(bias), [1, 1], [0, 0], [1, 1], 1)?);
    };
    let (s, p, d) = (spec.stride, spec.padding, spec.dilation);
    let column = wide_sum(x)?
        .f_div_scalar((n * h * w) as f64)?
        .f_reshape([1, c, 1, 1])?;
    let planes = Tensor::f_ones([1, c, h, w], (tch::Kind::Double, x.device()))?
        .f_mul(&column.f_to_kind(tch::Kind::Double)?)?;
    let wide = |t: &Tensor| t.f_to_kind(tch::Kind::Double);
    let share = planes
        .f_conv2d(
            &wide(kernel)?,
            Some(&wide(bias)?),
            [s, s],
            [p, p],
            [d, d],
            spec.groups,
        )?
        .f_to_kind(x.f_kind()?)?;
    Ok(x.f_sub(&column)?
        .f_conv2d(kernel, None::<&Tensor>, [s, s], [p, p], [d, d], spec.groups)?
        .f_add_(&share)?)
}

/// BN backward of one branch, in place on its centred output `yc`:
/// `dL/dy = a (g - mean(g)) - a S / (M var) (y - m)` with `S = sum(g (y - m))`. Returns `S`.
fn bn_backward_in_place(
    yc: &mut Tensor,
    centred_grad: &Tensor,
    grad: &Tensor,
    a: &Tensor,
    std: &Tensor,
    count: f64,
) -> Result<Tensor> {
    let column = |t: &Tensor| t.f_reshape([1, -1, 1, 1]);
    let sums = wide_sum(&yc.f_mul(grad)?)?;
    let coef = a
        .f_mul(&sums)?
        .f_div(&std.f_square()?.f_mul_scalar(count)?)?;
    let _ = yc.f_mul_(&column(&coef)?.f_neg()?)?;
    let _ = yc.f_addcmul_(centred_grad, &column(a)?)?;
    Ok(sums)
}

/// The gradients of [`forward`]: input, then per branch kernel (none for the skip), BN weight,
/// BN bias. Each branch is recomputed and its BN backward applied analytically; a conv branch's
/// result goes through libtorch's conv backward (autograd), a scale or skip branch's is mapped
/// back by hand (it is elementwise), with float64 accumulation for the scale kernel's gradient.
pub(super) fn backward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    saved: &[Tensor],
    grad: &Tensor,
) -> Result<Option<Vec<Tensor>>> {
    let [mean, var, a] = saved else {
        return Ok(None);
    };
    let list = branch_list(branches);
    let stats = vec![list.len() as i64, spec.in_channels];
    let expected = [(mean, stats.clone()), (var, stats.clone()), (a, stats)];
    if !saved_fit(spec, x, grad, x.f_kind()?, &expected)? {
        return Ok(None);
    }
    let count = output_count(spec, x)? as f64;
    let std = add_eps(&list, var)?.f_sqrt()?;
    let g_sum = wide_sum(grad)?;
    let centred_grad = grad.f_sub(&g_sum.f_div_scalar(count)?.f_reshape([1, -1, 1, 1])?)?;
    let ctx = BranchGrad {
        spec,
        x,
        grad,
        centred_grad: &centred_grad,
        count,
    };
    let mut dx = x.f_zeros_like()?;
    let mut grads = Vec::with_capacity(3 * list.len() + 1);
    for (i, b) in list.iter().enumerate() {
        let bn = BranchBn {
            mean: mean.f_get(i as i64)?,
            a: a.f_get(i as i64)?,
            std: std.f_get(i as i64)?,
        };
        let sums = match b.weight {
            Some(w) if !b.scale => ctx.conv_branch(b, w, &bn, &mut dx, &mut grads)?,
            _ => ctx.elementwise_branch(b, &bn, &mut dx, &mut grads)?,
        };
        grads.push(sums.f_div(&bn.std)?);
        grads.push(g_sum.shallow_clone());
    }
    grads.insert(0, dx);
    Ok(Some(grads))
}

/// One branch's BN as its backward reads it: the batch mean, `a = weight / std` and `std`.
struct BranchBn {
    mean: Tensor,
    a: Tensor,
    std: Tensor,
}

/// What every branch's backward shares.
struct BranchGrad<'a> {
    spec: &'a BlockSpec,
    x: &'a Tensor,
    grad: &'a Tensor,
    centred_grad: &'a Tensor,
    count: f64,
}

impl BranchGrad<'_> {
    fn bn_backward(&self, yc: &mut Tensor, bn: &BranchBn) -> Result<Tensor> {
        tch::no_grad(|| {
            bn_backward_in_place(yc, self.centred_grad, self.grad, &bn.a, &bn.std, self.count)
        })
    }

    /// Recomputes a depthwise conv branch under autograd and backpropagates its BN gradient.
    fn conv_branch(
        &self,
        b: &Branch<'_>,
        w: &Tensor,
        bn: &BranchBn,
        dx: &mut Tensor,
        grads: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let x_leaf = self.x.f_detach()?.f_set_requires_grad(true)?;
        let w_leaf = w.f_detach()?.f_set_requires_grad(true)?;
        let (loss, sums) = tch::with_grad(|| -> Result<(Tensor, Tensor)> {
            let y = branch_output(self.spec, b, Some(&w_leaf), &x_leaf, &bn.mean)?;
            let mut dy = y.f_detach()?;
            let sums = self.bn_backward(&mut dy, bn)?;
            Ok((y.f_mul(&dy)?.f_sum(None::<Kind>)?, sums))
        })?;
        let got = Tensor::f_run_backward(&[loss], &[&x_leaf, &w_leaf], false, false)?;
        let _ = dx.f_add_(&got[0])?;
        grads.push(got[1].shallow_clone());
        Ok(sums)
    }

    /// The scale (`w * strided x`) or skip (`x`) branch: its BN gradient maps back elementwise.
    fn elementwise_branch(
        &self,
        b: &Branch<'_>,
        bn: &BranchBn,
        dx: &mut Tensor,
        grads: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let mut dy = branch_output(self.spec, b, b.weight, self.x, &bn.mean)?;
        let sums = self.bn_backward(&mut dy, bn)?;
        let mut target = if b.scale {
            strided(self.spec, dx)?
        } else {
            dx.shallow_clone()
        };
        match b.weight {
            Some(w) => {
                let c = self.spec.in_channels;
                let dw = wide_sum(&dy.f_mul(&strided(self.spec, self.x)?)?)?;
                grads.push(dw.f_reshape(w.size())?);
                let _ = target.f_add_(&dy.f_mul(&w.f_reshape([1, c, 1, 1])?)?)?;
            }
            None => {
                let _ = target.f_add_(&dy)?;
            }
        }
        Ok(sums)
    }
}

// ---- the CPU patch-moment kernel ----

/// A tensor's values as a flat float64 vector (a copy).
fn values(t: &Tensor) -> Result<Vec<f64>> {
    let flat = t
        .f_detach()?
        .f_to_kind(Kind::Double)?
        .f_contiguous()?
        .f_reshape([-1])?;
    Ok(Vec::<f64>::try_from(&flat)?)
}

/// Every branch's kernel as the CPU kernel takes them; `None` when they do not fit.
fn kernels(spec: &BlockSpec, list: &[Branch<'_>]) -> Result<Option<Kernels>> {
    let channels = spec.in_channels as usize;
    let (mut conv, mut centre) = (Vec::new(), Vec::new());
    for b in list {
        match b.weight {
            Some(w) if !b.scale => conv.push(values(w)?),
            Some(w) => centre.push(values(w)?),
            None => centre.push(vec![1.0; channels]),
        }
    }
    Ok(Kernels::new(
        &conv,
        &centre,
        spec.kernel_size as usize,
        channels,
    ))
}

/// `(rows, cols)` float64 values as a tensor of `kind`.
fn matrix(v: &[f64], rows: usize, kind: Kind) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(v)?
        .f_reshape([rows as i64, -1])?
        .f_to_kind(kind)?)
}

/// The training forward on the CPU kernel; falls back to [`forward`] when a tensor does not
/// qualify for it.
pub(super) fn forward_cpu(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
) -> Result<Option<TrainForward>> {
    let list = branch_list(branches);
    let Some(kern) = kernels(spec, &list)? else {
        return forward(spec, branches, x);
    };
    let bn = Affine {
        gamma: list
            .iter()
            .map(|b| values(&b.bn.weight))
            .collect::<Result<_>>()?,
        beta: list
            .iter()
            .map(|b| values(&b.bn.bias))
            .collect::<Result<_>>()?,
        eps: list.iter().map(|b| b.bn.eps).collect(),
    };
    let Some((output, f)) = cpu::train_forward(&spec.into(), x, &kern, &bn)? else {
        return forward(spec, branches, x);
    };
    let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
    if !(finite(&f.mean) && finite(&f.var)) {
        return Ok(None);
    }
    let (channels, nb) = (spec.in_channels as usize, list.len());
    update_running(
        &list,
        &matrix(&f.mean, nb, Kind::Double)?,
        &matrix(&f.var, nb, Kind::Double)?,
        f.moments.count as i64,
    )?;
    let m = &f.moments;
    Ok(Some(TrainForward {
        output,
        saved: vec![
            matrix(&f.a, nb, Kind::Double)?,
            matrix(&f.var_eps, nb, Kind::Double)?,
            Tensor::f_from_slice(&m.mu)?,
            matrix(&m.nu, channels, Kind::Double)?,
            matrix(&m.cov, channels, Kind::Double)?,
        ],
    }))
}

/// The gradients of [`forward_cpu`]; `None` when the saved tensors or `grad` do not fit.
pub(super) fn backward_cpu(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    saved: &[Tensor],
    grad: &Tensor,
) -> Result<Option<Vec<Tensor>>> {
    let _guard = tch::no_grad_guard();
    if saved.len() == 3 {
        // The forward fell back to the branch outputs (a tensor did not suit the kernel).
        return backward(spec, branches, x, saved, grad);
    }
    let [a, var_eps, mu, nu, cov] = saved else {
        return Ok(None);
    };
    let list = branch_list(branches);
    let Some(kern) = kernels(spec, &list)? else {
        return Ok(None);
    };
    let count = output_count(spec, x)?;
    let m = Moments {
        count: count as usize,
        mu: values(mu)?,
        nu: values(nu)?,
        cov: values(cov)?,
    };
    let (a, var_eps) = (values(a)?, values(var_eps)?);
    let eps: Vec<f64> = list.iter().map(|b| b.bn.eps).collect();
    let scales = BranchScales {
        a: &a,
        var_eps: &var_eps,
        eps: &eps,
    };
    let kind = x.f_kind()?;
    let grad = grad.f_to_kind(kind)?;
    let Some((dx, g)) = cpu::train_backward(&spec.into(), x, &grad, &kern, &scales, &m)? else {
        return Ok(None);
    };
    let channels = spec.in_channels as usize;
    let beta = Tensor::f_from_slice(&g.beta)?.f_to_kind(kind)?;
    let mut grads = vec![dx];
    let (mut conv, mut centre) = (g.conv.iter(), g.centre.iter());
    for (b, br) in list.iter().enumerate() {
        if let Some(w) = br.weight {
            let values = if br.scale { centre.next() } else { conv.next() };
            let Some(values) = values else {
                return Ok(None);
            };
            grads.push(
                Tensor::f_from_slice(values)?
                    .f_reshape(w.size())?
                    .f_to_kind(w.f_kind()?)?,
            );
        } else {
            centre.next();
        }
        let gamma = &g.gamma[b * channels..][..channels];
        grads.push(Tensor::f_from_slice(gamma)?.f_to_kind(br.bn.weight.f_kind()?)?);
        grads.push(beta.f_to_kind(br.bn.bias.f_kind()?)?);
    }
    Ok(Some(grads))
}
