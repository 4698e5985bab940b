//! `BlockSpec`: a block's constructor arguments, built and validated once (keyword-only, strict
//! types), then passed to every call as it is.

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
    #[new]
    #[pyo3(signature = (*, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, use_se, num_conv_branches))]
    #[allow(clippy::too_many_arguments)] // keyword-only constructor: the arguments are the fields
    fn new(
        in_channels: &Bound<'_, PyAny>,
        out_channels: &Bound<'_, PyAny>,
        kernel_size: &Bound<'_, PyAny>,
        stride: &Bound<'_, PyAny>,
        padding: &Bound<'_, PyAny>,
        dilation: &Bound<'_, PyAny>,
        groups: &Bound<'_, PyAny>,
        use_se: &Bound<'_, PyAny>,
        num_conv_branches: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let spec = BlockSpec {
            in_channels: int_arg(in_channels, "in_channels")?,
            out_channels: int_arg(out_channels, "out_channels")?,
            kernel_size: int_arg(kernel_size, "kernel_size")?,
            stride: int_arg(stride, "stride")?,
            padding: int_arg(padding, "padding")?,
            dilation: int_arg(dilation, "dilation")?,
            groups: int_arg(groups, "groups")?,
            use_se: bool_arg(use_se, "use_se")?,
            num_conv_branches: int_arg(num_conv_branches, "num_conv_branches")?,
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
