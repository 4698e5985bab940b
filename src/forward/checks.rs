//! The dispatcher's conditions, child by child. Each returns the checked tensors a fast path
//! runs on, or the reason (naming the child) why only the module path models the state.

use tch::{Device, Kind, Tensor};

use super::se::SqueezeExcite;
use super::state::{BnState, BranchState, ConvState, Env, Momentum, SeState};
use super::{cpu_inference, Path, Plan};
use crate::error::Result;
use crate::fuse::{self, BatchNorm, Branches, ConvBn};
use crate::spec::BlockSpec;
use crate::train::TrainPath;

/// A conv's (stride, padding, dilation, groups).
type Geometry = (i64, i64, i64, i64);

/// A verdict: `Ok(value)` for the fast path, `Err(reason)` for the module path.
type Verdict<T> = std::result::Result<T, String>;

/// The value of a `Result<Verdict<T>>`, or an early return of its error or reason.
macro_rules! verdict {
    ($e:expr) => {
        match $e? {
            Ok(value) => value,
            Err(why) => return Ok(Err(why)),
        }
    };
}

/// Why the input alone rules out a fast path, if it does.
pub(super) fn input_reason(x: &Tensor, env: &Env) -> Result<Option<&'static str>> {
    if x.numel() == 0 {
        return Ok(Some("the input is empty"));
    }
    if x.is_sparse() || x.is_mkldnn() {
        return Ok(Some("the input is not a dense strided tensor"));
    }
    if !matches!(
        x.f_kind()?,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        return Ok(Some(
            "the input's dtype is not a float the fast paths model",
        ));
    }
    if !env.inference_mode && x.f_is_inference()? {
        return Ok(Some(
            "the input is an inference tensor used outside torch.inference_mode()",
        ));
    }
    Ok(None)
}

/// Checks one tensor of a child: shape, dtype, device, and no inference tensor outside
/// inference mode.
fn tensor(
    t: &Tensor,
    shape: &[i64],
    kind: Kind,
    device: Device,
    env: &Env,
    name: &str,
) -> Result<Verdict<()>> {
    if t.size() != shape {
        return Ok(Err(format!(
            "{name} has shape {:?}, not {shape:?}",
            t.size()
        )));
    }
    if t.f_kind()? != kind || t.device() != device {
        return Ok(Err(format!(
            "{name} differs from the input in dtype or device"
        )));
    }
    if !env.inference_mode && t.f_is_inference()? {
        return Ok(Err(format!(
            "{name} is an inference tensor used outside torch.inference_mode()"
        )));
    }
    Ok(Ok(()))
}

/// A conv child: plain, the given geometry, no bias unless `bias`, a weight of `shape`.
#[allow(clippy::too_many_arguments)]
fn conv(
    c: &ConvState,
    geometry: Geometry,
    bias: bool,
    shape: &[i64],
    x: &Tensor,
    kind: Kind,
    env: &Env,
    name: &str,
) -> Result<Verdict<()>> {
    if !c.plain {
        return Ok(Err(format!(
            "{name} is not a plain nn.Conv2d (or has hooks)"
        )));
    }
    let (stride, padding, dilation, groups) = geometry;
    if !c.has_geometry(stride, padding, dilation, groups, bias) {
        return Ok(Err(format!(
            "{name}'s stride, padding, dilation, groups, padding_mode or bias differ from the block's"
        )));
    }
    let device = x.device();
    verdict!(tensor(
        &c.weight,
        shape,
        kind,
        device,
        env,
        &format!("{name}.weight")
    ));
    if let Some(b) = &c.bias {
        verdict!(tensor(
            b,
            &shape[..1],
            kind,
            device,
            env,
            &format!("{name}.bias")
        ));
    }
    Ok(Ok(()))
}

/// The block's `se` child.
pub(super) fn se(
    s: &SeState,
    spec: &BlockSpec,
    x: &Tensor,
    kind: Kind,
    env: &Env,
) -> Result<Verdict<Option<SqueezeExcite>>> {
    let (reduce, expand) = match s {
        SeState::Absent { plain: true } => return Ok(Ok(None)),
        SeState::Absent { plain: false } => return Ok(Err("se has hooks".into())),
        SeState::Opaque => return Ok(Err("se is neither our SEBlock nor nn.Identity".into())),
        SeState::Present { plain: false, .. } => return Ok(Err("se has hooks".into())),
        SeState::Present { reduce, expand, .. } => (reduce, expand),
    };
    let c = spec.out_channels;
    let r = reduce.weight.size().first().copied().unwrap_or(0);
    for (child, shape, name) in [
        (reduce, [r, c, 1, 1], "se.reduce"),
        (expand, [c, r, 1, 1], "se.expand"),
    ] {
        verdict!(conv(child, (1, 0, 1, 1), true, &shape, x, kind, env, name));
    }
    let handles = |c: &ConvState| -> Result<(Tensor, Tensor)> {
        let bias = c.bias.as_ref().map(Tensor::shallow_clone);
        Ok((
            c.weight.shallow_clone(),
            bias.ok_or_else(|| crate::error::config("SE conv without bias"))?,
        ))
    };
    let ((reduce_weight, reduce_bias), (expand_weight, expand_bias)) =
        (handles(reduce)?, handles(expand)?);
    Ok(Ok(Some(SqueezeExcite {
        reduce_weight,
        reduce_bias,
        expand_weight,
        expand_bias,
    })))
}

