//! The binding to `device_rng.cpp`: Gaussian samples drawn on a tensor's device by libtorch's
//! own generator for that device type, from a private generator seeded by the caller (never the
//! default generator that training reseeds and draws from).
use std::ffi::{c_char, c_int, c_void, CStr};

use tch::{Kind, Tensor};

use crate::error::Result;

extern "C" {
    fn gg_def_normal(like: *mut c_void, seed: u64, std: f64, double_kind: c_int, error: *mut *mut c_char) -> *mut c_void;
    fn gg_def_free_error(error: *mut c_char);
}

/// N(0, std^2) samples with `like`'s shape and device, in f64 when `kind` is f64 and f32
/// otherwise (f16/bf16 noise is drawn in f32 and rounded by the caller, as the host draw is),
/// from a private generator of `like`'s device type seeded with `seed`: the same seed gives the
/// same bits on the same device and libtorch; libtorch's default generators are not advanced.
pub(crate) fn device_normal(like: &Tensor, std: f64, kind: Kind, seed: u64) -> Result<Tensor> {
    let mut error: *mut c_char = std::ptr::null_mut();
    let double = c_int::from(kind == Kind::Double);
    // SAFETY: `like` outlives the call; the binding only reads its metadata.
    let out = unsafe { gg_def_normal(like.as_ptr() as *mut c_void, seed, std, double, &mut error) };
    if !error.is_null() {
        // SAFETY: a non-null error is a NUL-terminated string the binding allocated with strdup.
        let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
        unsafe { gg_def_free_error(error) };
        return Err(tch::TchError::Torch(format!("drawing noise on {:?}: {message}", like.device())).into());
    }
    // SAFETY: without an error the result is a heap at::Tensor the binding made for us to own.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}
