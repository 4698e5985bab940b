//! The one error type of the core: every fallible path returns `Result<_, Error>`.

use thiserror::Error;

/// Everything that can go wrong in the core, by what the caller did wrong.
#[derive(Debug, Error)]
pub enum Error {
    /// A constructor argument or stage plan that cannot describe a valid MobileOne block.
    #[error("{0}")]
    Config(String),
    /// A constructor argument of the wrong type (a string where a bool belongs, a float where an
    /// integer does).
    #[error("{0}")]
    ArgumentType(String),
    /// An input tensor of the wrong rank or channel count.
    #[error("{0}")]
    InputShape(String),
    /// An input tensor whose dtype or device differs from the module's weights.
    #[error("{0}")]
    InputType(String),
    /// A model yaml that cannot be read or does not describe MobileOne stages.
    #[error("{0}")]
    Yaml(String),
    /// A fused kernel or bias that does not fit in the weights' dtype.
    #[error("{0}")]
    FuseOverflow(String),
    /// An error raised by libtorch itself.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A broken invariant inside the package (a bug; the call was refused, nothing crashed).
    #[error("internal error in mobileone_rs (please report it): {0}")]
    Internal(String),
}

/// The core's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// A device as messages name it. tch reports every device but CPU, CUDA and Vulkan (meta, MPS,
/// XPU, ...) as MPS, so that one is named by what it may be.
pub(crate) fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cpu => "cpu".into(),
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        tch::Device::Vulkan => "vulkan".into(),
        tch::Device::Mps => "a device other than cpu and cuda (meta, mps, xpu, ...)".into(),
    }
}

/// Builds an [`Error::Config`] from a message.
pub(crate) fn config(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}
