//! `BlockSpec`: a block's constructor arguments, built and validated once (keyword-only, strict
//! types), then passed to every call as it is.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::convert::{bool_arg, int_arg};
use crate::spec::BlockSpec;

/// The arguments of a `MobileOneBlock`, validated: `ConfigError` names the first wrong one.
#[pyclass(frozen, eq, hash, name = "BlockSpec", module = "mobileone_rs._native")]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PyBlockSpec(pub BlockSpec);

const FIELDS: [&str; 9] = [
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "use_se",
    "num_conv_branches",
];

#[pymethods]
impl PyBlockSpec {
    /// The field names, in the order old pickles stored them as a tuple.
    #[classattr]
    #[pyo3(name = "FIELDS")]
    fn fields(py: Python<'_>) -> PyResult<Py<PyTuple>> {
        Ok(PyTuple::new(py, FIELDS)?.unbind())
    }

    #[new]
    #[pyo3(signature = (**fields))]
    #[pyo3(
        text_signature = "(*, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, use_se, num_conv_branches)"
    )]
    fn new(py: Python<'_>, fields: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let empty = PyDict::new(py);
        let fields = fields.unwrap_or(&empty);
        for key in fields.keys() {
            let key: String = key.extract()?;
            if !FIELDS.contains(&key.as_str()) {
                return Err(PyTypeError::new_err(format!(
                    "BlockSpec() got an unexpected keyword argument {key:?}"
                )));
            }
        }
        let field = |name: &str| -> PyResult<Bound<'_, PyAny>> {
            fields.get_item(name)?.ok_or_else(|| {
                PyTypeError::new_err(format!(
                    "BlockSpec() missing required keyword argument {name:?}"
                ))
            })
        };
        let int = |name: &str| int_arg(&field(name)?, name);
        let spec = BlockSpec {
            in_channels: int("in_channels")?,
            out_channels: int("out_channels")?,
            kernel_size: int("kernel_size")?,
            stride: int("stride")?,
            padding: int("padding")?,
            dilation: int("dilation")?,
            groups: int("groups")?,
            use_se: bool_arg(&field("use_se")?, "use_se")?,
            num_conv_branches: int("num_conv_branches")?,
        };
        spec.validate()?;
        Ok(PyBlockSpec(spec))
    }

    #[getter]
    fn in_channels(&self) -> i64 {
        self.0.in_channels
    }
    #[getter]
    fn out_channels(&self) -> i64 {
        self.0.out_channels
    }
    #[getter]
    fn kernel_size(&self) -> i64 {
        self.0.kernel_size
    }
    #[getter]
    fn stride(&self) -> i64 {
        self.0.stride
    }
    #[getter]
    fn padding(&self) -> i64 {
        self.0.padding
    }
    #[getter]
    fn dilation(&self) -> i64 {
        self.0.dilation
    }
    #[getter]
    fn groups(&self) -> i64 {
        self.0.groups
    }
    #[getter]
    fn use_se(&self) -> bool {
        self.0.use_se
    }
    #[getter]
    fn num_conv_branches(&self) -> i64 {
        self.0.num_conv_branches
    }
    /// Whether the block has a BN skip branch (`in == out` and stride 1).
    #[getter]
    fn has_skip(&self) -> bool {
        self.0.has_skip()
    }
    /// Whether the block has a 1x1 conv+BN scale branch (`kernel_size > 1`).
    #[getter]
    fn has_scale(&self) -> bool {
        self.0.has_scale()
    }

    /// The fields as a dict of plain values (what a pickle of a block stores).
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.0;
        let ints = [
            s.in_channels,
            s.out_channels,
            s.kernel_size,
            s.stride,
            s.padding,
            s.dilation,
            s.groups,
        ];
        let dict = PyDict::new(py);
        for (name, value) in FIELDS.iter().zip(ints) {
            dict.set_item(name, value)?;
        }
        dict.set_item("use_se", s.use_se)?;
        dict.set_item("num_conv_branches", s.num_conv_branches)?;
        Ok(dict)
    }

    fn __getnewargs_ex__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyTuple>, Bound<'py, PyDict>)> {
        Ok((PyTuple::empty(py), self.as_dict(py)?))
    }

    fn __copy__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __deepcopy__(slf: Py<Self>, _memo: &Bound<'_, PyAny>) -> Py<Self> {
        slf
    }

    fn __repr__(&self) -> String {
        let s = &self.0;
        format!(
            "BlockSpec(in_channels={}, out_channels={}, kernel_size={}, stride={}, padding={}, \
             dilation={}, groups={}, use_se={}, num_conv_branches={})",
            s.in_channels,
            s.out_channels,
            s.kernel_size,
            s.stride,
            s.padding,
            s.dilation,
            s.groups,
            if s.use_se { "True" } else { "False" },
            s.num_conv_branches
        )
    }
}
