//! A float32 depthwise conv for inference (no autograd): the same plane buffers as training,
//! float32 throughout like libtorch's own kernel.

use super::geometry::{Element, Layout, Plane};
use super::simd::{conv_row_f32, dispatched, Isa};
use super::threads::{for_channels, PlaneWriter};

/// One output plane of a float32 inference conv: `out = bias + sum_t kernel[t] x[p + t]`.
#[inline(always)]
fn infer_plane<T: Element, I: Isa>(
    isa: I,
    plane: Plane<'_, f32>,
    kernel: &[f32],
    bias: f32,
    buf: &mut [f32],
    out: &mut [f32],
    _element: Option<T>,
) {
    let Plane {
        geo, offsets, x, ..
    } = plane;
    geo.fill_f32(x, buf);
    let mut rows: Vec<&[f32]> = Vec::with_capacity(offsets.len());
    for (oy, dst) in out.chunks_exact_mut(geo.ow).enumerate() {
        rows.clear();
        rows.extend(offsets.iter().map(|&o| &buf[o + oy * geo.pw..][..geo.ow]));
        conv_row_f32::<I>(isa, dst, &rows, kernel, bias);
    }
}
dispatched!(infer_plane_run, infer_plane_simd, infer_plane, (
    plane: Plane<'_, f32>, kernel: &[f32], bias: f32, buf: &mut [f32], out: &mut [f32],
    _element: Option<T>
));

/// A float32 depthwise conv with one `k^2` kernel and one bias per channel, for inference
/// (not differentiable), written into `out` (contiguous NCHW of the output size).
pub(crate) fn depthwise_conv_f32(
    lay: &Layout,
    x: &[f32],
    kernel: &[f32],
    bias: &[f32],
    out: &mut [f32],
    threads: usize,
) {
    let geo = lay.geo;
    let (taps, channels) = (geo.taps(), lay.c);
    assert!(out.len() == lay.n * channels * lay.out_plane() && kernel.len() == channels * taps);
    assert!(x.len() == lay.n * channels * lay.plane() && bias.len() == channels);
    let writer = PlaneWriter(out.as_mut_ptr());
    let writer = &writer;
    let out_plane = lay.out_plane();
    let offsets = geo.tap_offsets();
    let init = || vec![0.0f32; geo.buffer_len()];
    for_channels(channels, threads, init, |buf, c| {
        let k = &kernel[c * taps..][..taps];
        for n in 0..lay.n {
            // SAFETY: plane (n, c) lies inside `out` and only this thread holds channel c.
            let dst = unsafe { writer.plane(n * channels + c, out_plane) };
            let plane = lay.input_plane(&offsets, x, (n, c), 0.0);
            infer_plane_run::<f32>(plane, k, bias[c], buf, dst, None);
        }
    });
}
