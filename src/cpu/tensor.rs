//! The one entrance from tensors to raw memory: a tensor becomes a slice only after every check
//! below, and metadata queries that libtorch may refuse (nested tensors) are made fallibly.

use std::ffi::CStr;
use std::marker::PhantomData;

use tch::{Device, TchError, Tensor};

use super::geometry::Element;
use crate::error::{Error, Result};

/// The error libtorch left for the last call on this thread, if any (and clears it).
fn take_torch_error() -> Result<()> {
    // SAFETY: torch-sys hands over a malloc'ed C string (or null) that we now own.
    let message = unsafe { torch_sys::get_and_reset_last_err() };
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: non-null, NUL-terminated, owned (above); freed exactly once here.
    let text = unsafe {
        let text = CStr::from_ptr(message).to_string_lossy().into_owned();
        libc::free(message as *mut libc::c_void);
        text
    };
    Err(Error::Torch(TchError::Torch(text)))
}

/// Checks that the tensor's rank, sizes and dtype can be read (so tch's panicking accessors
/// `size()`, `dim()` and `kind()` cannot fail on it): refuses nested tensors, undefined
/// tensors and dtypes tch does not know.
pub fn check_metadata(t: &Tensor, what: &str) -> Result<()> {
    let handle = t.as_ptr() as *mut torch_sys::C_tensor;
    // SAFETY: `handle` is the live tensor `t` owns; errors land in the last-error slot.
    let defined = unsafe { torch_sys::at_defined(handle) };
    take_torch_error()?;
    if defined == 0 {
        return Err(Error::InputType(format!("{what} is an undefined tensor")));
    }
    // SAFETY: as above.
    let dim = unsafe { torch_sys::at_dim(handle) };
    take_torch_error()
        .map_err(|_| unsupported(what, "a tensor whose sizes cannot be read (nested?)"))?;
    let mut sizes = vec![0i64; dim];
    // SAFETY: `sizes` holds `dim` values, as at_shape writes.
    unsafe { torch_sys::at_shape(handle, sizes.as_mut_ptr()) };
    take_torch_error()
        .map_err(|_| unsupported(what, "a tensor whose sizes cannot be read (nested?)"))?;
    t.f_kind()
        .map_err(|_| unsupported(what, "a tensor of a dtype mobileone_rs does not know"))?;
    Ok(())
}

fn unsupported(what: &str, kind: &str) -> Error {
    Error::InputType(format!("{what} is {kind}; pass a dense strided tensor"))
}

/// A CPU tensor of `T` whose memory the kernels read or write as one slice: contiguous, dense
/// and strided, with storage, no lazy negation or conjugation, aligned for `T`.
pub(crate) struct Dense<T> {
    tensor: Tensor,
    ptr: *mut T,
    len: usize,
    _element: PhantomData<T>,
}

impl<T: Element> Dense<T> {
    /// The tensor's memory, copied first when it is not contiguous or not aligned; `None` when
    /// it is not a dense CPU tensor of `T` with storage (the caller runs libtorch instead).
    pub(crate) fn readable(t: &Tensor) -> Result<Option<Self>> {
        if t.device() != Device::Cpu || t.f_kind()? != T::KIND || t.is_sparse() || t.is_mkldnn() {
            return Ok(None);
        }
        let resolved = t.f_resolve_neg()?.f_resolve_conj()?.f_contiguous()?;
        if resolved.numel() == 0 {
            return Ok(None);
        }
        let Some(dense) = Self::wrap(resolved)? else {
            return Ok(None);
        };
        if dense.ptr.align_offset(std::mem::align_of::<T>()) == 0 {
            return Ok(Some(dense));
        }
        // A view at an odd byte offset (torch.frombuffer): copy into a fresh, aligned tensor.
        let copy = Tensor::f_empty(dense.tensor.size(), (T::KIND, Device::Cpu))?;
        copy.shallow_clone().f_copy_(&dense.tensor)?;
        Self::wrap(copy)
    }

    /// A fresh CPU tensor of `size` to fill.
    pub(crate) fn fresh(size: &[i64]) -> Result<Self> {
        let tensor = Tensor::f_empty(size, (T::KIND, Device::Cpu))?;
        match Self::wrap(tensor)? {
            Some(dense) if dense.ptr.align_offset(std::mem::align_of::<T>()) == 0 => Ok(dense),
            _ => Err(Error::Config(format!(
                "libtorch gave no aligned memory for {size:?}"
            ))),
        }
    }

    fn wrap(tensor: Tensor) -> Result<Option<Self>> {
        let handle = tensor.as_ptr() as *mut torch_sys::C_tensor;
        // SAFETY: `handle` is the live tensor we hold; a tensor without storage (functorch
        // wrappers) makes libtorch throw, which lands in the last-error slot.
        let ptr = unsafe { torch_sys::at_data_ptr(handle) } as *mut T;
        if take_torch_error().is_err() || (ptr.is_null() && tensor.numel() > 0) {
            return Ok(None);
        }
        let len = tensor.numel();
        Ok(Some(Dense {
            tensor,
            ptr,
            len,
            _element: PhantomData,
        }))
    }

    /// The elements.
    pub(crate) fn slice(&self) -> &[T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is the aligned, non-null start of `len` contiguous `T`s in a storage
        // that `self.tensor` keeps alive; no other thread writes it during the call (as for any
        // libtorch op on the same tensor).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The elements, to fill (for tensors this module allocated and nobody else holds).
    pub(crate) fn slice_mut(&mut self) -> &mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as `slice`; `&mut self` is the only handle on a fresh tensor.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The tensor, handed back to libtorch.
    pub(crate) fn into_tensor(self) -> Tensor {
        self.tensor
    }
}
