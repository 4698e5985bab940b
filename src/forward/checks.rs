//! The dispatcher's conditions, child by child. Each returns the checked tensors a fast path
//! runs on, or the refusal (naming the child) that sends the call to the module path.

use tch::{Device, Kind, Tensor};

use super::decision::{fast, Decision};
use super::se::SqueezeExcite;
use super::state::{BnState, BranchState, ConvState, Env, Momentum, SeState};
use super::Work;
use crate::error::Result;
use crate::fuse::{self, BatchNorm, Branches, ConvBn};
use crate::spec::BlockSpec;
use crate::train::TrainPath;

/// A conv's (stride, padding, dilation, groups).
type Geometry = (i64, i64, i64, i64);

/// What every check compares against: the block, the input and the call.
pub(super) struct Ctx<'a> {
    pub spec: &'a BlockSpec,
    pub x: &'a Tensor,
    pub kind: Kind,
    pub device: Device,
    pub env: &'a Env,
}

impl Ctx<'_> {
    /// A child tensor of the input's dtype and device, and no inference tensor outside inference
    /// mode (autograd would refuse it on the module path).
    fn matches_input(&self, t: &Tensor, name: &str) -> Result<Decision<()>> {
        if t.f_kind()? != self.kind || t.device() != self.device {
            return Ok(Decision::refuse(format!(
                "{name} differs from the input in dtype or device"
            )));
        }
        let inference = !self.env.inference_mode && t.f_is_inference()?;
        Ok(Decision::unless(
            inference,
            || format!("{name} is an inference tensor used outside torch.inference_mode()"),
            (),
        ))
    }

    /// [`Ctx::matches_input`] plus an exact shape.
    fn tensor(&self, t: &Tensor, shape: &[i64], name: &str) -> Result<Decision<()>> {
        if t.size() != shape {
            return Ok(Decision::refuse(format!(
                "{name} has shape {:?}, not {shape:?}",
                t.size()
            )));
        }
        self.matches_input(t, name)
    }

    /// Whether autograd would want a gradient of `x` or of any of `tensors`.
    fn wants_grad<'t>(&self, tensors: impl IntoIterator<Item = &'t Tensor>) -> bool {
        self.env.grad_enabled
            && (self.x.requires_grad() || tensors.into_iter().any(Tensor::requires_grad))
    }

    /// Whether the float32 CPU kernel may serve an eval path: a depthwise block, the option on, a
    /// float32 CPU input, and no gradient wanted (the kernel is not differentiable).
    fn cpu_inference<'t>(&self, tensors: impl IntoIterator<Item = &'t Tensor>) -> bool {
        self.env.options.cpu_kernel
            && self.spec.is_depthwise()
            && self.device == Device::Cpu
            && self.kind == Kind::Float
            && !self.wants_grad(tensors)
    }
}

/// Why the input alone rules out a fast path, if it does.
pub(super) fn input(x: &Tensor, env: &Env) -> Result<Decision<()>> {
    let reason = if x.numel() == 0 {
        "the input is empty"
    } else if x.is_sparse() || x.is_mkldnn() {
        "the input is not a dense strided tensor"
    } else if !matches!(
        x.f_kind()?,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        "the input's dtype is not a float the fast paths model"
    } else if !env.inference_mode && x.f_is_inference()? {
        "the input is an inference tensor used outside torch.inference_mode()"
    } else {
        return Ok(Decision::Fast(()));
    };
    Ok(Decision::refuse(reason))
}

/// A conv child: plain, the given geometry, no bias unless `bias`, a weight of `shape`.
fn conv(
    ctx: &Ctx<'_>,
    c: &ConvState,
    geometry: Geometry,
    bias: bool,
    shape: &[i64],
    name: &str,
) -> Result<Decision<()>> {
    if !c.plain {
        return Ok(Decision::refuse(format!(
            "{name} has hooks or tensor subclasses"
        )));
    }
    let (stride, padding, dilation, groups) = geometry;
    if !c.has_geometry(stride, padding, dilation, groups, bias) {
        return Ok(Decision::refuse(format!(
            "{name}'s stride, padding, dilation, groups, padding_mode or bias differ from the block's"
        )));
    }
    fast!(ctx.tensor(&c.weight, shape, &format!("{name}.weight")));
    match &c.bias {
        Some(b) => ctx.tensor(b, &shape[..1], &format!("{name}.bias")),
        None => Ok(Decision::Fast(())),
    }
}

