//! The one dispatcher: from the complete state of a block and of the call, it picks the path a
//! forward takes and returns a [`Plan`] that runs it.
//!
//! A fast path runs only where it provably equals the reference's module-by-module forward for
//! the whole state: every child's exact type, forward, hooks and attributes (each BN's own
//! training flag, `track_running_stats`, eps, momentum; each conv's stride, padding, dilation,
//! groups, padding mode, bias and shapes), the input (dtype, device, layout, sizes, finiteness)
//! and the call (grad mode, autocast, tracing, functorch, dispatch modes, saved-tensor hooks,
//! forward AD), and only where it is expected to be faster (`cost`). Anything else takes the
//! module path, which the Python shell runs. `state` holds what the shells observe, `checks` the
//! per-child conditions, `decision` their answer type, `eval` the fused and folded forwards,
//! `se` the squeeze-excite ops.

mod checks;
pub mod cost;
pub mod decision;
pub mod eval;
pub mod se;
pub mod state;

use tch::{Device, Kind, Tensor};

use crate::error::{config, Result};
use crate::fuse::{self, Branches};
use crate::spec::BlockSpec;
use crate::train::{self, TrainForward, TrainPath};
use checks::Ctx;
use decision::{fast, Decision, Refusal};
use se::SqueezeExcite;
use state::{BlockState, Body, Env, SeState};

/// Every path a block's forward can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The reference's forward, module by module (run by the Python shell).
    Module,
    /// An exact no-branch-storage training path (run by the shell's autograd Function).
    Train(TrainPath),
    /// Unfused, every BN on running statistics: one conv folded on the fly.
    Folded,
    /// As `Folded`, the conv on the CPU kernel (float32 depthwise, no gradient wanted).
    FoldedCpu,
    /// Re-parameterized: the one conv.
    Fused,
    /// As `Fused`, on the CPU kernel.
    FusedCpu,
}

impl Path {
    /// The name `MobileOneBlock.forward_path` reports.
    pub fn name(self) -> &'static str {
        match self {
            Path::Module => "module",
            Path::Train(path) => path.name(),
            Path::Folded => "folded",
            Path::FoldedCpu => "folded_cpu",
            Path::Fused => "fused",
            Path::FusedCpu => "fused_cpu",
        }
    }
}

/// What a fast path runs on: the checked tensors, nothing re-read later.
#[derive(Debug)]
pub enum Work {
    Module,
    Train {
        path: TrainPath,
        branches: Branches,
    },
    Folded {
        branches: Branches,
        /// The one conv the branches fold into, computed once the path is chosen.
        kernel: Option<(Tensor, Tensor)>,
        cpu: bool,
    },
    Fused {
        weight: Tensor,
        bias: Tensor,
        cpu: bool,
    },
}

impl Work {
    fn path(&self) -> Path {
        match self {
            Work::Module => Path::Module,
            Work::Train { path, .. } => Path::Train(*path),
            Work::Folded { cpu: false, .. } => Path::Folded,
            Work::Folded { cpu: true, .. } => Path::FoldedCpu,
            Work::Fused { cpu: false, .. } => Path::Fused,
            Work::Fused { cpu: true, .. } => Path::FusedCpu,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Work::Module => "the module path",
            Work::Train { .. } => "every BN trains: the exact no-branch-storage path",
            Work::Folded { .. } => "every BN is in eval mode: the branches folded into one conv",
            Work::Fused { .. } => "re-parameterized: one conv",
        }
    }
}

/// The dispatcher's verdict for one call: the path, why, and everything the path runs on.
#[derive(Debug)]
pub struct Plan {
    /// The block as this call sees it (`num_conv_branches` as read now).
    pub spec: BlockSpec,
    pub work: Work,
    pub reason: String,
    pub se: Option<SqueezeExcite>,
    /// The input's sizes the plan was checked for.
    pub input_size: Vec<i64>,
    /// The input's dtype (`None`: one tch cannot name) and device the plan was checked for.
    pub input_type: (Option<Kind>, Device),
}

