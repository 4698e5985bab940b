//! What the dispatcher sees: every child module's tensors and attributes as the shells read them
//! at call time, and the facts about the call (grad mode, autocast, tracing, ...) that only
//! Python can observe. Nothing here decides; `forward::choose` does.

use tch::Tensor;

use crate::spec::BlockSpec;

/// An `nn.Conv2d` child: its tensors and every attribute its forward reads.
#[derive(Debug)]
pub struct ConvState {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: Vec<i64>,
    /// `None` when the padding is a string (`"same"`, `"valid"`).
    pub padding: Option<Vec<i64>>,
    pub dilation: Vec<i64>,
    pub groups: i64,
    /// `padding_mode == "zeros"`.
    pub zeros_padding: bool,
    /// Exactly `nn.Conv2d`, no hooks, plain tensors.
    pub plain: bool,
}

impl ConvState {
    /// Whether this conv computes `conv2d(x, weight, bias, stride, padding, dilation, groups)`
    /// with the given geometry (square) and, when `bias` is set, carries a bias.
    pub fn has_geometry(
        &self,
        stride: i64,
        padding: i64,
        dilation: i64,
        groups: i64,
        bias: bool,
    ) -> bool {
        self.stride == [stride, stride]
            && self.padding.as_deref() == Some(&[padding, padding][..])
            && self.dilation == [dilation, dilation]
            && self.groups == groups
            && self.zeros_padding
            && self.bias.is_some() == bias
    }
}

/// A BatchNorm's `momentum` attribute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Momentum {
    /// `None`: a cumulative moving average.
    Cumulative,
    /// A number.
    Value(f64),
    /// Anything else (a tensor, a string): only the module path models it.
    Other,
}

/// An `nn.BatchNorm2d` child.
#[derive(Debug)]
pub struct BnState {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub running_mean: Option<Tensor>,
    pub running_var: Option<Tensor>,
    pub num_batches_tracked: Option<Tensor>,
    pub momentum: Momentum,
    /// `None` when `eps` is not a number.
    pub eps: Option<f64>,
    /// `None` when the attribute is not a bool (the fast paths refuse it).
    pub training: Option<bool>,
    /// `None` when the attribute is not a bool (the fast paths refuse it).
    pub track_running_stats: Option<bool>,
    /// Exactly `nn.BatchNorm2d`, no hooks, plain tensors.
    pub plain: bool,
}

/// A conv+BN branch (`nn.Sequential` of `conv` and `bn`).
#[derive(Debug)]
pub struct BranchState {
    pub conv: ConvState,
    pub bn: BnState,
    /// Exactly `nn.Sequential` of those two children, no hooks.
    pub plain: bool,
}

/// The block's `se` child.
#[derive(Debug)]
pub enum SeState {
    /// `nn.Identity` (`plain`: exactly that type, no hooks).
    Absent { plain: bool },
    /// Our `SEBlock` (`plain`: exactly that type, no hooks).
    Present {
        reduce: Box<ConvState>,
        expand: Box<ConvState>,
        plain: bool,
    },
    /// Anything else (the reason names it).
    Opaque(String),
}

/// What the block holds: its train-time branches, or the fused conv.
#[derive(Debug)]
pub enum Body {
    Branches {
        conv: Vec<BranchState>,
        scale: Option<Box<BranchState>>,
        skip: Option<Box<BnState>>,
    },
    Fused(Box<ConvState>),
    /// A child the shell could not describe (the reason names it): the module path.
    Opaque(String),
}

/// A `MobileOneBlock` as its forward sees it.
#[derive(Debug)]
pub struct BlockState {
    pub spec: BlockSpec,
    pub body: Body,
    pub se: SeState,
    /// `activation` is exactly `nn.ReLU`, no hooks.
    pub activation_plain: bool,
}

/// The block's fast-path options (constructor arguments, attributes, or a scope's override).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Any fast path at all; off means the reference's module path always.
    pub fast: bool,
    /// Depthwise blocks off the CPU kernel (CUDA, or `cpu_kernel` off) train without storing
    /// branch outputs, at the cost of time; off (the default) runs the module path there.
    pub low_memory: bool,
    /// The CPU kernels of depthwise blocks (training, and float32 inference).
    pub cpu_kernel: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fast: true,
            low_memory: false,
            cpu_kernel: true,
        }
    }
}

/// Facts about the call that Python observes and the dispatcher weighs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Env {
    pub grad_enabled: bool,
    pub inference_mode: bool,
    pub autocast: bool,
    pub jit_tracing: bool,
    pub functorch: bool,
    pub dispatch_mode: bool,
    pub function_mode: bool,
    pub saved_tensor_hooks: bool,
    pub forward_ad: bool,
    pub global_hooks: bool,
    /// A torch function or stock module method the module path would call was replaced
    /// (`nn.BatchNorm2d.forward = ...`, `F.conv2d = ...`).
    pub patched_torch: bool,
    /// The input is not exactly `torch.Tensor` (a subclass: FakeTensor, a wrapper, a Parameter).
    pub input_subclass: bool,
    pub options: Options,
}