/// The block's `se` child.
pub(super) fn se(ctx: &Ctx<'_>, s: &SeState) -> Result<Decision<Option<SqueezeExcite>>> {
    let (reduce, expand) = match s {
        SeState::Absent { plain: true } => return Ok(Decision::Fast(None)),
        SeState::Absent { plain: false } | SeState::Present { plain: false, .. } => {
            return Ok(Decision::refuse("se has hooks"))
        }
        SeState::Opaque(why) => return Ok(Decision::refuse(why.clone())),
        SeState::Present { reduce, expand, .. } => (reduce, expand),
    };
    let c = ctx.spec.out_channels;
    let r = reduce.weight.size().first().copied().unwrap_or(0);
    fast!(conv(
        ctx,
        reduce,
        (1, 0, 1, 1),
        true,
        &[r, c, 1, 1],
        "se.reduce"
    ));
    fast!(conv(
        ctx,
        expand,
        (1, 0, 1, 1),
        true,
        &[c, r, 1, 1],
        "se.expand"
    ));
    let (Some(reduce_bias), Some(expand_bias)) = (&reduce.bias, &expand.bias) else {
        return Ok(Decision::refuse("an SE conv has no bias"));
    };
    Ok(Decision::Fast(Some(SqueezeExcite {
        reduce_weight: reduce.weight.shallow_clone(),
        reduce_bias: reduce_bias.shallow_clone(),
        expand_weight: expand.weight.shallow_clone(),
        expand_bias: expand_bias.shallow_clone(),
    })))
}

/// A fused block's `reparam_conv`.
pub(super) fn fused(ctx: &Ctx<'_>, c: &ConvState) -> Result<Decision<Work>> {
    let spec = ctx.spec;
    let geometry = (spec.stride, spec.padding, spec.dilation, spec.groups);
    let shape = spec.kernel_shape(spec.kernel_size);
    fast!(conv(ctx, c, geometry, true, &shape, "reparam_conv"));
    let Some(bias) = &c.bias else {
        return Ok(Decision::refuse("reparam_conv has no bias"));
    };
    Ok(Decision::Fast(Work::Fused {
        cpu: ctx.cpu_inference([&c.weight, bias]),
        weight: c.weight.shallow_clone(),
        bias: bias.shallow_clone(),
    }))
}

/// A BN child on the fast paths: plain, affine, running statistics, finite positive eps and a
/// momentum `nn.BatchNorm2d` can apply.
fn bn(b: &BnState, name: &str) -> Decision<BatchNorm> {
    if !b.plain {
        return Decision::refuse(format!("{name} has hooks or tensor subclasses"));
    }
    if b.training.is_none() || b.track_running_stats.is_none() {
        return Decision::refuse(format!(
            "{name}.training or .track_running_stats is not a bool (torch reads it as truthy)"
        ));
    }
    let (Some(weight), Some(bias)) = (&b.weight, &b.bias) else {
        return Decision::refuse(format!("{name} has no affine parameters"));
    };
    let (Some(mean), Some(var)) = (&b.running_mean, &b.running_var) else {
        return Decision::refuse(format!("{name} has no running statistics"));
    };
    let Some(eps) = b.eps.filter(|e| e.is_finite() && *e > 0.0) else {
        return Decision::refuse(format!("{name}.eps is not a finite positive number"));
    };
    let momentum = match b.momentum {
        Momentum::Cumulative => None,
        Momentum::Value(m) if m.is_finite() => Some(m),
        _ => return Decision::refuse(format!("{name}.momentum is not None or a finite number")),
    };
    Decision::Fast(BatchNorm {
        weight: weight.shallow_clone(),
        bias: bias.shallow_clone(),
        running_mean: mean.shallow_clone(),
        running_var: var.shallow_clone(),
        num_batches_tracked: b.num_batches_tracked.as_ref().map(Tensor::shallow_clone),
        momentum,
        eps,
    })
}

