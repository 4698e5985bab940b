//! The dispatcher's decisions from a block state and a call, without Python: which path, and the
//! module path (with a reason) for every state only the module path models.

use mobileone_rs::forward::state::{
    BlockState, BnState, Body, BranchState, ConvState, Env, Momentum, Options, SeState,
};
use mobileone_rs::forward::{choose, Path, Plan};
use mobileone_rs::train::TrainPath;
use mobileone_rs::BlockSpec;
use tch::{Kind, Tensor};

const C: i64 = 8;

fn depthwise() -> BlockSpec {
    BlockSpec {
        in_channels: C,
        out_channels: C,
        kernel_size: 3,
        padding: 1,
        groups: C,
        num_conv_branches: 2,
        ..BlockSpec::default()
    }
}

fn pointwise() -> BlockSpec {
    BlockSpec {
        in_channels: C,
        out_channels: C,
        kernel_size: 1,
        padding: 0,
        num_conv_branches: 2,
        ..BlockSpec::default()
    }
}

fn conv(spec: &BlockSpec, k: i64, padding: i64, bias: bool) -> ConvState {
    let shape = spec.kernel_shape(k);
    ConvState {
        weight: Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)),
        bias: bias.then(|| Tensor::zeros([shape[0]], (Kind::Float, tch::Device::Cpu))),
        stride: vec![spec.stride; 2],
        padding: Some(vec![padding; 2]),
        dilation: vec![1, 1],
        groups: spec.groups,
        zeros_padding: true,
        plain: true,
    }
}

fn bn(channels: i64, training: bool) -> BnState {
    let opts = (Kind::Float, tch::Device::Cpu);
    BnState {
        weight: Some(Tensor::ones([channels], opts)),
        bias: Some(Tensor::zeros([channels], opts)),
        running_mean: Some(Tensor::zeros([channels], opts)),
        running_var: Some(Tensor::ones([channels], opts)),
        num_batches_tracked: Some(Tensor::zeros([], (Kind::Int64, tch::Device::Cpu))),
        momentum: Momentum::Value(0.1),
        eps: Some(1e-5),
        training: Some(training),
        track_running_stats: Some(true),
        plain: true,
    }
}

fn branch(spec: &BlockSpec, k: i64, padding: i64, training: bool) -> BranchState {
    BranchState {
        conv: conv(spec, k, padding, false),
        bn: bn(spec.out_channels, training),
        plain: true,
    }
}

fn unfused(spec: BlockSpec, training: bool) -> BlockState {
    let convs = (0..spec.num_conv_branches)
        .map(|_| branch(&spec, spec.kernel_size, spec.padding, training))
        .collect();
    BlockState {
        spec,
        body: Body::Branches {
            conv: convs,
            scale: spec
                .has_scale()
                .then(|| Box::new(branch(&spec, 1, 0, training))),
            skip: spec
                .has_skip()
                .then(|| Box::new(bn(spec.in_channels, training))),
        },
        se: SeState::Absent { plain: true },
        activation_plain: true,
    }
}

fn fused(spec: BlockSpec) -> BlockState {
    BlockState {
        spec,
        body: Body::Fused(Box::new(conv(&spec, spec.kernel_size, spec.padding, true))),
        se: SeState::Absent { plain: true },
        activation_plain: true,
    }
}

fn env() -> Env {
    Env {
        grad_enabled: true,
        options: Options::default(),
        ..Env::default()
    }
}

fn input() -> Tensor {
    Tensor::randn([2, C, 6, 5], (Kind::Float, tch::Device::Cpu))
}

fn plan(block: &BlockState, env: &Env) -> Plan {
    choose(&input(), block, env).expect("a valid input")
}

fn refused(block: &BlockState, env: &Env, reason: &str) {
    let plan = plan(block, env);
    assert_eq!(plan.path(), Path::Module);
    assert!(plan.reason.contains(reason), "{:?}", plan.reason);
}

#[test]
fn training_blocks_take_their_geometry_training_path() {
    let dw = plan(&unfused(depthwise(), true), &env());
    assert_eq!(dw.path(), Path::Train(TrainPath::DepthwiseCpu));
    let mut no_cpu = env();
    no_cpu.options.cpu_kernel = false;
    refused(&unfused(depthwise(), true), &no_cpu, "low_memory=True");
    no_cpu.options.low_memory = true;
    let recompute = plan(&unfused(depthwise(), true), &no_cpu);
    assert_eq!(recompute.path(), Path::Train(TrainPath::DepthwiseRecompute));
    let pw = plan(&unfused(pointwise(), true), &env());
    assert_eq!(pw.path(), Path::Train(TrainPath::Gram));
    assert_eq!(pw.parameters().unwrap().len(), 3 * 2 + 2);
}

#[test]
fn eval_blocks_fold_and_fused_blocks_run_one_conv() {
    let no_grad = Env {
        grad_enabled: false,
        ..env()
    };
    assert_eq!(
        plan(&unfused(depthwise(), false), &no_grad).path(),
        Path::FoldedCpu
    );
    assert_eq!(
        plan(&unfused(pointwise(), false), &no_grad).path(),
        Path::Folded
    );
    assert_eq!(plan(&fused(depthwise()), &no_grad).path(), Path::FusedCpu);
    assert_eq!(plan(&fused(pointwise()), &no_grad).path(), Path::Fused);
}

