//! mobileone_rs: Apple's MobileOne re-parameterizable block (arXiv 2206.04040) over libtorch,
//! with Python bindings that YOLOv9 can use unchanged. The modules form an acyclic graph, lower
//! layers first:
//!
//! - [`error`]: the one error enum of the core.
//! - [`spec`]: what a block or stage is before any tensor: constructor arguments and their
//!   validation, the stage plan, the YOLO model yaml.
//! - [`cpu`]: the CPU kernels of depthwise blocks and the only code that touches raw memory
//!   (every check at its entrance), SIMD behind a proof-of-feature token, threads.
//! - [`fuse`]: the re-parameterization math: BN folding, kernel padding, identity kernels, the
//!   fused kernel and bias of a block.
//! - [`train`]: the exact train-time paths that never store a branch output (pointwise Gram,
//!   depthwise patch moments or recompute) and the BatchNorm algebra they share.
//! - [`forward`]: the one dispatcher that picks a block's path from the complete state, the cost
//!   rule that keeps a fast path only where it is expected to beat the module path, the fused and
//!   folded eval forwards, and squeeze-excite.
//! - `python` (feature `python`): the pyo3 bindings: argument conversion, GIL release, one
//!   error mapping, the `#[pymodule]`.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cpu;
pub mod error;
pub mod forward;
pub mod fuse;
pub mod spec;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
pub use fuse::{BatchNorm, Branches, ConvBn};
pub use spec::stage::{plan_stage, StageSpec};
pub use spec::BlockSpec;