/// What training needs beyond [`bn`]: tracked statistics it may update in place, a batch counter,
/// and more than one value per channel (else the module path raises `F.batch_norm`'s
/// `ValueError`, after the counters the reference increments before it).
fn bn_trainable(b: &BnState, values: i64, name: &str) -> Result<Decision<()>> {
    if values <= 1 {
        return Ok(Decision::refuse(format!(
            "{name} would average {values} value per channel"
        )));
    }
    if b.track_running_stats != Some(true) {
        return Ok(Decision::refuse(format!(
            "{name}.track_running_stats is False"
        )));
    }
    let Some(count) = &b.num_batches_tracked else {
        return Ok(Decision::refuse(format!(
            "{name} has no num_batches_tracked"
        )));
    };
    if count.numel() != 1 || count.f_kind()? != Kind::Int64 || count.requires_grad() {
        return Ok(Decision::refuse(format!(
            "{name}.num_batches_tracked is not one int64 counter"
        )));
    }
    let fixed = [&b.running_mean, &b.running_var]
        .into_iter()
        .flatten()
        .any(|t| !t.is_contiguous() || t.requires_grad());
    Ok(Decision::unless(
        fixed,
        || format!("{name}'s running statistics cannot be updated in place"),
        (),
    ))
}

/// One conv+BN branch of an unfused block, as the fold and the training paths take it.
fn conv_bn(branch: &BranchState, geometry: Geometry, name: &str) -> Decision<ConvBn> {
    if !branch.plain {
        return Decision::refuse(format!("{name} has hooks"));
    }
    let c = &branch.conv;
    if !c.plain {
        return Decision::refuse(format!("{name}.conv has hooks or tensor subclasses"));
    }
    if !c.has_geometry(geometry.0, geometry.1, geometry.2, geometry.3, false) {
        return Decision::refuse(format!(
            "{name}.conv's stride, padding, dilation, groups, padding_mode or bias differ from the \
             block's"
        ));
    }
    match bn(&branch.bn, &format!("{name}.bn")) {
        Decision::Fast(bn) => Decision::Fast(ConvBn {
            weight: c.weight.shallow_clone(),
            bn,
        }),
        Decision::Module(why) => Decision::Module(why),
    }
}

/// A BN (`state`) with the number of values its batch statistics would average.
type Trained<'a> = (&'a BnState, String, i64);

/// An unfused block's branches: every child checked once, then the whole set validated once by
/// [`fuse::check_branches`] (counts, shapes, one dtype and device), then matched to the input.
pub(super) fn branches(
    ctx: &Ctx<'_>,
    convs: &[BranchState],
    scale: Option<&BranchState>,
    skip: Option<&BnState>,
) -> Result<Decision<Work>> {
    let spec = ctx.spec;
    if scale.is_some() != spec.has_scale() || skip.is_some() != spec.has_skip() {
        return Ok(Decision::refuse(
            "the block's scale or skip branch differs from its constructor arguments",
        ));
    }
    if !matches!(ctx.kind, Kind::Float | Kind::Double) {
        return Ok(Decision::refuse(
            "unfused fast paths take float32 or float64 only",
        ));
    }
    let size = ctx.x.size();
    let out = |d: usize| spec.output_size(size[d]).unwrap_or(0);
    let (conv_values, skip_values) = (size[0] * out(2) * out(3), size[0] * size[2] * size[3]);
    let (s, p, d, g) = (spec.stride, spec.padding, spec.dilation, spec.groups);
    let mut trained: Vec<Trained<'_>> = Vec::new();
    let mut conv = Vec::with_capacity(convs.len());
    for (i, branch) in convs.iter().enumerate() {
        let name = format!("rbr_conv.{i}");
        conv.push(fast!(now conv_bn(branch, (s, p, d, g), &name)));
        trained.push((&branch.bn, format!("{name}.bn"), conv_values));
    }
    let scale = match scale {
        None => None,
        Some(b) => {
            trained.push((&b.bn, "rbr_scale.bn".into(), conv_values));
            Some(fast!(now conv_bn(b, (s, 0, 1, g), "rbr_scale")))
        }
    };
    let skip = match skip {
        None => None,
        Some(b) => {
            trained.push((b, "rbr_skip".into(), skip_values));
            Some(fast!(now bn(b, "rbr_skip")))
        }
    };
    let branches = Branches { conv, scale, skip };
    if let Err(err) = fuse::check_branches(spec, &branches) {
        return Ok(Decision::refuse(err.to_string()));
    }
    fast!(match_input(ctx, &branches));
    choose_work(ctx, branches, &trained)
}

