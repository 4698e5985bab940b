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

use std::sync::atomic::{AtomicUsize, Ordering};
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
    pub fn new(
        k: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        h: usize,
        w: usize,
    ) -> Option<Self> {
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

    /// The strided fill (stride >= 2): each input row is padded once into `row` (length
    /// `pw * stride`, `pad` outside the input, `value(x)` inside), then split into the phase rows.
    #[inline(always)]
    fn fill_strided<T: Copy, B: Copy>(
        &self,
        x: &[T],
        pad: B,
        value: impl Fn(T) -> B,
        row: &mut [B],
        buf: &mut [B],
    ) {
        let (s, p, w, pw) = (self.stride, self.padding, self.w, self.pw);
        let (lo, hi) = (p.min(pw * s), (p + w).min(pw * s));
        for ry in 0..s {
            for i in 0..self.ph {
                let y = (i * s + ry).wrapping_sub(p);
                let phase_row = |rx: usize| ((ry * s + rx) * self.ph + i) * pw;
                if y >= self.h {
                    for rx in 0..s {
                        buf[phase_row(rx)..][..pw].fill(pad);
                    }
                    continue;
                }
                row[..lo].fill(pad);
                row[hi..].fill(pad);
                for (d, v) in row[lo..hi].iter_mut().zip(&x[y * w..][..hi - lo]) {
                    *d = value(*v);
                }
                if s == 2 {
                    let (even, rest) = buf[phase_row(0)..].split_at_mut(pw);
                    let odd = &mut rest[phase_row(1) - phase_row(0) - pw..][..pw];
                    for ((e, o), pair) in
                        even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2))
                    {
                        *e = pair[0];
                        *o = pair[1];
                    }
                } else {
                    for rx in 0..s {
                        let dst = &mut buf[phase_row(rx)..][..pw];
                        for (d, v) in dst.iter_mut().zip(row[rx..].iter().step_by(s)) {
                            *d = *v;
                        }
                    }
                }
            }
        }
    }

    /// Fills `buf` with the padded plane `x`: `pad` outside the input, `value(x)` inside.
    #[inline(always)]
    fn fill_with<T: Copy, B: Copy>(&self, x: &[T], pad: B, value: impl Fn(T) -> B, buf: &mut [B]) {
        if self.stride > 1 {
            let mut row = vec![pad; self.pw * self.stride];
            self.fill_strided(x, pad, value, &mut row, buf);
            return;
        }
        let (lo, hi) = self.valid_columns(0);
        for (i, row) in buf[..self.phase_len()]
            .chunks_exact_mut(self.pw)
            .enumerate()
        {
            let y = i.wrapping_sub(self.padding);
            if y >= self.h {
                row.fill(pad);
                continue;
            }
            row[..lo].fill(pad);
            row[hi..].fill(pad);
            if lo < hi {
                let src = &x[y * self.w + lo - self.padding..][..hi - lo];
                for (v, x) in row[lo..hi].iter_mut().zip(src) {
                    *v = value(*x);
                }
            }
        }
    }

    /// Fills `buf` with the padded plane `x` minus `shift` (so padding reads `-shift`).
    #[inline(always)]
    fn fill<T: Element>(&self, x: &[T], shift: f64, buf: &mut [f64]) {
        self.fill_with(x, -shift, |v: T| v.to_f64() - shift, buf);
    }

    /// Fills `buf` with the padded float32 plane `x` (zeros in the padding), for inference.
    #[inline(always)]
    fn fill_f32(&self, x: &[f32], buf: &mut [f32]) {
        self.fill_with(x, 0.0, |v: f32| v, buf);
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
                    if s == 1 {
                        for (d, v) in dst.iter_mut().zip(&row[lo..hi]) {
                            *d = T::from_f64(*v);
                        }
                    } else {
                        for (d, v) in dst.iter_mut().step_by(s).zip(&row[lo..hi]) {
                            *d = T::from_f64(*v);
                        }
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
    /// Every branch's full `k^2` kernel per channel (branch-major), centre-only ones padded.
    full: Vec<f64>,
    conv_branches: usize,
    branches: usize,
    taps: usize,
    channels: usize,
}

impl Kernels {
    /// The kernels of a block with `k x k` taps and `channels` channels: per conv branch
    /// `channels * k^2` taps, then per centre-only branch (scale, skip) `channels` values.
    pub fn new(conv: &[Vec<f64>], centre: &[Vec<f64>], k: usize, channels: usize) -> Self {
        let taps = k * k;
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
        Kernels {
            full,
            conv_branches: conv.len(),
            branches: conv.len() + centre.len(),
            taps,
            channels,
        }
    }

    pub fn branches(&self) -> usize {
        self.branches
    }

    /// Branch `b`'s full kernel of channel `c`.
    fn full(&self, b: usize, c: usize) -> &[f64] {
        &self.full[(b * self.channels + c) * self.taps..][..self.taps]
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

/// Runs `work(&mut scratch, c)` for every channel `c`, on up to `threads` threads that each
/// take the next channel as they finish one (each thread builds its own `scratch` with `init`).
///
/// The threads are torch's own OpenMP team when libgomp is loaded (torch's intra-op pool, so no
/// extra threads compete with its spinning workers), else scoped threads.
fn for_channels<S, I, W>(channels: usize, threads: usize, init: I, work: W)
where
    I: Fn() -> S + Sync,
    W: Fn(&mut S, usize) + Sync,
{
    for_channels_on(channels, threads, true, init, work)
}

/// [`for_channels`], with torch's OpenMP team only when `openmp` (tests run both).
fn for_channels_on<S, I, W>(channels: usize, threads: usize, openmp: bool, init: I, work: W)
where
    I: Fn() -> S + Sync,
    W: Fn(&mut S, usize) + Sync,
{
    let next = AtomicUsize::new(0);
    let run = || {
        let mut scratch = init();
        loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= channels {
                break;
            }
            work(&mut scratch, c);
        }
    };
    let threads = threads.clamp(1, channels.max(1));
    if threads == 1 {
        run();
    } else if !(openmp && omp::parallel(threads, &run)) {
        thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(run);
            }
            run();
        });
    }
}

