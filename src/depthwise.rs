//! The exact training path of depthwise blocks.
//!
//! On CPU (float32/float64) the statistics and gradients come from each channel's patch moments
//! (`patch.rs`): no branch is run or stored. Elsewhere (CUDA) each branch's batch statistics come
//! from its own output (a depthwise conv, or the input scaled), which is dropped at once; the
//! forward then runs one conv, and the backward recomputes one branch at a time, applies its BN
//! backward analytically and lets libtorch's conv backward map it to the input and kernel.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

use crate::block::{check_batch_size, BlockSpec, Branches};
use crate::error::{config, Result};
use crate::fusion;
use crate::patch::{self, Affine, BranchScales, Element, Geometry, Kernels, Layout, Moments};
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
///
/// `raw` allows the CPU kernel, which reads and writes tensor memory directly: the caller passes
/// false for tensors that are not plain (subclasses, fake tensors) or while tracing.
pub fn forward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    raw: bool,
) -> Result<TrainForward> {
    if raw && patch_kernel_applies(x) {
        return patch_forward(spec, branches, x);
    }
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
    if let [a, var_eps, mu, nu, cov] = saved {
        return patch_backward(spec, branches, x, [a, var_eps, mu, nu, cov], grad);
    }
    let [mean, var, a] = saved else {
        return Err(config("depthwise backward needs 3 or 5 saved tensors"));
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

// ---- the CPU patch-moment kernel ----

/// Whether depthwise training steps on CPU use the patch-moment kernel (tests switch it off to
/// exercise the branch path that CUDA tensors take).
static PATCH_KERNEL: AtomicBool = AtomicBool::new(true);

/// Switches the CPU patch-moment kernel on or off; returns the previous setting.
pub fn set_patch_kernel(enabled: bool) -> bool {
    PATCH_KERNEL.swap(enabled, Ordering::SeqCst)
}

fn patch_kernel_applies(x: &Tensor) -> bool {
    PATCH_KERNEL.load(Ordering::SeqCst)
        && x.device() == Device::Cpu
        && matches!(x.kind(), Kind::Float | Kind::Double)
}

/// A detached tensor's values as a flat vector of `T`.
fn flat<T: tch::kind::Element + Copy>(t: &Tensor) -> Result<Vec<T>> {
    let flat = t.f_detach()?.f_contiguous()?.f_reshape([-1])?;
    Ok(Vec::<T>::try_from(&flat)?)
}

/// A detached tensor's values as a flat float64 vector.
fn values(t: &Tensor) -> Result<Vec<f64>> {
    flat(t)
}

fn to_usize(v: i64) -> Result<usize> {
    usize::try_from(v).map_err(|_| config(format!("negative geometry value {v}")))
}

fn layout(spec: &BlockSpec, x: &Tensor) -> Result<Layout> {
    check_batch_size(&x.size())?;
    layout_any(spec, x)
}

/// The layout of any input (inference needs no batch statistics).
fn layout_any(spec: &BlockSpec, x: &Tensor) -> Result<Layout> {
    let size = x.size();
    let geo = Geometry::new(
        to_usize(spec.kernel_size)?,
        to_usize(spec.stride)?,
        to_usize(spec.padding)?,
        to_usize(spec.dilation)?,
        to_usize(size[2])?,
        to_usize(size[3])?,
    )
    .ok_or_else(|| config(format!("input {size:?} too small for the kernel")))?;
    Ok(Layout {
        n: to_usize(size[0])?,
        c: to_usize(size[1])?,
        geo,
    })
}

fn kernels(spec: &BlockSpec, list: &[Branch<'_>]) -> Result<Kernels> {
    let channels = to_usize(spec.in_channels)?;
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
        to_usize(spec.kernel_size)?,
        channels,
    ))
}

/// The elements of a contiguous CPU tensor of element type `T`.
///
/// # Safety
/// `t` must be contiguous, on the CPU, of `T`'s kind, and outlive the slice unmodified.
unsafe fn elements<T>(t: &Tensor) -> &[T] {
    std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel())
}

/// The elements of a fresh contiguous CPU tensor of element type `T`, to fill.
///
/// # Safety
/// As [`elements`], and nothing else reads or writes `t` while the slice lives.
#[allow(clippy::mut_from_ref)]
unsafe fn elements_mut<T>(t: &Tensor) -> &mut [T] {
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel())
}

/// A fresh CPU tensor of the folded conv's output size for `x`.
fn output_like(lay: &Layout, x: &Tensor) -> Result<Tensor> {
    let (geo, kind) = (lay.geo, x.kind());
    let size = [lay.n as i64, lay.c as i64, geo.oh as i64, geo.ow as i64];
    Ok(Tensor::f_empty(size, (kind, Device::Cpu))?)
}

/// `(rows, cols)` float64 values as a tensor of `kind`.
fn matrix(v: &[f64], rows: usize, kind: Kind) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(v)?
        .f_reshape([rows as i64, -1])?
        .f_to_kind(kind)?)
}

fn threads(x: &Tensor) -> usize {
    patch::threads_for(x.numel(), tch::get_num_threads().max(1) as usize)
}

