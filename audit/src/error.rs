//! Why an audit (or the validation study) could not run.
use gradguard_defenses::DefenceError;
use gradguard_guard::GuardError;
use gradguard_models::ModelError;
use std::path::PathBuf;
use tch::TchError;

/// Why an audit (or the validation study) could not run; contextual variants keep the
/// underlying error as their `source`.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Options that do not go together (the message names the command-line flag).
    #[error("{0}")]
    Usage(String),
    /// The model or its data could not be used, or an output could not be written.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A libtorch error outside the estimators.
    #[error(transparent)]
    Torch(#[from] TchError),
    /// An error of the guard outside the estimators (layer discovery, device names).
    #[error(transparent)]
    Guard(Box<GuardError>),
    /// A defence rejected its parameters or the gradient.
    #[error(transparent)]
    Defence(#[from] DefenceError),
    /// An estimator failed; `metric` names it, e.g. `M1 (sensitivity)`.
    #[error("{metric}")]
    Estimate {
        /// The metric being estimated.
        metric: &'static str,
        /// The estimator's error.
        #[source]
        source: Box<GuardError>,
    },
    /// An SVG could not be drawn.
    #[error("drawing {path}: {why}")]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// The plotting library's message.
        why: String,
    },
    /// The report could not be serialised.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl From<GuardError> for AuditError {
    fn from(e: GuardError) -> Self {
        Self::Guard(Box::new(e))
    }
}

/// The crate's result type.
pub type Result<T, E = AuditError> = std::result::Result<T, E>;

/// Attaches the metric name to an estimator's error.
pub trait EstimateContext<T> {
    /// The error, as the estimate of `metric` failing.
    fn metric(self, metric: &'static str) -> Result<T>;
}

impl<T> EstimateContext<T> for std::result::Result<T, GuardError> {
    fn metric(self, metric: &'static str) -> Result<T> {
        self.map_err(|source| AuditError::Estimate { metric, source: Box::new(source) })
    }
}
