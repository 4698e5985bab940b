//! A CPU kernel for the exact training step of depthwise blocks.
//!
//! Every branch of a depthwise block filters each channel of the same input with its own `k x k`
//! kernel (the scale and the skip are kernels with only the centre tap), so each branch's batch
//! statistics follow from the channel's **patch moments**: the mean of every tap and the `k^2 x
//! k^2` covariance of the taps over all output positions, padding included. One pass over the
//! input gives them. The backward needs `sum g * patch` (one pass) and then the input gradient
//! (one more pass), recomputing each conv branch's output per row in registers-sized buffers;
//! no branch output is ever stored.
//!
//! All accumulation is in float64 with centred values (the channel mean is subtracted first, so
//! padded taps read minus that mean), so float32 inputs do not cancel. Channels are split over
//! `torch.get_num_threads()` threads; each thread owns whole channels.

use std::thread;

/// A float element the kernel reads and writes (computation is in float64).
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// The conv geometry of one block on one input size.
///
/// Each `h x w` input plane is padded and split into `stride^2` phase planes of `ph x pw`, so
/// that for a row of outputs every tap reads one contiguous slice of one phase plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    ph: usize,
    pw: usize,
}

impl Geometry {
    /// The geometry of a `k x k` conv on `h x w`; `None` when the output would be empty.
    pub fn new(k: usize, stride: usize, padding: usize, dilation: usize, h: usize, w: usize) -> Option<Self> {
        let span = dilation * (k - 1) + 1;
        if k == 0 || stride == 0 || h + 2 * padding < span || w + 2 * padding < span {
            return None;
        }
        let oh = (h + 2 * padding - span) / stride + 1;
        let ow = (w + 2 * padding - span) / stride + 1;
        let reach = dilation * (k - 1) / stride;
        Some(Geometry {
            k,
            stride,
            padding,
            dilation,
            h,
            w,
            oh,
            ow,
            ph: oh + reach,
            pw: ow + reach,
        })
    }

    pub fn taps(&self) -> usize {
        self.k * self.k
    }

    /// The centre tap's index (the tap the scale and skip branches read).
    pub fn centre(&self) -> usize {
        (self.k / 2) * self.k + self.k / 2
    }

    fn phase_len(&self) -> usize {
        self.ph * self.pw
    }

    fn buffer_len(&self) -> usize {
        self.stride * self.stride * self.phase_len()
    }

    /// Where tap `t` of output `(0, 0)` lies in the phase buffer; output `(oy, ox)` adds
    /// `oy * pw + ox`.
    fn tap_offset(&self, t: usize) -> usize {
        let (dy, dx) = ((t / self.k) * self.dilation, (t % self.k) * self.dilation);
        let phase = (dy % self.stride) * self.stride + dx % self.stride;
        phase * self.phase_len() + (dy / self.stride) * self.pw + dx / self.stride
    }

    fn tap_offsets(&self) -> Vec<usize> {
        (0..self.taps()).map(|t| self.tap_offset(t)).collect()
    }

    /// The raw coordinate of phase-buffer row `i` of phase `r`, if inside the input.
    fn raw(&self, i: usize, r: usize, size: usize) -> Option<usize> {
        (i * self.stride + r)
            .checked_sub(self.padding)
            .filter(|&v| v < size)
    }

    /// Fills `buf` with the padded plane `x` minus `shift` (so padding reads `-shift`).
    fn fill<T: Element>(&self, x: &[T], shift: f64, buf: &mut [f64]) {
        let s = self.stride;
        for ry in 0..s {
            for rx in 0..s {
                let phase = &mut buf[(ry * s + rx) * self.phase_len()..][..self.phase_len()];
                for (i, row) in phase.chunks_exact_mut(self.pw).enumerate() {
                    let Some(y) = self.raw(i, ry, self.h) else {
                        row.fill(-shift);
                        continue;
                    };
                    let src = &x[y * self.w..][..self.w];
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = match self.raw(j, rx, self.w) {
                            Some(c) => src[c].to_f64() - shift,
                            None => -shift,
                        };
                    }
                }
            }
        }
    }

    /// Writes the raw plane `dx` from the padded-frame gradient `buf` (the padding is dropped;
    /// positions no tap reaches get zero).
    fn gather<T: Element>(&self, buf: &[f64], dx: &mut [T]) {
        let s = self.stride;
        for (y, row) in dx.chunks_exact_mut(self.w).enumerate() {
            let (ry, i) = ((y + self.padding) % s, (y + self.padding) / s);
            for (x, v) in row.iter_mut().enumerate() {
                let (rx, j) = ((x + self.padding) % s, (x + self.padding) / s);
                *v = if i < self.ph && j < self.pw {
                    T::from_f64(buf[(ry * s + rx) * self.phase_len() + i * self.pw + j])
                } else {
                    T::from_f64(0.0)
                };
            }
        }
    }
}