/// The inference conv of a depthwise block with a folded kernel `(C, 1, k, k)` and bias, on the
/// float32 CPU kernel when `raw` allows it (see [`forward`]; callers also require that no
/// gradient is wanted) and the tensors suit it; `None` means: run libtorch's conv.
pub fn inference_conv(
    spec: &BlockSpec,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    raw: bool,
) -> Result<Option<Tensor>> {
    let depthwise = spec.groups == spec.in_channels && spec.in_channels == spec.out_channels;
    let suits = |t: &Tensor| t.kind() == Kind::Float && t.device() == Device::Cpu;
    let wanted = raw && depthwise && PATCH_KERNEL.load(Ordering::SeqCst);
    if !(wanted && suits(x) && suits(weight) && suits(bias)) {
        return Ok(None);
    }
    let x = x.f_contiguous()?;
    let lay = layout_any(spec, &x)?;
    let (kernel, bias) = (flat::<f32>(weight)?, flat::<f32>(bias)?);
    let output = output_like(&lay, &x)?;
    // SAFETY: `x` is contiguous float32 on the CPU; `output` is a fresh float32 tensor that
    // nothing else touches while the kernel fills it.
    unsafe {
        let out = elements_mut::<f32>(&output);
        patch::depthwise_conv_f32(&lay, elements::<f32>(&x), &kernel, &bias, out, threads(&x));
    }
    Ok(Some(output))
}

fn run_forward<T: Element>(
    lay: &Layout,
    x: &Tensor,
    output: &Tensor,
    kern: &Kernels,
    bn: &Affine,
) -> patch::Forward {
    // SAFETY: the caller passes a contiguous CPU `x` of `T`'s kind and a fresh `output` of that
    // kind that nothing else reads or writes while the kernel fills it.
    unsafe {
        let out = elements_mut::<T>(output);
        patch::forward(lay, elements::<T>(x), kern, bn, out, threads(x))
    }
}

fn patch_forward(spec: &BlockSpec, branches: &Branches, x: &Tensor) -> Result<TrainForward> {
    let x = x.f_contiguous()?;
    let list = branch_list(branches);
    let lay = layout(spec, &x)?;
    let (channels, nb) = (lay.c, list.len());
    let kern = kernels(spec, &list)?;
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
    let output = output_like(&lay, &x)?;
    let f = match x.kind() {
        Kind::Float => run_forward::<f32>(&lay, &x, &output, &kern, &bn),
        Kind::Double => run_forward::<f64>(&lay, &x, &output, &kern, &bn),
        other => return Err(config(format!("patch kernel on {other:?}"))),
    };
    update_running(
        &list,
        &matrix(&f.mean, nb, Kind::Double)?,
        &matrix(&f.var, nb, Kind::Double)?,
        f.moments.count as i64,
    )?;
    let m = &f.moments;
    Ok(TrainForward {
        output,
        saved: vec![
            matrix(&f.a, nb, Kind::Double)?,
            matrix(&f.var_eps, nb, Kind::Double)?,
            Tensor::f_from_slice(&m.mu)?,
            matrix(&m.nu, channels, Kind::Double)?,
            matrix(&m.cov, channels, Kind::Double)?,
        ],
    })
}

fn run_backward<T: Element>(
    lay: &Layout,
    x: &Tensor,
    grad: &Tensor,
    dx: &Tensor,
    kern: &Kernels,
    scales: &BranchScales<'_>,
    m: &Moments,
) -> patch::Gradients {
    // SAFETY: the caller passes contiguous CPU tensors of `T`'s kind; `dx` is a fresh tensor
    // that nothing else reads or writes while the kernel fills it.
    unsafe {
        let out = elements_mut::<T>(dx);
        patch::backward(
            lay,
            elements::<T>(x),
            elements::<T>(grad),
            out,
            kern,
            scales,
            m,
            threads(x),
        )
    }
}

fn patch_backward(
    spec: &BlockSpec,
    branches: &Branches,
    x: &Tensor,
    [a, var_eps, mu, nu, cov]: [&Tensor; 5],
    grad: &Tensor,
) -> Result<Vec<Tensor>> {
    let _guard = tch::no_grad_guard();
    let x = x.f_contiguous()?;
    let kind = x.kind();
    if !matches!(kind, Kind::Float | Kind::Double) || x.device() != Device::Cpu {
        return Err(config(format!(
            "patch kernel backward on {kind:?} {:?}",
            x.device()
        )));
    }
    let grad = grad.f_to_kind(kind)?.f_contiguous()?;
    let list = branch_list(branches);
    let lay = layout(spec, &x)?;
    let kern = kernels(spec, &list)?;
    let m = Moments {
        count: lay.n * lay.geo.oh * lay.geo.ow,
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
    let dx = Tensor::f_empty(x.size(), (kind, Device::Cpu))?;
    let g = match kind {
        Kind::Float => run_backward::<f32>(&lay, &x, &grad, &dx, &kern, &scales, &m),
        _ => run_backward::<f64>(&lay, &x, &grad, &dx, &kern, &scales, &m),
    };
    let channels = lay.c;
    let beta = Tensor::f_from_slice(&g.beta)?.f_to_kind(kind)?;
    let mut grads = vec![dx];
    let (mut conv, mut centre) = (g.conv.iter(), g.centre.iter());
    for (b, br) in list.iter().enumerate() {
        if let Some(w) = br.weight {
            let values = if br.scale { centre.next() } else { conv.next() };
            let values = values.ok_or_else(|| config("patch kernel lost a branch gradient"))?;
            grads.push(
                Tensor::f_from_slice(values)?
                    .f_reshape(w.size())?
                    .f_to_kind(w.kind())?,
            );
        } else {
            centre.next();
        }
        let gamma = &g.gamma[b * channels..][..channels];
        grads.push(Tensor::f_from_slice(gamma)?.f_to_kind(br.bn.weight.kind())?);
        grads.push(beta.f_to_kind(br.bn.bias.kind())?);
    }
    Ok(grads)
}
