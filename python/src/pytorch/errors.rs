//! The PyTorch front end's errors: the engine's [`GuardError`] as the typed Python exception a
//! user catches, with libtorch's message trimmed to its informative line (no C++ backtrace
//! reaches Python), and a Python exception raised inside the user's functions as the cause.
use crate::errors::{AuditError, ConfigError, InputError, InternalError, PolicyError, StateError};
use gradguard_guard::error::torch_message;
use gradguard_guard::GuardError;
use pyo3::prelude::*;

/// The exception for `e`, raised while `what`; `raised` is the exception a Python callback
/// raised during the step, if one did (the engine only saw its message).
pub(crate) fn to_py(py: Python<'_>, what: &str, e: GuardError, raised: Option<PyErr>) -> PyErr {
    if let Some(cause) = raised {
        let err = InputError::new_err(format!("{what}: {}", torch_message(&e.to_string())));
        err.set_cause(py, Some(cause));
        return err;
    }
    let message = format!("{what}: {}", torch_message(&e.to_string()));
    match e {
        GuardError::Policy(_) | GuardError::PolicyRejected { .. } => PolicyError::new_err(message),
        GuardError::EmptyBatch
        | GuardError::BatchMismatch { .. }
        | GuardError::InputShape { .. }
        | GuardError::AttributeKind(_)
        | GuardError::SampleIdKind(_)
        | GuardError::NonFiniteLoss { .. }
        | GuardError::LossNotScalar(_)
        | GuardError::DiscreteInputs { .. }
        | GuardError::Embedding(_)
        | GuardError::UnknownParameter { .. }
        | GuardError::ParameterShape { .. } => InputError::new_err(message),
        GuardError::Config { .. } | GuardError::Layers(_) | GuardError::NoParameters => ConfigError::new_err(message),
        GuardError::Audit(_) => AuditError::new_err(message),
        GuardError::StateFile(_) => StateError::new_err(message),
        _ => InternalError::new_err(message),
    }
}