/// The per-branch kernels of a depthwise block, in float64: conv branches with all `k^2` taps,
/// then the centre-only branches (scale, skip) as one value per channel.
#[derive(Debug, Clone)]
pub struct Kernels {
    /// Per conv branch, `channels * k^2` taps.
    pub conv: Vec<Vec<f64>>,
    /// Per centre-only branch, `channels` values (the scale's weight, or ones for the skip).
    pub centre: Vec<Vec<f64>>,
}

impl Kernels {
    pub fn branches(&self) -> usize {
        self.conv.len() + self.centre.len()
    }

    /// Branch `b`'s full kernel of channel `c`.
    fn full(&self, geo: &Geometry, b: usize, c: usize) -> Vec<f64> {
        let taps = geo.taps();
        if b < self.conv.len() {
            self.conv[b][c * taps..][..taps].to_vec()
        } else {
            let mut k = vec![0.0; taps];
            k[geo.centre()] = self.centre[b - self.conv.len()][c];
            k
        }
    }
}

/// Per channel: the input mean `mu`, the tap means `nu` of the centred input, and the tap
/// covariance `cov` (row-major `k^2 x k^2`), each over all `count` output positions.
#[derive(Debug, Clone)]
pub struct Moments {
    pub count: usize,
    pub mu: Vec<f64>,
    pub nu: Vec<f64>,
    pub cov: Vec<f64>,
}

/// The shape of a contiguous NCHW tensor and its geometry.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub n: usize,
    pub c: usize,
    pub geo: Geometry,
}

impl Layout {
    fn plane(&self) -> usize {
        self.geo.h * self.geo.w
    }

    fn out_plane(&self) -> usize {
        self.geo.oh * self.geo.ow
    }

    fn count(&self) -> usize {
        self.n * self.out_plane()
    }

    /// Input plane `(n, c)`.
    fn input<'a, T>(&self, x: &'a [T], n: usize, c: usize) -> &'a [T] {
        &x[(n * self.c + c) * self.plane()..][..self.plane()]
    }

    /// Output plane `(n, c)`.
    fn output<'a, T>(&self, g: &'a [T], n: usize, c: usize) -> &'a [T] {
        &g[(n * self.c + c) * self.out_plane()..][..self.out_plane()]
    }
}

/// Splits `0..channels` over up to `threads` scoped threads; `work(range, slices)` gets each
/// thread's channels and its chunks of `outputs` (each output holds `per_channel[i]` values per
/// channel).
fn for_channels<F>(channels: usize, threads: usize, outputs: Vec<(&mut [f64], usize)>, work: F)
where
    F: Fn(std::ops::Range<usize>, Vec<&mut [f64]>) + Sync,
{
    let threads = threads.clamp(1, channels.max(1));
    let per_thread = channels.div_ceil(threads);
    let mut parts: Vec<Vec<&mut [f64]>> = (0..threads).map(|_| Vec::new()).collect();
    for (out, width) in outputs {
        for (part, chunk) in parts.iter_mut().zip(out.chunks_mut(per_thread * width)) {
            part.push(chunk);
        }
    }
    if threads == 1 {
        work(0..channels, parts.pop().unwrap_or_default());
        return;
    }
    thread::scope(|scope| {
        for (i, part) in parts.into_iter().enumerate() {
            let start = i * per_thread;
            let end = (start + per_thread).min(channels);
            if start >= end {
                continue;
            }
            let work = &work;
            scope.spawn(move || work(start..end, part));
        }
    });
}

/// How many threads a job of `elements` input elements is worth (one below ~64k).
pub fn threads_for(elements: usize, available: usize) -> usize {
    if elements < 1 << 16 {
        1
    } else {
        available.max(1)
    }
}

#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