/// A fused block's `reparam_conv`.
pub(super) fn fused(
    spec: &BlockSpec,
    c: &ConvState,
    x: &Tensor,
    kind: Kind,
    env: &Env,
) -> Result<Plan> {
    let geometry = (spec.stride, spec.padding, spec.dilation, spec.groups);
    let shape = spec.kernel_shape(spec.kernel_size);
    if let Err(why) = conv(c, geometry, true, &shape, x, kind, env, "reparam_conv")? {
        return Ok(Plan::module(why));
    }
    let Some(bias) = &c.bias else {
        return Ok(Plan::module("reparam_conv has no bias"));
    };
    let cpu = cpu_inference(spec, x, kind, env, &[&c.weight, bias]);
    Ok(Plan {
        path: if cpu { Path::FusedCpu } else { Path::Fused },
        reason: "re-parameterized: one conv".into(),
        branches: None,
        fused: Some((c.weight.shallow_clone(), bias.shallow_clone())),
        se: None,
    })
}

/// A BN child on the fast paths: plain, affine, running statistics, finite positive eps, every
/// tensor of the input's dtype and device.
fn bn(
    b: &BnState,
    channels: i64,
    x: &Tensor,
    kind: Kind,
    env: &Env,
    name: &str,
) -> Result<Verdict<BatchNorm>> {
    if !b.plain {
        return Ok(Err(format!(
            "{name} is not a plain nn.BatchNorm2d (or has hooks)"
        )));
    }
    let (Some(weight), Some(bias)) = (&b.weight, &b.bias) else {
        return Ok(Err(format!("{name} has no affine parameters")));
    };
    let (Some(mean), Some(var)) = (&b.running_mean, &b.running_var) else {
        return Ok(Err(format!("{name} has no running statistics")));
    };
    let Some(eps) = b.eps.filter(|e| e.is_finite() && *e > 0.0) else {
        return Ok(Err(format!("{name}.eps is not a finite positive number")));
    };
    for (field, t) in [
        ("weight", weight),
        ("bias", bias),
        ("running_mean", mean),
        ("running_var", var),
    ] {
        verdict!(tensor(
            t,
            &[channels],
            kind,
            x.device(),
            env,
            &format!("{name}.{field}")
        ));
    }
    let momentum = match b.momentum {
        Momentum::Cumulative => None,
        Momentum::Value(m) if m.is_finite() => Some(m),
        _ => {
            return Ok(Err(format!(
                "{name}.momentum is not None or a finite number"
            )))
        }
    };
    Ok(Ok(BatchNorm {
        weight: weight.shallow_clone(),
        bias: bias.shallow_clone(),
        running_mean: mean.shallow_clone(),
        running_var: var.shallow_clone(),
        num_batches_tracked: b.num_batches_tracked.as_ref().map(Tensor::shallow_clone),
        momentum,
        eps,
    }))
}

/// What training needs beyond [`bn`]: tracked statistics it may update in place, a batch counter,
/// and more than one value per channel (else the module path raises `F.batch_norm`'s
/// `ValueError`, after the counters the seed increments before it).
fn bn_trainable(b: &BnState, values: i64, name: &str) -> Result<Verdict<()>> {
    if values <= 1 {
        return Ok(Err(format!(
            "{name} would average {values} value per channel"
        )));
    }
    if !b.track_running_stats {
        return Ok(Err(format!("{name}.track_running_stats is False")));
    }
    let Some(count) = &b.num_batches_tracked else {
        return Ok(Err(format!("{name} has no num_batches_tracked")));
    };
    if count.numel() != 1 || count.f_kind()? != Kind::Int64 || count.requires_grad() {
        return Ok(Err(format!(
            "{name}.num_batches_tracked is not one int64 counter"
        )));
    }
    for t in [&b.running_mean, &b.running_var].into_iter().flatten() {
        if !t.is_contiguous() || t.requires_grad() {
            return Ok(Err(format!(
                "{name}'s running statistics cannot be updated in place"
            )));
        }
    }
    Ok(Ok(()))
}

