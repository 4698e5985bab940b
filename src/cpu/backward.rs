//! The backward of a depthwise block's training step from the same patch moments.
//!
//! Per channel: one pass for `sum g` and `sum g * patch`, then the parameter gradients in closed
//! form, then one pass for the input gradient (in gather form at stride 1, `(2k - 1)^2` taps;
//! scatter form otherwise), recomputing each conv branch's contribution per row: no branch
//! output is ever stored.

use super::geometry::{tap_rows, Element, Geometry, Layout, Plane};
use super::moments::{Kernels, Moments};
use super::simd::{accumulate_rows, dispatched, dots, fmadd, lane_sum, Isa};
use super::threads::{for_channels, PlaneWriter, Records};

/// One plane's `sum g` and `sum_p g[p] * (x - mu)[p + t]`.
#[inline(always)]
fn grad_sums_plane<T: Element, I: Isa>(
    isa: I,
    plane: Plane<'_, T>,
    g: &[T],
    (buf, grow): (&mut [f64], &mut [f64]),
    gsum: &mut f64,
    h: &mut [f64],
) {
    let Plane {
        geo,
        offsets,
        x,
        shift,
    } = plane;
    geo.fill(x, shift, buf);
    let mut rows = Vec::with_capacity(offsets.len());
    for (oy, src) in g.chunks_exact(geo.ow).enumerate() {
        for (d, s) in grow.iter_mut().zip(src) {
            *d = s.to_f64();
        }
        *gsum += lane_sum::<I>(isa, grow);
        tap_rows(geo, offsets, buf, oy, &mut rows);
        dots::<I>(isa, grow, &rows, h);
    }
}

/// What the input-gradient pass applies per channel: at every output position `p`, tap `t`
/// of the patch receives `keff[t] g[p] + konst[t] - sum_u quad[t][u] (x - mu)[p + u]`.
struct Scatter {
    konst: Vec<f64>,
    quad: Vec<f64>,
    /// Stride 1 only (see [`dx_plane_dense`]): the coefficients of the gather form's rows,
    /// `corr[d] = sum_{u - t = d} quad[t][u]` over the `(2k - 1)^2` offsets, then `-keff[t]`;
    /// `sum_t konst[t]`; and `-quad`, for the outputs outside the grid.
    gather_coefs: Vec<f64>,
    konst_sum: f64,
    negated_quad: Vec<f64>,
    /// Per tap `t`: `[-keff[t], quad[t][..]]`, the coefficients of `[g, patch rows]`.
    tap_coefs: Vec<f64>,
}

impl Scatter {
    fn new(k: usize, keff: &[f64], konst: Vec<f64>, quad: Vec<f64>) -> Self {
        let (taps, span) = (k * k, 2 * k - 1);
        let mut gather_coefs = vec![0.0; span * span];
        for t in 0..taps {
            for u in 0..taps {
                let dy = u / k + k - 1 - t / k;
                let dx = u % k + k - 1 - t % k;
                gather_coefs[dy * span + dx] += quad[t * taps + u];
            }
        }
        gather_coefs.extend(keff.iter().map(|v| -v));
        let tap_coefs = (0..taps)
            .flat_map(|t| std::iter::once(-keff[t]).chain(quad[t * taps..][..taps].iter().copied()))
            .collect();
        Scatter {
            konst_sum: konst.iter().sum(),
            negated_quad: quad.iter().map(|q| -q).collect(),
            konst,
            quad,
            gather_coefs,
            tap_coefs,
        }
    }
}

/// Buffers and offsets of the stride-1 input-gradient pass, per thread.
///
/// The pass works in an extended frame: the padded frame plus a margin `E = (k - 1) d` on every
/// side, holding `x - mu` (`-mu` outside the input) and `g` (zero outside the output grid).
struct Dense {
    ext: Geometry,
    margin: usize,
    /// Per offset `d` of `corr`: where `(x - mu)[q + d]` starts for padded position `q = (0, 0)`.
    x_offsets: Vec<usize>,
    /// Per tap `t`: where `g[q - t]` starts for `q = (0, 0)`.
    g_offsets: Vec<usize>,
    xbuf: Vec<f64>,
    gbuf: Vec<f64>,
    dbuf: Vec<f64>,
}

impl Dense {
    fn new(geo: &Geometry) -> Option<Self> {
        if geo.stride != 1 {
            return None;
        }
        let (k, d) = (geo.k, geo.dilation);
        let margin = (k - 1) * d;
        let ext = Geometry::new(k, 1, geo.padding + margin, d, geo.h, geo.w)?;
        let pw = ext.pw;
        let span = 2 * k - 1;
        let x_offsets = (0..span * span)
            .map(|i| (i / span) * d * pw + (i % span) * d)
            .collect();
        let g_offsets = (0..k * k)
            .map(|t| (margin - (t / k) * d) * pw + margin - (t % k) * d)
            .collect();
        let len = ext.buffer_len();
        Some(Dense {
            ext,
            margin,
            x_offsets,
            g_offsets,
            xbuf: vec![0.0; len],
            gbuf: vec![0.0; len],
            dbuf: vec![0.0; len],
        })
    }
}