/// torch's OpenMP runtime (libgomp), found among the loaded libraries at run time.
mod omp {
    use std::ffi::{c_char, c_int, c_uint, c_void};
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    use std::sync::{Mutex, OnceLock};

    type Parallel =
        unsafe extern "C" fn(unsafe extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

    extern "C" {
        fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }

    const RTLD_LAZY: c_int = 1;
    const RTLD_NOLOAD: c_int = 4;

    fn gomp_parallel() -> Option<Parallel> {
        static FOUND: OnceLock<Option<usize>> = OnceLock::new();
        let address = *FOUND.get_or_init(|| {
            // SAFETY: RTLD_NOLOAD only looks up a library already loaded (torch's libgomp);
            // `GOMP_parallel` has had this signature in libgomp's ABI since GCC 4.9.
            unsafe {
                let handle = dlopen(c"libgomp.so.1".as_ptr(), RTLD_LAZY | RTLD_NOLOAD);
                if handle.is_null() {
                    return None;
                }
                let symbol = dlsym(handle, c"GOMP_parallel".as_ptr());
                (!symbol.is_null()).then_some(symbol as usize)
            }
        });
        // SAFETY: the address is libgomp's GOMP_parallel (above).
        address.map(|a| unsafe { std::mem::transmute::<usize, Parallel>(a) })
    }

    struct Job<'a> {
        run: &'a (dyn Fn() + Sync),
        panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    }

    unsafe extern "C" fn trampoline(data: *mut c_void) {
        // SAFETY: `data` is the `Job` that `parallel` keeps alive until GOMP_parallel returns.
        let job = unsafe { &*(data as *const Job<'_>) };
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (job.run)())) {
            if let Ok(mut slot) = job.panic.lock() {
                slot.get_or_insert(payload);
            }
        }
    }

