//! The Python binding layer: the only place that touches pyo3 / pyo3-tch. Every call converts its
//! arguments, runs the core with the GIL released, and maps the core's error once.

mod convert;
mod errors;

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use crate::block::{self, BlockSpec};
use crate::config;
use crate::se::{self, SqueezeExcite};
use crate::stage::{self, StageSpec};
use crate::train;
use convert::{PyBatchNorm, PyBlockSpec, PyConvBn, PySqueezeExcite, SpecTuple};

/// Validates a block's constructor arguments; raises `ConfigError` naming the first bad one.
#[pyfunction]
fn validate_block(spec: PyBlockSpec) -> PyResult<()> {
    Ok(BlockSpec::from(spec).validate()?)
}

/// The seed's SE reduced width `int(in_channels * rd_ratio)`; raises `ConfigError` when it is 0.
#[pyfunction]
fn se_reduced_channels(
    in_channels: &Bound<'_, PyAny>,
    rd_ratio: &Bound<'_, PyAny>,
) -> PyResult<i64> {
    let in_channels = convert::int_arg(in_channels, "in_channels")?;
    Ok(se::reduced_channels(
        in_channels,
        convert::float_arg(rd_ratio, "rd_ratio")?,
    )?)
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

/// Forward of an unfused block: branches with batch statistics when `training`, else one
/// conv folded from the running statistics.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (x, spec, conv, scale, skip, se, training, autocast, raw=false))]
fn block_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    spec: PyBlockSpec,
    conv: Vec<PyConvBn>,
    scale: Option<PyConvBn>,
    skip: Option<PyBatchNorm>,
    se: Option<PySqueezeExcite>,
    training: bool,
    autocast: bool,
    raw: bool,
) -> PyResult<PyTensor> {
    let x = convert::input_tensor(x)?;
    let spec = BlockSpec::from(spec);
    let branches = convert::branches(conv, scale, skip);
    let se = se.map(SqueezeExcite::from);
    let out = py.allow_threads(move || {
        let weight = &branches
            .conv
            .first()
            .ok_or_else(|| crate::error::config("no conv branch"))?
            .weight;
        spec.check_input(&x, weight, autocast)?;
        // Under autocast the seed's branch sum mixes reduced-precision convs with a float32 BN
        // skip; running the branches keeps its output dtype and rounding.
        if training || autocast {
            block::forward_branches(&spec, &branches, se.as_ref(), &x, training)
        } else {
            block::forward_folded(&spec, &branches, se.as_ref(), &x, raw)
        }
    })?;
    Ok(PyTensor(out))
}

/// Checks an input against a block's spec and weight: rank, channels, dtype, device, size.
#[pyfunction]
fn check_input(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    spec: PyBlockSpec,
    weight: PyTensor,
    autocast: bool,
) -> PyResult<()> {
    let x = convert::input_tensor(x)?;
    let spec = BlockSpec::from(spec);
    Ok(py.allow_threads(move || spec.check_input(&x, &weight, autocast))?)
}

fn path_of(spec: &BlockSpec) -> PyResult<train::TrainPath> {
    match train::train_path(spec) {
        train::TrainPath::Branches => {
            Err(crate::error::config("this block has no exact fast training path").into())
        }
        path => Ok(path),
    }
}

/// The train-time path of a block: "gram", "depthwise" or "branches".
#[pyfunction]
fn train_path(spec: PyBlockSpec) -> &'static str {
    match train::train_path(&BlockSpec::from(spec)) {
        train::TrainPath::Gram => "gram",
        train::TrainPath::Depthwise => "depthwise",
        train::TrainPath::Branches => "branches",
    }
}

/// Switches the CPU patch-moment kernel of depthwise training steps on or off (tests use it to
/// run the branch path that CUDA tensors take); returns the previous setting.
#[pyfunction]
fn set_patch_kernel(enabled: bool) -> bool {
    crate::depthwise::set_patch_kernel(enabled)
}

/// The exact train-time branch sum (before SE and ReLU) of a gram or depthwise block, updating the
/// running statistics; returns the sum and the tensors its backward needs.
#[pyfunction]
#[pyo3(signature = (x, spec, conv, scale, skip, raw=false))]
fn train_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    spec: PyBlockSpec,
    conv: Vec<PyConvBn>,
    scale: Option<PyConvBn>,
    skip: Option<PyBatchNorm>,
    raw: bool,
) -> PyResult<(PyTensor, Vec<PyTensor>)> {
    let x = convert::input_tensor(x)?;
    let spec = BlockSpec::from(spec);
    let path = path_of(&spec)?;
    let branches = convert::branches(conv, scale, skip);
    let out = py.allow_threads(move || {
        spec.check_input(&x, &branches.conv[0].weight, false)?;
        train::forward(&spec, &branches, &x, path, raw)
    })?;
    Ok((
        PyTensor(out.output),
        out.saved.into_iter().map(PyTensor).collect(),
    ))
}