impl Plan {
    /// The path this plan takes.
    pub fn path(&self) -> Path {
        self.work.path()
    }

    /// Runs an eval path (`Folded`, `FoldedCpu`, `Fused`, `FusedCpu`) on `x`.
    pub fn run_eval(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let se = self.se.as_ref();
        match &self.work {
            Work::Folded {
                kernel: Some((weight, bias)),
                cpu,
                ..
            } => eval::forward_fused(&self.spec, weight, bias, se, x, *cpu),
            Work::Folded { branches, cpu, .. } => {
                eval::forward_folded(&self.spec, branches, se, x, *cpu)
            }
            Work::Fused { weight, bias, cpu } => {
                eval::forward_fused(&self.spec, weight, bias, se, x, *cpu)
            }
            _ => Err(config(format!(
                "{} is not an eval path",
                self.path().name()
            ))),
        }
    }

    /// The exact train-time branch sum (before SE and ReLU), updating the running statistics;
    /// `None` when the batch statistics are not finite (nothing was updated).
    pub fn train_forward(&self, x: &Tensor) -> Result<Option<TrainForward>> {
        self.check_input(x)?;
        let (path, branches) = self.training()?;
        train::forward(&self.spec, branches, x, path)
    }

    /// The gradients of [`Plan::train_forward`]: input, then per branch kernel, BN weight, BN
    /// bias; `None` when `grad` or `saved` do not fit.
    pub fn train_backward(
        &self,
        grad: &Tensor,
        x: &Tensor,
        saved: &[Tensor],
    ) -> Result<Option<Vec<Tensor>>> {
        self.check_input(x)?;
        let (path, branches) = self.training()?;
        train::backward(&self.spec, branches, x, saved, grad, path)
    }

    /// The trainable tensors of a training plan, in the order of the backward's gradients.
    pub fn parameters(&self) -> Result<Vec<&Tensor>> {
        let (_, branches) = self.training()?;
        Ok(train::parameters(branches))
    }

    /// Each branch's BN eps, in the order of [`Plan::parameters`]' branches.
    pub fn batch_norm_eps(&self) -> Result<Vec<f64>> {
        let (_, branches) = self.training()?;
        Ok(branches.batch_norms().map(|b| b.eps).collect())
    }

    /// SE (when the block has one) then ReLU, as the block applies them after its branch sum.
    pub fn activate(&self, y: Tensor) -> Result<Tensor> {
        se::activate(y, self.se.as_ref())
    }

    fn training(&self) -> Result<(TrainPath, &Branches)> {
        match &self.work {
            Work::Train { path, branches } => Ok((*path, branches)),
            _ => Err(config(format!(
                "{} is not a training path",
                self.path().name()
            ))),
        }
    }

    /// The plan runs only on an input of the size, dtype and device it was checked for.
    fn check_input(&self, x: &Tensor) -> Result<()> {
        if x.size() != self.input_size {
            return Err(config(format!(
                "the plan was made for an input of size {:?}, got {:?}",
                self.input_size,
                x.size()
            )));
        }
        if (x.f_kind().ok(), x.device()) != self.input_type {
            return Err(config(format!(
                "the plan was made for a {:?} input on {}, got {:?} on {}",
                self.input_type.0,
                crate::error::device_name(self.input_type.1),
                x.f_kind().ok(),
                crate::error::device_name(x.device())
            )));
        }
        Ok(())
    }
}

