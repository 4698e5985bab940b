//! Row kernels compiled twice: for AVX2+FMA (chosen at run time) and for the baseline target.
//!
//! Every kernel is generic over an [`Isa`] and takes a value of it. `Baseline` is free to make;
//! an [`Avx2Fma`] value exists only after [`Avx2Fma::detect`] found the features, so no safe
//! code can reach an AVX2 instruction on a CPU without them. `dispatched!` wraps a plane
//! function in a `#[target_feature]` build and a run-time choice between the two.

/// An instruction set the row kernels are compiled for.
///
/// # Safety
/// An implementation with `FMA = true` must be constructible only where the CPU supports AVX2
/// and FMA: its values are the proof the kernels rely on.
pub(crate) unsafe trait Isa: Copy + Send + Sync {
    /// Whether the AVX2+FMA paths run.
    const FMA: bool;
}

/// The baseline target: portable code, no feature needed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Baseline;

// SAFETY: FMA is false.
unsafe impl Isa for Baseline {
    const FMA: bool = false;
}

/// Proof that the CPU has AVX2 and FMA: only [`Avx2Fma::detect`] makes one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2Fma(());

// SAFETY: values come only from `detect`, which checks both features.
unsafe impl Isa for Avx2Fma {
    const FMA: bool = true;
}

impl Avx2Fma {
    /// The proof, when the CPU has both features (checked once, then cached).
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let found = *FOUND.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            });
            found.then_some(Avx2Fma(()))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }
}

/// Lanes per chunk: one AVX2 register of float64.
pub(crate) const LANES: usize = 4;

