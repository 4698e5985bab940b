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

    /// Phase-buffer columns `j` of phase `r` that hold input columns: `lo..hi`, with input
    /// column `j * stride + r - padding`.
    fn valid_columns(&self, r: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // smallest j with j*s + r >= p, and the first j with j*s + r - p >= w
        let lo = (p.saturating_sub(r)).div_ceil(s);
        let hi = (self.w + p).saturating_sub(r).div_ceil(s);
        (lo.min(self.pw), hi.clamp(lo.min(self.pw), self.pw))
    }

    /// Fills `buf` with the padded plane `x` minus `shift` (so padding reads `-shift`).
    #[inline(always)]
    fn fill<T: Element>(&self, x: &[T], shift: f64, buf: &mut [f64]) {
        let (s, p) = (self.stride, self.padding);
        for ry in 0..s {
            for rx in 0..s {
                let (lo, hi) = self.valid_columns(rx);
                let phase = &mut buf[(ry * s + rx) * self.phase_len()..][..self.phase_len()];
                for (i, row) in phase.chunks_exact_mut(self.pw).enumerate() {
                    let y = (i * s + ry).wrapping_sub(p);
                    if y >= self.h {
                        row.fill(-shift);
                        continue;
                    }
                    row[..lo].fill(-shift);
                    row[hi..].fill(-shift);
                    if lo < hi {
                        let first = lo * s + rx - p;
                        let src = &x[y * self.w + first..][..(hi - lo - 1) * s + 1];
                        for (v, x) in row[lo..hi].iter_mut().zip(src.iter().step_by(s)) {
                            *v = x.to_f64() - shift;
                        }
                    }
                }
            }
        }
    }

    /// Writes the raw plane `dx` from the padded-frame gradient `buf` (the padding is dropped;
    /// positions no tap reaches get zero).
    #[inline(always)]
    fn gather<T: Element>(&self, buf: &[f64], dx: &mut [T]) {
        let (s, p) = (self.stride, self.padding);
        for ry in 0..s {
            for rx in 0..s {
                let (lo, hi) = self.valid_columns(rx);
                let phase = &buf[(ry * s + rx) * self.phase_len()..][..self.phase_len()];
                for (i, row) in phase.chunks_exact(self.pw).enumerate() {
                    let y = (i * s + ry).wrapping_sub(p);
                    if y >= self.h || lo >= hi {
                        continue;
                    }
                    let first = lo * s + rx - p;
                    let dst = &mut dx[y * self.w + first..][..(hi - lo - 1) * s + 1];
                    for (d, v) in dst.iter_mut().step_by(s).zip(&row[lo..hi]) {
                        *d = T::from_f64(*v);
                    }
                }
            }
        }
        // Input rows and columns past every phase plane's reach get no gradient.
        let (rows, cols) = (self.ph * s, self.pw * s);
        for (y, row) in dx.chunks_exact_mut(self.w).enumerate() {
            if y + p >= rows {
                row.fill(T::from_f64(0.0));
            } else if self.w + p > cols {
                row[cols.saturating_sub(p)..].fill(T::from_f64(0.0));
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

// ---- row kernels: compiled twice, for AVX2+FMA (chosen at run time) and for the baseline ----

/// Lanes per chunk: one AVX2 register of float64.
const LANES: usize = 4;

#[inline(always)]
fn fmadd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Adds the dots of `a` with each of `N` rows (each at least as long) to `out`.
#[inline(always)]
fn multi_dot<const N: usize, const FMA: bool>(a: &[f64], rows: &[&[f64]], out: &mut [f64]) {
    let len = a.len();
    assert!(rows.len() >= N && out.len() >= N && rows[..N].iter().all(|r| r.len() >= len));
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is true only inside the AVX2+FMA build (see `dispatched!`); lengths checked.
        unsafe { avx::multi_dot::<N>(a, rows, out) };
        return;
    }
    let rows: [&[f64]; N] = std::array::from_fn(|n| &rows[n][..len]);
    let mut acc = [[0.0f64; LANES]; N];
    let (chunks, tail) = a.split_at(len - len % LANES);
    for (j, av) in chunks.chunks_exact(LANES).enumerate() {
        for n in 0..N {
            let bv = &rows[n][j * LANES..][..LANES];
            for l in 0..LANES {
                acc[n][l] = fmadd::<FMA>(av[l], bv[l], acc[n][l]);
            }
        }
    }
    for n in 0..N {
        let mut sum = (acc[n][0] + acc[n][1]) + (acc[n][2] + acc[n][3]);
        for (i, v) in tail.iter().enumerate() {
            sum = fmadd::<FMA>(*v, rows[n][chunks.len() + i], sum);
        }
        out[n] += sum;
    }
}

/// Adds the dots of `a` with every row of `rows` to `out`, eight rows at a time.
#[inline(always)]
fn dots<const FMA: bool>(a: &[f64], rows: &[&[f64]], out: &mut [f64]) {
    for (rows, out) in rows.chunks(8).zip(out.chunks_mut(8)) {
        match rows.len() {
            1 => multi_dot::<1, FMA>(a, rows, out),
            2 => multi_dot::<2, FMA>(a, rows, out),
            3 => multi_dot::<3, FMA>(a, rows, out),
            4 => multi_dot::<4, FMA>(a, rows, out),
            5 => multi_dot::<5, FMA>(a, rows, out),
            6 => multi_dot::<6, FMA>(a, rows, out),
            7 => multi_dot::<7, FMA>(a, rows, out),
            _ => multi_dot::<8, FMA>(a, rows, out),
        }
    }
}

#[inline(always)]
fn lane_sum<const FMA: bool>(a: &[f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is true only inside the AVX2+FMA build (see `dispatched!`).
        return unsafe { avx::lane_sum(a) };
    }
    let mut acc = [0.0f64; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().sum();
    for x in chunks {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// `dst[j] += kt g[j] + ct - sum_u quad[u] rows[u][j]` for one tap of the input-gradient pass.
#[inline(always)]
fn scatter_row<const FMA: bool>(dst: &mut [f64], g: &[f64], rows: &[&[f64]], quad: &[f64], kt: f64, ct: f64) {
    let len = dst.len();
    assert!(g.len() >= len && quad.len() >= rows.len() && rows.iter().all(|r| r.len() >= len));
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is true only inside the AVX2+FMA build (see `dispatched!`); lengths checked.
        unsafe {
            if rows.len() == 9 {
                avx::scatter_row::<9>(dst, g, rows, quad, kt, ct);
            } else {
                avx::scatter_row_any(dst, g, rows, quad, kt, ct);
            }
        }
        return;
    }
    for j in 0..len {
        let mut acc = fmadd::<FMA>(kt, g[j], ct);
        for (u, row) in rows.iter().enumerate() {
            acc = fmadd::<FMA>(-quad[u], row[j], acc);
        }
        dst[j] += acc;
    }
}

/// AVX2+FMA row kernels. Callers guarantee the CPU features and the slice lengths.
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn horizontal(v: __m256d) -> f64 {
        let mut lanes = [0.0f64; 4];
        // SAFETY: `lanes` holds 4 values.
        unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), v) };
        (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
    }

    /// # Safety
    /// `rows[..N]` and `out[..N]` exist and every row is at least `a.len()` long.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn multi_dot<const N: usize>(a: &[f64], rows: &[&[f64]], out: &mut [f64]) {
        let len = a.len();
        let whole = len - len % 4;
        let ptrs: [*const f64; N] = std::array::from_fn(|n| rows[n].as_ptr());
        let mut acc = [_mm256_setzero_pd(); N];
        let mut j = 0;
        while j < whole {
            let av = _mm256_loadu_pd(a.as_ptr().add(j));
            for n in 0..N {
                acc[n] = _mm256_fmadd_pd(av, _mm256_loadu_pd(ptrs[n].add(j)), acc[n]);
            }
            j += 4;
        }
        for n in 0..N {
            let mut sum = horizontal(acc[n]);
            for i in whole..len {
                sum = a[i].mul_add(*ptrs[n].add(i), sum);
            }
            out[n] += sum;
        }
    }

    /// # Safety
    /// None beyond the CPU features.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn lane_sum(a: &[f64]) -> f64 {
        let whole = a.len() - a.len() % 8;
        let (mut s0, mut s1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut j = 0;
        while j < whole {
            s0 = _mm256_add_pd(s0, _mm256_loadu_pd(a.as_ptr().add(j)));
            s1 = _mm256_add_pd(s1, _mm256_loadu_pd(a.as_ptr().add(j + 4)));
            j += 8;
        }
        horizontal(_mm256_add_pd(s0, s1)) + a[whole..].iter().sum::<f64>()
    }

    /// # Safety
    /// `rows.len() == T`, `quad.len() >= T`, `g` and every row at least `dst.len()` long.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scatter_row<const T: usize>(
        dst: &mut [f64],
        g: &[f64],
        rows: &[&[f64]],
        quad: &[f64],
        kt: f64,
        ct: f64,
    ) {
        let len = dst.len();
        let whole = len - len % 4;
        let q: [__m256d; T] = std::array::from_fn(|u| _mm256_set1_pd(quad[u]));
        let ptrs: [*const f64; T] = std::array::from_fn(|u| rows[u].as_ptr());
        let (k, c) = (_mm256_set1_pd(kt), _mm256_set1_pd(ct));
        let mut j = 0;
        while j < whole {
            let mut acc = _mm256_fmadd_pd(k, _mm256_loadu_pd(g.as_ptr().add(j)), c);
            for u in 0..T {
                acc = _mm256_fnmadd_pd(q[u], _mm256_loadu_pd(ptrs[u].add(j)), acc);
            }
            let d = dst.as_mut_ptr().add(j);
            _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), acc));
            j += 4;
        }
        for j in whole..len {
            let mut acc = kt.mul_add(g[j], ct);
            for u in 0..T {
                acc = (-quad[u]).mul_add(*ptrs[u].add(j), acc);
            }
            dst[j] += acc;
        }
    }

    /// [`scatter_row`] for any number of taps.
    ///
    /// # Safety
    /// As [`scatter_row`], with `quad.len() >= rows.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scatter_row_any(
        dst: &mut [f64],
        g: &[f64],
        rows: &[&[f64]],
        quad: &[f64],
        kt: f64,
        ct: f64,
    ) {
        let len = dst.len();
        let whole = len - len % 4;
        let (k, c) = (_mm256_set1_pd(kt), _mm256_set1_pd(ct));
        let mut j = 0;
        while j < whole {
            let mut acc = _mm256_fmadd_pd(k, _mm256_loadu_pd(g.as_ptr().add(j)), c);
            for (u, row) in rows.iter().enumerate() {
                acc = _mm256_fnmadd_pd(_mm256_set1_pd(quad[u]), _mm256_loadu_pd(row.as_ptr().add(j)), acc);
            }
            let d = dst.as_mut_ptr().add(j);
            _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), acc));
            j += 4;
        }
        for j in whole..len {
            let mut acc = kt.mul_add(g[j], ct);
            for (u, row) in rows.iter().enumerate() {
                acc = (-quad[u]).mul_add(*row.as_ptr().add(j), acc);
            }
            dst[j] += acc;
        }
    }
}