    /// Runs `run` on every thread of an OpenMP team of up to `threads`; false when libgomp is
    /// not loaded (nothing ran). A panic in any thread is re-raised here.
    pub fn parallel(threads: usize, run: &(dyn Fn() + Sync)) -> bool {
        let Some(gomp) = gomp_parallel() else {
            return false;
        };
        let job = Job {
            run,
            panic: Mutex::new(None),
        };
        // SAFETY: the trampoline only reads `job`, which outlives the call; GOMP_parallel
        // returns after every thread of the team has finished.
        unsafe {
            gomp(
                trampoline,
                &job as *const Job<'_> as *mut c_void,
                threads as c_uint,
                0,
            )
        };
        if let Some(payload) = job.panic.into_inner().ok().flatten() {
            resume_unwind(payload);
        }
        true
    }
}

/// Per-channel records of `width` values that threads owning disjoint channels write.
struct Records {
    ptr: *mut f64,
    width: usize,
}

// SAFETY: each channel's record is written by the one thread that took that channel.
unsafe impl Send for Records {}
unsafe impl Sync for Records {}

impl Records {
    fn new(values: &mut [f64], width: usize) -> Self {
        Records {
            ptr: values.as_mut_ptr(),
            width,
        }
    }

    /// Channel `c`'s record.
    ///
    /// # Safety
    /// `c` is within the records and only the calling thread holds channel `c`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, c: usize) -> &mut [f64] {
        std::slice::from_raw_parts_mut(self.ptr.add(c * self.width), self.width)
    }
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

/// Runs `$body` with the const `$n` equal to `$len`, for `1 <= $len <= GROUP` (a const generic
/// per group size keeps a group's rows and coefficients in registers).
macro_rules! by_group_size {
    ($len:expr, $n:ident => $body:expr) => {
        match $len {
            1 => {
                const $n: usize = 1;
                $body
            }
            2 => {
                const $n: usize = 2;
                $body
            }
            3 => {
                const $n: usize = 3;
                $body
            }
            4 => {
                const $n: usize = 4;
                $body
            }
            5 => {
                const $n: usize = 5;
                $body
            }
            6 => {
                const $n: usize = 6;
                $body
            }
            7 => {
                const $n: usize = 7;
                $body
            }
            8 => {
                const $n: usize = 8;
                $body
            }
            9 => {
                const $n: usize = 9;
                $body
            }
            _ => {
                const $n: usize = 10;
                $body
            }
        }
    };
}

