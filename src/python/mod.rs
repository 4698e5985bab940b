//! The Python binding layer: the only place that touches pyo3 / pyo3-tch. Every call converts
//! its arguments, runs the core with the GIL released under a panic guard, and maps the core's
//! error once (`errors`). `convert` and `state` turn the shells' tuples into core types.

mod convert;
mod errors;
mod state;

use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Tensor;

use crate::error::{config, Result};
use crate::forward::{self, Path};
use crate::fuse;
use crate::spec::stage::{self, StageSpec};
use crate::spec::{self as block_spec, yaml};
use crate::train::{self, TrainPath};
use convert::{PyBatchNorm, PyBlockSpec, PyConvBn, SpecTuple};
use errors::guarded;

/// Runs `f` with the GIL released and every panic turned into an error.
fn released<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T> + Send) -> PyResult<T> {
    Ok(py.allow_threads(|| guarded(f))?)
}

/// Validates a block's constructor arguments; raises `ConfigError` naming the first bad one.
#[pyfunction]
fn validate_block(spec: PyBlockSpec) -> PyResult<()> {
    spec.validated().map(|_| ())
}

/// The seed's SE reduced width `int(in_channels * rd_ratio)`; raises `ConfigError` when it is 0.
#[pyfunction]
fn se_reduced_channels(
    in_channels: &Bound<'_, PyAny>,
    rd_ratio: &Bound<'_, PyAny>,
) -> PyResult<i64> {
    let in_channels = convert::int_arg(in_channels, "in_channels")?;
    let rd_ratio = convert::float_arg(rd_ratio, "rd_ratio")?;
    Ok(block_spec::se_reduced_channels(in_channels, rd_ratio)?)
}

/// The block specs of a `MobileOne` stage, in order.
#[pyfunction]
fn stage_plan(
    in_channels: &Bound<'_, PyAny>,
    out_channels: &Bound<'_, PyAny>,
    num_blocks_per_stage: &Bound<'_, PyAny>,
    num_conv_branches: &Bound<'_, PyAny>,
    use_se: bool,
    num_se: &Bound<'_, PyAny>,
) -> PyResult<Vec<SpecTuple>> {
    let spec = StageSpec {
        in_channels: convert::int_arg(in_channels, "in_channels")?,
        out_channels: convert::int_arg(out_channels, "out_channels")?,
        num_blocks: convert::int_arg(num_blocks_per_stage, "num_blocks_per_stage")?,
        num_conv_branches: convert::int_arg(num_conv_branches, "num_conv_branches")?,
        use_se,
        num_se: convert::int_arg(num_se, "num_se")?,
    };
    Ok(stage::plan_stage(&spec)?
        .iter()
        .map(convert::spec_tuple)
        .collect())
}

/// Checks an input against a block's spec and weight: rank, channels, dtype, device, size.
#[pyfunction]
fn check_input(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    spec: PyBlockSpec,
    weight: &Bound<'_, PyAny>,
    autocast: bool,
) -> PyResult<()> {
    let x = convert::input_tensor(x)?;
    let weight = convert::tensor_arg(weight, "the block's weight")?;
    let spec = spec.validated()?;
    released(py, move || spec.check_input(&x, &weight, autocast))
}

/// `(path, reason)`: the path `block_forward` takes for this input and state, and why.
#[pyfunction]
fn forward_path(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    block: &Bound<'_, PyAny>,
    env: &Bound<'_, PyAny>,
) -> PyResult<(&'static str, String)> {
    let x = convert::input_tensor(x)?;
    let (block, env) = (state::block(block)?, state::env(env)?);
    released(py, move || {
        let plan = forward::choose(&x, &block, &env)?;
        Ok((plan.path.name(), plan.reason))
    })
}

/// A block forward's result: the output of a path run here, or the name of one the shell runs
/// (`"module"`, `"train_*"`).
#[derive(IntoPyObject)]
enum Forwarded {
    Output(PyTensor),
    Path(&'static str),
}

/// The forward of a block: runs the eval paths here and returns their output; for the module
/// and training paths returns the path's name.
#[pyfunction]
fn block_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    block: &Bound<'_, PyAny>,
    env: &Bound<'_, PyAny>,
) -> PyResult<Forwarded> {
    let x = convert::input_tensor(x)?;
    let (block, env) = (state::block(block)?, state::env(env)?);
    released(py, move || {
        let plan = forward::choose(&x, &block, &env)?;
        Ok(match forward::run_eval(&block.spec, &plan, &x)? {
            Some(out) => Forwarded::Output(PyTensor(out)),
            None => Forwarded::Path(plan.path.name()),
        })
    })
}

