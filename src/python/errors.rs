//! The exception hierarchy, declared on the real module path, and the one mapping from the
//! core's [`Error`] to Python exceptions.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyTuple, PyType};

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use crate::error::Error;

create_exception!(
    mobileone_rs,
    MobileOneError,
    PyException,
    "Base class of every mobileone_rs error."
);

static CONFIG_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static INPUT_SHAPE_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static INPUT_TYPE_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static YAML_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static FUSE_OVERFLOW_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static TORCH_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static ARGUMENT_TYPE_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();

/// A subclass of `MobileOneError` and of a builtin, so `except ValueError` still catches it.
fn subclass(
    py: Python<'_>,
    name: &str,
    builtin: Bound<'_, PyType>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    subclass_of(py, name, [py.get_type::<MobileOneError>(), builtin], doc)
}

fn subclass_of<'py>(
    py: Python<'py>,
    name: &str,
    bases: [Bound<'py, PyType>; 2],
    doc: &str,
) -> PyResult<Py<PyType>> {
    let bases = PyTuple::new(py, bases)?;
    let namespace = PyDict::new(py);
    namespace.set_item("__module__", "mobileone_rs")?;
    namespace.set_item("__doc__", doc)?;
    let cls = py.get_type::<PyType>().call1((name, bases, namespace))?;
    Ok(cls.downcast_into::<PyType>()?.unbind())
}

type ErrorClass = (
    &'static GILOnceCell<Py<PyType>>,
    &'static str,
    fn(Python<'_>) -> Bound<'_, PyType>,
    &'static str,
);

const CLASSES: [ErrorClass; 6] = [
    (
        &CONFIG_ERROR,
        "ConfigError",
        |py| py.get_type::<PyValueError>(),
        "Invalid constructor arguments or stage plan.",
    ),
    (
        &INPUT_SHAPE_ERROR,
        "InputShapeError",
        |py| py.get_type::<PyValueError>(),
        "Input of the wrong rank, channels or size.",
    ),
    (
        &INPUT_TYPE_ERROR,
        "InputTypeError",
        |py| py.get_type::<PyTypeError>(),
        "Input that is not a tensor, or of another dtype or device.",
    ),
    (
        &YAML_ERROR,
        "YamlError",
        |py| py.get_type::<PyValueError>(),
        "A model yaml that cannot be read.",
    ),
    (
        &FUSE_OVERFLOW_ERROR,
        "FuseOverflowError",
        |py| py.get_type::<PyOverflowError>(),
        "A fused kernel or bias that overflows the weights' dtype.",
    ),
    (
        &TORCH_ERROR,
        "TorchError",
        |py| py.get_type::<PyRuntimeError>(),
        "An error raised by libtorch.",
    ),
];

/// Creates every exception class and adds it to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MobileOneError", py.get_type::<MobileOneError>())?;
    for (cell, name, builtin, doc) in CLASSES {
        let cls = cell.get_or_try_init(py, || subclass(py, name, builtin(py), doc))?;
        m.add(name, cls.bind(py))?;
    }
    // A wrong-typed constructor argument is a ConfigError (YOLOv9's yaml-layer hint catches it)
    // and a TypeError (as Python reports a wrong type).
    let config = CONFIG_ERROR.get(py).map(|c| c.bind(py).clone());
    let config = config.ok_or_else(|| PyTypeError::new_err("ConfigError is not registered"))?;
    let cls = ARGUMENT_TYPE_ERROR.get_or_try_init(py, || {
        let bases = [config, py.get_type::<PyTypeError>()];
        let doc = "A constructor argument of the wrong type (a str where a bool belongs, ...).";
        subclass_of(py, "ArgumentTypeError", bases, doc)
    })?;
    m.add("ArgumentTypeError", cls.bind(py))?;
    Ok(())
}

fn raise(cell: &GILOnceCell<Py<PyType>>, msg: String) -> PyErr {
    Python::with_gil(|py| match cell.get(py) {
        Some(cls) => PyErr::from_type(cls.bind(py).clone(), msg),
        None => MobileOneError::new_err(msg),
    })
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            Error::Config(_) => raise(&CONFIG_ERROR, msg),
            Error::ArgumentType(_) => raise(&ARGUMENT_TYPE_ERROR, msg),
            Error::InputShape(_) => raise(&INPUT_SHAPE_ERROR, msg),
            Error::InputType(_) => raise(&INPUT_TYPE_ERROR, msg),
            Error::Yaml(_) => raise(&YAML_ERROR, msg),
            Error::FuseOverflow(_) => raise(&FUSE_OVERFLOW_ERROR, msg),
            // libtorch appends a C++ backtrace; the first lines say what went wrong.
            Error::Torch(_) => raise(
                &TORCH_ERROR,
                msg.split("\nException raised from")
                    .next()
                    .unwrap_or("")
                    .to_string(),
            ),
            Error::Internal(_) => raise(&TORCH_ERROR, msg),
        }
    }
}

/// The error for an argument that should have been a tensor.
pub fn not_a_tensor(what: &str, obj: &Bound<'_, PyAny>) -> PyErr {
    Error::InputType(format!(
        "{what} must be a torch.Tensor, got {}",
        type_name(obj)
    ))
    .into()
}

/// The name of `obj`'s type, for error messages.
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Calls in flight under [`guarded`]: while any runs, the panic hook stays silent (the panic
/// becomes an error instead of a message and backtrace on stderr).
static GUARDED: AtomicUsize = AtomicUsize::new(0);

/// Installs a panic hook that is silent inside [`guarded`] calls and defers to the previous hook
/// elsewhere (other Rust code in the process keeps its messages).
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.load(Ordering::SeqCst) == 0 {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic (a broken invariant: the core is written not to panic on any
/// input) into [`Error::Internal`] so Python sees an exception, never a PanicException.
pub fn guarded<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    GUARDED.fetch_add(1, Ordering::SeqCst);
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.fetch_sub(1, Ordering::SeqCst);
    result.unwrap_or_else(|payload| {
        let text = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        Err(Error::Internal(text))
    })
}
