//! `Plan`: the dispatcher's verdict for one call, carrying the checked tensors its path runs on.
//! The shell dispatches once per call; the eval paths run from the plan, and the autograd
//! Function carries it into its backward (no second dispatch, no re-conversion).

use std::sync::{Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use super::convert::{input_tensor, tensor_arg};
use super::released;
use super::spec::PyBlockSpec;
use crate::error::{Error, Result};
use crate::forward::{Path, Plan};

/// The path of one block call and what it runs on (see `MobileOneBlock.forward_path`).
#[pyclass(frozen, name = "Plan", module = "mobileone_rs._native")]
pub struct PyPlan {
    // tch tensors are Send but not Sync: the lock makes the plan shareable across the threads
    // autograd may run the backward on. It is never contended.
    plan: Mutex<Plan>,
    path: Path,
    reason: String,
    spec: PyBlockSpec,
}

impl From<Plan> for PyPlan {
    fn from(plan: Plan) -> Self {
        PyPlan {
            path: plan.path(),
            reason: plan.reason.clone(),
            spec: PyBlockSpec(plan.spec),
            plan: Mutex::new(plan),
        }
    }
}

impl PyPlan {
    fn plan(&self) -> Result<MutexGuard<'_, Plan>> {
        self.plan
            .lock()
            .map_err(|_| Error::Internal("a plan was poisoned by an earlier failure".into()))
    }
}

fn tensors(ts: Vec<tch::Tensor>) -> Vec<PyTensor> {
    ts.into_iter().map(PyTensor).collect()
}

#[pymethods]
impl PyPlan {
    /// The path's name: `"module"`, `"train_gram"`, `"train_depthwise_cpu"`, `"train_depthwise"`,
    /// `"folded"`, `"folded_cpu"`, `"fused"` or `"fused_cpu"`.
    #[getter]
    fn name(&self) -> &'static str {
        self.path.name()
    }

    /// Why this path (for the module path: what rules the fast paths out).
    #[getter]
    fn reason(&self) -> &str {
        &self.reason
    }

    /// Whether the shell runs the reference's module path.
    #[getter]
    fn module(&self) -> bool {
        self.path == Path::Module
    }

    /// Whether this is an exact training path (run through the autograd Function).
    #[getter]
    fn training(&self) -> bool {
        matches!(self.path, Path::Train(_))
    }

    /// The block as this call saw it (`num_conv_branches` as read at the call).
    #[getter]
    fn spec(&self) -> PyBlockSpec {
        self.spec
    }

    /// Runs an eval path on `x` (the input the plan was made for): SE and ReLU included.
    fn run(&self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        let x = input_tensor(x)?;
        released(py, move || Ok(PyTensor(self.plan()?.run_eval(&x)?)))
    }

    /// The exact train-time branch sum (before SE and ReLU), updating every BN's running
    /// statistics: `(sum, saved)`, or `None` when the batch statistics are not finite (nothing
    /// was updated: the shell runs the module path).
    fn train_forward(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
    ) -> PyResult<Option<(PyTensor, Vec<PyTensor>)>> {
        let x = input_tensor(x)?;
        let out = released(py, move || self.plan()?.train_forward(&x))?;
        Ok(out.map(|f| (PyTensor(f.output), tensors(f.saved))))
    }

    /// The gradients of `train_forward` (input, then per branch kernel, BN weight, BN bias);
    /// `None` when `grad` or `saved` do not fit it.
    fn train_backward(
        &self,
        py: Python<'_>,
        grad: &Bound<'_, PyAny>,
        x: &Bound<'_, PyAny>,
        saved: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Option<Vec<PyTensor>>> {
        let grad = tensor_arg(grad, "grad")?;
        let x = input_tensor(x)?;
        let saved = saved
            .iter()
            .map(|t| tensor_arg(t, "a saved tensor"))
            .collect::<PyResult<Vec<_>>>()?;
        let grads = released(py, move || self.plan()?.train_backward(&grad, &x, &saved))?;
        Ok(grads.map(tensors))
    }

    /// The trainable tensors of a training plan, in the order of `train_backward`'s gradients.
    fn parameters(&self) -> PyResult<Vec<PyTensor>> {
        let plan = self.plan()?;
        let params = plan.parameters()?;
        Ok(params
            .into_iter()
            .map(|t| PyTensor(t.shallow_clone()))
            .collect())
    }

    /// Each branch's BN eps, in the order of `parameters`' branches.
    fn batch_norm_eps(&self) -> PyResult<Vec<f64>> {
        Ok(self.plan()?.batch_norm_eps()?)
    }

    /// SE (when the block has one) then ReLU, applied to a branch sum.
    fn activate(&self, py: Python<'_>, y: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        let y = input_tensor(y)?;
        released(py, move || Ok(PyTensor(self.plan()?.activate(y)?)))
    }

    fn __repr__(&self) -> String {
        format!("Plan({:?}, {:?})", self.path.name(), self.reason)
    }
}