fn train_path_named(name: &str) -> Result<TrainPath> {
    [
        TrainPath::Gram,
        TrainPath::DepthwiseCpu,
        TrainPath::DepthwiseRecompute,
    ]
    .into_iter()
    .find(|p| p.name() == name)
    .ok_or_else(|| config(format!("unknown training path {name:?}")))
}

/// The exact train-time branch sum (before SE and ReLU) on the training path `path`, updating
/// the running statistics; `(sum, saved)`, or `None` when the batch statistics are not finite
/// (nothing updated: the shell runs the module path). The dispatcher must pick `path` for this
/// state, else `ConfigError`.
#[pyfunction]
fn train_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    block: &Bound<'_, PyAny>,
    env: &Bound<'_, PyAny>,
    path: &str,
) -> PyResult<Option<(PyTensor, Vec<PyTensor>)>> {
    let x = convert::input_tensor(x)?;
    let (block, env) = (state::block(block)?, state::env(env)?);
    let path = train_path_named(path)?;
    let out = released(py, move || {
        let plan = forward::choose(&x, &block, &env)?;
        let (Path::Train(chosen), Some(branches)) = (plan.path, plan.branches) else {
            return Err(config(format!(
                "the dispatcher picks {:?} here, not {}",
                plan.path.name(),
                path.name()
            )));
        };
        if chosen != path {
            return Err(config(format!(
                "the dispatcher picks {}, not {}",
                chosen.name(),
                path.name()
            )));
        }
        train::forward(&block.spec, &branches, &x, path)
    })?;
    Ok(out.map(|f| {
        (
            PyTensor(f.output),
            f.saved.into_iter().map(PyTensor).collect(),
        )
    }))
}

/// The gradients of [`train_forward`] (input, then per branch kernel, BN weight, BN bias), for
/// the block state captured at that forward; `None` when `grad` or the saved tensors do not fit.
#[pyfunction]
fn train_backward(
    py: Python<'_>,
    grad: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    block: &Bound<'_, PyAny>,
    path: &str,
    saved: Vec<Bound<'_, PyAny>>,
) -> PyResult<Option<Vec<PyTensor>>> {
    let grad = convert::tensor_arg(grad, "grad")?;
    let x = convert::input_tensor(x)?;
    let block = state::block(block)?;
    let path = train_path_named(path)?;
    let saved = saved
        .iter()
        .map(|t| convert::tensor_arg(t, "a saved tensor"))
        .collect::<PyResult<Vec<Tensor>>>()?;
    let grads = released(py, move || {
        let branches = forward::branches_of(&block)?;
        if x.dim() != 4 || x.size()[1] != block.spec.in_channels {
            return Ok(None);
        }
        train::backward(&block.spec, &branches, &x, &saved, &grad, path)
    })?;
    Ok(grads.map(|g| g.into_iter().map(PyTensor).collect()))
}

/// SE (when the state has one) then ReLU, as a block applies them after its branch sum.
#[pyfunction]
fn se_relu(py: Python<'_>, x: &Bound<'_, PyAny>, se: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
    let x = convert::input_tensor(x)?;
    let se = state::se(se)?;
    released(py, move || {
        let se = forward::se_of(&se, &x)?;
        Ok(PyTensor(forward::se::activate(x, se.as_ref())?))
    })
}

/// The squeeze-excite forward of a standalone `SEBlock` of `channels`, or `None` when the state
/// or call needs the module path.
#[pyfunction]
fn se_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    se: &Bound<'_, PyAny>,
    channels: i64,
    env: &Bound<'_, PyAny>,
) -> PyResult<Option<PyTensor>> {
    let x = convert::input_tensor(x)?;
    let (se, env) = (state::se(se)?, state::env(env)?);
    released(py, move || {
        let Some(se) = forward::choose_se(&x, &se, channels, &env)? else {
            return Ok(None);
        };
        Ok(Some(PyTensor(forward::se::forward(&se, &x)?)))
    })
}

