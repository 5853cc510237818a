//! The guard's binding to what tch does not expose of libtorch (`libtorch_ext.cpp`): the
//! default random generators' state ([`super::rng`]) and a parameter's gradient slot.
use crate::error::{GuardError, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::Tensor;

extern "C" {
    fn gg_rng_get_state(device: c_int, error: *mut *mut c_char) -> *mut c_void;
    fn gg_rng_set_state(device: c_int, state: *mut c_void, error: *mut *mut c_char);
    fn gg_set_grad(param: *mut c_void, grad: *mut c_void, error: *mut *mut c_char);
    fn gg_ext_free_error(error: *mut c_char);
}

/// Runs one binding call with an error slot; its message becomes the error.
fn checked<T>(what: &'static str, call: impl FnOnce(*mut *mut c_char) -> T) -> Result<T> {
    let mut error: *mut c_char = std::ptr::null_mut();
    let out = call(&mut error);
    if error.is_null() {
        return Ok(out);
    }
    // SAFETY: a non-null error is a NUL-terminated string the binding allocated with strdup.
    let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { gg_ext_free_error(error) };
    Err(GuardError::Torch { context: what, source: tch::TchError::Torch(message) })
}

/// A copy of the default generator's state of `device` (tch's numbering: -1 the host, i CUDA i).
pub(crate) fn rng_state(device: c_int) -> Result<Tensor> {
    let state = checked("saving libtorch's random generator state", |e| unsafe { gg_rng_get_state(device, e) })?;
    // SAFETY: a non-null result is a heap at::Tensor the binding made for us to own.
    Ok(unsafe { Tensor::from_ptr(state as *mut torch_sys::C_tensor) })
}

/// Puts a state taken by [`rng_state`] back.
pub(crate) fn set_rng_state(device: c_int, state: &Tensor) -> Result<()> {
    // SAFETY: the tensor outlives the call; the binding copies from it.
    checked("restoring libtorch's random generator state", |e| unsafe { gg_rng_set_state(device, state.as_ptr() as *mut c_void, e) })
}

/// `param.grad = grad`: the tensor itself becomes the parameter's gradient (what a backward
/// pass would have accumulated into an empty slot).
pub(crate) fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    // SAFETY: both tensors outlive the call; the binding takes its own reference to `grad`.
    checked("setting a parameter's gradient", |e| unsafe { gg_set_grad(param.as_ptr() as *mut c_void, grad.as_ptr() as *mut c_void, e) })
}
