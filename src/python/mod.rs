//! The Python binding layer: the only place that touches pyo3 / pyo3-tch. Every call converts
//! its arguments, runs the core with the GIL released under a panic guard, and maps the core's
//! error once (`errors`). `spec` is the validated block spec, `state` reads the shells'
//! observations by name, `plan` is the dispatcher's verdict that runs a call's path, `convert`
//! the remaining arguments.

mod convert;
mod errors;
mod plan;
mod spec;
mod state;

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use crate::error::Result;
use crate::forward::{self, decision::Decision};
use crate::fuse;
use crate::spec::stage::{self, StageSpec};
use crate::spec::{self as block_spec, yaml};
use convert::{PyFoldBn, PyFoldBranch};
use errors::guarded;
use plan::PyPlan;
use spec::PyBlockSpec;
use state::PyCallEnv;

/// Runs `f` with the GIL released and every panic turned into an error.
fn released<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T> + Send) -> PyResult<T> {
    Ok(py.allow_threads(|| guarded(f))?)
}

/// The reference's SE reduced width `int(in_channels * rd_ratio)`; `ConfigError` when it is 0.
#[pyfunction]
fn se_reduced_channels(
    in_channels: &Bound<'_, PyAny>,
    rd_ratio: &Bound<'_, PyAny>,
) -> PyResult<i64> {
    let in_channels = convert::int_arg(in_channels, "in_channels")?;
    let rd_ratio = convert::float_arg(rd_ratio, "rd_ratio")?;
    Ok(block_spec::se_reduced_channels(in_channels, rd_ratio)?)
}

/// The block specs of a `MobileOne` stage, in order; `ConfigError` names a wrong argument.
#[pyfunction]
fn stage_plan(
    in_channels: &Bound<'_, PyAny>,
    out_channels: &Bound<'_, PyAny>,
    num_blocks_per_stage: &Bound<'_, PyAny>,
    num_conv_branches: &Bound<'_, PyAny>,
    use_se: &Bound<'_, PyAny>,
    num_se: &Bound<'_, PyAny>,
) -> PyResult<Vec<PyBlockSpec>> {
    let spec = StageSpec {
        in_channels: convert::int_arg(in_channels, "in_channels")?,
        out_channels: convert::int_arg(out_channels, "out_channels")?,
        num_blocks: convert::int_arg(num_blocks_per_stage, "num_blocks_per_stage")?,
        num_conv_branches: convert::int_arg(num_conv_branches, "num_conv_branches")?,
        use_se: convert::bool_arg(use_se, "use_se")?,
        num_se: convert::int_arg(num_se, "num_se")?,
    };
    Ok(stage::plan_stage(&spec)?
        .into_iter()
        .map(PyBlockSpec)
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
    released(py, move || spec.0.check_input(&x, &weight, autocast))
}

/// The plan of a block's forward on `x`: its path, why, and what it runs on. Raises for inputs
/// the block cannot take at all (rank, channels, dtype, device, size).
#[pyfunction(name = "plan")]
fn dispatch(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    block: &Bound<'_, PyAny>,
    env: PyCallEnv,
) -> PyResult<PyPlan> {
    let x = convert::input_tensor(x)?;
    let block = state::block(block)?;
    let env = env.into();
    let plan = released(py, move || forward::choose(&x, &block, &env))?;
    Ok(plan.into())
}

/// The squeeze-excite forward of a standalone `SEBlock` of `channels`, or `None` when the state
/// or call needs the module path.
#[pyfunction]
fn se_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    se: &Bound<'_, PyAny>,
    channels: i64,
    env: PyCallEnv,
) -> PyResult<Option<PyTensor>> {
    let x = convert::input_tensor(x)?;
    let (se, env) = (state::se(se)?, env.into());
    released(py, move || {
        match forward::choose_se(&x, &se, channels, &env)? {
            Decision::Fast(se) => Ok(Some(PyTensor(forward::se::forward(&se, &x)?))),
            Decision::Module(_) => Ok(None),
        }
    })
}

/// The `(kernel, bias)` of the one conv equal to every branch in eval mode, in the weights'
/// dtype (computed in at least float32). Raises `FuseOverflowError` when it does not fit.
#[pyfunction]
#[pyo3(signature = (spec, convs, scale, skip))]
fn fuse_block(
    py: Python<'_>,
    spec: PyBlockSpec,
    convs: Vec<PyFoldBranch>,
    scale: Option<PyFoldBranch>,
    skip: Option<PyFoldBn>,
) -> PyResult<(PyTensor, PyTensor)> {
    let spec = crate::spec::BlockSpec {
        num_conv_branches: convs.len() as i64,
        ..spec.0
    };
    let branches = convert::branches(convs, scale, skip)?;
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
    m.add_class::<PyBlockSpec>()?;
    m.add_class::<PyPlan>()?;
    m.add_function(wrap_pyfunction!(se_reduced_channels, m)?)?;
    m.add_function(wrap_pyfunction!(stage_plan, m)?)?;
    m.add_function(wrap_pyfunction!(check_input, m)?)?;
    m.add_function(wrap_pyfunction!(dispatch, m)?)?;
    m.add_function(wrap_pyfunction!(se_forward, m)?)?;
    m.add_function(wrap_pyfunction!(fuse_block, m)?)?;
    m.add_function(wrap_pyfunction!(yaml_mobileone_layers, m)?)?;
    Ok(())
}