/// One plane's input gradient for stride 1, in gather form. At padded position `q`,
/// `dx[q] = sum_t keff[t] g[q - t] + sum_t konst[t] - sum_d corr[d] (x - mu)[q + d]` counts
/// every tap `t` as if `q - t` were an output; the outputs just outside the grid that this
/// counts (`g` is zero there, so only their `konst` and `quad` terms) are then taken back one
/// by one. `corr` has `(2k - 1)^2` taps where the scatter form applies `k^4`.
#[inline(always)]
fn dx_plane_dense<T: Element, I: Isa>(
    isa: I,
    plane: Plane<'_, T>,
    g: &[T],
    sc: &Scatter,
    dense: &mut Dense,
    dx: &mut [T],
) {
    let Plane { geo, x, shift, .. } = plane;
    let Dense {
        ext,
        margin,
        x_offsets,
        g_offsets,
        xbuf,
        gbuf,
        dbuf,
    } = dense;
    let (e, pwx) = (*margin, ext.pw);
    ext.fill(x, shift, xbuf);
    for (oy, src) in g.chunks_exact(geo.ow).enumerate() {
        let dst = &mut gbuf[(oy + e) * pwx + e..][..geo.ow];
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f64();
        }
    }
    let coef = &sc.gather_coefs;
    let mut rows: Vec<&[f64]> = Vec::with_capacity(coef.len());
    for qy in 0..geo.ph {
        rows.clear();
        rows.extend(x_offsets.iter().map(|&o| &xbuf[qy * pwx + o..][..geo.pw]));
        rows.extend(g_offsets.iter().map(|&o| &gbuf[qy * pwx + o..][..geo.pw]));
        let dst = &mut dbuf[(qy + e) * pwx + e..][..geo.pw];
        dst.fill(0.0);
        accumulate_rows::<I>(isa, dst, &rows, coef, sc.konst_sum);
    }
    // Take back the outputs just outside the grid: scatter `-(konst[t] - quad[t] . patch)` from
    // each, a row segment at a time; targets outside the padded frame land in the margin,
    // which is never gathered.
    let (k, d, taps) = (geo.k, geo.dilation, geo.k * geo.k);
    let tap_offset = |t: usize| (t / k) * d * pwx + (t % k) * d;
    let (oh, ow) = (geo.oh, geo.ow);
    let full = ow + 2 * e;
    // Virtual output rows above and below the grid (ext row `py` = output row + e), whole.
    let mut patch: Vec<&[f64]> = Vec::with_capacity(taps);
    let negated = &sc.negated_quad;
    for py in (0..e).chain(oh + e..oh + 2 * e) {
        patch.clear();
        patch.extend((0..taps).map(|u| &xbuf[py * pwx + tap_offset(u)..][..full]));
        for t in 0..taps {
            let dst = &mut dbuf[py * pwx + tap_offset(t)..][..full];
            accumulate_rows::<I>(isa, dst, &patch, &negated[t * taps..][..taps], -sc.konst[t]);
        }
    }
    // The `e` virtual columns left and right of every grid row: too short for row passes.
    let offsets: Vec<usize> = (0..taps).map(tap_offset).collect();
    let mut values = vec![0.0; taps];
    for py in e..oh + e {
        for px in (0..e).chain(ow + e..full) {
            let at = py * pwx + px;
            for (v, o) in values.iter_mut().zip(&offsets) {
                *v = xbuf[at + o];
            }
            for t in 0..taps {
                let quad = &sc.quad[t * taps..][..taps];
                let w = quad
                    .iter()
                    .zip(&values)
                    .fold(sc.konst[t], |w, (q, v)| fmadd::<I>(-q, *v, w));
                dbuf[at + offsets[t]] -= w;
            }
        }
    }
    ext.gather(dbuf, dx);
}

