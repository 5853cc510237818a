//! Why a model or its data could not be loaded (or an output written).
use crate::data::DataError;
use gradguard_guard::GuardError;
use gradguard_tch::TorchScriptError;
use std::path::PathBuf;
use tch::TchError;

/// Why a model or its data could not be used (or a file written). Every input problem names
/// the file it is about; contextual variants keep the underlying error as their `source`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
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
    /// A JSON value could not be serialised.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl From<TorchScriptError> for ModelError {
    fn from(e: TorchScriptError) -> Self {
        Self::TorchScript(Box::new(e))
    }
}

impl From<GuardError> for ModelError {
    fn from(e: GuardError) -> Self {
        Self::Guard(Box::new(e))
    }
}

/// The result type of model and data loading.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
