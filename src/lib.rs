//! mobileone_rs: Apple's MobileOne re-parameterizable block (arXiv 2206.04040) over libtorch,
//! with Python bindings that YOLOv9 can use unchanged.

pub mod block;
pub mod config;
mod depthwise;
pub mod error;
pub mod fusion;
mod patch;
pub mod se;
pub mod stage;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use block::{BlockSpec, Branches};
pub use depthwise::set_patch_kernel;
pub use error::{Error, Result};
pub use fusion::{BatchNorm, ConvBn};
pub use se::SqueezeExcite;
pub use stage::{plan_stage, StageSpec};