/// The tap rows of output row `oy`: one slice of `buf` per tap.
#[inline(always)]
fn tap_rows<'a>(geo: &Geometry, offsets: &[usize], buf: &'a [f64], oy: usize, rows: &mut Vec<&'a [f64]>) {
    rows.clear();
    rows.extend(offsets.iter().map(|&o| &buf[o + oy * geo.pw..][..geo.ow]));
}

/// One input plane's contribution to its channel's tap sums and upper-triangle cross sums.
#[inline(always)]
fn moments_plane<T: Element, const FMA: bool>(
    geo: &Geometry,
    offsets: &[usize],
    x: &[T],
    shift: f64,
    buf: &mut [f64],
    sums: &mut [f64],
    cross: &mut [f64],
) {
    geo.fill(x, shift, buf);
    let taps = offsets.len();
    let mut rows = Vec::with_capacity(taps);
    for oy in 0..geo.oh {
        tap_rows(geo, offsets, buf, oy, &mut rows);
        for t1 in 0..taps {
            sums[t1] += lane_sum::<FMA>(rows[t1]);
            dots::<FMA>(rows[t1], &rows[t1..], &mut cross[t1 * taps + t1..(t1 + 1) * taps]);
        }
    }
}

/// One plane's `sum g` and `sum_p g[p] * (x - mu)[p + t]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_sums_plane<T: Element, const FMA: bool>(
    geo: &Geometry,
    offsets: &[usize],
    x: &[T],
    g: &[T],
    shift: f64,
    buf: &mut [f64],
    grow: &mut [f64],
    gsum: &mut f64,
    h: &mut [f64],
) {
    geo.fill(x, shift, buf);
    let mut rows = Vec::with_capacity(offsets.len());
    for (oy, src) in g.chunks_exact(geo.ow).enumerate() {
        for (d, s) in grow.iter_mut().zip(src) {
            *d = s.to_f64();
        }
        *gsum += lane_sum::<FMA>(grow);
        tap_rows(geo, offsets, buf, oy, &mut rows);
        dots::<FMA>(grow, &rows, h);
    }
}

