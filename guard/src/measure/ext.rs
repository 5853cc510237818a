//! The guard's binding to what tch does not expose of libtorch (`libtorch_ext.cpp`): the
//! default random generators' state ([`super::rng`]), a parameter's gradient slot, and the
//! loss's last node with backward passes from its input (M6's per-sample terms,
//! [`super::isolation`]).
use crate::error::{GuardError, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::Tensor;

extern "C" {
    fn gg_rng_get_state(device: c_int, error: *mut *mut c_char) -> *mut c_void;
    fn gg_rng_set_state(device: c_int, state: *mut c_void, error: *mut *mut c_char);
    fn gg_set_grad(param: *mut c_void, grad: *mut c_void, error: *mut *mut c_char);
    fn gg_ext_free_error(error: *mut c_char);
    fn gg_loss_head(loss: *mut c_void, name: *mut *mut c_char, inputs: *mut c_int, sizes: *mut i64, dims: *mut c_int, error: *mut *mut c_char);
    fn gg_loss_head_grad(loss: *mut c_void, error: *mut *mut c_char) -> *mut c_void;
    fn gg_loss_head_backward(loss: *mut c_void, grad: *mut c_void, params: *const *mut c_void, count: c_int, out: *mut *mut c_void, error: *mut *mut c_char);
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

/// The last operation of a scalar loss: its node's name (`NllLossBackward0`, `MeanBackward0`),
/// how many differentiable inputs it has, and the shape of the first (None when the node does
/// not record one).
pub(crate) struct LossHead {
    pub(crate) node: String,
    pub(crate) inputs: usize,
    pub(crate) shape: Option<Vec<i64>>,
}

/// The loss's last operation ([`LossHead`]); an error for a loss without a graph.
pub(crate) fn loss_head(loss: &Tensor) -> Result<LossHead> {
    let mut name: *mut c_char = std::ptr::null_mut();
    let (mut inputs, mut dims): (c_int, c_int) = (0, -1);
    let mut sizes = [0i64; 8];
    checked("reading the loss's last operation", |e| unsafe {
        gg_loss_head(loss.as_ptr() as *mut c_void, &mut name, &mut inputs, sizes.as_mut_ptr(), &mut dims, e)
    })?;
    let node = if name.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null name is a NUL-terminated string the binding allocated with strdup.
        let text = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
        unsafe { gg_ext_free_error(name) };
        text
    };
    let shape = usize::try_from(dims).ok().map(|d| sizes[..d.min(8)].to_vec());
    Ok(LossHead { node, inputs: usize::try_from(inputs).unwrap_or(0), shape })
}

/// dL/dT at the loss's last operation's one differentiable input T, the graph kept.
pub(crate) fn loss_head_grad(loss: &Tensor) -> Result<Tensor> {
    let grad = checked("differentiating the loss at its last operation", |e| unsafe { gg_loss_head_grad(loss.as_ptr() as *mut c_void, e) })?;
    // SAFETY: a non-null result is a heap at::Tensor the binding made for us to own.
    Ok(unsafe { Tensor::from_ptr(grad as *mut torch_sys::C_tensor) })
}

/// The gradients of <grad, T> (T: the loss's last operation's input) with respect to `params`,
/// through the loss's graph, which is kept; undefined where a parameter is not reached.
pub(crate) fn loss_head_backward(loss: &Tensor, grad: &Tensor, params: &[Tensor]) -> Result<Vec<Tensor>> {
    let count = c_int::try_from(params.len()).map_err(|_| GuardError::Config { setting: "parameters", why: "too many parameter tensors".into() })?;
    let pointers: Vec<*mut c_void> = params.iter().map(|p| p.as_ptr() as *mut c_void).collect();
    let mut out: Vec<*mut c_void> = vec![std::ptr::null_mut(); params.len()];
    checked("a backward pass from the loss's last operation", |e| unsafe {
        gg_loss_head_backward(loss.as_ptr() as *mut c_void, grad.as_ptr() as *mut c_void, pointers.as_ptr(), count, out.as_mut_ptr(), e)
    })?;
    // SAFETY: on success every slot holds a heap at::Tensor the binding made for us to own.
    Ok(out.into_iter().map(|t| unsafe { Tensor::from_ptr(t as *mut torch_sys::C_tensor) }).collect())
}