/// Adds the dots of `a` with every row of `rows` to `out`, `GROUP` rows at a time.
#[inline(always)]
fn dots<const FMA: bool>(a: &[f64], rows: &[&[f64]], out: &mut [f64]) {
    for (rows, out) in rows.chunks(GROUP).zip(out.chunks_mut(GROUP)) {
        by_group_size!(rows.len(), N => multi_dot::<N, FMA>(a, rows, out));
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

/// `dst[j] += add - sum_u coefs[u] rows[u][j]`: every row pass of the kernel (folded conv,
/// input gradient) is one of these.
#[inline(always)]
fn accumulate_rows<const FMA: bool>(dst: &mut [f64], rows: &[&[f64]], coefs: &[f64], add: f64) {
    let len = dst.len();
    assert!(coefs.len() >= rows.len() && rows.iter().all(|r| r.len() >= len));
    #[cfg(target_arch = "x86_64")]
    if FMA {
        if rows.is_empty() {
            dst.iter_mut().for_each(|d| *d += add);
        }
        for (i, (rows, coefs)) in rows.chunks(GROUP).zip(coefs.chunks(GROUP)).enumerate() {
            let add = if i == 0 { add } else { 0.0 };
            // SAFETY: FMA is true only inside the AVX2+FMA build (see `dispatched!`); lengths
            // checked above.
            unsafe { by_group_size!(rows.len(), N => avx::accumulate::<N>(dst, rows, coefs, add)) }
        }
        return;
    }
    for (j, d) in dst.iter_mut().enumerate() {
        let mut acc = *d + add;
        for (row, c) in rows.iter().zip(coefs) {
            acc = fmadd::<FMA>(-c, row[j], acc);
        }
        *d = acc;
    }
}

/// Rows per pass of [`accumulate_rows`] (their coefficients and pointers stay in registers).
const GROUP: usize = 10;

/// `dst[j] = add + sum_u coefs[u] rows[u][j]` in float32 (the inference conv's rows).
#[inline(always)]
fn conv_row_f32<const FMA: bool>(dst: &mut [f32], rows: &[&[f32]], coefs: &[f32], add: f32) {
    let len = dst.len();
    assert!(coefs.len() >= rows.len() && rows.iter().all(|r| r.len() >= len));
    #[cfg(target_arch = "x86_64")]
    if FMA && !rows.is_empty() {
        for (i, (rows, coefs)) in rows.chunks(GROUP).zip(coefs.chunks(GROUP)).enumerate() {
            let first = i == 0;
            // SAFETY: FMA is true only inside the AVX2+FMA build (see `dispatched!`); lengths
            // checked above.
            unsafe {
                by_group_size!(rows.len(), N => avx::conv_f32::<N>(dst, rows, coefs, first, add))
            }
        }
        return;
    }
    for (j, d) in dst.iter_mut().enumerate() {
        *d = rows
            .iter()
            .zip(coefs)
            .fold(add, |acc, (row, c)| c.mul_add(row[j], acc));
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
            for (i, v) in a.iter().enumerate().skip(whole) {
                sum = v.mul_add(*ptrs[n].add(i), sum);
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

    /// `dst[j] = (first ? add : dst[j]) + sum_n coefs[n] rows[n][j]` for `N` float32 rows.
    ///
    /// # Safety
    /// `rows` and `coefs` hold at least `N` entries, every row at least `dst.len()` long.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn conv_f32<const N: usize>(
        dst: &mut [f32],
        rows: &[&[f32]],
        coefs: &[f32],
        first: bool,
        add: f32,
    ) {
        let len = dst.len();
        let whole = len - len % 8;
        let c: [__m256; N] = std::array::from_fn(|n| _mm256_set1_ps(coefs[n]));
        let ptrs: [*const f32; N] = std::array::from_fn(|n| rows[n].as_ptr());
        let base = _mm256_set1_ps(add);
        let d = dst.as_mut_ptr();
        let mut j = 0;
        while j < whole {
            let mut acc = if first {
                base
            } else {
                _mm256_loadu_ps(d.add(j))
            };
            for n in 0..N {
                acc = _mm256_fmadd_ps(c[n], _mm256_loadu_ps(ptrs[n].add(j)), acc);
            }
            _mm256_storeu_ps(d.add(j), acc);
            j += 8;
        }
        for j in whole..len {
            let mut acc = if first { add } else { *d.add(j) };
            for n in 0..N {
                acc = coefs[n].mul_add(*ptrs[n].add(j), acc);
            }
            *d.add(j) = acc;
        }
    }

    /// `dst[j] += add - sum_n coefs[n] rows[n][j]` for `N` rows.
    ///
    /// # Safety
    /// `rows` and `coefs` hold at least `N` entries, every row at least `dst.len()` long.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn accumulate<const N: usize>(
        dst: &mut [f64],
        rows: &[&[f64]],
        coefs: &[f64],
        add: f64,
    ) {
        let len = dst.len();
        let whole = len - len % 4;
        let c: [__m256d; N] = std::array::from_fn(|n| _mm256_set1_pd(coefs[n]));
        let ptrs: [*const f64; N] = std::array::from_fn(|n| rows[n].as_ptr());
        let base = _mm256_set1_pd(add);
        let d = dst.as_mut_ptr();
        let mut j = 0;
        while j < whole {
            let mut acc = _mm256_add_pd(_mm256_loadu_pd(d.add(j)), base);
            for n in 0..N {
                acc = _mm256_fnmadd_pd(c[n], _mm256_loadu_pd(ptrs[n].add(j)), acc);
            }
            _mm256_storeu_pd(d.add(j), acc);
            j += 4;
        }
        for j in whole..len {
            let mut acc = *d.add(j) + add;
            for n in 0..N {
                acc = (-coefs[n]).mul_add(*ptrs[n].add(j), acc);
            }
            *d.add(j) = acc;
        }
    }
}

/// The tap rows of output row `oy`: one slice of `buf` per tap.
#[inline(always)]
fn tap_rows<'a>(
    geo: &Geometry,
    offsets: &[usize],
    buf: &'a [f64],
    oy: usize,
    rows: &mut Vec<&'a [f64]>,
) {
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
    if shifted_moments::<FMA>(geo, buf, sums, cross) {
        return;
    }
    let taps = offsets.len();
    let mut rows = Vec::with_capacity(taps);
    for oy in 0..geo.oh {
        tap_rows(geo, offsets, buf, oy, &mut rows);
        for t1 in 0..taps {
            sums[t1] += lane_sum::<FMA>(rows[t1]);
            dots::<FMA>(
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
fn shifted_moments<const FMA: bool>(
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
        dots::<FMA>(&row[core.clone()], &partners, &mut core_dots[..live.len()]);
        let core_sum = lane_sum::<FMA>(&row[core.clone()]);
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
#[allow(clippy::too_many_arguments)]
fn dx_plane_dense<T: Element, const FMA: bool>(
    geo: &Geometry,
    x: &[T],
    g: &[T],
    shift: f64,
    sc: &Scatter,
    dense: &mut Dense,
    dx: &mut [T],
) {
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
        accumulate_rows::<FMA>(dst, &rows, coef, sc.konst_sum);
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
            accumulate_rows::<FMA>(dst, &patch, &negated[t * taps..][..taps], -sc.konst[t]);
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
                    .fold(sc.konst[t], |w, (q, v)| fmadd::<FMA>(-q, *v, w));
                dbuf[at + offsets[t]] -= w;
            }
        }
    }
    ext.gather(dbuf, dx);
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
    for (oy, src) in g.chunks_exact(ow).enumerate() {
        for (d, s) in grow.iter_mut().zip(src) {
            *d = s.to_f64();
        }
        let mut rows: Vec<&[f64]> = Vec::with_capacity(taps + 1);
        rows.push(grow);
        rows.extend(offsets.iter().map(|&o| &buf[o + oy * geo.pw..][..ow]));
        for t in 0..taps {
            let dst = &mut dbuf[offsets[t] + oy * geo.pw..][..ow];
            accumulate_rows::<FMA>(
                dst,
                &rows,
                &sc.tap_coefs[t * (taps + 1)..][..taps + 1],
                sc.konst[t],
            );
        }
    }
    geo.gather(dbuf, dx);
}

/// One output plane of the folded conv: `out[p] = base + sum_t kernel[t] (x - shift)[p + t]`
/// (the padding reads `-shift`, so `base` carries `shift * sum kernel`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn conv_plane<T: Element, const FMA: bool>(
    geo: &Geometry,
    offsets: &[usize],
    x: &[T],
    shift: f64,
    negated: &[f64],
    base: f64,
    buf: &mut [f64],
    acc: &mut [f64],
    out: &mut [T],
) {
    geo.fill(x, shift, buf);
    let mut rows = Vec::with_capacity(offsets.len());
    for (oy, dst) in out.chunks_exact_mut(geo.ow).enumerate() {
        tap_rows(geo, offsets, buf, oy, &mut rows);
        acc.fill(0.0);
        accumulate_rows::<FMA>(acc, &rows, negated, base);
        for (d, v) in dst.iter_mut().zip(acc.iter()) {
            *d = T::from_f64(*v);
        }
    }
}

/// One output plane of a float32 inference conv: `out = bias + sum_t kernel[t] x[p + t]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn infer_plane<T: Element, const FMA: bool>(
    geo: &Geometry,
    offsets: &[usize],
    x: &[f32],
    kernel: &[f32],
    bias: f32,
    buf: &mut [f32],
    out: &mut [f32],
    _element: Option<T>,
) {
    geo.fill_f32(x, buf);
    let mut rows: Vec<&[f32]> = Vec::with_capacity(offsets.len());
    for (oy, dst) in out.chunks_exact_mut(geo.ow).enumerate() {
        rows.clear();
        rows.extend(offsets.iter().map(|&o| &buf[o + oy * geo.pw..][..geo.ow]));
        conv_row_f32::<FMA>(dst, &rows, kernel, bias);
    }
}

/// Whether the CPU runs the AVX2+FMA builds of the row kernels.
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static SIMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SIMD.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
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

dispatched!(dx_plane_dense_run, dx_plane_dense_simd, dx_plane_dense, (
    geo: &Geometry, x: &[T], g: &[T], shift: f64, sc: &Scatter, dense: &mut Dense, dx: &mut [T]
));
dispatched!(infer_plane_run, infer_plane_simd, infer_plane, (
    geo: &Geometry, offsets: &[usize], x: &[f32], kernel: &[f32], bias: f32, buf: &mut [f32],
    out: &mut [f32], _element: Option<T>
));
dispatched!(conv_plane_run, conv_plane_simd, conv_plane, (
    geo: &Geometry, offsets: &[usize], x: &[T], shift: f64, negated: &[f64], base: f64,
    buf: &mut [f64], acc: &mut [f64], out: &mut [T]
));

/// A raw pointer to an NCHW tensor that threads owning disjoint channels write through.
struct PlaneWriter<T>(*mut T);

// SAFETY: every thread writes only the planes of its own channels (see `plane`).
unsafe impl<T: Send> Send for PlaneWriter<T> {}
unsafe impl<T: Send> Sync for PlaneWriter<T> {}

impl<T> PlaneWriter<T> {
    /// Plane `index` of `len` elements.
    ///
    /// # Safety
    /// The plane lies inside the tensor and no other thread touches it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn plane(&self, index: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(index * len), len)
    }
}

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