/// What the input-gradient pass applies per channel: at every output position `p`, tap `t`
/// of the patch receives `keff[t] g[p] + konst[t] - sum_u quad[t][u] (x - mu)[p + u]`.
struct Scatter {
    keff: Vec<f64>,
    konst: Vec<f64>,
    quad: Vec<f64>,
}

/// One plane's input gradient: scatter into the padded frame `dbuf`, then gather into `dx`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dx_plane<T: Element, const FMA: bool>(
    geo: &Geometry,
    offsets: &[usize],
    x: &[T],
    g: &[T],
    shift: f64,
    sc: &Scatter,
    buf: &mut [f64],
    dbuf: &mut [f64],
    grow: &mut [f64],
    dx: &mut [T],
) {
    geo.fill(x, shift, buf);
    dbuf.fill(0.0);
    let taps = offsets.len();
    let ow = geo.ow;
    let mut rows = Vec::with_capacity(taps);
    for (oy, src) in g.chunks_exact(ow).enumerate() {
        for (d, s) in grow.iter_mut().zip(src) {
            *d = s.to_f64();
        }
        tap_rows(geo, offsets, buf, oy, &mut rows);
        for t in 0..taps {
            let quad = &sc.quad[t * taps..][..taps];
            let dst = &mut dbuf[offsets[t] + oy * geo.pw..][..ow];
            scatter_row::<FMA>(dst, grow, &rows, quad, sc.keff[t], sc.konst[t]);
        }
    }
    geo.gather(dbuf, dx);
}