/// A change to the call's facts, and the reason it must give.
type EnvEdit = (fn(&mut Env), &'static str);

#[test]
fn call_facts_send_every_block_to_the_module_path() {
    let cases: [EnvEdit; 5] = [
        (|e| e.options.fast = false, "fast paths are off"),
        (|e| e.autocast = true, "autocast"),
        (|e| e.patched_torch = true, "was replaced"),
        (|e| e.saved_tensor_hooks = true, "saved-tensor hooks"),
        (|e| e.input_subclass = true, "subclass"),
    ];
    for (set, reason) in cases {
        let mut e = env();
        set(&mut e);
        refused(&unfused(depthwise(), true), &e, reason);
        refused(&fused(pointwise()), &e, reason);
    }
}

#[test]
fn child_states_the_fast_paths_do_not_model_are_refused_by_name() {
    let mut mixed = unfused(depthwise(), true);
    if let Body::Branches { conv, .. } = &mut mixed.body {
        conv[1].bn.training = Some(false);
    }
    refused(&mixed, &env(), "some BNs train");
    let mut hooked = unfused(pointwise(), true);
    if let Body::Branches { conv, .. } = &mut hooked.body {
        conv[0].conv.plain = false;
    }
    refused(&hooked, &env(), "rbr_conv.0.conv");
    let mut reflect = unfused(depthwise(), false);
    if let Body::Branches { scale: Some(s), .. } = &mut reflect.body {
        s.conv.zeros_padding = false;
    }
    refused(&reflect, &env(), "rbr_scale.conv");
    let mut eps = unfused(pointwise(), true);
    if let Body::Branches { skip: Some(s), .. } = &mut eps.body {
        s.eps = Some(0.0);
    }
    refused(&eps, &env(), "rbr_skip.eps");
    let opaque = BlockState {
        body: Body::Opaque("rbr_conv.0.bn is a SyncBatchNorm".into()),
        ..unfused(depthwise(), true)
    };
    refused(&opaque, &env(), "SyncBatchNorm");
    let mut truthy = unfused(depthwise(), false);
    if let Body::Branches { conv, .. } = &mut truthy.body {
        conv[0].bn.training = None; // `bn.training = 1`: torch reads it as truthy
    }
    refused(&truthy, &env(), "rbr_conv.0.bn.training");
    let mut relu = unfused(depthwise(), true);
    relu.activation_plain = false;
    refused(&relu, &env(), "activation");
}

#[test]
fn non_finite_inputs_and_weights_leave_the_folded_and_cpu_eval_paths() {
    let no_grad = Env {
        grad_enabled: false,
        ..env()
    };
    let x = input();
    let _ = x.get(0).get(1).get(2).get(3).fill_(f64::INFINITY);
    for block in [
        unfused(depthwise(), false),
        fused(depthwise()),
        unfused(pointwise(), false),
    ] {
        let plan = choose(&x, &block, &no_grad).unwrap();
        assert_eq!(plan.path(), Path::Module, "{:?}", plan.reason);
        assert!(plan.reason.contains("NaN or inf"));
    }
    // The fused libtorch conv is the reference's own op: inf goes where the reference puts it.
    assert_eq!(
        choose(&x, &fused(pointwise()), &no_grad).unwrap().path(),
        Path::Fused
    );
    // A non-finite weight: the CPU kernel would multiply the zero padding by it, the fold would
    // spread it otherwise than the branches.
    let finite = input();
    let mut inf_weight = fused(depthwise());
    if let Body::Fused(conv) = &mut inf_weight.body {
        let _ = conv.weight.get(0).fill_(f64::INFINITY);
    }
    let mut nan_var = unfused(depthwise(), false);
    if let Body::Branches { conv, .. } = &mut nan_var.body {
        let _ = conv[0].bn.running_var.as_mut().unwrap().fill_(f64::NAN);
    }
    for block in [inf_weight, nan_var] {
        let plan = choose(&finite, &block, &no_grad).unwrap();
        assert_eq!(plan.path(), Path::Module, "{:?}", plan.reason);
        assert!(plan.reason.contains("weights hold NaN or inf"));
    }
}

#[test]
fn a_plan_refuses_other_inputs_and_other_paths() {
    let no_grad = Env {
        grad_enabled: false,
        ..env()
    };
    let p = plan(&unfused(depthwise(), false), &no_grad);
    assert!(p.run_eval(&input()).is_ok());
    let other = Tensor::randn([2, C, 9, 5], (Kind::Float, tch::Device::Cpu));
    assert!(p.run_eval(&other).is_err());
    let double = input().to_kind(Kind::Double);
    let err = p.run_eval(&double).unwrap_err().to_string();
    assert!(err.contains("Double"), "{err}");
    assert!(p.train_forward(&input()).is_err());
    assert!(p.parameters().is_err());
}