/// Why the call itself rules out every fast path, if it does.
fn env_reason(env: &Env) -> Option<&'static str> {
    let reasons = [
        (
            !env.options.fast,
            "fast paths are off for this block (fast=False or module_path())",
        ),
        (
            env.jit_tracing,
            "torch.jit.trace records the reference's torch-level graph",
        ),
        (
            env.functorch,
            "a torch.func transform (vmap, grad, jvp, ...) is active",
        ),
        (env.forward_ad, "forward-mode AD (a dual level) is active"),
        (env.dispatch_mode, "a TorchDispatchMode is active"),
        (env.function_mode, "a TorchFunctionMode is active"),
        (
            env.saved_tensor_hooks,
            "saved-tensor hooks are active (checkpointing, offloading)",
        ),
        (env.global_hooks, "global module hooks are registered"),
        (
            env.patched_torch,
            "a torch function or module method the module path calls was replaced",
        ),
        (env.autocast, "autocast is enabled for the input's device"),
        (
            env.input_subclass,
            "the input is a tensor subclass, not a plain torch.Tensor",
        ),
    ];
    reasons
        .into_iter()
        .find(|(hit, _)| *hit)
        .map(|(_, why)| why)
}

/// Picks the path of `block`'s forward on `x`. Errors only for inputs the block cannot take at
/// all (wrong rank, channels, dtype, device or size), with the package's clear messages.
pub fn choose(x: &Tensor, block: &BlockState, env: &Env) -> Result<Plan> {
    let (work, reason, se) = match decide(x, block, env)? {
        Decision::Fast((work, se)) => {
            let reason = work.reason().to_string();
            (work, reason, se)
        }
        Decision::Module(why) => (Work::Module, why.to_string(), None),
    };
    Ok(Plan {
        spec: block.spec,
        work,
        reason,
        se,
        input_size: x.size(),
        input_type: (x.f_kind().ok(), x.device()),
    })
}

fn decide(
    x: &Tensor,
    block: &BlockState,
    env: &Env,
) -> Result<Decision<(Work, Option<SqueezeExcite>)>> {
    if let Some(why) = env_reason(env) {
        return Ok(Decision::refuse(why));
    }
    if !block.activation_plain {
        return Ok(Decision::refuse(
            "activation is not torch's nn.ReLU with its own forward (or has hooks)",
        ));
    }
    let weight = match &block.body {
        Body::Opaque(why) => return Ok(Decision::refuse(why.clone())),
        Body::Fused(conv) => &conv.weight,
        Body::Branches { conv, .. } => match conv.first() {
            Some(branch) => &branch.conv.weight,
            None => return Ok(Decision::refuse("the block has no conv branch")),
        },
    };
    if is_exotic(x.device()) || is_exotic(weight.device()) {
        return Ok(Decision::refuse(
            "the input or weights are on a device the fast paths do not model",
        ));
    }
    block.spec.check_input(x, weight, false)?;
    fast!(checks::input(x, env));
    let ctx = Ctx {
        spec: &block.spec,
        x,
        kind: x.f_kind()?,
        device: x.device(),
        env,
    };
    let se = fast!(checks::se(&ctx, &block.se));
    let work = match &block.body {
        Body::Fused(conv) => fast!(checks::fused(&ctx, conv)),
        Body::Branches { conv, scale, skip } => fast!(checks::branches(
            &ctx,
            conv,
            scale.as_deref(),
            skip.as_deref()
        )),
        Body::Opaque(why) => return Ok(Decision::refuse(why.clone())),
    };
    // The cost rule first: the finiteness check reads the input (a device sync on CUDA), so it runs
    // only for the path that will run.
    let work = fast!(now by_cost(work, &block.spec, x, weight));
    let work = fold(work, &block.spec)?;
    fast!(finite_for_eval(&work, x));
    Ok(Decision::Fast((work, se)))
}

/// The work as the cost rule ([`cost::judge`]) leaves it: kept, moved from the CPU kernel to
/// libtorch's conv, or refused when the fast path is expected to be slower than the module path.
fn by_cost(work: Work, spec: &BlockSpec, x: &Tensor, weight: &Tensor) -> Decision<Work> {
    let mut input = cost::Input::of(&x.size(), &x.stride());
    input.channels_last |= cost::Input::of(&weight.size(), &weight.stride()).channels_last;
    input.cuda = x.device().is_cuda();
    match (cost::judge(work.path(), spec, &input), work) {
        (cost::Cost::Faster, work) => Decision::Fast(work),
        (cost::Cost::Instead(_, _), Work::Folded { branches, .. }) => {
            Decision::Fast(Work::Folded {
                branches,
                kernel: None,
                cpu: false,
            })
        }
        (cost::Cost::Instead(_, _), Work::Fused { weight, bias, .. }) => {
            Decision::Fast(Work::Fused {
                weight,
                bias,
                cpu: false,
            })
        }
        (cost::Cost::Instead(_, why) | cost::Cost::Slower(why), _) => {
            Decision::refuse(format!("expected slower than the module path: {why}"))
        }
    }
}

