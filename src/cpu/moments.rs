//! The forward of a depthwise block's training step from per-channel patch moments.
//!
//! Every branch of a depthwise block filters each channel of the same input with its own `k x k`
//! kernel (the scale and the skip are kernels with only the centre tap), so each branch's batch
//! statistics follow from the channel's **patch moments**: the mean of every tap and the `k^2 x
//! k^2` covariance of the taps over all output positions, padding included. One pass over the
//! input gives them (at stride 1 from shifted self-products of each row); the folded conv is then
//! written in the same channel pass, while its planes are still in cache. All accumulation is in
//! float64 on centred values (the channel mean is subtracted first, so padded taps read minus
//! that mean), so float32 inputs do not cancel.

use super::geometry::{tap_rows, Element, Geometry, Layout, Plane};
use super::simd::{accumulate_rows, dispatched, dots, lane_sum, Isa, LANES};
use super::threads::{for_channels, PlaneWriter, Records};

/// The per-branch kernels of a depthwise block, in float64: conv branches with all `k^2` taps,
/// then the centre-only branches (scale, skip) as one value per channel.
#[derive(Debug, Clone)]
pub struct Kernels {
    /// Every branch's full `k^2` kernel per channel (branch-major), centre-only ones padded.
    full: Vec<f64>,
    pub(crate) conv_branches: usize,
    branches: usize,
    taps: usize,
    channels: usize,
}

impl Kernels {
    /// The kernels of a block with `k x k` taps and `channels` channels: per conv branch
    /// `channels * k^2` taps, then per centre-only branch (scale, skip) `channels` values.
    /// `None` when a kernel holds fewer values than that.
    pub fn new(conv: &[Vec<f64>], centre: &[Vec<f64>], k: usize, channels: usize) -> Option<Self> {
        let taps = k * k;
        let short = conv.iter().any(|c| c.len() < channels * taps)
            || centre.iter().any(|c| c.len() < channels);
        if short || k == 0 {
            return None;
        }
        let mut full = Vec::with_capacity((conv.len() + centre.len()) * channels * taps);
        for kernel in conv {
            full.extend_from_slice(&kernel[..channels * taps]);
        }
        for values in centre {
            for &v in &values[..channels] {
                let start = full.len();
                full.resize(start + taps, 0.0);
                full[start + (k / 2) * k + k / 2] = v;
            }
        }
        Some(Kernels {
            full,
            conv_branches: conv.len(),
            branches: conv.len() + centre.len(),
            taps,
            channels,
        })
    }

    /// Whether these are kernels of `taps` taps for `channels` channels.
    pub fn fits(&self, channels: usize, taps: usize) -> bool {
        self.channels == channels && self.taps == taps
    }

    pub fn branches(&self) -> usize {
        self.branches
    }

    /// Branch `b`'s full kernel of channel `c`.
    pub(crate) fn full(&self, b: usize, c: usize) -> &[f64] {
        &self.full[(b * self.channels + c) * self.taps..][..self.taps]
    }
}

