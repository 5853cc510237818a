//! The extension's errors: the Python exception classes, the Rust-side error, and the wrapper that
//! runs every entry point without the GIL and turns a panic into an `InternalError`.
use gradguard_guard::GuardError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

create_exception!(gradguard, GradguardError, PyException, "Base class of every gradguard error.");
create_exception!(gradguard, ConfigError, GradguardError, "A setting has an unknown key or a bad value (a round's config, a metrics address).");
create_exception!(
    gradguard,
    ParameterError,
    GradguardError,
    "The given parameters do not match the local model (names, shapes, dtypes, values)."
);
create_exception!(gradguard, DataError, GradguardError, "The client's data partition cannot be used (empty, bad spec).");
create_exception!(gradguard, PolicyError, GradguardError, "The privacy policy is invalid or does not fit the model.");
create_exception!(
    gradguard,
    ModelError,
    GradguardError,
    "The model file cannot be used (missing, not TorchScript, does not fit the data); the message names the file."
);
create_exception!(
    gradguard,
    InputError,
    GradguardError,
    "A batch the guard cannot use (shapes, dtypes, devices, labels), or a loss function that raised or returned no finite scalar; the model is left as it was."
);
create_exception!(gradguard, AuditError, GradguardError, "The audit log cannot be opened or written; the message names the file.");
create_exception!(gradguard, InternalError, GradguardError, "A libtorch failure or a caught panic inside the extension.");
create_exception!(
    gradguard,
    StateError,
    GradguardError,
    "The guard state saved beside the audit log is missing, rolled back, altered or unreadable: nothing is released until an operator resets it (`gradguard log reset-state LOG`)."
);

/// The extension's errors before they become Python exceptions.
#[derive(Debug)]
pub(crate) enum FlError {
    Config(String),
    Parameter(String),
    Data(String),
    Policy(String),
    Model(String),
    Internal(String),
    State(String),
}

impl From<FlError> for PyErr {
    fn from(e: FlError) -> PyErr {
        match e {
            FlError::Config(m) => ConfigError::new_err(m),
            FlError::Parameter(m) => ParameterError::new_err(m),
            FlError::Data(m) => DataError::new_err(m),
            FlError::Policy(m) => PolicyError::new_err(m),
            FlError::Model(m) => ModelError::new_err(m),
            FlError::Internal(m) => InternalError::new_err(m),
            FlError::State(m) => StateError::new_err(m),
        }
    }
}

impl From<tch::TchError> for FlError {
    fn from(e: tch::TchError) -> Self {
        FlError::Internal(format!("libtorch: {e}"))
    }
}

impl From<gradguard_models::data::DataError> for FlError {
    fn from(e: gradguard_models::data::DataError) -> Self {
        FlError::Data(e.to_string())
    }
}

impl From<gradguard_models::ModelError> for FlError {
    /// The models crate's loader errors name the file and what is wrong with it; data files
    /// are `DataError`s, the model file (and a model that does not fit the data) `ModelError`s.
    fn from(e: gradguard_models::ModelError) -> Self {
        use gradguard_models::ModelError as A;
        match e {
            A::ModelFit { .. } | A::UnknownModel { .. } => FlError::Model(e.to_string()),
            A::NotFound { .. } | A::NotNpy { .. } | A::Dtype { .. } | A::Shape { .. } | A::NonFinite { .. } | A::LabelRange { .. } | A::Usage(_) => FlError::Data(e.to_string()),
            other => FlError::Model(other.to_string()),
        }
    }
}

impl From<GuardError> for FlError {
    fn from(e: GuardError) -> Self {
        match e {
            GuardError::Policy(_) | GuardError::PolicyRejected { .. } => FlError::Policy(e.to_string()),
            GuardError::UnknownParameter { .. } | GuardError::ParameterShape { .. } => FlError::Parameter(e.to_string()),
            GuardError::EmptyBatch | GuardError::BatchMismatch { .. } | GuardError::InputShape { .. } => FlError::Data(e.to_string()),
            GuardError::Config { .. } => FlError::Config(e.to_string()),
            GuardError::StateFile(_) => FlError::State(e.to_string()),
            other => FlError::Internal(other.to_string()),
        }
    }
}

pub(crate) type FlResult<T> = Result<T, FlError>;

/// Runs `f` without the GIL and turns a panic into an `InternalError`.
pub(crate) fn guarded<T: Send>(py: Python<'_>, what: &str, f: impl FnOnce() -> FlResult<T> + Send) -> PyResult<T> {
    let out = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    match out {
        Ok(result) => result.map_err(PyErr::from),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(InternalError::new_err(format!("internal error while {what} (a Rust panic, caught): {msg}")))
        }
    }
}

