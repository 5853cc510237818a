//! libtorch's random stream, kept where the guard found it. The guard's own passes run the
//! user's model (the probes' forward, the per-sample passes), and a dropout layer there draws
//! from the default generator of its device, the one the training step draws from next. A
//! [`RngSnapshot`] taken before the passes and put back after them leaves that stream as if
//! the guard had not run, so a rule-less guarded run with dropout ends bit-identical to the
//! unguarded one. tch exposes no generator state: `rng_state.cpp` reads and writes it.
use crate::error::{GuardError, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{Device, Tensor};

extern "C" {
    fn gg_rng_get_state(device: c_int, error: *mut *mut c_char) -> *mut c_void;
    fn gg_rng_set_state(device: c_int, state: *mut c_void, error: *mut *mut c_char);
    fn gg_rng_free_error(error: *mut c_char);
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
    unsafe { gg_rng_free_error(error) };
    Err(GuardError::Torch { context: what, source: tch::TchError::Torch(message) })
}

/// The states of the default generators a model's passes can draw from: the host's always
/// (host tensors, and ops that draw on the host), and the model's CUDA device's.
pub(crate) struct RngSnapshot {
    saved: Vec<(c_int, Tensor)>,
}

impl RngSnapshot {
    /// Copies the states of the host generator and, for a CUDA model, its device's.
    pub(crate) fn take(device: Device) -> Result<Self> {
        let mut devices = vec![-1];
        if let Device::Cuda(index) = device {
            devices.push(c_int::try_from(index).unwrap_or(c_int::MAX));
        }
        let mut saved = Vec::with_capacity(devices.len());
        for d in devices {
            // SAFETY: a non-null result is a heap at::Tensor the binding made for us to own.
            let state = checked("saving libtorch's random generator state", |e| unsafe { gg_rng_get_state(d, e) })?;
            saved.push((d, unsafe { Tensor::from_ptr(state as *mut torch_sys::C_tensor) }));
        }
        Ok(Self { saved })
    }

    /// Puts every saved state back.
    pub(crate) fn restore(&self) -> Result<()> {
        for (d, state) in &self.saved {
            // SAFETY: the tensor outlives the call; the binding copies from it.
            checked("restoring libtorch's random generator state", |e| unsafe { gg_rng_set_state(*d, state.as_ptr() as *mut c_void, e) })?;
        }
        Ok(())
    }
}