/// The gradients of [`train_forward`]: input, then per branch kernel (none for the skip), BN
/// weight, BN bias.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (grad, x, spec, conv, scale, skip, saved))]
fn train_backward(
    py: Python<'_>,
    grad: PyTensor,
    x: PyTensor,
    spec: PyBlockSpec,
    conv: Vec<PyConvBn>,
    scale: Option<PyConvBn>,
    skip: Option<PyBatchNorm>,
    saved: Vec<PyTensor>,
) -> PyResult<Vec<PyTensor>> {
    let spec = BlockSpec::from(spec);
    let path = path_of(&spec)?;
    let branches = convert::branches(conv, scale, skip);
    let saved: Vec<tch::Tensor> = saved.into_iter().map(|t| t.0).collect();
    let grads =
        py.allow_threads(move || train::backward(&spec, &branches, &x, &saved, &grad, path))?;
    Ok(grads.into_iter().map(PyTensor).collect())
}

/// Forward of a re-parameterized block: one conv, SE, ReLU.
#[pyfunction]
#[pyo3(signature = (x, spec, weight, bias, se, autocast, raw=false))]
#[allow(clippy::too_many_arguments)]
fn fused_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    spec: PyBlockSpec,
    weight: PyTensor,
    bias: PyTensor,
    se: Option<PySqueezeExcite>,
    autocast: bool,
    raw: bool,
) -> PyResult<PyTensor> {
    let x = convert::input_tensor(x)?;
    let spec = BlockSpec::from(spec);
    let se = se.map(SqueezeExcite::from);
    let out = py.allow_threads(move || {
        spec.check_input(&x, &weight, autocast)?;
        block::forward_fused(&spec, &weight, &bias, se.as_ref(), &x, raw)
    })?;
    Ok(PyTensor(out))
}

/// SE (when given) then ReLU, as a block applies them after its branch sum.
#[pyfunction]
fn se_relu(py: Python<'_>, x: PyTensor, se: Option<PySqueezeExcite>) -> PyResult<PyTensor> {
    let se = se.map(SqueezeExcite::from);
    Ok(PyTensor(py.allow_threads(move || {
        block::activate(x.0, se.as_ref())
    })?))
}

/// The squeeze-excite forward on its own.
#[pyfunction]
fn se_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    se: PySqueezeExcite,
    autocast: bool,
) -> PyResult<PyTensor> {
    let x = convert::input_tensor(x)?;
    let se = SqueezeExcite::from(se);
    let out = py.allow_threads(move || {
        block::check_input_type(&x, &se.expand_weight, autocast)?;
        se::forward(&se, &x)
    })?;
    Ok(PyTensor(out))
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
    let spec = BlockSpec::from(spec);
    let branches = convert::branches(conv, scale, skip);
    let (kernel, bias) = py.allow_threads(move || {
        let _guard = tch::no_grad_guard();
        block::fused_kernel_bias_checked(&spec, &branches)
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
    let layers = config::mobileone_layers(text, image_channels)?;
    Ok(layers
        .into_iter()
        .map(|l| {
            let s = l.spec;
            (
                l.index,
                (
                    s.in_channels,
                    s.out_channels,
                    s.num_blocks,
                    s.num_conv_branches,
                    s.use_se,
                    s.num_se,
                ),
                l.input_stride,
            )
        })
        .collect())
}

/// The native core of mobileone_rs.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("TORCH_VERSION_BUILT", "2.13")?;
    m.add_function(wrap_pyfunction!(validate_block, m)?)?;
    m.add_function(wrap_pyfunction!(se_reduced_channels, m)?)?;
    m.add_function(wrap_pyfunction!(stage_plan, m)?)?;
    m.add_function(wrap_pyfunction!(block_forward, m)?)?;
    m.add_function(wrap_pyfunction!(fused_forward, m)?)?;
    m.add_function(wrap_pyfunction!(check_input, m)?)?;
    m.add_function(wrap_pyfunction!(train_path, m)?)?;
    m.add_function(wrap_pyfunction!(train_forward, m)?)?;
    m.add_function(wrap_pyfunction!(set_patch_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(train_backward, m)?)?;
    m.add_function(wrap_pyfunction!(se_forward, m)?)?;
    m.add_function(wrap_pyfunction!(se_relu, m)?)?;
    m.add_function(wrap_pyfunction!(fuse_block, m)?)?;
    m.add_function(wrap_pyfunction!(yaml_mobileone_layers, m)?)?;
    Ok(())
}