impl Moments {
    /// Whether these are the moments of `channels` channels of `taps` taps over `count` outputs.
    pub fn fits(&self, channels: usize, taps: usize, count: usize) -> bool {
        self.count == count
            && self.mu.len() == channels
            && self.nu.len() == channels * taps
            && self.cov.len() == channels * taps * taps
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

/// One input plane's contribution to its channel's tap sums and upper-triangle cross sums.
#[inline(always)]
fn moments_plane<T: Element, I: Isa>(
    isa: I,
    plane: Plane<'_, T>,
    buf: &mut [f64],
    sums: &mut [f64],
    cross: &mut [f64],
) {
    let Plane {
        geo,
        offsets,
        x,
        shift,
    } = plane;
    geo.fill(x, shift, buf);
    if shifted_moments::<I>(isa, geo, buf, sums, cross) {
        return;
    }
    let taps = offsets.len();
    let mut rows = Vec::with_capacity(taps);
    for oy in 0..geo.oh {
        tap_rows(geo, offsets, buf, oy, &mut rows);
        for t1 in 0..taps {
            sums[t1] += lane_sum::<I>(isa, rows[t1]);
            dots::<I>(
                isa,
                rows[t1],
                &rows[t1..],
                &mut cross[t1 * taps + t1..(t1 + 1) * taps],
            );
        }
    }
}

/// The stride-1 moments of one filled plane from products of the plane with shifted copies of
/// itself: taps `t1 <= t2` differ by an offset `delta = t2 - t1`, and their cross sum is the sum
/// of `x[r][c] x[r + dy][c + dx]` over the window of `t1`. There are `(k^2 + 1) / 2 + k (k - 1) / 2`
/// offsets (13 for k = 3, against 45 pairs), each one long dot per row over the columns every
/// window shares, plus the few columns at the window edges. False (nothing added) when the
/// stride is not 1 or the output is narrower than the kernel's reach.
#[inline(always)]
pub(crate) fn shifted_moments<I: Isa>(
    isa: I,
    geo: &Geometry,
    buf: &[f64],
    sums: &mut [f64],
    cross: &mut [f64],
) -> bool {
    let (k, d, pw, ph, ow, oh) = (geo.k, geo.dilation, geo.pw, geo.ph, geo.ow, geo.oh);
    let reach = (k - 1) * d;
    if geo.stride != 1 || ow <= reach || k == 1 {
        return false;
    }
    let taps = k * k;
    // Offsets (dy, dx) in taps: dy = 0 with dx >= 0, or dy > 0 with any dx.
    let deltas: Vec<(usize, isize)> = (0..k)
        .flat_map(|dy| {
            let from = if dy == 0 { 0 } else { -(k as isize - 1) };
            (from..k as isize).map(move |dx| (dy, dx))
        })
        .collect();
    let core = reach..ow;
    // Per offset, row and window column t1x: the window's row sum of the products.
    let mut window = vec![0.0; deltas.len() * ph * k];
    let mut plain = vec![0.0; ph * k];
    let mut partners: Vec<&[f64]> = Vec::with_capacity(deltas.len());
    let mut live: Vec<usize> = Vec::with_capacity(deltas.len());
    let mut core_dots = vec![0.0; deltas.len()];
    for r in 0..ph {
        let row = &buf[r * pw..][..pw];
        partners.clear();
        live.clear();
        for (i, &(dy, dx)) in deltas.iter().enumerate() {
            if r + dy * d >= ph {
                continue;
            }
            let start = ((r + dy * d) * pw + core.start) as isize + dx * d as isize;
            partners.push(&buf[start as usize..][..core.len()]);
            live.push(i);
        }
        core_dots[..live.len()].fill(0.0);
        dots::<I>(
            isa,
            &row[core.clone()],
            &partners,
            &mut core_dots[..live.len()],
        );
        let core_sum = lane_sum::<I>(isa, &row[core.clone()]);
        for t1x in 0..k {
            let edges = (t1x * d..reach).chain(ow..t1x * d + ow);
            plain[r * k + t1x] = core_sum + edges.map(|c| row[c]).sum::<f64>();
        }
        for (&i, &core_dot) in live.iter().zip(&core_dots) {
            let (dy, dx) = deltas[i];
            let other = &buf[(r + dy * d) * pw..][..pw];
            for t1x in 0..k {
                let t2x = t1x as isize + dx;
                if !(0..k as isize).contains(&t2x) {
                    continue;
                }
                let shift = |c: usize| (c as isize + dx * d as isize) as usize;
                let edges = (t1x * d..reach).chain(ow..t1x * d + ow);
                let edge: f64 = edges.map(|c| row[c] * other[shift(c)]).sum();
                window[(i * ph + r) * k + t1x] = core_dot + edge;
            }
        }
    }
    for t1 in 0..taps {
        let (t1y, t1x) = (t1 / k, t1 % k);
        let rows = t1y * d..t1y * d + oh;
        sums[t1] += rows.clone().map(|r| plain[r * k + t1x]).sum::<f64>();
        for (i, &(dy, dx)) in deltas.iter().enumerate() {
            let (t2y, t2x) = (t1y + dy, t1x as isize + dx);
            if t2y >= k || !(0..k as isize).contains(&t2x) {
                continue;
            }
            let t2 = t2y * k + t2x as usize;
            let total: f64 = rows.clone().map(|r| window[(i * ph + r) * k + t1x]).sum();
            cross[t1 * taps + t2] += total;
        }
    }
    true
}
/// One output plane of the folded conv: `out[p] = base + sum_t kernel[t] (x - shift)[p + t]`
/// (the padding reads `-shift`, so `base` carries `shift * sum kernel`).
#[inline(always)]
fn conv_plane<T: Element, I: Isa>(
    isa: I,
    plane: Plane<'_, T>,
    (negated, base): (&[f64], f64),
    buf: &mut [f64],
    acc: &mut [f64],
    out: &mut [T],
) {
    let Plane {
        geo,
        offsets,
        x,
        shift,
    } = plane;
    geo.fill(x, shift, buf);
    let mut rows = Vec::with_capacity(offsets.len());
    for (oy, dst) in out.chunks_exact_mut(geo.ow).enumerate() {
        tap_rows(geo, offsets, buf, oy, &mut rows);
        acc.fill(0.0);
        accumulate_rows::<I>(isa, acc, &rows, negated, base);
        for (d, v) in dst.iter_mut().zip(acc.iter()) {
            *d = T::from_f64(*v);
        }
    }
}
dispatched!(moments_plane_run, moments_plane_simd, moments_plane, (
    plane: Plane<'_, T>, buf: &mut [f64], sums: &mut [f64], cross: &mut [f64]
));
dispatched!(conv_plane_run, conv_plane_simd, conv_plane, (
    plane: Plane<'_, T>, folded: (&[f64], f64), buf: &mut [f64], acc: &mut [f64], out: &mut [T]
));

/// Mean of channel `c` of a contiguous NCHW tensor, in float64.
pub(crate) fn channel_mean<T: Element>(lay: &Layout, x: &[T], c: usize) -> f64 {
    let total: f64 = (0..lay.n)
        .map(|n| {
            let mut acc = [0.0f64; LANES];
            let plane = lay.input(x, n, c);
            let chunks = plane.chunks_exact(LANES);
            let tail: f64 = chunks.remainder().iter().map(|v| v.to_f64()).sum();
            for v in chunks {
                for l in 0..LANES {
                    acc[l] += v[l].to_f64();
                }
            }
            (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
        })
        .sum();
    total / (lay.n * lay.plane()) as f64
}

/// The BatchNorm affine parameters of every branch, in float64.
pub struct Affine {
    /// Per branch, `channels` weights.
    pub gamma: Vec<Vec<f64>>,
    /// Per branch, `channels` biases.
    pub beta: Vec<Vec<f64>>,
    /// Per branch.
    pub eps: Vec<f64>,
}

impl Affine {
    /// Whether this holds `branches` branches of `channels` values each.
    pub fn fits(&self, branches: usize, channels: usize) -> bool {
        let rows = |v: &Vec<Vec<f64>>| v.len() == branches && v.iter().all(|r| r.len() == channels);
        rows(&self.gamma) && rows(&self.beta) && self.eps.len() == branches
    }
}

/// What the forward measured: the patch moments and, per branch and channel (branch-major),
/// the batch mean, the biased variance, `var + eps` and the BN scale `a = gamma / sqrt(var + eps)`.
pub struct Forward {
    pub moments: Moments,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub var_eps: Vec<f64>,
    pub a: Vec<f64>,
}

/// Per channel: the tap means and covariance (normalized), from the raw sums over `count`.
fn finish_moments(sums: &[f64], cross: &[f64], count: f64, nu: &mut [f64], cov: &mut [f64]) {
    let taps = sums.len();
    for t in 0..taps {
        nu[t] = sums[t] / count;
    }
    for t1 in 0..taps {
        for t2 in t1..taps {
            let v = cross[t1 * taps + t2] / count - nu[t1] * nu[t2];
            cov[t1 * taps + t2] = v;
            cov[t2 * taps + t1] = v;
        }
    }
}

/// Mean and biased variance of a branch with kernel `k` on a channel's moments: the output is
/// `k . patch`, so its mean is `k . E[patch]` and its variance `k^T Cov k`.
fn branch_moments(k: &[f64], mu: f64, nu: &[f64], cov: &[f64]) -> (f64, f64) {
    let taps = k.len();
    let mean = (0..taps).map(|t| k[t] * (nu[t] + mu)).sum();
    let var: f64 = (0..taps)
        .filter(|&t| k[t] != 0.0)
        .map(|t| k[t] * (0..taps).map(|u| cov[t * taps + u] * k[u]).sum::<f64>())
        .sum();
    // Rounding can leave a tiny negative variance; a NaN must stay NaN (f64::max would drop it).
    (mean, if var < 0.0 { 0.0 } else { var })
}

/// The training-step forward of a depthwise block's branch sum: per channel the patch moments,
/// each branch's batch statistics, then the folded conv (`out`, contiguous NCHW of the output
/// size), one channel after another so that its planes are still in cache.
pub(crate) fn forward<T: Element>(
    lay: &Layout,
    x: &[T],
    kernels: &Kernels,
    bn: &Affine,
    out: &mut [T],
    threads: usize,
) -> Forward {
    let geo = lay.geo;
    let (taps, channels, nb) = (geo.taps(), lay.c, kernels.branches());
    assert!(out.len() == lay.n * channels * lay.out_plane());
    let count = lay.count() as f64;
    // Per channel record: mu, nu, cov, then per branch mean and variance.
    let width = 1 + taps + taps * taps + 2 * nb;
    let mut records = vec![0.0; channels * width];
    let writer = PlaneWriter(out.as_mut_ptr());
    let writer = &writer;
    let out_plane = lay.out_plane();
    let rec_writer = Records::new(&mut records, width);
    let rec_writer = &rec_writer;
    let offsets = geo.tap_offsets();
    let init = || {
        let buf = vec![0.0; geo.buffer_len()];
        (
            buf,
            vec![0.0; taps],
            vec![0.0; taps * taps],
            vec![0.0; geo.ow],
        )
    };
    for_channels(channels, threads, init, |(buf, sums, cross, acc), c| {
        {
            // SAFETY: only this thread holds channel c.
            let rec = unsafe { rec_writer.get(c) };
            let shift = channel_mean(lay, x, c);
            sums.fill(0.0);
            cross.fill(0.0);
            for n in 0..lay.n {
                let plane = lay.input_plane(&offsets, x, (n, c), shift);
                moments_plane_run(plane, buf, sums, cross);
            }
            let (head, stats) = rec.split_at_mut(1 + taps + taps * taps);
            head[0] = shift;
            let (nu, cov) = head[1..].split_at_mut(taps);
            finish_moments(sums, cross, count, nu, cov);
            // Each branch's statistics, and the folded kernel and bias of this channel.
            let mut negated = vec![0.0; taps];
            let mut base = 0.0;
            for b in 0..nb {
                let k = kernels.full(b, c);
                let (mean, var) = branch_moments(k, shift, nu, cov);
                stats[2 * b] = mean;
                stats[2 * b + 1] = var;
                let a = bn.gamma[b][c] / (var + bn.eps[b]).sqrt();
                base += bn.beta[b][c] - a * mean;
                for t in 0..taps {
                    negated[t] -= a * k[t];
                }
            }
            // out = bias + sum_t kernel[t] x[p + t] = bias + shift sum(kernel) + kernel . (x - shift)
            base -= shift * negated.iter().sum::<f64>();
            for n in 0..lay.n {
                // SAFETY: plane (n, c) lies inside `out` and only this thread owns channel c.
                let dst = unsafe { writer.plane(n * channels + c, out_plane) };
                let plane = lay.input_plane(&offsets, x, (n, c), shift);
                conv_plane_run(plane, (&negated, base), buf, acc, dst);
            }
        }
    });
    let mut moments = Moments {
        count: lay.count(),
        mu: vec![0.0; channels],
        nu: vec![0.0; channels * taps],
        cov: vec![0.0; channels * taps * taps],
    };
    let mut stats = Forward {
        moments: Moments {
            count: 0,
            mu: Vec::new(),
            nu: Vec::new(),
            cov: Vec::new(),
        },
        mean: vec![0.0; nb * channels],
        var: vec![0.0; nb * channels],
        var_eps: vec![0.0; nb * channels],
        a: vec![0.0; nb * channels],
    };
    for (c, rec) in records.chunks_exact(width).enumerate() {
        moments.mu[c] = rec[0];
        moments.nu[c * taps..][..taps].copy_from_slice(&rec[1..1 + taps]);
        moments.cov[c * taps * taps..][..taps * taps]
            .copy_from_slice(&rec[1 + taps..][..taps * taps]);
        let branch = &rec[1 + taps + taps * taps..];
        for b in 0..nb {
            let i = b * channels + c;
            stats.mean[i] = branch[2 * b];
            stats.var[i] = branch[2 * b + 1];
            stats.var_eps[i] = stats.var[i] + bn.eps[b];
            stats.a[i] = bn.gamma[b][c] / stats.var_eps[i].sqrt();
        }
    }
    stats.moments = moments;
    stats
}
