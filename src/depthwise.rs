//! The exact training path of depthwise blocks: each branch's batch statistics come from its own
//! output (a depthwise conv, or the input scaled), which is dropped at once; the forward then runs
//! one conv. The backward recomputes one branch at a time, applies its BN backward analytically
//! and lets libtorch's conv backward map it to the input and kernel.

use tch::{Kind, Tensor};

use crate::block::{check_batch_size, BlockSpec, Branches};
use crate::error::{config, Result};
use crate::fusion;
use crate::train::{
    add_eps, bn_scale, branch_list, stack_bn, update_running, Branch, TrainForward,
};

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
        Some(w) if b.scale => spec
            .strided(x)?
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

/// Per-channel mean and biased variance over (N, H, W): two-pass so float32 does not cancel, and
/// accumulated in float64 as `F.batch_norm`'s CPU kernels do. Consumes `y`.
fn centred_moments(mut y: Tensor, count: f64) -> Result<(Tensor, Tensor)> {
    let kind = y.kind();
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
        .f_to_kind(t.kind())?)
}

fn output_count(spec: &BlockSpec, x: &Tensor) -> Result<i64> {
    let size = spec.strided(x)?.size();
    check_batch_size(&size)?;
    Ok(size[0] * size[2] * size[3])
}

/// The `(C, 1, k, k)` kernel of a branch: the scale padded to the centre, the skip an identity.
fn full_kernel(spec: &BlockSpec, b: &Branch<'_>, like: &Tensor) -> Result<Tensor> {
    match b.weight {
        Some(w) if b.scale => fusion::pad_kernel_to(w, spec.kernel_size),
        Some(w) => Ok(w.shallow_clone()),
        None => fusion::identity_kernel(
            spec.in_channels,
            spec.groups,
            spec.kernel_size,
            &b.bn.running_mean,
            like.kind(),
        ),
    }
}

/// The train-time branch sum: statistics per branch, running statistics updated, one conv.
pub fn forward(spec: &BlockSpec, branches: &Branches, x: &Tensor) -> Result<TrainForward> {
    let list = branch_list(branches);
    let count = output_count(spec, x)?;
    let zero = list[0]
        .bn
        .running_mean
        .f_zeros_like()?
        .f_to_kind(x.kind())?;
    let mut means = Vec::with_capacity(list.len());
    let mut vars = Vec::with_capacity(list.len());
    for b in &list {
        let (m, v) = centred_moments(branch_output(spec, b, b.weight, x, &zero)?, count as f64)?;
        means.push(m);
        vars.push(v);
    }
    let (mean, var) = (Tensor::f_stack(&means, 0)?, Tensor::f_stack(&vars, 0)?);
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
    let (s, p, d) = (spec.stride, spec.padding, spec.dilation);
    let output = x.f_conv2d(&kernel, Some(&bias), [s, s], [p, p], [d, d], spec.groups)?;
    Ok(TrainForward {
        output,
        saved: vec![mean, var, a],
    })
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
pub fn backward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    saved: &[Tensor],
    grad: &Tensor,
) -> Result<Vec<Tensor>> {
    let [mean, var, a] = saved else {
        return Err(config("depthwise backward needs 3 saved tensors"));
    };
    let list = branch_list(branches);
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
        let (a_b, std_b, m_b) = (
            a.f_get(i as i64)?,
            std.f_get(i as i64)?,
            mean.f_get(i as i64)?,
        );
        let sums = match b.weight {
            Some(w) if !b.scale => {
                ctx.conv_branch(b, w, &m_b, &a_b, &std_b, &mut dx, &mut grads)?
            }
            _ => ctx.elementwise_branch(b, &m_b, &a_b, &std_b, &mut dx, &mut grads)?,
        };
        grads.push(sums.f_div(&std_b)?);
        grads.push(g_sum.shallow_clone());
    }
    grads.insert(0, dx);
    Ok(grads)
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
    fn bn_backward(&self, yc: &mut Tensor, a: &Tensor, std: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| bn_backward_in_place(yc, self.centred_grad, self.grad, a, std, self.count))
    }

    /// Recomputes a depthwise conv branch under autograd and backpropagates its BN gradient.
    #[allow(clippy::too_many_arguments)]
    fn conv_branch(
        &self,
        b: &Branch<'_>,
        w: &Tensor,
        m: &Tensor,
        a: &Tensor,
        std: &Tensor,
        dx: &mut Tensor,
        grads: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let x_leaf = self.x.f_detach()?.f_set_requires_grad(true)?;
        let w_leaf = w.f_detach()?.f_set_requires_grad(true)?;
        let (loss, sums) = tch::with_grad(|| -> Result<(Tensor, Tensor)> {
            let y = branch_output(self.spec, b, Some(&w_leaf), &x_leaf, m)?;
            let mut dy = y.f_detach()?;
            let sums = self.bn_backward(&mut dy, a, std)?;
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
        m: &Tensor,
        a: &Tensor,
        std: &Tensor,
        dx: &mut Tensor,
        grads: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let mut dy = branch_output(self.spec, b, b.weight, self.x, m)?;
        let sums = self.bn_backward(&mut dy, a, std)?;
        let mut target = if b.scale {
            self.spec.strided(dx)?
        } else {
            dx.shallow_clone()
        };
        match b.weight {
            Some(w) => {
                let c = self.spec.in_channels;
                let dw = wide_sum(&dy.f_mul(&self.spec.strided(self.x)?)?)?;
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
