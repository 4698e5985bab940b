//! Unit tests of the kernels' building blocks against their definitions.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::geometry::Geometry;
use super::moments::shifted_moments;
use super::simd::{accumulate_rows, conv_row_f32, dots, Avx2Fma, Baseline};
use super::threads::for_channels_on;

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
            shifted_moments::<Baseline>(Baseline, &geo, &buf, &mut got_sums, &mut got_cross),
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
    assert!(!shifted_moments::<Baseline>(
        Baseline,
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
        accumulate_rows::<Baseline>(Baseline, &mut portable, &rows, &coefs, 0.25);
        let (mut dots_portable, mut dots_simd) = (vec![0.0; count], vec![0.0; count]);
        dots::<Baseline>(Baseline, rows[0], &rows, &mut dots_portable);
        let rows32: Vec<Vec<f32>> = data
            .iter()
            .map(|r| r.iter().map(|&v| v as f32).collect())
            .collect();
        let rows32: Vec<&[f32]> = rows32.iter().map(Vec::as_slice).collect();
        let coefs32: Vec<f32> = coefs.iter().map(|&v| v as f32).collect();
        let mut conv_portable = vec![0.0f32; len];
        conv_row_f32::<Baseline>(Baseline, &mut conv_portable, &rows32, &coefs32, 0.5);
        let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * (1.0 + b.abs());
        for j in 0..len {
            assert!(
                close(portable[j], expected[j], 1e-13),
                "accumulate {len} {count}"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = Avx2Fma::detect() {
            let mut fast = start.clone();
            // SAFETY: `isa` proves the CPU has AVX2 and FMA, the features these are built for.
            unsafe { accumulate_simd(isa, &mut fast, &rows, &coefs, 0.25) };
            // SAFETY: as above.
            unsafe { dots_simd_run(isa, rows[0], &rows, &mut dots_simd) };
            let mut conv_fast = vec![0.0f32; len];
            // SAFETY: as above.
            unsafe { conv_simd(isa, &mut conv_fast, &rows32, &coefs32, 0.5) };
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
fn accumulate_simd(isa: Avx2Fma, dst: &mut [f64], rows: &[&[f64]], coefs: &[f64], add: f64) {
    accumulate_rows::<Avx2Fma>(isa, dst, rows, coefs, add)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dots_simd_run(isa: Avx2Fma, a: &[f64], rows: &[&[f64]], out: &mut [f64]) {
    dots::<Avx2Fma>(isa, a, rows, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn conv_simd(isa: Avx2Fma, dst: &mut [f32], rows: &[&[f32]], coefs: &[f32], add: f32) {
    conv_row_f32::<Avx2Fma>(isa, dst, rows, coefs, add)
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