/// One plane's input gradient: scatter into the padded frame `dbuf`, then gather into `dx`.
#[inline(always)]
fn dx_plane<T: Element, I: Isa>(
    isa: I,
    plane: Plane<'_, T>,
    g: &[T],
    sc: &Scatter,
    (buf, dbuf, grow): (&mut [f64], &mut [f64], &mut [f64]),
    dx: &mut [T],
) {
    let Plane {
        geo,
        offsets,
        x,
        shift,
    } = plane;
    geo.fill(x, shift, buf);
    dbuf.fill(0.0);
    let taps = offsets.len();
    let ow = geo.ow;
    for (oy, src) in g.chunks_exact(ow).enumerate() {
        for (d, s) in grow.iter_mut().zip(src) {
            *d = s.to_f64();
        }
        let mut rows: Vec<&[f64]> = Vec::with_capacity(taps + 1);
        rows.push(grow);
        rows.extend(offsets.iter().map(|&o| &buf[o + oy * geo.pw..][..ow]));
        for t in 0..taps {
            let dst = &mut dbuf[offsets[t] + oy * geo.pw..][..ow];
            accumulate_rows::<I>(
                isa,
                dst,
                &rows,
                &sc.tap_coefs[t * (taps + 1)..][..taps + 1],
                sc.konst[t],
            );
        }
    }
    geo.gather(dbuf, dx);
}

dispatched!(grad_sums_plane_run, grad_sums_plane_simd, grad_sums_plane, (
    plane: Plane<'_, T>, g: &[T], scratch: (&mut [f64], &mut [f64]), gsum: &mut f64,
    h: &mut [f64]
));
dispatched!(dx_plane_run, dx_plane_simd, dx_plane, (
    plane: Plane<'_, T>, g: &[T], sc: &Scatter, scratch: (&mut [f64], &mut [f64], &mut [f64]),
    dx: &mut [T]
));
dispatched!(dx_plane_dense_run, dx_plane_dense_simd, dx_plane_dense, (
    plane: Plane<'_, T>, g: &[T], sc: &Scatter, dense: &mut Dense, dx: &mut [T]
));

/// What the backward needs per branch and channel (`branches * channels`, branch-major): the
/// BN scale `a = gamma / sqrt(var + eps)` and `var + eps`; and each branch's BN eps.
pub struct BranchScales<'a> {
    pub a: &'a [f64],
    pub var_eps: &'a [f64],
    pub eps: &'a [f64],
}

impl BranchScales<'_> {
    /// Whether these hold `branches` branches of `channels` values each.
    pub fn fits(&self, branches: usize, channels: usize) -> bool {
        self.a.len() == branches * channels
            && self.var_eps.len() == branches * channels
            && self.eps.len() == branches
    }
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

/// One channel's parameter gradients and the scatter its input gradient applies, from `sum g`
/// and `h[t] = sum_p g[p] (x - mu)[p + t]`. Writes `[gamma grads (nb), kernel grads (nb * taps)]`
/// into `rec`.
///
/// Per branch `b`: `dL/dy_b = a_b (g - mean g) - coef_b (y_b - m_b)` with
/// `coef_b = a_b S_b / (M (var_b + eps))` and `S_b = sum g (y_b - m_b) = K_b . h'`, where
/// `h'[t] = sum_p (g - mean g)[p] x[p + t] = h[t] - sum g * nu[t]`. Hence the kernel gradient
/// `a_b h' - coef_b M Cov K_b`, and the input gradient scatters, per output position,
/// `sum_b dL/dy_b[p] K_b` over the patch.
fn channel_gradients(
    geo: &Geometry,
    fit: &Fit<'_>,
    c: usize,
    (gsum, h): (f64, &[f64]),
    rec: &mut [f64],
) -> Scatter {
    let Fit { kernels, scales, m } = *fit;
    let (taps, channels, count) = (geo.taps(), m.mu.len(), m.count as f64);
    let nb = kernels.branches();
    let nu = &m.nu[c * taps..][..taps];
    let cov = &m.cov[c * taps * taps..][..taps * taps];
    let hc: Vec<f64> = (0..taps).map(|t| h[t] - gsum * nu[t]).collect();
    let gbar = gsum / count;
    let (mut keff, mut konst, mut quad) =
        (vec![0.0; taps], vec![0.0; taps], vec![0.0; taps * taps]);
    let (gamma, dk) = rec.split_at_mut(nb);
    for b in 0..nb {
        let k = kernels.full(b, c);
        let (a, ve) = (scales.a[b * channels + c], scales.var_eps[b * channels + c]);
        let s: f64 = (0..taps).map(|t| k[t] * hc[t]).sum();
        let cf = a * s / (count * ve);
        gamma[b] = s / ve.sqrt();
        // dK = a h' - coef M Cov K = (a / ve) (h' ve - (K . h') Cov K); with ve = K.u + eps and
        // u = Cov K the bracket is h' eps + sum_s K[s] (h'[t] u[s] - u[t] h'[s]), whose s = t
        // term is exactly zero: BN makes a branch's gradient along its own kernel O(eps), and
        // this form keeps it from cancelling (the scale's is all of that kind).
        let u: Vec<f64> = (0..taps)
            .map(|t| (0..taps).map(|v| cov[t * taps + v] * k[v]).sum())
            .collect();
        let eps = scales.eps[b];
        for t in 0..taps {
            let turn: f64 = (0..taps)
                .filter(|&s| s != t && k[s] != 0.0)
                .map(|s| k[s] * (hc[t] * u[s] - u[t] * hc[s]))
                .sum();
            dk[b * taps + t] = a / ve * (hc[t] * eps + turn);
        }
        let k_nu: f64 = (0..taps).map(|t| k[t] * nu[t]).sum();
        for t in 0..taps {
            keff[t] += a * k[t];
            konst[t] += cf * k[t] * k_nu;
            if k[t] != 0.0 {
                for u in 0..taps {
                    quad[t * taps + u] += cf * k[t] * k[u];
                }
            }
        }
    }
    for t in 0..taps {
        konst[t] -= keff[t] * gbar;
    }
    Scatter::new(geo.k, &keff, konst, quad)
}

