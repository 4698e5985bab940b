//! The cost rule: whether a fast path that is exact for a block's state is also expected to be
//! faster than the module path (the reference's forward, module by module) on the call's sizes.
//!
//! A pure function of the candidate path, the block's spec and the input's sizes and layout: no
//! tensor is read and nothing is timed at call time. Each path's work is counted in units of one
//! float32 multiply-add of libtorch's conv (the module path's own currency), with weights fitted
//! to side-by-side medians measured on this project's 2-core x86-64 VM (bench/bench.py's model
//! rows keep them honest):
//!
//! - `train_gram` runs its four long products (the Gram matrix, `grad . x^T`, the two halves of
//!   the input gradient) in float64 and `~3 C_in^2 C_out` per branch on top, independent of the
//!   batch; the module path runs `3 C_in C_out` per value per branch. So the Gram path wins only
//!   with several branches and `N H W` well above `C_in` (s0's 4 branches; never with one). On
//!   CUDA, where float64 runs at a fraction of float32's rate on most GPUs, it is refused.
//! - `train_depthwise_cpu` works in float64 on `k^2` patch moments per output; the module path's
//!   depthwise convs are cheap per tap, so large kernels (k = 7) with one branch lose, and so do
//!   small planes (14x14 and below), where the module path's convs and BNs run from cache: with one
//!   branch the kernel needs planes of about 90x90, with four about 27x27 (tiny inputs aside,
//!   where the module path's op calls dominate).
//! - `train_depthwise` recomputes every branch in its backward (1.9x the module path's time on
//!   the CPU, k = 3; the YOLOv9-C-MobileOne training step 1.7-3.1x the reference's on an H200):
//!   it saves memory, not time, and runs only where the options ask for that trade
//!   (`low_memory=True`, off by default); the rule lets it run then.
//! - `folded`, `fused`: one conv instead of every branch's conv and BN: never slower on the CPU.
//!   On CUDA, at launch-bound sizes, the fold's small ops and the finiteness check's device sync
//!   made the unfused eval forward 2.4x the reference (H200): `folded` is refused there.
//! - `folded_cpu`, `fused_cpu`: the CPU kernel reads and writes contiguous NCHW; on a
//!   channels_last input it would copy the input and hand NCHW to the next layer, so libtorch's
//!   conv (`folded`, `fused`), which keeps channels_last, is taken instead. It also gives way to
//!   libtorch's conv where many channels meet small maps ([`cpu_kernel_conv_pays`]).

use super::Path;
use crate::spec::BlockSpec;
use crate::train::TrainPath;

/// The sizes and layout of a block's input, as the cost rule sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    pub n: i64,
    pub c: i64,
    pub h: i64,
    pub w: i64,
    /// The input (or the block's weights) is channels_last: the layout the next layer expects.
    pub channels_last: bool,
    /// The input is on a CUDA device (the weights fitted here are the CPU's).
    pub cuda: bool,
}

impl Input {
    /// The input of `size` (`[N, C, H, W]`) and its `strides`: channels_last when the channels are
    /// the innermost dimension of more than one channel and the tensor is not plain NCHW. `cuda`
    /// is left false for the caller to set.
    pub fn of(size: &[i64], strides: &[i64]) -> Input {
        let [n, c, h, w] = size[..] else {
            return Input {
                n: 0,
                c: 0,
                h: 0,
                w: 0,
                channels_last: false,
                cuda: false,
            };
        };
        let channels_last = strides.len() == 4 && c > 1 && strides[1] == 1 && strides[3] != 1;
        Input {
            n,
            c,
            h,
            w,
            channels_last,
            cuda: false,
        }
    }
}

/// The cost rule's verdict on a candidate path.
#[derive(Debug, Clone, PartialEq)]
pub enum Cost {
    /// Take the candidate path.
    Faster,
    /// Take this other fast path (as exact for the same state) instead; the reason says why.
    Instead(Path, String),
    /// Take the module path: the candidate is expected to be slower; the reason says why.
    Slower(String),
}

/// A training path runs only below this fraction of the module path's modelled work: below 1,
/// so that a path the model calls even is refused (the bench's rule is "never above 1.0"). The
/// Gram path's weights fit the measurements within ~10%, the depthwise kernel's within ~25%.
const GRAM_MARGIN: f64 = 0.9;
const DEPTHWISE_MARGIN: f64 = 0.8;

