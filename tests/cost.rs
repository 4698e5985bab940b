//! The cost rule: a fast path runs only where it is expected to beat the module path.

use mobileone_rs::forward::cost::{judge, Cost, Input};
use mobileone_rs::forward::Path;
use mobileone_rs::train::TrainPath;
use mobileone_rs::BlockSpec;

fn pointwise(c_in: i64, c_out: i64, branches: i64) -> BlockSpec {
    BlockSpec {
        in_channels: c_in,
        out_channels: c_out,
        kernel_size: 1,
        padding: 0,
        num_conv_branches: branches,
        ..BlockSpec::default()
    }
}

fn depthwise(channels: i64, k: i64, stride: i64, branches: i64) -> BlockSpec {
    BlockSpec {
        in_channels: channels,
        out_channels: channels,
        kernel_size: k,
        stride,
        padding: k / 2,
        groups: channels,
        num_conv_branches: branches,
        ..BlockSpec::default()
    }
}

fn nchw(n: i64, c: i64, h: i64, w: i64) -> Input {
    Input {
        n,
        c,
        h,
        w,
        channels_last: false,
        cuda: false,
    }
}

fn channels_last(n: i64, c: i64, h: i64, w: i64) -> Input {
    Input {
        channels_last: true,
        ..nchw(n, c, h, w)
    }
}

const GRAM: Path = Path::Train(TrainPath::Gram);
const DEPTHWISE_CPU: Path = Path::Train(TrainPath::DepthwiseCpu);

fn slower(cost: &Cost) -> bool {
    matches!(cost, Cost::Slower(_))
}

/// Both CPU-kernel eval paths hand the block to libtorch's conv on the same folded/fused kernel.
fn gives_way_to_libtorch(spec: &BlockSpec, x: &Input) -> bool {
    matches!(
        judge(Path::FusedCpu, spec, x),
        Cost::Instead(Path::Fused, _)
    ) && matches!(
        judge(Path::FoldedCpu, spec, x),
        Cost::Instead(Path::Folded, _)
    )
}

#[test]
fn gram_runs_with_four_branches_and_many_values_per_channel() {
    // s0's stage 1 pointwise block at 224, batch 8: 8x56x56 values per channel, 48 channels.
    assert_eq!(
        judge(GRAM, &pointwise(48, 48, 4), &nchw(8, 48, 56, 56)),
        Cost::Faster
    );
    assert_eq!(
        judge(GRAM, &pointwise(64, 64, 4), &nchw(8, 64, 28, 28)),
        Cost::Faster
    );
}

#[test]
fn gram_is_refused_where_values_per_channel_are_not_well_above_channels() {
    // YOLOv9's S4 P5 pointwise block: 896 -> 2048 at 20x20, batch 2 (800 values per channel).
    let cost = judge(GRAM, &pointwise(896, 2048, 1), &nchw(2, 896, 20, 20));
    let Cost::Slower(why) = cost else {
        panic!("expected a refusal, got {cost:?}")
    };
    assert!(
        why.contains("train_gram") && why.contains("2x896x20x20"),
        "{why}"
    );
    // Four branches do not save it either: 256 channels on 2x4x4 values.
    assert!(slower(&judge(
        GRAM,
        &pointwise(256, 512, 4),
        &nchw(2, 256, 4, 4)
    )));
}

#[test]
fn gram_is_refused_on_cuda() {
    let x = Input {
        cuda: true,
        ..nchw(8, 48, 56, 56)
    };
    assert!(slower(&judge(GRAM, &pointwise(48, 48, 4), &x)));
    assert_eq!(judge(Path::Fused, &pointwise(48, 48, 4), &x), Cost::Faster);
}

#[test]
fn folding_on_the_fly_is_refused_on_cuda_only() {
    let x = nchw(16, 64, 160, 160);
    let cuda = Input { cuda: true, ..x };
    assert_eq!(judge(Path::Folded, &pointwise(64, 64, 4), &x), Cost::Faster);
    assert!(slower(&judge(Path::Folded, &pointwise(64, 64, 4), &cuda)));
}

#[test]
fn gram_is_refused_with_one_branch_at_any_size() {
    // s1..s4 have one conv branch: the module path runs one conv, the Gram path four products.
    for m in [14, 56, 112, 224] {
        assert!(
            slower(&judge(GRAM, &pointwise(192, 192, 1), &nchw(8, 192, m, m))),
            "{m}"
        );
    }
}

