//! torch.Tensor <-> tch::Tensor without a copy: both wrap the same libtorch `at::Tensor` (the
//! extension links the libtorch that `torch` loaded, one library in the process), so a tensor
//! unpacked here shares its storage, its `.grad` and its autograd graph with the Python object.
use crate::errors::{InputError, InternalError};
use crate::params::type_name;
use pyo3::prelude::*;
use tch::python::CPyObject;
use tch::Tensor;

/// The libtorch tensor behind a `torch.Tensor`; an `InputError` naming `what` for anything else.
pub(crate) fn unpack(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Tensor> {
    // SAFETY: the pointer is a live Python object (borrowed from `obj` for this call), and the
    // GIL is held: THPVariable_Check/Unpack only read it.
    let unpacked = unsafe { Tensor::pyobject_unpack(obj.as_ptr() as *mut CPyObject) };
    match unpacked {
        Ok(Some(t)) => Ok(t),
        Ok(None) => Err(InputError::new_err(format!("{what} must be a torch.Tensor, got {}", type_name(obj)))),
        Err(e) => Err(InternalError::new_err(format!("reading {what}: {}", gradguard_guard::error::torch_message(&e.to_string())))),
    }
}

/// A `torch.Tensor` sharing `t`'s libtorch tensor (and its autograd history).
pub(crate) fn wrap<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    let ptr = t.pyobject_wrap().map_err(|e| InternalError::new_err(format!("handing a tensor to Python: {}", gradguard_guard::error::torch_message(&e.to_string()))))?;
    // SAFETY: THPVariable_Wrap returns a new reference (or null with the Python error set).
    unsafe { Bound::from_owned_ptr_or_err(py, ptr as *mut pyo3::ffi::PyObject) }
}

/// `[(name, torch.Tensor)]` unpacked, names kept.
pub(crate) fn unpack_named(named: &[(String, Bound<'_, PyAny>)], what: &str) -> PyResult<Vec<(String, Tensor)>> {
    named.iter().map(|(n, t)| Ok((n.clone(), unpack(t, &format!("{what} {n}"))?))).collect()
}