/// The `(kernel, bias)` of the one conv equal to every branch in eval mode, in the weights'
/// dtype (computed in at least float32). Raises `FuseOverflowError` when it does not fit.
#[pyfunction]
#[pyo3(signature = (spec, conv, scale, skip))]
fn fuse_block(
    py: Python<'_>,
    spec: PyBlockSpec,
    conv: Vec<PyConvBn>,
    scale: Option<PyConvBn>,
    skip: Option<PyBatchNorm>,
) -> PyResult<(PyTensor, PyTensor)> {
    let spec = spec.validated()?;
    let branches = convert::branches(conv, scale, skip)?;
    let (kernel, bias) = released(py, move || {
        let _guard = tch::no_grad_guard();
        fuse::check_branches(&spec, &branches)?;
        fuse::fused_kernel_bias_checked(&spec, &branches)
    })?;
    Ok((PyTensor(kernel), PyTensor(bias)))
}

/// `(layer_index, stage_args, input_stride)` of one yaml `MobileOne` row.
type YamlLayer = (usize, (i64, i64, i64, i64, bool, i64), i64);

/// The `MobileOne` layers of a YOLO model yaml: `(layer_index, stage_args, input_stride)`, with
/// `stage_args = (in_channels, out_channels, num_blocks, num_conv_branches, use_se, num_se)`.
#[pyfunction]
#[pyo3(signature = (text, image_channels=3))]
fn yaml_mobileone_layers(text: &str, image_channels: i64) -> PyResult<Vec<YamlLayer>> {
    let layers = yaml::mobileone_layers(text, image_channels)?;
    Ok(layers
        .into_iter()
        .map(|l| {
            let s = l.spec;
            let args = (
                s.in_channels,
                s.out_channels,
                s.num_blocks,
                s.num_conv_branches,
                s.use_se,
                s.num_se,
            );
            (l.index, args, l.input_stride)
        })
        .collect())
}

/// The torch this extension is built for, from build.rs (torch-versions.txt): the libtorch version it
/// compiled against, the torch minors it serves, the wheel's torch requirement, and which build serves
/// each torch minor.
fn add_torch_build(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let list = |s: &'static str| s.split(',').collect::<Vec<_>>();
    m.add("TORCH_BUILT_FOR", env!("MOBILEONE_TORCH_BUILT_FOR"))?;
    let supported = pyo3::types::PyTuple::new(m.py(), list(env!("MOBILEONE_TORCH_SUPPORTED")))?;
    m.add("TORCH_SUPPORTED", supported)?;
    m.add("TORCH_REQUIREMENT", env!("MOBILEONE_TORCH_REQUIREMENT"))?;
    let builds = list(env!("MOBILEONE_TORCH_BUILDS"))
        .into_iter()
        .filter_map(|b| b.split_once('='));
    m.add(
        "TORCH_BUILDS",
        builds.collect::<std::collections::BTreeMap<_, _>>(),
    )?;
    Ok(())
}

/// The native core of mobileone_rs.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    errors::install_panic_hook();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    add_torch_build(m)?;
    m.add_function(wrap_pyfunction!(validate_block, m)?)?;
    m.add_function(wrap_pyfunction!(se_reduced_channels, m)?)?;
    m.add_function(wrap_pyfunction!(stage_plan, m)?)?;
    m.add_function(wrap_pyfunction!(check_input, m)?)?;
    m.add_function(wrap_pyfunction!(forward_path, m)?)?;
    m.add_function(wrap_pyfunction!(block_forward, m)?)?;
    m.add_function(wrap_pyfunction!(train_forward, m)?)?;
    m.add_function(wrap_pyfunction!(train_backward, m)?)?;
    m.add_function(wrap_pyfunction!(se_relu, m)?)?;
    m.add_function(wrap_pyfunction!(se_forward, m)?)?;
    m.add_function(wrap_pyfunction!(fuse_block, m)?)?;
    m.add_function(wrap_pyfunction!(yaml_mobileone_layers, m)?)?;
    Ok(())
}
