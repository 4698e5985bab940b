//! The one dispatcher: from the complete state of a block and of the call, it picks the path a
//! forward takes, and runs the eval paths.
//!
//! A fast path runs only where it provably equals the seed's module-by-module forward for the
//! whole state: every child's exact type, hooks and attributes (each BN's own training flag,
//! `track_running_stats`, eps, momentum; each conv's stride, padding, dilation, groups,
//! padding mode, bias and shapes), the input (dtype, device, layout, sizes, the values each BN
//! averages) and the call (grad mode, autocast, tracing, functorch, dispatch modes, saved-tensor
//! hooks, forward AD). Anything else takes the module path, which the Python shell runs. `state`
//! holds what the shells observe, `checks` the per-child conditions, `cost` the rule that hands
//! an exact fast path to the module path where it is expected to be slower, `eval` the fused and
//! folded forwards, `se` the squeeze-excite ops.

mod checks;
pub mod cost;
pub mod eval;
pub mod se;
pub mod state;

use tch::{Device, Kind, Tensor};

use crate::error::{config, Result};
use crate::fuse::{BatchNorm, Branches, ConvBn};
use crate::spec::BlockSpec;
use crate::train::TrainPath;
use se::SqueezeExcite;
use state::{BlockState, Body, Env, SeState};

/// Every path a block's forward can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The seed's forward, module by module (run by the Python shell).
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

/// The dispatcher's verdict: the path, why, and the checked tensors a fast path runs on.
pub struct Plan {
    pub path: Path,
    pub reason: String,
    pub branches: Option<Branches>,
    pub fused: Option<(Tensor, Tensor)>,
    pub se: Option<SqueezeExcite>,
}

