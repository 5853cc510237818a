//! The one error type of the crate.
use crate::data::DataError;
use gradguard_defenses::DefenceError;
use gradguard_guard::GuardError;
use gradguard_hooks::{BuildError, TorchScriptError};
use std::path::PathBuf;
use tch::TchError;

/// Why an audit (or the validation study) could not run. Every input problem names the file
/// it is about; contextual variants keep the underlying error as their `source`.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// An input file does not exist.
    #[error("{what} {path}: no such file")]
    NotFound {
        /// `inputs`, `labels` or `attribute`.
        what: &'static str,
        /// The file as given.
        path: PathBuf,
    },
    /// An input file is not a readable .npy array.
    #[error("{what} {path} is not a .npy file: {why}")]
    NotNpy {
        /// `inputs`, `labels` or `attribute`.
        what: &'static str,
        /// The file as given.
        path: PathBuf,
        /// The reader's complaint.
        why: String,
    },
    /// An input array has a dtype (or memory order) the audit cannot use.
    #[error("{what} {path}: {why}")]
    Dtype {
        /// `inputs`, `labels` or `attribute`.
        what: &'static str,
        /// The file as given.
        path: PathBuf,
        /// The dtype found and the one expected.
        why: String,
    },
    /// An input array's shape does not fit the other inputs or the model.
    #[error("{what} {path}: {why}")]
    Shape {
        /// `inputs`, `labels` or `attribute`.
        what: &'static str,
        /// The file as given.
        path: PathBuf,
        /// The shape found and the one expected.
        why: String,
    },
    /// An input array holds NaN or infinite values.
    #[error("{what} {path}: {count} non-finite value(s) (NaN or infinity), the first at sample {sample}")]
    NonFinite {
        /// `inputs` or `labels`.
        what: &'static str,
        /// The file as given.
        path: PathBuf,
        /// Number of non-finite values.
        count: usize,
        /// Sample (index along dimension 0) of the first one.
        sample: usize,
    },
    /// A class id is outside the model's outputs.
    #[error("labels {path}: value {value} at index {index} is outside 0..{classes} (the model has {classes} outputs)")]
    LabelRange {
        /// The labels file.
        path: PathBuf,
        /// The offending class id.
        value: i64,
        /// Its index.
        index: usize,
        /// Outputs of the model.
        classes: i64,
    },
    /// The model cannot run on the inputs (or returns outputs the loss cannot use).
    #[error("inputs {path} (per-sample shape {shape:?}) do not fit the model {model}: {why}")]
    ModelFit {
        /// The inputs file.
        path: String,
        /// Per-sample shape of the inputs.
        shape: Vec<i64>,
        /// The model's label.
        model: String,
        /// libtorch's message, or what is wrong with the output.
        why: String,
    },
    /// A model name that is neither built in nor a file.
    #[error("unknown model {name:?}: expected `cnn`, `mlp` or the path of a TorchScript file")]
    UnknownModel {
        /// The name as given.
        name: String,
    },
    /// Options that do not go together (the message names the command-line flag).
    #[error("{0}")]
    Usage(String),
    /// A TorchScript file that cannot be used.
    #[error(transparent)]
    TorchScript(Box<TorchScriptError>),
    /// The shipped digits could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A libtorch error outside the estimators.
    #[error(transparent)]
    Torch(#[from] TchError),
    /// An error of the guard outside the estimators (layer discovery, device names).
    #[error(transparent)]
    Guard(Box<GuardError>),
    /// The guarded optimizer could not be built (the policy does not fit the model, a busy
    /// metrics port).
    #[error(transparent)]
    Build(Box<BuildError>),
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
    /// A file or folder could not be written.
    #[error("{action} {path}")]
    Io {
        /// What was being done, e.g. `writing the JSON report`.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
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
    /// The metrics exporter could not start (a busy port, an address that is not one).
    #[error("metrics exporter: {0}")]
    Exporter(#[from] gradguard_exporter::ExporterError),
}

impl From<TorchScriptError> for AuditError {
    fn from(e: TorchScriptError) -> Self {
        Self::TorchScript(Box::new(e))
    }
}

impl From<BuildError> for AuditError {
    fn from(e: BuildError) -> Self {
        Self::Build(Box::new(e))
    }
}

impl From<GuardError> for AuditError {
    fn from(e: GuardError) -> Self {
        Self::Guard(Box::new(e))
    }
}

/// The crate's result type.
pub type Result<T, E = AuditError> = std::result::Result<T, E>;

/// Attaches the metric name to an estimator's error.
pub(crate) trait EstimateContext<T> {
    fn metric(self, metric: &'static str) -> Result<T>;
}

impl<T> EstimateContext<T> for std::result::Result<T, GuardError> {
    fn metric(self, metric: &'static str) -> Result<T> {
        self.map_err(|source| AuditError::Estimate { metric, source: Box::new(source) })
    }
}

/// Creates the parent folder of `path` (if it has one).
pub(crate) fn create_parent(path: &std::path::Path) -> Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => create_dir(parent),
        None => Ok(()),
    }
}

/// Creates `dir` and its parents.
pub(crate) fn create_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| AuditError::Io { action: "creating", path: dir.to_path_buf(), source })
}

/// Writes `contents` to `path`, creating its parent folder first.
pub(crate) fn write_file(path: &std::path::Path, contents: &str, action: &'static str) -> Result<()> {
    create_parent(path)?;
    std::fs::write(path, contents).map_err(|source| AuditError::Io { action, path: path.to_path_buf(), source })
}
