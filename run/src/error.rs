//! Why a guarded run could not start or go on.
use gradguard_guard::GuardError;
use gradguard_models::ModelError;
use gradguard_tch::BuildError;
use tch::TchError;

/// Why a run could not start or go on. A step that fails ends the run with the step's error;
/// the guard has then applied nothing of that step.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Options that do not go together (the message names the command-line flag).
    #[error("{0}")]
    Usage(String),
    /// The model or its data could not be used, or an output could not be written.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The guard refused a step or its log (a non-finite batch is a block, not this).
    #[error(transparent)]
    Guard(Box<GuardError>),
    /// The guarded optimizer could not be built (the policy does not fit the model).
    #[error(transparent)]
    Build(Box<BuildError>),
    /// A libtorch error outside the guard (the unguarded baseline's step, evaluation).
    #[error(transparent)]
    Torch(#[from] TchError),
    /// The metrics exporter could not start (a busy port, an address that is not one).
    #[error("metrics exporter: {0}")]
    Exporter(#[from] gradguard_exporter::ExporterError),
    /// The model's parameters were refused before training on them (`Vetting::refusal`):
    /// nothing was trained.
    #[error("{0}")]
    Refused(String),
    /// The report could not be serialised.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl From<GuardError> for RunError {
    fn from(e: GuardError) -> Self {
        Self::Guard(Box::new(e))
    }
}

impl From<BuildError> for RunError {
    fn from(e: BuildError) -> Self {
        Self::Build(Box::new(e))
    }
}

/// The result type of runs.
pub type Result<T, E = RunError> = std::result::Result<T, E>;