/// The cost rule for `path` on a block of `spec` and an input of `input`'s sizes and layout.
pub fn judge(path: Path, spec: &BlockSpec, input: &Input) -> Cost {
    match path {
        Path::Folded if input.cuda => Cost::Slower(
            "on CUDA the fold's many small ops and the finiteness check's device sync cost more \
             than the branches (the unfused eval forward measured 2.4x the reference on an H200)"
                .into(),
        ),
        Path::Module | Path::Folded | Path::Fused => Cost::Faster,
        Path::FoldedCpu | Path::FusedCpu if input.channels_last => Cost::Instead(
            if path == Path::FoldedCpu {
                Path::Folded
            } else {
                Path::Fused
            },
            "channels_last input: libtorch's conv keeps the layout, the CPU kernel would copy to \
             NCHW and return NCHW"
                .into(),
        ),
        Path::FoldedCpu | Path::FusedCpu if !cpu_kernel_conv_pays(input) => Cost::Instead(
            if path == Path::FoldedCpu {
                Path::Folded
            } else {
                Path::Fused
            },
            format!(
                "{} planes of {}x{}: libtorch's depthwise conv is faster than the CPU kernel there",
                input.n * input.c,
                input.h,
                input.w
            ),
        ),
        Path::FoldedCpu | Path::FusedCpu => Cost::Faster,
        Path::Train(TrainPath::DepthwiseCpu) if input.channels_last => Cost::Slower(
            "channels_last input: the CPU kernel would copy it to NCHW and return NCHW".into(),
        ),
        // Asked for by `low_memory=True` (off by default): it trades time for memory, which is
        // the option's promise (measured: 1.9x the module path's time on the CPU; the YOLOv9-C
        // MobileOne training step 1.7-3.1x the reference's on an H200).
        Path::Train(TrainPath::DepthwiseRecompute) => Cost::Faster,
        Path::Train(TrainPath::Gram) if input.cuda => Cost::Slower(
            "train_gram runs its long products in float64, which most GPUs run at a small \
             fraction of float32's rate"
                .into(),
        ),
        Path::Train(train) => compare(train, spec, input),
    }
}

/// At most this many planes (`N * C`) for the inference kernel on any map size.
const CPU_CONV_MAX_PLANES: i64 = 64;
/// From this many input values on, the inference kernel beats libtorch's depthwise conv whatever
/// the shape.
const CPU_CONV_MIN_VALUES: i64 = 5 << 20;

/// Whether the float32 inference kernel (`folded_cpu`, `fused_cpu`) is expected to beat libtorch's
/// depthwise conv. Measured side by side (k = 3, fused block, medians of 3x30 calls, this
/// project's 2-core VM, torch 2.13): the kernel's per-channel fixed costs lose where many channels
/// meet small maps (512 channels at 14x14, batch 1: 1.6x libtorch's time; batch 8 at 7x7-28x28:
/// 1.5-5x), and it wins with few planes (batch 1 with 32-64 channels: 0.4-0.97 at 7x7 to
/// 112x112) and on large inputs, where libtorch slows down (6.4M values and up: 0.17-0.52).
/// Between those the two are within noise or libtorch wins (3.2M values: 0.17-1.85): libtorch.
fn cpu_kernel_conv_pays(input: &Input) -> bool {
    let planes = input.n * input.c;
    planes <= CPU_CONV_MAX_PLANES || planes * input.h * input.w >= CPU_CONV_MIN_VALUES
}

/// Module-path work against the training path's, both in conv multiply-adds.
fn compare(path: TrainPath, spec: &BlockSpec, input: &Input) -> Cost {
    let (module, fast, margin) = match path {
        TrainPath::Gram => (
            module_train_work(spec, input),
            gram_work(spec, input),
            GRAM_MARGIN,
        ),
        _ => {
            let (_, bns) = branch_counts(spec);
            let module = module_train_work(spec, input) + MODULE_CALL_OVERHEAD * bns;
            (module, depthwise_cpu_work(spec, input), DEPTHWISE_MARGIN)
        }
    };
    if fast <= margin * module {
        return Cost::Faster;
    }
    Cost::Slower(format!(
        "{} would do about {:.2}x the module path's work on {}x{}x{}x{} (it runs below {margin}x)",
        path.name(),
        fast / module,
        input.n,
        input.c,
        input.h,
        input.w
    ))
}

/// `(conv branches, BN branches)`: every conv branch plus the scale; and those plus the skip.
fn branch_counts(spec: &BlockSpec) -> (f64, f64) {
    let convs = spec.num_conv_branches + i64::from(spec.has_scale());
    (convs as f64, (convs + i64::from(spec.has_skip())) as f64)
}

/// Output positions per image batch: `N H' W'`.
fn outputs(spec: &BlockSpec, input: &Input) -> f64 {
    let out = |d: i64| spec.output_size(d).unwrap_or(0) as f64;
    input.n as f64 * out(input.h) * out(input.w)
}