/// What the forward fitted and the backward reads: the branches' kernels, their BN scales and
/// the channels' patch moments.
#[derive(Clone, Copy)]
pub(crate) struct Fit<'a> {
    pub kernels: &'a Kernels,
    pub scales: &'a BranchScales<'a>,
    pub m: &'a Moments,
}

/// The backward of the depthwise branch sum: writes the input gradient into `dx` (contiguous
/// NCHW like `x`) and returns the parameter gradients. Channel by channel: `sum g` and
/// `sum g * patch` (one pass), the parameter gradients, then the input gradient (one pass).
pub(crate) fn backward<T: Element>(
    lay: &Layout,
    x: &[T],
    g: &[T],
    dx: &mut [T],
    fit: &Fit<'_>,
    threads: usize,
) -> Gradients {
    let Fit { kernels, m, .. } = *fit;
    let geo = lay.geo;
    let (taps, channels) = (geo.taps(), lay.c);
    let (nconv, nb) = (kernels.conv_branches, kernels.branches());
    assert!(dx.len() == x.len() && g.len() == lay.n * channels * lay.out_plane());
    // Per channel record: sum g, per branch the BN weight's gradient, then its full kernel's.
    let width = 1 + nb + nb * taps;
    let mut records = vec![0.0; channels * width];
    let writer = PlaneWriter(dx.as_mut_ptr());
    let writer = &writer;
    let plane_len = lay.plane();
    let rec_writer = Records::new(&mut records, width);
    let rec_writer = &rec_writer;
    let offsets = geo.tap_offsets();
    let init = || {
        let buf = vec![0.0; geo.buffer_len()];
        (
            buf,
            vec![0.0; geo.buffer_len()],
            vec![0.0; geo.ow],
            Dense::new(&geo),
            vec![0.0; taps],
        )
    };
    for_channels(channels, threads, init, |(buf, dbuf, grow, dense, h), c| {
        {
            // SAFETY: only this thread holds channel c.
            let rec = unsafe { rec_writer.get(c) };
            let mut gsum = 0.0;
            h.fill(0.0);
            for n in 0..lay.n {
                let plane = lay.input_plane(&offsets, x, (n, c), m.mu[c]);
                let gp = lay.output(g, n, c);
                grad_sums_plane_run(plane, gp, (&mut buf[..], &mut grow[..]), &mut gsum, h);
            }
            rec[0] = gsum;
            let sc = channel_gradients(&geo, fit, c, (gsum, h), &mut rec[1..]);
            for n in 0..lay.n {
                // SAFETY: plane (n, c) lies inside `dx` and only this thread owns channel c.
                let out = unsafe { writer.plane(n * channels + c, plane_len) };
                let plane = lay.input_plane(&offsets, x, (n, c), m.mu[c]);
                let gp = lay.output(g, n, c);
                match dense.as_mut() {
                    Some(dense) => dx_plane_dense_run(plane, gp, &sc, dense, out),
                    None => dx_plane_run(
                        plane,
                        gp,
                        &sc,
                        (&mut buf[..], &mut dbuf[..], &mut grow[..]),
                        out,
                    ),
                }
            }
        }
    });
    let mut grads = Gradients {
        conv: vec![vec![0.0; channels * taps]; nconv],
        centre: vec![vec![0.0; channels]; nb - nconv],
        gamma: vec![0.0; nb * channels],
        beta: vec![0.0; channels],
    };
    for (c, rec) in records.chunks_exact(width).enumerate() {
        grads.beta[c] = rec[0];
        for b in 0..nb {
            grads.gamma[b * channels + c] = rec[1 + b];
            let dk = &rec[1 + nb + b * taps..][..taps];
            if b < nconv {
                grads.conv[b][c * taps..][..taps].copy_from_slice(dk);
            } else {
                grads.centre[b - nconv][c] = dk[geo.centre()];
            }
        }
    }
    grads
}