/// An unfused block's branches.
#[allow(clippy::too_many_arguments)]
pub(super) fn branches(
    spec: &BlockSpec,
    convs: &[BranchState],
    scale: Option<&BranchState>,
    skip: Option<&BnState>,
    x: &Tensor,
    kind: Kind,
    env: &Env,
) -> Result<Verdict<Plan>> {
    if convs.len() as i64 != spec.num_conv_branches
        || scale.is_some() != spec.has_scale()
        || skip.is_some() != spec.has_skip()
    {
        return Ok(Err(
            "the block's branches differ from its constructor arguments".into(),
        ));
    }
    if !matches!(kind, Kind::Float | Kind::Double) {
        return Ok(Err("unfused fast paths take float32 or float64 only".into()));
    }
    let size = x.size();
    let out = |d: usize| spec.output_size(size[d]).unwrap_or(0);
    let (conv_values, skip_values) = (size[0] * out(2) * out(3), size[0] * size[2] * size[3]);
    let (s, p, d, g) = (spec.stride, spec.padding, spec.dilation, spec.groups);
    let (channels, k) = (spec.out_channels, spec.kernel_size);
    // (branch, name, geometry, kernel size)
    let mut list: Vec<(&BranchState, String, Geometry, i64)> = convs
        .iter()
        .enumerate()
        .map(|(i, b)| (b, format!("rbr_conv.{i}"), (s, p, d, g), k))
        .collect();
    if let Some(b) = scale {
        list.push((b, "rbr_scale".into(), (s, 0, 1, g), 1));
    }
    let mut training = Vec::new();
    let mut conv_bn = Vec::new();
    for (branch, name, geometry, size) in &list {
        if !branch.plain {
            return Ok(Err(format!(
                "{name} is not a plain nn.Sequential(conv, bn) (or has hooks)"
            )));
        }
        let shape = spec.kernel_shape(*size);
        verdict!(conv(
            &branch.conv,
            *geometry,
            false,
            &shape,
            x,
            kind,
            env,
            &format!("{name}.conv")
        ));
        let checked = verdict!(bn(
            &branch.bn,
            channels,
            x,
            kind,
            env,
            &format!("{name}.bn")
        ));
        training.push((&branch.bn, format!("{name}.bn"), conv_values));
        conv_bn.push(ConvBn {
            weight: branch.conv.weight.shallow_clone(),
            bn: checked,
        });
    }
    let skip_bn = match skip {
        None => None,
        Some(b) => {
            let checked = verdict!(bn(b, spec.in_channels, x, kind, env, "rbr_skip"));
            training.push((b, "rbr_skip".into(), skip_values));
            Some(checked)
        }
    };
    let scale_bn = if scale.is_some() { conv_bn.pop() } else { None };
    let branches = Branches {
        conv: conv_bn,
        scale: scale_bn,
        skip: skip_bn,
    };
    if let Err(err) = fuse::check_branches(spec, &branches) {
        return Ok(Err(err.to_string()));
    }
    let all_train = training.iter().all(|(b, _, _)| b.training);
    if !all_train && training.iter().any(|(b, _, _)| b.training) {
        return Ok(Err(
            "some BNs train and others are in eval mode (only the module path mixes them)".into(),
        ));
    }
    if !all_train {
        let cpu = cpu_inference(spec, x, kind, env, &[]) && !any_grad(&branches, env);
        return Ok(Ok(eval_plan(cpu, branches)));
    }
    for (b, name, values) in &training {
        verdict!(bn_trainable(b, *values, name));
    }
    let path = match train_path(spec, x, env) {
        Ok(path) => path,
        Err(why) => return Ok(Err(why)),
    };
    Ok(Ok(Plan {
        path: Path::Train(path),
        reason: "every BN trains: the exact no-branch-storage path".into(),
        branches: Some(branches),
        fused: None,
        se: None,
    }))
}

/// Whether autograd would want a gradient of any branch parameter.
fn any_grad(branches: &Branches, env: &Env) -> bool {
    let bn_grad = branches
        .batch_norms()
        .any(|b| b.weight.requires_grad() || b.bias.requires_grad());
    env.grad_enabled && (bn_grad || branches.kernels().any(Tensor::requires_grad))
}

fn eval_plan(cpu: bool, branches: Branches) -> Plan {
    Plan {
        path: if cpu { Path::FoldedCpu } else { Path::Folded },
        reason: "every BN is in eval mode: the branches folded into one conv".into(),
        branches: Some(branches),
        fused: None,
        se: None,
    }
}

/// The training path of a block's geometry.
fn train_path(spec: &BlockSpec, x: &Tensor, env: &Env) -> Verdict<TrainPath> {
    if spec.is_pointwise() {
        return Ok(TrainPath::Gram);
    }
    if !spec.is_depthwise() {
        return Err(
            "no exact no-branch-storage training path for this geometry (only pointwise 1x1 and \
                    depthwise blocks have one)"
                .into(),
        );
    }
    if !env.options.low_memory {
        return Err("low_memory=False: depthwise blocks train through the seed's branches".into());
    }
    if env.options.cpu_kernel && x.device() == Device::Cpu {
        Ok(TrainPath::DepthwiseCpu)
    } else {
        Ok(TrainPath::DepthwiseRecompute)
    }
}