/// Whether the CPU runs the AVX2+FMA builds of the row kernels.
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static SIMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SIMD.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `$name(args)` runs `$body::<T, true>` compiled for AVX2+FMA when the CPU has them, else
/// `$body::<T, false>` for the baseline target.
macro_rules! dispatched {
    ($name:ident, $fast:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $fast<T: Element>($($arg: $ty),*) {
            $body::<T, true>($($arg),*)
        }

        #[allow(clippy::too_many_arguments)]
        fn $name<T: Element>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if simd() {
                // SAFETY: the CPU has AVX2 and FMA (checked at run time).
                return unsafe { $fast::<T>($($arg),*) };
            }
            $body::<T, false>($($arg),*)
        }
    };
}

dispatched!(moments_plane_run, moments_plane_simd, moments_plane, (
    geo: &Geometry, offsets: &[usize], x: &[T], shift: f64, buf: &mut [f64], sums: &mut [f64],
    cross: &mut [f64]
));
dispatched!(grad_sums_plane_run, grad_sums_plane_simd, grad_sums_plane, (
    geo: &Geometry, offsets: &[usize], x: &[T], g: &[T], shift: f64, buf: &mut [f64],
    grow: &mut [f64], gsum: &mut f64, h: &mut [f64]
));
dispatched!(dx_plane_run, dx_plane_simd, dx_plane, (
    geo: &Geometry, offsets: &[usize], x: &[T], g: &[T], shift: f64, sc: &Scatter,
    buf: &mut [f64], dbuf: &mut [f64], grow: &mut [f64], dx: &mut [T]
));

/// Mean of channel `c` of a contiguous NCHW tensor, in float64.
fn channel_mean<T: Element>(lay: &Layout, x: &[T], c: usize) -> f64 {
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
                let plane = lay.input(x, n, c);
                moments_plane_run(&geo, &offsets, plane, shift, &mut buf, &mut sums, &mut cross);
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
                let (xp, gp) = (lay.input(x, n, c), lay.output(g, n, c));
                grad_sums_plane_run(&geo, &offsets, xp, gp, m.mu[c], &mut buf, &mut grow, &mut gsum_out[i], h_c);
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

    let scatters: Vec<Scatter> = (0..channels)
        .map(|c| {
            let nu = &m.nu[c * taps..][..taps];
            let gbar = gsum[c] / count;
            let mut sc = Scatter {
                keff: vec![0.0; taps],
                konst: vec![0.0; taps],
                quad: vec![0.0; taps * taps],
            };
            for b in 0..nb {
                let k = kernels.full(&geo, b, c);
                let (a, cf) = (scales.a[b * channels + c], coef[b * channels + c]);
                let k_nu: f64 = (0..taps).map(|t| k[t] * nu[t]).sum();
                for t in 0..taps {
                    sc.keff[t] += a * k[t];
                    sc.konst[t] += cf * k[t] * k_nu;
                    if k[t] != 0.0 {
                        for u in 0..taps {
                            sc.quad[t * taps + u] += cf * k[t] * k[u];
                        }
                    }
                }
            }
            for t in 0..taps {
                sc.konst[t] -= sc.keff[t] * gbar;
            }
            sc
        })
        .collect();
    let writer = PlaneWriter(dx.as_mut_ptr());
    let writer = &writer;
    let (plane, cn) = (lay.plane(), lay.c);
    let scatters = &scatters;
    for_channels(channels, threads, Vec::new(), |range, _| {
        let offsets = geo.tap_offsets();
        let mut buf = vec![0.0; geo.buffer_len()];
        let mut dbuf = vec![0.0; geo.buffer_len()];
        let mut grow = vec![0.0; geo.ow];
        for c in range {
            for n in 0..lay.n {
                // SAFETY: plane (n, c) lies inside `dx` and only this thread owns channel c.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(writer.0.add((n * cn + c) * plane), plane)
                };
                let (xp, gp) = (lay.input(x, n, c), lay.output(g, n, c));
                dx_plane_run(&geo, &offsets, xp, gp, m.mu[c], &scatters[c], &mut buf, &mut dbuf, &mut grow, out);
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