#[inline(always)]
pub(crate) fn fmadd<I: Isa>(a: f64, b: f64, c: f64) -> f64 {
    if I::FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Adds the dots of `a` with each of `N` rows (each at least as long) to `out`.
#[inline(always)]
fn multi_dot<const N: usize, I: Isa>(isa: I, a: &[f64], rows: &[&[f64]], out: &mut [f64]) {
    let len = a.len();
    assert!(rows.len() >= N && out.len() >= N && rows[..N].iter().all(|r| r.len() >= len));
    #[cfg(target_arch = "x86_64")]
    if I::FMA {
        let _proof = isa;
        // SAFETY: `I::FMA` holds only for `Avx2Fma`, and `isa` is a value of it (the CPU has
        // AVX2 and FMA); lengths checked above.
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
                acc[n][l] = fmadd::<I>(av[l], bv[l], acc[n][l]);
            }
        }
    }
    for n in 0..N {
        let mut sum = (acc[n][0] + acc[n][1]) + (acc[n][2] + acc[n][3]);
        for (i, v) in tail.iter().enumerate() {
            sum = fmadd::<I>(*v, rows[n][chunks.len() + i], sum);
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
pub(crate) fn dots<I: Isa>(isa: I, a: &[f64], rows: &[&[f64]], out: &mut [f64]) {
    for (rows, out) in rows.chunks(GROUP).zip(out.chunks_mut(GROUP)) {
        by_group_size!(rows.len(), N => multi_dot::<N, I>(isa, a, rows, out));
    }
}

#[inline(always)]
pub(crate) fn lane_sum<I: Isa>(isa: I, a: &[f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if I::FMA {
        let _proof = isa;
        // SAFETY: `I::FMA` holds only for `Avx2Fma`, and `isa` is a value of it (the CPU has
        // AVX2 and FMA).
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
pub(crate) fn accumulate_rows<I: Isa>(
    isa: I,
    dst: &mut [f64],
    rows: &[&[f64]],
    coefs: &[f64],
    add: f64,
) {
    let len = dst.len();
    assert!(coefs.len() >= rows.len() && rows.iter().all(|r| r.len() >= len));
    #[cfg(target_arch = "x86_64")]
    if I::FMA {
        let _proof = isa;
        if rows.is_empty() {
            dst.iter_mut().for_each(|d| *d += add);
        }
        for (i, (rows, coefs)) in rows.chunks(GROUP).zip(coefs.chunks(GROUP)).enumerate() {
            let add = if i == 0 { add } else { 0.0 };
            // SAFETY: `I::FMA` holds only for `Avx2Fma`, and `isa` is a value of it (the CPU has
            // AVX2 and FMA); lengths checked above.
            unsafe { by_group_size!(rows.len(), N => avx::accumulate::<N>(dst, rows, coefs, add)) }
        }
        return;
    }
    for (j, d) in dst.iter_mut().enumerate() {
        let mut acc = *d + add;
        for (row, c) in rows.iter().zip(coefs) {
            acc = fmadd::<I>(-c, row[j], acc);
        }
        *d = acc;
    }
}

/// Rows per pass of [`accumulate_rows`] (their coefficients and pointers stay in registers).
const GROUP: usize = 10;

/// `dst[j] = add + sum_u coefs[u] rows[u][j]` in float32 (the inference conv's rows).
#[inline(always)]
pub(crate) fn conv_row_f32<I: Isa>(
    isa: I,
    dst: &mut [f32],
    rows: &[&[f32]],
    coefs: &[f32],
    add: f32,
) {
    let len = dst.len();
    assert!(coefs.len() >= rows.len() && rows.iter().all(|r| r.len() >= len));
    #[cfg(target_arch = "x86_64")]
    if I::FMA && !rows.is_empty() {
        let _proof = isa;
        for (i, (rows, coefs)) in rows.chunks(GROUP).zip(coefs.chunks(GROUP)).enumerate() {
            let first = i == 0;
            // SAFETY: `I::FMA` holds only for `Avx2Fma`, and `isa` is a value of it (the CPU has
            // AVX2 and FMA); lengths checked above.
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

/// AVX2+FMA row kernels. Every function is `unsafe`: callers prove the CPU features (an
/// [`Avx2Fma`] value) and the slice lengths stated in its `# Safety`.
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
    /// The CPU has AVX2 and FMA; `rows[..N]` and `out[..N]` exist and every row is at least
    /// `a.len()` long.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn multi_dot<const N: usize>(a: &[f64], rows: &[&[f64]], out: &mut [f64]) {
        let len = a.len();
        let whole = len - len % 4;
        let ptrs: [*const f64; N] = std::array::from_fn(|n| rows[n].as_ptr());
        let mut acc = [_mm256_setzero_pd(); N];
        let mut j = 0;
        while j < whole {
            // SAFETY: j + 4 <= a.len() <= every row's length.
            unsafe {
                let av = _mm256_loadu_pd(a.as_ptr().add(j));
                for n in 0..N {
                    acc[n] = _mm256_fmadd_pd(av, _mm256_loadu_pd(ptrs[n].add(j)), acc[n]);
                }
            }
            j += 4;
        }
        for n in 0..N {
            let mut sum = horizontal(acc[n]);
            for (i, v) in a.iter().enumerate().skip(whole) {
                // SAFETY: i < a.len() <= the row's length.
                sum = v.mul_add(unsafe { *ptrs[n].add(i) }, sum);
            }
            out[n] += sum;
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn lane_sum(a: &[f64]) -> f64 {
        let whole = a.len() - a.len() % 8;
        let (mut s0, mut s1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut j = 0;
        while j < whole {
            // SAFETY: j + 8 <= a.len().
            unsafe {
                s0 = _mm256_add_pd(s0, _mm256_loadu_pd(a.as_ptr().add(j)));
                s1 = _mm256_add_pd(s1, _mm256_loadu_pd(a.as_ptr().add(j + 4)));
            }
            j += 8;
        }
        horizontal(_mm256_add_pd(s0, s1)) + a[whole..].iter().sum::<f64>()
    }

    /// `dst[j] = (first ? add : dst[j]) + sum_n coefs[n] rows[n][j]` for `N` float32 rows.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `rows` and `coefs` hold at least `N` entries, every row at
    /// least `dst.len()` long.
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
            // SAFETY: j + 8 <= dst.len() <= every row's length.
            unsafe {
                let mut acc = if first {
                    base
                } else {
                    _mm256_loadu_ps(d.add(j))
                };
                for n in 0..N {
                    acc = _mm256_fmadd_ps(c[n], _mm256_loadu_ps(ptrs[n].add(j)), acc);
                }
                _mm256_storeu_ps(d.add(j), acc);
            }
            j += 8;
        }
        for (j, out) in dst.iter_mut().enumerate().skip(whole) {
            let mut acc = if first { add } else { *out };
            for n in 0..N {
                // SAFETY: j < dst.len() <= the row's length.
                acc = coefs[n].mul_add(unsafe { *ptrs[n].add(j) }, acc);
            }
            *out = acc;
        }
    }

    /// `dst[j] += add - sum_n coefs[n] rows[n][j]` for `N` rows.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `rows` and `coefs` hold at least `N` entries, every row at
    /// least `dst.len()` long.
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
            // SAFETY: j + 4 <= dst.len() <= every row's length.
            unsafe {
                let mut acc = _mm256_add_pd(_mm256_loadu_pd(d.add(j)), base);
                for n in 0..N {
                    acc = _mm256_fnmadd_pd(c[n], _mm256_loadu_pd(ptrs[n].add(j)), acc);
                }
                _mm256_storeu_pd(d.add(j), acc);
            }
            j += 4;
        }
        for (j, out) in dst.iter_mut().enumerate().skip(whole) {
            let mut acc = *out + add;
            for n in 0..N {
                // SAFETY: j < dst.len() <= the row's length.
                acc = (-coefs[n]).mul_add(unsafe { *ptrs[n].add(j) }, acc);
            }
            *out = acc;
        }
    }
}

/// `$name(args)` runs `$body::<T, Avx2Fma>` compiled for AVX2+FMA when the CPU has them, else
/// `$body::<T, Baseline>` for the baseline target.
macro_rules! dispatched {
    ($name:ident, $fast:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $fast<T: Element>(isa: $crate::cpu::simd::Avx2Fma, $($arg: $ty),*) {
            $body::<T, $crate::cpu::simd::Avx2Fma>(isa, $($arg),*)
        }

        fn $name<T: Element>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if let Some(isa) = $crate::cpu::simd::Avx2Fma::detect() {
                // SAFETY: `isa` proves the CPU has AVX2 and FMA, the features `$fast` is built for.
                return unsafe { $fast::<T>(isa, $($arg),*) };
            }
            $body::<T, $crate::cpu::simd::Baseline>($crate::cpu::simd::Baseline, $($arg),*)
        }
    };
}
pub(crate) use dispatched;
