//! Fusion math on hand-computed kernels.

use mobileone_rs::fuse::{self as fusion, BatchNorm, Branches, ConvBn};
use mobileone_rs::BlockSpec;
use tch::{Kind, Tensor};

fn bn(gamma: &[f64], beta: &[f64], mean: &[f64], var: &[f64], eps: f64) -> BatchNorm {
    let t = |v: &[f64]| Tensor::from_slice(v);
    BatchNorm {
        weight: t(gamma),
        bias: t(beta),
        running_mean: t(mean),
        running_var: t(var),
        num_batches_tracked: None,
        momentum: Some(0.1),
        eps,
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn bn_folds_into_kernel() {
    // std = sqrt(3 + 1) = 2, scale = 4 / 2 = 2, bias = 0.25 - 0.5 * 2 = -0.75.
    let kernel = Tensor::from_slice(&[1.5f64]).reshape([1, 1, 1, 1]);
    let (k, b) = fusion::fuse_bn_into_kernel(
        &kernel,
        &bn(&[4.0], &[0.25], &[0.5], &[3.0], 1.0),
        Kind::Double,
    )
    .unwrap();
    assert_eq!(values(&k), vec![3.0]);
    assert_eq!(values(&b), vec![-0.75]);
}

#[test]
fn one_by_one_kernel_pads_to_centre() {
    let kernel = Tensor::from_slice(&[7.0f64]).reshape([1, 1, 1, 1]);
    let padded = fusion::pad_kernel_to(&kernel, 5).unwrap();
    assert_eq!(padded.size(), vec![1, 1, 5, 5]);
    let v = values(&padded);
    assert_eq!(v[12], 7.0);
    assert_eq!(v.iter().sum::<f64>(), 7.0);
}

#[test]
fn identity_kernel_for_groups() {
    // 4 channels in 2 groups: channel i reads input i % 2 of its group, at the centre tap.
    let like = Tensor::zeros([4], (Kind::Double, tch::Device::Cpu));
    let k = fusion::identity_kernel(4, 2, 3, &like, Kind::Double).unwrap();
    assert_eq!(k.size(), vec![4, 2, 3, 3]);
    let v = values(&k);
    for i in 0..4usize {
        for j in 0..2usize {
            for tap in 0..9usize {
                let expected = if j == i % 2 && tap == 4 { 1.0 } else { 0.0 };
                assert_eq!(v[(i * 2 + j) * 9 + tap], expected, "i={i} j={j} tap={tap}");
            }
        }
    }
}

#[test]
fn depthwise_block_kernel_by_hand() {
    // One channel, 3x3 depthwise: conv kernel all 1 (BN identity-ish), scale 2 (BN scale 0.5),
    // skip BN scale 3: centre = 1 + 2 * 0.5 + 3 = 5, other taps 1; bias = 1 + 2 + (-1).
    let spec = BlockSpec {
        in_channels: 1,
        out_channels: 1,
        groups: 1,
        ..BlockSpec::default()
    };
    let conv = ConvBn {
        weight: Tensor::ones([1, 1, 3, 3], (Kind::Double, tch::Device::Cpu)),
        bn: bn(&[1.0], &[1.0], &[0.0], &[1.0], 0.0),
    };
    let scale = ConvBn {
        weight: Tensor::from_slice(&[2.0f64]).reshape([1, 1, 1, 1]),
        bn: bn(&[2.0], &[3.0], &[1.0], &[16.0], 0.0),
    };
    let skip = bn(&[3.0], &[2.0], &[1.0], &[1.0], 0.0);
    let branches = Branches {
        conv: vec![conv],
        scale: Some(scale),
        skip: Some(skip),
    };
    let (k, b) = fusion::fused_kernel_bias(&spec, &branches).unwrap();
    let v = values(&k);
    assert_eq!(v[4], 5.0);
    assert_eq!(v.iter().sum::<f64>(), 13.0);
    // biases: conv 1, scale 3 - 1 * 0.5 = 2.5, skip 2 - 1 * 3 = -1.
    assert_eq!(values(&b), vec![2.5]);
}

#[test]
fn half_weights_fuse_in_float32_and_come_back_half() {
    let spec = BlockSpec {
        in_channels: 1,
        out_channels: 1,
        kernel_size: 1,
        padding: 0,
        ..BlockSpec::default()
    };
    let mut norm = bn(&[1.0], &[0.0], &[0.0], &[1e-8], 0.0);
    norm.weight = norm.weight.to_kind(Kind::Half);
    let conv = ConvBn {
        weight: Tensor::from_slice(&[1.0f32])
            .reshape([1, 1, 1, 1])
            .to_kind(Kind::Half),
        bn: norm,
    };
    let branches = Branches {
        conv: vec![conv],
        scale: None,
        skip: None,
    };
    let (k, _) = fusion::fused_kernel_bias(&spec, &branches).unwrap();
    assert_eq!(k.kind(), Kind::Half);
    // 1 / sqrt(1e-8) = 1e4 fits half; computed in half, 1e-8 would underflow to 0 and give inf.
    assert!((values(&k)[0] - 1e4).abs() < 8.0);
}