/// The BatchNorm affine parameters of every branch, in float64.
pub struct Affine {
    /// Per branch, `channels` weights.
    pub gamma: Vec<Vec<f64>>,
    /// Per branch, `channels` biases.
    pub beta: Vec<Vec<f64>>,
    /// Per branch.
    pub eps: Vec<f64>,
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
    (mean, var.max(0.0))
}

/// The training-step forward of a depthwise block's branch sum: per channel the patch moments,
/// each branch's batch statistics, then the folded conv (`out`, contiguous NCHW of the output
/// size), one channel after another so that its planes are still in cache.
pub fn forward<T: Element>(
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
                let plane = lay.input(x, n, c);
                moments_plane_run(&geo, &offsets, plane, shift, buf, sums, cross);
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
                let plane = lay.input(x, n, c);
                conv_plane_run(&geo, &offsets, plane, shift, &negated, base, buf, acc, dst);
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

/// A float32 depthwise conv with one `k^2` kernel and one bias per channel, for inference
/// (not differentiable), written into `out` (contiguous NCHW of the output size).
pub fn depthwise_conv_f32(
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
            infer_plane_run::<f32>(
                &geo,
                &offsets,
                lay.input(x, n, c),
                k,
                bias[c],
                buf,
                dst,
                None,
            );
        }
    });
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