#[test]
fn depthwise_cpu_runs_for_small_kernels_and_is_refused_for_large_ones_with_one_branch() {
    let x = nchw(8, 96, 56, 56);
    // measured: 4 branches 0.45x the module path; one branch at 112x112 0.56-0.66x
    assert_eq!(
        judge(DEPTHWISE_CPU, &depthwise(96, 3, 1, 4), &x),
        Cost::Faster
    );
    assert_eq!(
        judge(
            DEPTHWISE_CPU,
            &depthwise(64, 3, 1, 1),
            &nchw(8, 64, 112, 112)
        ),
        Cost::Faster
    );
    assert_eq!(
        judge(DEPTHWISE_CPU, &depthwise(96, 5, 1, 4), &x),
        Cost::Faster
    );
    assert!(slower(&judge(DEPTHWISE_CPU, &depthwise(96, 7, 1, 1), &x)));
    // k = 5 with one branch measured 0.7-1.3x the module path: too close to call, refused.
    assert!(slower(&judge(DEPTHWISE_CPU, &depthwise(96, 5, 1, 1), &x)));
    // one branch at 56x56 measured 0.87-1.26x: refused
    assert!(slower(&judge(DEPTHWISE_CPU, &depthwise(96, 3, 1, 1), &x)));
}

#[test]
fn depthwise_cpu_is_refused_on_small_planes_of_real_sizes_and_runs_on_tiny_inputs() {
    // timm's s1-s4 at 224, batch 8: 512 channels at 14x14 measured 3.2-3.5x (one branch), 1.5-1.7x
    // (four); 192 channels at 28x28, one branch, 1.9x
    for (branches, x) in [
        (1, nchw(8, 512, 14, 14)),
        (4, nchw(8, 512, 14, 14)),
        (1, nchw(8, 192, 28, 28)),
        (4, nchw(8, 1024, 7, 7)),
    ] {
        let cost = judge(DEPTHWISE_CPU, &depthwise(x.c, 3, 1, branches), &x);
        assert!(slower(&cost), "{branches} branches, {x:?}: {cost:?}");
    }
    // measured 0.37-0.62x: the module path's op calls dominate tiny inputs
    for (branches, x) in [
        (1, nchw(2, 8, 7, 6)),
        (4, nchw(2, 8, 7, 6)),
        (4, nchw(2, 16, 14, 14)),
    ] {
        let cost = judge(DEPTHWISE_CPU, &depthwise(x.c, 3, 1, branches), &x);
        assert_eq!(cost, Cost::Faster, "{branches} branches, {x:?}");
    }
}

#[test]
fn cpu_kernels_give_way_to_libtorch_on_channels_last() {
    let (spec, x) = (depthwise(64, 3, 1, 4), channels_last(1, 64, 56, 56));
    assert!(gives_way_to_libtorch(&spec, &x));
    assert!(slower(&judge(DEPTHWISE_CPU, &spec, &x)));
    let nchw = nchw(1, 64, 56, 56);
    assert_eq!(judge(Path::FusedCpu, &spec, &nchw), Cost::Faster);
    assert_eq!(judge(Path::FoldedCpu, &spec, &nchw), Cost::Faster);
}

#[test]
fn the_inference_kernel_gives_way_where_many_channels_meet_small_maps() {
    // measured: 512 channels at 14x14, batch 1: 1.6x libtorch's time; batch 8, 128 channels, 14x14: 2x
    for x in [
        nchw(1, 512, 14, 14),
        nchw(8, 128, 14, 14),
        nchw(2, 256, 28, 28),
    ] {
        assert!(gives_way_to_libtorch(&depthwise(x.c, 3, 1, 4), &x), "{x:?}");
    }
    // few planes (batch 1, 32-64 channels: 0.4-0.97) and large inputs (0.17-0.52) keep it
    for x in [
        nchw(1, 64, 28, 28),
        nchw(2, 32, 7, 7),
        nchw(1, 512, 112, 112),
        nchw(8, 64, 112, 112),
    ] {
        assert_eq!(
            judge(Path::FusedCpu, &depthwise(x.c, 3, 1, 4), &x),
            Cost::Faster
        );
    }
}

#[test]
fn one_conv_eval_paths_always_run() {
    for (spec, x) in [
        (pointwise(896, 2048, 1), nchw(1, 896, 1, 1)),
        (depthwise(64, 7, 2, 1), channels_last(1, 64, 3, 3)),
    ] {
        assert_eq!(judge(Path::Fused, &spec, &x), Cost::Faster);
        assert_eq!(judge(Path::Folded, &spec, &x), Cost::Faster);
    }
}

#[test]
fn channels_last_is_read_from_the_strides() {
    let size = [2, 8, 5, 6];
    assert!(!Input::of(&size, &[240, 30, 6, 1]).channels_last);
    assert!(Input::of(&size, &[240, 1, 48, 8]).channels_last);
    // One channel: both layouts are the same memory.
    assert!(!Input::of(&[2, 1, 5, 6], &[30, 1, 6, 1]).channels_last);
    assert_eq!(Input::of(&[3, 4], &[4, 1]), nchw(0, 0, 0, 0));
}