#[inline]
fn sum(a: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = a.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().sum();
    for x in chunks {
        for l in 0..4 {
            acc[l] += x[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Mean of every channel of a contiguous NCHW tensor, in float64.
fn channel_mean<T: Element>(lay: &Layout, x: &[T], c: usize) -> f64 {
    let total: f64 = (0..lay.n)
        .map(|n| lay.input(x, n, c).iter().map(|v| v.to_f64()).sum::<f64>())
        .sum();
    total / (lay.n * lay.plane()) as f64
}

/// The patch moments of every channel of `x` (contiguous NCHW, `lay`).
pub fn moments<T: Element>(lay: &Layout, x: &[T], threads: usize) -> Moments {
    let geo = lay.geo;
    let taps = geo.taps();
    let count = lay.count();
    let mut mu = vec![0.0; lay.c];
    let mut nu = vec![0.0; lay.c * taps];
    let mut cov = vec![0.0; lay.c * taps * taps];
    let outputs = vec![(&mut mu[..], 1), (&mut nu[..], taps), (&mut cov[..], taps * taps)];
    for_channels(lay.c, threads, outputs, |channels, mut out| {
        let (cov_out, rest) = out.split_last_mut().expect("three outputs");
        let (nu_out, mu_out) = rest.split_last_mut().expect("three outputs");
        let offsets = geo.tap_offsets();
        let mut buf = vec![0.0; geo.buffer_len()];
        let mut sums = vec![0.0; taps];
        let mut cross = vec![0.0; taps * taps];
        for (i, c) in channels.enumerate() {
            let shift = channel_mean(lay, x, c);
            sums.fill(0.0);
            cross.fill(0.0);
            for n in 0..lay.n {
                geo.fill(lay.input(x, n, c), shift, &mut buf);
                for oy in 0..geo.oh {
                    let row = |t: usize| &buf[offsets[t] + oy * geo.pw..][..geo.ow];
                    for t1 in 0..taps {
                        let r1 = row(t1);
                        sums[t1] += sum(r1);
                        for t2 in t1..taps {
                            cross[t1 * taps + t2] += dot(r1, row(t2));
                        }
                    }
                }
            }
            mu_out[0][i] = shift;
            let nu_c = &mut nu_out[i * taps..][..taps];
            for t in 0..taps {
                nu_c[t] = sums[t] / count as f64;
            }
            let cov_c = &mut cov_out[i * taps * taps..][..taps * taps];
            for t1 in 0..taps {
                for t2 in t1..taps {
                    let v = cross[t1 * taps + t2] / count as f64 - nu_c[t1] * nu_c[t2];
                    cov_c[t1 * taps + t2] = v;
                    cov_c[t2 * taps + t1] = v;
                }
            }
        }
    });
    Moments { count, mu, nu, cov }
}

/// Mean and biased variance of every branch (`branches * channels`, branch-major): a branch's
/// output is `K . patch`, so its mean is `K . E[patch]` and its variance `K^T Cov K`.
pub fn branch_statistics(geo: &Geometry, kernels: &Kernels, m: &Moments) -> (Vec<f64>, Vec<f64>) {
    let taps = geo.taps();
    let channels = m.mu.len();
    let nb = kernels.branches();
    let mut mean = vec![0.0; nb * channels];
    let mut var = vec![0.0; nb * channels];
    for c in 0..channels {
        let nu = &m.nu[c * taps..][..taps];
        let cov = &m.cov[c * taps * taps..][..taps * taps];
        for b in 0..nb {
            let k = kernels.full(geo, b, c);
            mean[b * channels + c] = (0..taps).map(|t| k[t] * (nu[t] + m.mu[c])).sum();
            let quad: f64 = (0..taps)
                .map(|t1| k[t1] * (0..taps).map(|t2| cov[t1 * taps + t2] * k[t2]).sum::<f64>())
                .sum();
            var[b * channels + c] = quad.max(0.0);
        }
    }
    (mean, var)
}

/// What the backward needs per branch and channel (`branches * channels`, branch-major): the
/// BN scale `a = gamma / sqrt(var + eps)` and `var + eps`; and each branch's BN eps.
pub struct BranchScales<'a> {
    pub a: &'a [f64],
    pub var_eps: &'a [f64],
    pub eps: &'a [f64],
}

/// The gradients of one depthwise training step. `dx` is written in place; the rest are
/// per-branch float64 vectors.
pub struct Gradients {
    /// Per conv branch, `channels * k^2`.
    pub conv: Vec<Vec<f64>>,
    /// Per centre-only branch, `channels` (only the scale's is a parameter).
    pub centre: Vec<Vec<f64>>,
    /// `branches * channels`: the BN weights' gradients.
    pub gamma: Vec<f64>,
    /// `channels`: every BN bias gets `sum g`.
    pub beta: Vec<f64>,
}

/// Per channel: `sum g` and `sum_p g[p] * (x - mu)[p + t]` for every tap.
fn grad_patch_sums<T: Element>(lay: &Layout, x: &[T], g: &[T], m: &Moments, threads: usize) -> (Vec<f64>, Vec<f64>) {
    let geo = lay.geo;
    let taps = geo.taps();
    let mut gsum = vec![0.0; lay.c];
    let mut h = vec![0.0; lay.c * taps];
    let outputs = vec![(&mut gsum[..], 1), (&mut h[..], taps)];
    for_channels(lay.c, threads, outputs, |channels, mut out| {
        let (h_out, rest) = out.split_last_mut().expect("two outputs");
        let gsum_out = &mut rest[0];
        let offsets = geo.tap_offsets();
        let mut buf = vec![0.0; geo.buffer_len()];
        let mut grow = vec![0.0; geo.ow];
        for (i, c) in channels.enumerate() {
            let h_c = &mut h_out[i * taps..][..taps];
            for n in 0..lay.n {
                geo.fill(lay.input(x, n, c), m.mu[c], &mut buf);
                let gp = lay.output(g, n, c);
                for oy in 0..geo.oh {
                    for (d, s) in grow.iter_mut().zip(&gp[oy * geo.ow..][..geo.ow]) {
                        *d = s.to_f64();
                    }
                    gsum_out[i] += sum(&grow);
                    for t in 0..taps {
                        h_c[t] += dot(&grow, &buf[offsets[t] + oy * geo.pw..][..geo.ow]);
                    }
                }
            }
        }
    });
    (gsum, h)
}

/// A raw pointer to the input gradient that threads owning disjoint channels write through.
struct PlaneWriter<T>(*mut T);

// SAFETY: every thread writes only the planes of its own channels (see `backward`).
unsafe impl<T: Send> Send for PlaneWriter<T> {}
unsafe impl<T: Send> Sync for PlaneWriter<T> {}

/// The backward of the depthwise branch sum: writes the input gradient into `dx` (contiguous
/// NCHW like `x`) and returns the parameter gradients.
///
/// Per branch `b` and channel: `dL/dy_b = a_b (g - mean g) - coef_b (y_b - m_b)` with
/// `coef_b = a_b S_b / (M (var_b + eps))` and `S_b = sum g (y_b - m_b) = K_b . h'`, where
/// `h'[t] = sum_p (g - mean g)[p] x[p + t]`. Hence the kernel gradient
/// `a_b h' - coef_b M Cov K_b`, and the input gradient scatters, per output position,
/// `sum_b dL/dy_b[p] K_b` over the patch.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    lay: &Layout,
    x: &[T],
    g: &[T],
    dx: &mut [T],
    kernels: &Kernels,
    scales: &BranchScales<'_>,
    m: &Moments,
    threads: usize,
) -> Gradients {
    let geo = lay.geo;
    let (taps, channels, count) = (geo.taps(), lay.c, m.count as f64);
    let (nconv, nb) = (kernels.conv.len(), kernels.branches());
    let (gsum, h) = grad_patch_sums(lay, x, g, m, threads);

    // Per channel and branch: h', S_b, coef_b and the parameter gradients.
    let mut grads = Gradients {
        conv: vec![vec![0.0; channels * taps]; nconv],
        centre: vec![vec![0.0; channels]; nb - nconv],
        gamma: vec![0.0; nb * channels],
        beta: gsum.clone(),
    };
    let mut coef = vec![0.0; nb * channels];
    for c in 0..channels {
        let nu = &m.nu[c * taps..][..taps];
        let cov = &m.cov[c * taps * taps..][..taps * taps];
        let hc: Vec<f64> = (0..taps).map(|t| h[c * taps + t] - gsum[c] * nu[t]).collect();
        for b in 0..nb {
            let k = kernels.full(&geo, b, c);
            let (a, ve) = (scales.a[b * channels + c], scales.var_eps[b * channels + c]);
            let s: f64 = (0..taps).map(|t| k[t] * hc[t]).sum();
            let cf = a * s / (count * ve);
            coef[b * channels + c] = cf;
            grads.gamma[b * channels + c] = s / ve.sqrt();
            // dK = a h' - coef M Cov K = (a / ve) (h' ve - (K . h') Cov K); with ve = K.u + eps
            // and u = Cov K the bracket is h' eps + sum_s K[s] (h'[t] u[s] - u[t] h'[s]), whose
            // s = t term is exactly zero: BN makes a branch's gradient along its own kernel
            // O(eps), and this form keeps it from cancelling (the scale's is all of that kind).
            let u: Vec<f64> = (0..taps)
                .map(|t| (0..taps).map(|v| cov[t * taps + v] * k[v]).sum())
                .collect();
            let eps = scales.eps[b];
            let dk = |t: usize| {
                let turn: f64 = (0..taps)
                    .filter(|&s| s != t && k[s] != 0.0)
                    .map(|s| k[s] * (hc[t] * u[s] - u[t] * hc[s]))
                    .sum();
                a / ve * (hc[t] * eps + turn)
            };
            if b < nconv {
                for t in 0..taps {
                    grads.conv[b][c * taps + t] = dk(t);
                }
            } else {
                grads.centre[b - nconv][c] = dk(geo.centre());
            }
        }
    }

    let writer = PlaneWriter(dx.as_mut_ptr());
    let writer = &writer;
    let (plane, cn) = (lay.plane(), lay.c);
    let coef = &coef;
    let gsum = &gsum;
    for_channels(channels, threads, Vec::new(), |range, _| {
        let offsets = geo.tap_offsets();
        let centre = geo.centre();
        let mut buf = vec![0.0; geo.buffer_len()];
        let mut dbuf = vec![0.0; geo.buffer_len()];
        let mut grow = vec![0.0; geo.ow];
        let mut z = vec![vec![0.0; geo.ow]; nconv];
        for c in range {
            let nu = &m.nu[c * taps..][..taps];
            // v[t] = keff[t] g - sum_b ck[b][t] z_b - [t = centre] alpha (x - mu) + konst[t]
            let mut keff = vec![0.0; taps];
            let mut konst = vec![0.0; taps];
            let mut ck = vec![vec![0.0; taps]; nconv];
            let mut alpha = 0.0;
            let gbar = gsum[c] / count;
            for b in 0..nb {
                let k = kernels.full(&geo, b, c);
                let (a, cf) = (scales.a[b * channels + c], coef[b * channels + c]);
                let k_nu: f64 = (0..taps).map(|t| k[t] * nu[t]).sum();
                for t in 0..taps {
                    keff[t] += a * k[t];
                    konst[t] += cf * k[t] * k_nu;
                }
                if b < nconv {
                    for t in 0..taps {
                        ck[b][t] = cf * k[t];
                    }
                } else {
                    alpha += cf * k[centre] * k[centre];
                }
            }
            for t in 0..taps {
                konst[t] -= keff[t] * gbar;
            }
            let kconv: Vec<&[f64]> = (0..nconv)
                .map(|b| &kernels.conv[b][c * taps..][..taps])
                .collect();
            for n in 0..lay.n {
                geo.fill(lay.input(x, n, c), m.mu[c], &mut buf);
                dbuf.fill(0.0);
                let gp = lay.output(g, n, c);
                for oy in 0..geo.oh {
                    for (d, s) in grow.iter_mut().zip(&gp[oy * geo.ow..][..geo.ow]) {
                        *d = s.to_f64();
                    }
                    let base = oy * geo.pw;
                    for (zb, kb) in z.iter_mut().zip(&kconv) {
                        zb.fill(0.0);
                        for t in 0..taps {
                            let src = &buf[offsets[t] + base..][..geo.ow];
                            let kt = kb[t];
                            for (zv, s) in zb.iter_mut().zip(src) {
                                *zv += kt * s;
                            }
                        }
                    }
                    for t in 0..taps {
                        let (kt, ct) = (keff[t], konst[t]);
                        let start = offsets[t] + base;
                        let dst = &mut dbuf[start..][..geo.ow];
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let mut v = kt * grow[ox] + ct;
                            for b in 0..nconv {
                                v -= ck[b][t] * z[b][ox];
                            }
                            *d += v;
                        }
                        if t == centre && alpha != 0.0 {
                            for ox in 0..geo.ow {
                                dbuf[start + ox] -= alpha * buf[start + ox];
                            }
                        }
                    }
                }
                // SAFETY: plane (n, c) lies inside `dx` and only this thread owns channel c.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(writer.0.add((n * cn + c) * plane), plane)
                };
                geo.gather(&dbuf, out);
            }
        }
    });
    grads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_offsets_follow_stride_and_dilation() {
        let geo = Geometry::new(3, 2, 1, 1, 6, 6).unwrap();
        assert_eq!((geo.oh, geo.ow, geo.ph, geo.pw), (3, 3, 4, 4));
        // Tap (1, 1) is in phase (1, 1) at (0, 0); tap (2, 2) in phase (0, 0) at (1, 1).
        assert_eq!(geo.tap_offset(4), 3 * 16);
        assert_eq!(geo.tap_offset(8), 4 + 1);
    }
}