impl Plan {
    fn module(reason: impl Into<String>) -> Plan {
        Plan {
            path: Path::Module,
            reason: reason.into(),
            branches: None,
            fused: None,
            se: None,
        }
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
            "torch.jit.trace records the seed's torch-level graph",
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
    if let Some(why) = env_reason(env) {
        return Ok(Plan::module(why));
    }
    if !block.activation_plain {
        return Ok(Plan::module(
            "activation is not a plain nn.ReLU (or has hooks)",
        ));
    }
    let spec = &block.spec;
    let weight = match &block.body {
        Body::Opaque(why) => return Ok(Plan::module(why.clone())),
        Body::Fused(conv) => &conv.weight,
        Body::Branches { conv, .. } => match conv.first() {
            Some(branch) => &branch.conv.weight,
            None => return Ok(Plan::module("the block has no conv branch")),
        },
    };
    if is_exotic(x.device()) || is_exotic(weight.device()) {
        return Ok(Plan::module(
            "the input or weights are on a device the fast paths do not model",
        ));
    }
    spec.check_input(x, weight, false)?;
    if let Some(why) = checks::input_reason(x, env)? {
        return Ok(Plan::module(why));
    }
    let kind = x.f_kind()?;
    let se = match checks::se(&block.se, spec, x, kind, env)? {
        Ok(se) => se,
        Err(why) => return Ok(Plan::module(why)),
    };
    let plan = match &block.body {
        Body::Fused(conv) => checks::fused(spec, conv, x, kind, env)?,
        Body::Branches { conv, scale, skip } => {
            match checks::branches(spec, conv, scale.as_deref(), skip.as_deref(), x, kind, env)? {
                Ok(plan) => plan,
                Err(why) => Plan::module(why),
            }
        }
        Body::Opaque(why) => Plan::module(why.clone()),
    };
    Ok(Plan {
        se,
        ..by_cost(plan, spec, x, weight)
    })
}

/// The plan as the cost rule ([`cost::judge`]) leaves it: kept, moved to another fast path, or
/// handed to the module path when the fast path is expected to be slower.
fn by_cost(plan: Plan, spec: &BlockSpec, x: &Tensor, weight: &Tensor) -> Plan {
    let mut input = cost::Input::of(&x.size(), &x.stride());
    input.channels_last |= cost::Input::of(&weight.size(), &weight.stride()).channels_last;
    input.cuda = x.device().is_cuda();
    match cost::judge(plan.path, spec, &input) {
        cost::Cost::Faster => plan,
        cost::Cost::Instead(path, why) => Plan {
            path,
            reason: format!("{}; {why}", plan.reason),
            ..plan
        },
        cost::Cost::Slower(why) => {
            Plan::module(format!("expected slower than the module path: {why}"))
        }
    }
}

/// tch reports every device but CPU, CUDA and Vulkan (meta, XPU, ...) as MPS.
fn is_exotic(device: Device) -> bool {
    !matches!(device, Device::Cpu | Device::Cuda(_))
}

/// Runs an eval path of a plan (`Folded`, `FoldedCpu`, `Fused`, `FusedCpu`); `None` for the
/// paths the shell runs.
pub fn run_eval(spec: &BlockSpec, plan: &Plan, x: &Tensor) -> Result<Option<Tensor>> {
    let se = plan.se.as_ref();
    let cpu = matches!(plan.path, Path::FoldedCpu | Path::FusedCpu);
    match (plan.path, &plan.branches, &plan.fused) {
        (Path::Folded | Path::FoldedCpu, Some(branches), _) => {
            Ok(Some(eval::forward_folded(spec, branches, se, x, cpu)?))
        }
        (Path::Fused | Path::FusedCpu, _, Some((weight, bias))) => {
            Ok(Some(eval::forward_fused(spec, weight, bias, se, x, cpu)?))
        }
        _ => Ok(None),
    }
}

/// Whether the float32 CPU kernel may serve an eval path: a depthwise block, the option on, a
/// float32 CPU input, and no gradient wanted (the kernel is not differentiable).
fn cpu_inference(spec: &BlockSpec, x: &Tensor, kind: Kind, env: &Env, tensors: &[&Tensor]) -> bool {
    let wants_grad =
        env.grad_enabled && (x.requires_grad() || tensors.iter().any(|t| t.requires_grad()));
    env.options.cpu_kernel
        && spec.is_depthwise()
        && x.device() == Device::Cpu
        && kind == Kind::Float
        && !wants_grad
}

/// The squeeze-excite path of a standalone `SEBlock`: `Ok(Some(se))` when the native ops may
/// run, `Ok(None)` for the module path.
pub fn choose_se(
    x: &Tensor,
    se: &SeState,
    channels: i64,
    env: &Env,
) -> Result<Option<SqueezeExcite>> {
    if env_reason(env).is_some() || x.dim() != 4 || is_exotic(x.device()) {
        return Ok(None);
    }
    if x.size()[1] != channels || checks::input_reason(x, env)?.is_some() {
        return Ok(None);
    }
    let spec = BlockSpec {
        in_channels: channels,
        out_channels: channels,
        use_se: true,
        ..BlockSpec::default()
    };
    Ok(checks::se(se, &spec, x, x.f_kind()?, env)?.ok().flatten())
}

/// The branches of an unfused block's state, shape-checked but without the dispatcher's policy:
/// a training backward runs on the state its forward was dispatched with.
pub fn branches_of(block: &BlockState) -> Result<Branches> {
    let Body::Branches { conv, scale, skip } = &block.body else {
        return Err(config("a fused block has no branches"));
    };
    let bn = |b: &state::BnState| -> Result<BatchNorm> {
        let field = |t: &Option<Tensor>| {
            t.as_ref()
                .map(Tensor::shallow_clone)
                .ok_or_else(|| config("a BN without affine parameters or running statistics"))
        };
        let momentum = match b.momentum {
            state::Momentum::Value(m) => Some(m),
            _ => None,
        };
        Ok(BatchNorm {
            weight: field(&b.weight)?,
            bias: field(&b.bias)?,
            running_mean: field(&b.running_mean)?,
            running_var: field(&b.running_var)?,
            num_batches_tracked: b.num_batches_tracked.as_ref().map(Tensor::shallow_clone),
            momentum,
            eps: b
                .eps
                .ok_or_else(|| config("a BN eps that is not a number"))?,
        })
    };
    let conv_bn = |b: &state::BranchState| -> Result<ConvBn> {
        Ok(ConvBn {
            weight: b.conv.weight.shallow_clone(),
            bn: bn(&b.bn)?,
        })
    };
    let branches = Branches {
        conv: conv.iter().map(conv_bn).collect::<Result<_>>()?,
        scale: scale.as_deref().map(conv_bn).transpose()?,
        skip: skip.as_deref().map(bn).transpose()?,
    };
    crate::fuse::check_branches(&block.spec, &branches)?;
    Ok(branches)
}

/// The SE of a state for an input `x` (4-D), shape-checked against its channels.
pub fn se_of(se: &SeState, x: &Tensor) -> Result<Option<SqueezeExcite>> {
    let (reduce, expand) = match se {
        SeState::Absent { .. } => return Ok(None),
        SeState::Opaque => return Err(config("se is neither our SEBlock nor nn.Identity")),
        SeState::Present { reduce, expand, .. } => (reduce, expand),
    };
    let size = x.size();
    if size.len() != 4 {
        return Err(crate::error::Error::InputShape(format!(
            "SE expects a 4-D input, got {size:?}"
        )));
    }
    let c = size[1];
    let r = reduce.weight.size().first().copied().unwrap_or(0);
    let (Some(reduce_bias), Some(expand_bias)) = (&reduce.bias, &expand.bias) else {
        return Err(config("SE convs need biases"));
    };
    let shapes = [
        (&reduce.weight, vec![r, c, 1, 1]),
        (reduce_bias, vec![r]),
        (&expand.weight, vec![c, r, 1, 1]),
        (expand_bias, vec![c]),
    ];
    for (t, shape) in &shapes {
        if t.size() != *shape {
            return Err(config(format!(
                "an SE tensor has shape {:?}, expected {shape:?}",
                t.size()
            )));
        }
    }
    Ok(Some(SqueezeExcite {
        reduce_weight: reduce.weight.shallow_clone(),
        reduce_bias: reduce_bias.shallow_clone(),
        expand_weight: expand.weight.shallow_clone(),
        expand_bias: expand_bias.shallow_clone(),
    }))
}