/// One channel's parameter gradients and the scatter its input gradient applies, from `sum g`
/// and `h[t] = sum_p g[p] (x - mu)[p + t]`. Writes `[gamma grads (nb), kernel grads (nb * taps)]`
/// into `rec`.
///
/// Per branch `b`: `dL/dy_b = a_b (g - mean g) - coef_b (y_b - m_b)` with
/// `coef_b = a_b S_b / (M (var_b + eps))` and `S_b = sum g (y_b - m_b) = K_b . h'`, where
/// `h'[t] = sum_p (g - mean g)[p] x[p + t] = h[t] - sum g * nu[t]`. Hence the kernel gradient
/// `a_b h' - coef_b M Cov K_b`, and the input gradient scatters, per output position,
/// `sum_b dL/dy_b[p] K_b` over the patch.
#[allow(clippy::too_many_arguments)]
fn channel_gradients(
    geo: &Geometry,
    kernels: &Kernels,
    scales: &BranchScales<'_>,
    m: &Moments,
    c: usize,
    gsum: f64,
    h: &[f64],
    rec: &mut [f64],
) -> Scatter {
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

/// The backward of the depthwise branch sum: writes the input gradient into `dx` (contiguous
/// NCHW like `x`) and returns the parameter gradients. Channel by channel: `sum g` and
/// `sum g * patch` (one pass), the parameter gradients, then the input gradient (one pass).
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
    let (taps, channels) = (geo.taps(), lay.c);
    let (nconv, nb) = (kernels.conv_branches, kernels.branches());
    assert!(dx.len() == x.len() && g.len() == lay.n * channels * lay.out_plane());
    // Per channel record: sum g, per branch the BN weight's gradient, then its full kernel's.
    let width = 1 + nb + nb * taps;
    let mut records = vec![0.0; channels * width];
    let writer = PlaneWriter(dx.as_mut_ptr());
    let writer = &writer;
    let plane = lay.plane();
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
                let (xp, gp) = (lay.input(x, n, c), lay.output(g, n, c));
                grad_sums_plane_run(&geo, &offsets, xp, gp, m.mu[c], buf, grow, &mut gsum, h);
            }
            rec[0] = gsum;
            let sc = channel_gradients(&geo, kernels, scales, m, c, gsum, h, &mut rec[1..]);
            for n in 0..lay.n {
                // SAFETY: plane (n, c) lies inside `dx` and only this thread owns channel c.
                let out = unsafe { writer.plane(n * channels + c, plane) };
                let (xp, gp) = (lay.input(x, n, c), lay.output(g, n, c));
                match dense.as_mut() {
                    Some(dense) => dx_plane_dense_run(&geo, xp, gp, m.mu[c], &sc, dense, out),
                    None => {
                        dx_plane_run(&geo, &offsets, xp, gp, m.mu[c], &sc, buf, dbuf, grow, out)
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Cross and tap sums of a filled plane, pair by pair over the output grid (the definition).
    fn direct_moments(geo: &Geometry, buf: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let offsets = geo.tap_offsets();
        let taps = offsets.len();
        let (mut sums, mut cross) = (vec![0.0; taps], vec![0.0; taps * taps]);
        for oy in 0..geo.oh {
            for ox in 0..geo.ow {
                let at = |t: usize| buf[offsets[t] + oy * geo.pw + ox];
                for t1 in 0..taps {
                    sums[t1] += at(t1);
                    for t2 in t1..taps {
                        cross[t1 * taps + t2] += at(t1) * at(t2);
                    }
                }
            }
        }
        (sums, cross)
    }

    #[test]
    fn shifted_moments_equal_the_pairwise_definition() {
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for (k, d, p, h, w) in [
            (3, 1, 1, 9, 7),
            (3, 2, 2, 8, 11),
            (5, 1, 2, 12, 9),
            (3, 1, 0, 6, 10),
            (7, 1, 3, 9, 9),
        ] {
            let geo = Geometry::new(k, 1, p, d, h, w).unwrap();
            let buf: Vec<f64> = (0..geo.buffer_len()).map(|_| next()).collect();
            let (sums, cross) = direct_moments(&geo, &buf);
            let taps = geo.taps();
            let (mut got_sums, mut got_cross) = (vec![0.0; taps], vec![0.0; taps * taps]);
            assert!(
                shifted_moments::<false>(&geo, &buf, &mut got_sums, &mut got_cross),
                "{k} {d} {w}"
            );
            for (a, b) in got_sums
                .iter()
                .zip(&sums)
                .chain(got_cross.iter().zip(&cross))
            {
                assert!(
                    (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                    "k={k} d={d}: {a} != {b}"
                );
            }
        }
        // Too narrow for a shared core: the caller's pairwise path runs instead.
        let geo = Geometry::new(3, 1, 0, 1, 5, 4).unwrap();
        let buf = vec![1.0; geo.buffer_len()];
        assert!(!shifted_moments::<false>(
            &geo,
            &buf,
            &mut [0.0; 9],
            &mut [0.0; 81]
        ));
    }

    #[test]
    fn simd_and_portable_row_kernels_agree() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for (len, count) in [(1, 1), (7, 3), (37, 9), (64, 13), (101, 34)] {
            let data: Vec<Vec<f64>> = (0..count)
                .map(|_| (0..len).map(|_| next()).collect())
                .collect();
            let rows: Vec<&[f64]> = data.iter().map(Vec::as_slice).collect();
            let coefs: Vec<f64> = (0..count).map(|_| next()).collect();
            let start: Vec<f64> = (0..len).map(|_| next()).collect();
            let expected: Vec<f64> = (0..len)
                .map(|j| start[j] + 0.25 - (0..count).map(|u| coefs[u] * rows[u][j]).sum::<f64>())
                .collect();
            let mut portable = start.clone();
            accumulate_rows::<false>(&mut portable, &rows, &coefs, 0.25);
            let (mut dots_portable, mut dots_simd) = (vec![0.0; count], vec![0.0; count]);
            dots::<false>(rows[0], &rows, &mut dots_portable);
            let rows32: Vec<Vec<f32>> = data
                .iter()
                .map(|r| r.iter().map(|&v| v as f32).collect())
                .collect();
            let rows32: Vec<&[f32]> = rows32.iter().map(Vec::as_slice).collect();
            let coefs32: Vec<f32> = coefs.iter().map(|&v| v as f32).collect();
            let mut conv_portable = vec![0.0f32; len];
            conv_row_f32::<false>(&mut conv_portable, &rows32, &coefs32, 0.5);
            let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * (1.0 + b.abs());
            for j in 0..len {
                assert!(
                    close(portable[j], expected[j], 1e-13),
                    "accumulate {len} {count}"
                );
            }
            #[cfg(target_arch = "x86_64")]
            if simd() {
                let mut fast = start.clone();
                // SAFETY: the FMA build is only entered when the CPU has the features.
                unsafe { accumulate_simd(&mut fast, &rows, &coefs, 0.25) };
                // SAFETY: as above.
                unsafe { dots_simd_run(rows[0], &rows, &mut dots_simd) };
                let mut conv_fast = vec![0.0f32; len];
                // SAFETY: as above.
                unsafe { conv_simd(&mut conv_fast, &rows32, &coefs32, 0.5) };
                for j in 0..len {
                    assert!(
                        close(fast[j], expected[j], 1e-13),
                        "simd accumulate {len} {count}"
                    );
                    assert!(
                        close(conv_fast[j] as f64, conv_portable[j] as f64, 1e-5),
                        "conv {len} {count}"
                    );
                }
                for (a, b) in dots_simd.iter().zip(&dots_portable) {
                    assert!(close(*a, *b, 1e-12), "dots {len} {count}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate_simd(dst: &mut [f64], rows: &[&[f64]], coefs: &[f64], add: f64) {
        accumulate_rows::<true>(dst, rows, coefs, add)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_simd_run(a: &[f64], rows: &[&[f64]], out: &mut [f64]) {
        dots::<true>(a, rows, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn conv_simd(dst: &mut [f32], rows: &[&[f32]], coefs: &[f32], add: f32) {
        conv_row_f32::<true>(dst, rows, coefs, add)
    }

    #[test]
    fn every_channel_runs_once_on_any_thread_count() {
        for openmp in [true, false] {
            for threads in [1, 2, 3, 8] {
                let seen: Vec<AtomicUsize> = (0..37).map(|_| AtomicUsize::new(0)).collect();
                let inits = AtomicUsize::new(0);
                let init = || inits.fetch_add(1, Ordering::Relaxed);
                for_channels_on(seen.len(), threads, openmp, init, |_, c| {
                    seen[c].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    seen.iter().all(|n| n.load(Ordering::Relaxed) == 1),
                    "{openmp} {threads}"
                );
                assert!(inits.load(Ordering::Relaxed) <= threads);
            }
        }
    }

    #[test]
    fn tap_offsets_follow_stride_and_dilation() {
        let geo = Geometry::new(3, 2, 1, 1, 6, 6).unwrap();
        assert_eq!((geo.oh, geo.ow, geo.ph, geo.pw), (3, 3, 4, 4));
        // Tap (1, 1) is in phase (1, 1) at (0, 0); tap (2, 2) in phase (0, 0) at (1, 1).
        assert_eq!(geo.tap_offset(4), 3 * 16);
        assert_eq!(geo.tap_offset(8), 4 + 1);
    }
}
