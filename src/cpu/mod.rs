//! The CPU kernels of depthwise blocks, and the only code in the crate that touches raw memory.
//!
//! A depthwise block's training step runs here from per-channel patch moments without running
//! or storing any branch (`moments` for the forward, `backward` for the gradients), and its
//! float32 inference conv runs on the same plane buffers (`conv`). `geometry` says where each
//! tap reads, `simd` holds the AVX2+FMA row kernels behind a proof-of-feature token, `threads`
//! spreads channels over torch's OpenMP team. `tensor` is the entrance: a tensor becomes a slice
//! only there, after every check (device, dtype, layout, storage, alignment). The entry points
//! below return `None` when a tensor does not qualify, and the caller runs libtorch instead.

mod backward;
mod conv;
mod geometry;
mod moments;
pub(crate) mod simd;
mod tensor;
mod threads;

#[cfg(test)]
mod tests;

use tch::Tensor;

pub use backward::{BranchScales, Gradients};
pub use geometry::{Element, Geometry, Layout};
pub use moments::{Affine, Forward, Kernels, Moments};
pub use tensor::check_metadata;

use crate::error::Result;
use tensor::Dense;

/// The conv of a depthwise block: kernel size, stride, padding, dilation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv {
    pub kernel_size: i64,
    pub stride: i64,
    pub padding: i64,
    pub dilation: i64,
}

fn to_usize(v: i64) -> Option<usize> {
    usize::try_from(v).ok()
}

impl Conv {
    /// The layout of a contiguous NCHW input of `size`; `None` when it is not 4-D, empty or too
    /// small for the kernel.
    pub fn layout(&self, size: &[i64]) -> Option<Layout> {
        let [n, c, h, w] = *size else {
            return None;
        };
        if n < 1 || c < 1 {
            return None;
        }
        let geo = Geometry::new(
            to_usize(self.kernel_size)?,
            to_usize(self.stride)?,
            to_usize(self.padding)?,
            to_usize(self.dilation)?,
            to_usize(h)?,
            to_usize(w)?,
        )?;
        Some(Layout {
            n: to_usize(n)?,
            c: to_usize(c)?,
            geo,
        })
    }
}

fn threads(elements: usize) -> usize {
    threads::threads_for(elements, tch::get_num_threads().max(1) as usize)
}

fn output_size(lay: &Layout) -> [i64; 4] {
    [lay.n, lay.c, lay.geo.oh, lay.geo.ow].map(|v| v as i64)
}

/// The training forward of a depthwise block on a float32/float64 CPU input: the folded conv's
/// output and the statistics it measured. `None` when `x` does not qualify or the kernels and
/// affine parameters do not match its channels.
pub fn train_forward(
    conv: &Conv,
    x: &Tensor,
    kernels: &Kernels,
    bn: &Affine,
) -> Result<Option<(Tensor, Forward)>> {
    match x.f_kind()? {
        tch::Kind::Float => train_forward_as::<f32>(conv, x, kernels, bn),
        tch::Kind::Double => train_forward_as::<f64>(conv, x, kernels, bn),
        _ => Ok(None),
    }
}

fn train_forward_as<T: Element>(
    conv: &Conv,
    x: &Tensor,
    kernels: &Kernels,
    bn: &Affine,
) -> Result<Option<(Tensor, Forward)>> {
    let Some(lay) = conv.layout(&x.size()) else {
        return Ok(None);
    };
    if !kernels.fits(lay.c, lay.geo.taps()) || !bn.fits(kernels.branches(), lay.c) {
        return Ok(None);
    }
    let Some(input) = Dense::<T>::readable(x)? else {
        return Ok(None);
    };
    let mut out = Dense::<T>::fresh(&output_size(&lay))?;
    let stats = moments::forward(
        &lay,
        input.slice(),
        kernels,
        bn,
        out.slice_mut(),
        threads(input.slice().len()),
    );
    Ok(Some((out.into_tensor(), stats)))
}

/// The backward of [`train_forward`]: the input gradient and the parameter gradients. `None`
/// when a tensor does not qualify or the saved statistics do not match the input.
pub fn train_backward(
    conv: &Conv,
    x: &Tensor,
    grad: &Tensor,
    kernels: &Kernels,
    scales: &BranchScales<'_>,
    m: &Moments,
) -> Result<Option<(Tensor, Gradients)>> {
    match x.f_kind()? {
        tch::Kind::Float => train_backward_as::<f32>(conv, x, grad, kernels, scales, m),
        tch::Kind::Double => train_backward_as::<f64>(conv, x, grad, kernels, scales, m),
        _ => Ok(None),
    }
}

fn train_backward_as<T: Element>(
    conv: &Conv,
    x: &Tensor,
    grad: &Tensor,
    kernels: &Kernels,
    scales: &BranchScales<'_>,
    m: &Moments,
) -> Result<Option<(Tensor, Gradients)>> {
    let Some(lay) = conv.layout(&x.size()) else {
        return Ok(None);
    };
    let (c, taps) = (lay.c, lay.geo.taps());
    let fits = kernels.fits(c, taps)
        && scales.fits(kernels.branches(), c)
        && m.fits(c, taps, lay.count())
        && grad.size() == output_size(&lay);
    if !fits {
        return Ok(None);
    }
    let (Some(input), Some(g)) = (Dense::<T>::readable(x)?, Dense::<T>::readable(grad)?) else {
        return Ok(None);
    };
    let mut dx = Dense::<T>::fresh(&x.size())?;
    let grads = backward::backward(
        &lay,
        input.slice(),
        g.slice(),
        dx.slice_mut(),
        &backward::Fit { kernels, scales, m },
        threads(input.slice().len()),
    );
    Ok(Some((dx.into_tensor(), grads)))
}

/// A float32 depthwise conv (`kernel` of `(C, 1, k, k)`, `bias` of `C`) on a CPU input, for
/// inference. `None` when a tensor does not qualify.
pub fn inference_conv(
    conv: &Conv,
    x: &Tensor,
    kernel: &Tensor,
    bias: &Tensor,
) -> Result<Option<Tensor>> {
    let Some(lay) = conv.layout(&x.size()) else {
        return Ok(None);
    };
    let taps = lay.geo.taps();
    let shapes = kernel.size() == [lay.c as i64, 1, conv.kernel_size, conv.kernel_size]
        && bias.size() == [lay.c as i64]
        && kernel.numel() == lay.c * taps;
    if !shapes {
        return Ok(None);
    }
    let readable = (
        Dense::<f32>::readable(x)?,
        Dense::<f32>::readable(kernel)?,
        Dense::<f32>::readable(bias)?,
    );
    let (Some(input), Some(k), Some(b)) = readable else {
        return Ok(None);
    };
    let mut out = Dense::<f32>::fresh(&output_size(&lay))?;
    let threads = threads(input.slice().len());
    conv::depthwise_conv_f32(
        &lay,
        input.slice(),
        k.slice(),
        b.slice(),
        out.slice_mut(),
        threads,
    );
    Ok(Some(out.into_tensor()))
}