/// Per conv call and output value, the module path's passes over memory (im2col, the conv's
/// output, its gradient), in conv multiply-adds.
const MODULE_CONV_PASSES: f64 = 10.0;
/// Per output value and BN branch, the module path's elementwise work (BN forward and backward,
/// the branch sum), in conv multiply-adds.
const MODULE_ELEMENTWISE: f64 = 3.0;

/// The module path's training step: every branch's conv forward, input and weight gradients
/// (`3 x` the forward's multiply-adds and passes; the scale's conv has one tap), and its BN.
fn module_train_work(spec: &BlockSpec, input: &Input) -> f64 {
    let m = outputs(spec, input) * spec.out_channels as f64;
    let per_group = (spec.in_channels / spec.groups.max(1)) as f64;
    let taps = (spec.kernel_size * spec.kernel_size) as f64;
    let (convs, bns) = branch_counts(spec);
    let macs =
        per_group * (spec.num_conv_branches as f64 * taps + f64::from(u8::from(spec.has_scale())));
    3.0 * m * (macs + convs * MODULE_CONV_PASSES) + MODULE_ELEMENTWISE * m * bns
}

/// A float64 multiply-add of a long product, in conv multiply-adds.
const WIDE_MAC: f64 = 1.5;
/// A float64 multiply-add of the small `C x C` products, in conv multiply-adds.
const SMALL_MAC: f64 = 2.0;
/// Per input and output value, the Gram path's float64 copies and centring passes.
const GRAM_ELEMENTWISE: f64 = 12.0;

/// The Gram path: four float64 products of length `N H W` (`2 C (C + O)` per value), one float32
/// conv, `~3 C^2 O` float64 per branch for the statistics and gradients, float64 copies.
fn gram_work(spec: &BlockSpec, input: &Input) -> f64 {
    let m = outputs(spec, input);
    let (c, o) = (spec.in_channels as f64, spec.out_channels as f64);
    let (_, bns) = branch_counts(spec);
    WIDE_MAC * 2.0 * c * (c + o) * m
        + c * o * m
        + SMALL_MAC * 3.0 * bns * o * c * c
        + GRAM_ELEMENTWISE * m * (c + o)
}

/// Per output value and unit of the kernel's work below, its float64 work in conv multiply-adds,
/// on an output plane of [`PLANE_REF`] values.
const PATCH_MAC: f64 = 1.33;
/// The output plane (`H' W'`) the kernel's work is calibrated on (112x112).
const PLANE_REF: f64 = 12544.0;
/// How the kernel's work per value grows as planes shrink, against the module path's (whose convs
/// and BNs stay in cache on small planes): `(PLANE_REF / plane)^PLANE_EXP`. Fitted to side-by-side
/// medians of k = 3 training steps, 1 and 4 branches, 7x7 to 112x112 planes, 0.2M to 6.4M values
/// (this project's 2-core VM): the kernel measured 0.56-0.66x the module path at 112x112 with one
/// branch but 3.2-3.7x at 14x14 and 5-7.9x at 7x7 (4 branches: 0.26-0.33, 1.4-1.6, 3.1-3.5).
const PLANE_EXP: f64 = 0.42;
/// The module path's fixed cost per BN branch and call (its op calls), in conv multiply-adds: what
/// makes the kernel win on tiny inputs whatever their planes (1K-6K values: 0.4-0.8x).
const MODULE_CALL_OVERHEAD: f64 = 0.8e6;

/// The depthwise CPU kernel: per channel and output position, the patch moments (at stride 1 one
/// product per tap offset, `(k^2 + 1) / 2 + k (k - 1) / 2`, else half of every tap pair), the
/// folded conv (`k^2`), the gradient sums (`k^2`) and the input gradient (`(2k - 1)^2` at stride
/// 1, else half of `k^2 (k^2 + 1)`: the strided passes run shorter rows), all in float64.
fn depthwise_cpu_work(spec: &BlockSpec, input: &Input) -> f64 {
    let m = outputs(spec, input) * spec.in_channels as f64;
    let k = spec.kernel_size as f64;
    let taps = k * k;
    let (moments, dx) = if spec.stride == 1 {
        (
            (taps + 1.0) / 2.0 + k * (k - 1.0) / 2.0,
            (2.0 * k - 1.0).powi(2),
        )
    } else {
        (taps * (taps + 1.0) / 4.0, taps * (taps + 1.0) / 2.0)
    };
    let plane = (outputs(spec, input) / input.n.max(1) as f64).max(1.0);
    PATCH_MAC * m * (moments + 2.0 * taps + dx) * (PLANE_REF / plane).powf(PLANE_EXP)
}