/// `Folded` work with its one conv computed now (differentiable, as the branches are): the
/// finiteness check then sees the kernel that will run, and the plan runs it.
fn fold(work: Work, spec: &BlockSpec) -> Result<Work> {
    Ok(match work {
        Work::Folded { branches, cpu, .. } => {
            let (weight, bias) = fuse::fused_kernel_bias(spec, &branches)?;
            Work::Folded {
                branches,
                kernel: Some((weight, bias)),
                cpu,
            }
        }
        work => work,
    })
}

/// The folded and CPU-kernel eval paths differ from the reference wherever a value is not finite:
/// they sum the branches before an inf can meet another (the reference gives NaN for inf - inf
/// between branches, they could give inf); the CPU kernel multiplies the zero padding by the
/// weight (inf * 0 = NaN where libtorch's conv skips the padding); a fold of finite BN
/// parameters can overflow where the reference's BN after the conv stays finite. So these paths
/// run only where the input and the conv that will run (the folded kernel and bias, or the fused
/// ones for the CPU kernel) are finite. (`Fused` on libtorch's conv is the reference's own one
/// conv; the training paths hand non-finite batches over themselves.) One sum per tensor and one
/// read of their total (one device sync); a finite total that overflows goes to the module path
/// too, still exact.
fn finite_for_eval(work: &Work, x: &Tensor) -> Result<Decision<()>> {
    let conv = match work {
        Work::Folded {
            kernel: Some((weight, bias)),
            ..
        } => [weight, bias],
        Work::Fused {
            weight,
            bias,
            cpu: true,
        } => [weight, bias],
        _ => return Ok(Decision::Fast(())),
    };
    let kind = x.f_kind()?;
    let mut total = x.f_sum(kind)?;
    for t in conv {
        total = total.f_add(&t.f_sum(kind)?)?;
    }
    let total = total.f_double_value(&[])?;
    Ok(Decision::unless(
        !total.is_finite(),
        || {
            "the input or the block's weights hold NaN or inf (or their folded conv overflows): \
             the module path keeps the reference's NaN/inf pattern"
                .to_string()
        },
        (),
    ))
}

/// tch reports every device but CPU, CUDA and Vulkan (meta, XPU, ...) as MPS.
fn is_exotic(device: Device) -> bool {
    !matches!(device, Device::Cpu | Device::Cuda(_))
}

/// The squeeze-excite of a standalone `SEBlock` over `channels`: `Fast(se)` when the native ops
/// may run, else the module path and why.
pub fn choose_se(
    x: &Tensor,
    se: &SeState,
    channels: i64,
    env: &Env,
) -> Result<Decision<SqueezeExcite>> {
    if let Some(why) = env_reason(env) {
        return Ok(Decision::refuse(why));
    }
    if x.dim() != 4 || is_exotic(x.device()) || x.size()[1] != channels {
        return Ok(Decision::refuse(
            "the input is not a 4-D tensor of the SE's channels on CPU or CUDA",
        ));
    }
    fast!(checks::input(x, env));
    let spec = BlockSpec {
        in_channels: channels,
        out_channels: channels,
        use_se: true,
        ..BlockSpec::default()
    };
    let ctx = Ctx {
        spec: &spec,
        x,
        kind: x.f_kind()?,
        device: x.device(),
        env,
    };
    match fast!(checks::se(&ctx, se)) {
        Some(se) => Ok(Decision::Fast(se)),
        None => Ok(Decision::Module(Refusal::new("no SE"))),
    }
}