/// Every branch tensor of the input's dtype and device.
fn match_input(ctx: &Ctx<'_>, branches: &Branches) -> Result<Decision<()>> {
    for t in branches.kernels() {
        fast!(ctx.matches_input(t, "a branch kernel"));
    }
    for b in branches.batch_norms() {
        for t in [&b.weight, &b.bias, &b.running_mean, &b.running_var] {
            fast!(ctx.matches_input(t, "a BatchNorm tensor"));
        }
    }
    Ok(Decision::Fast(()))
}

/// Folded when every BN is in eval mode, a training path when every BN trains.
fn choose_work(
    ctx: &Ctx<'_>,
    branches: Branches,
    trained: &[Trained<'_>],
) -> Result<Decision<Work>> {
    let all_train = trained.iter().all(|(b, _, _)| b.training == Some(true));
    if !all_train && trained.iter().any(|(b, _, _)| b.training == Some(true)) {
        return Ok(Decision::refuse(
            "some BNs train and others are in eval mode (only the module path mixes them)",
        ));
    }
    if !all_train {
        let params = branches
            .batch_norms()
            .flat_map(|b| [&b.weight, &b.bias])
            .chain(branches.kernels());
        let cpu = ctx.cpu_inference(params);
        return Ok(Decision::Fast(Work::Folded {
            branches,
            kernel: None,
            cpu,
        }));
    }
    for (b, name, values) in trained {
        fast!(bn_trainable(b, *values, name));
    }
    fast!(now unshared_statistics(&branches));
    let path = fast!(now train_path(ctx));
    Ok(Decision::Fast(Work::Train { path, branches }))
}

/// The bytes a tensor's elements span (its storage offset on, as far as its largest index reaches).
fn span(t: &Tensor) -> (usize, usize) {
    let start = t.data_ptr() as usize;
    let reach: i64 = t
        .size()
        .iter()
        .zip(t.stride())
        .map(|(&n, s)| (n - 1).max(0) * s.abs())
        .sum();
    // Checked before: floating statistics of the input's dtype and an int64 counter.
    let element = t.f_kind().map_or(8, |k| k.elt_size_in_bytes());
    let bytes = (reach as usize + 1) * element;
    (start, start + bytes)
}

/// No two BNs share (or overlap in) a running statistic or counter: the reference updates a
/// shared buffer once per BN in its own order (skip, scale, conv branches), which only the module
/// path reproduces.
fn unshared_statistics(branches: &Branches) -> Decision<()> {
    let spans: Vec<(usize, usize)> = branches
        .batch_norms()
        .flat_map(|b| {
            [
                Some(&b.running_mean),
                Some(&b.running_var),
                b.num_batches_tracked.as_ref(),
            ]
        })
        .flatten()
        .filter(|t| t.numel() > 0)
        .map(span)
        .collect();
    let shared = spans
        .iter()
        .enumerate()
        .any(|(i, a)| spans[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1));
    Decision::unless(
        shared,
        || {
            "two BNs share running statistics (the module path updates them in the reference's order)"
            .to_string()
        },
        (),
    )
}

/// The training path of a block's geometry.
fn train_path(ctx: &Ctx<'_>) -> Decision<TrainPath> {
    let spec = ctx.spec;
    if spec.is_pointwise() {
        return Decision::Fast(TrainPath::Gram);
    }
    if !spec.is_depthwise() {
        return Decision::refuse(
            "no exact no-branch-storage training path for this geometry (only pointwise 1x1 and \
             depthwise blocks have one)",
        );
    }
    if ctx.env.options.cpu_kernel && ctx.device == Device::Cpu {
        return Decision::Fast(TrainPath::DepthwiseCpu);
    }
    if ctx.env.options.low_memory {
        return Decision::Fast(TrainPath::DepthwiseRecompute);
    }
    Decision::refuse(
        "depthwise training off the CPU kernel: the module path is faster (low_memory=True trades \
         time for memory: train_depthwise recomputes the branches in the backward)",
    )
}
