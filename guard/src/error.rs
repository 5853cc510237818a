//! The one error type of the guard. Every variant names what was wrong so that a user can act
//! on it without reading the source.
use std::path::PathBuf;
use tch::TchError;

/// The newest policy format version this build reads (it reads every version from 1 up).
pub const POLICY_VERSION: u32 = 2;

/// Errors the guard returns instead of panicking on user input.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// A batch with no samples.
    #[error("empty batch: the guard needs at least one sample")]
    EmptyBatch,
    /// A tensor that should have one entry per sample has a different count.
    #[error("batch mismatch: inputs have {inputs} samples but {what} has {got}")]
    BatchMismatch {
        /// What disagrees with the inputs, e.g. `"targets"`.
        what: &'static str,
        /// Samples in the inputs.
        inputs: i64,
        /// Entries in `what`.
        got: i64,
    },
    /// The per-sample input shape differs from the first batch's.
    #[error("wrong input shape: expected per-sample shape {expected:?} (as in the first batch), got {got:?}")]
    InputShape {
        /// Per-sample shape of the first batch.
        expected: Vec<i64>,
        /// Per-sample shape of this batch.
        got: Vec<i64>,
    },
    /// Attribute labels of a non-integer dtype (named in the field).
    #[error("attribute labels must be integer class ids (int64/int32), got dtype {0}")]
    AttributeKind(String),
    /// Sample ids of a non-integer dtype (named in the field).
    #[error("sample ids must be integers (int64/int32), got dtype {0}")]
    SampleIdKind(String),
    /// The loss was NaN or infinite: nothing is estimated or released.
    #[error("non-finite loss ({value}) at step {step}: nothing was estimated or released")]
    NonFiniteLoss {
        /// Training step.
        step: u64,
        /// The loss value.
        value: f64,
    },
    /// The gradient has NaN or infinite entries: the update is not applied.
    #[error("non-finite gradient at step {step} in layer(s) {layers:?}: the update is not applied")]
    NonFiniteGradient {
        /// Training step.
        step: u64,
        /// Layers with non-finite entries.
        layers: Vec<String>,
    },
    /// The loss function returned a non-scalar tensor (of the shape in the field).
    #[error("the loss function must return a scalar, got shape {0:?}")]
    LossNotScalar(Vec<i64>),
    /// Inputs of an integer dtype (token ids, categorical codes) and no embedding split: M1
    /// has no continuous representation to differentiate. M1 is reported absent with this
    /// message; training goes on.
    #[error("M1 needs a continuous representation: the inputs are {kind} (token ids or categorical codes) and no embedding split is declared (declare embed and loss_from_embedded: gradguard_guard::SplitLoss, or .embedding(...) on the guarded optimizer)")]
    DiscreteInputs {
        /// The inputs' dtype.
        kind: String,
    },
    /// The embedding split's `embed` returned something M1 cannot differentiate.
    #[error("the embedding split's embed returned {0}: embeddings must be floating point, one row per sample")]
    Embedding(String),
    /// The model cannot run on a batch of one sample, though the batch itself trains: the loss
    /// fails (an error or a panic), or a buffer turns non-finite (a batch norm with one value
    /// per channel: `batch_norm1d` in training mode). Per-sample gradients (M2, M3) do not exist
    /// for this model; M2 and M3 are absent with this reason, training goes on.
    #[error("no per-sample gradients: the model cannot run on a batch of one sample: {why}")]
    NoPerSampleGradients {
        /// The first line of the loss's error or panic message, or the buffer that turned
        /// non-finite.
        why: String,
    },
    /// The model has no trainable parameters to guard.
    #[error("the model has no trainable parameters")]
    NoParameters,
    /// A device name that does not parse or does not exist on this machine.
    #[error("unknown device {given:?}: {why}")]
    UnknownDevice {
        /// The name as given.
        given: String,
        /// What is wrong with it.
        why: String,
    },
    /// A setting outside its valid range.
    #[error("invalid setting {setting}: {why}")]
    Config {
        /// The setting's name, e.g. `"sensitivity.probes"`.
        setting: &'static str,
        /// What is wrong and what is allowed.
        why: String,
    },
    /// Layers could not be discovered from the model (why in the field).
    #[error("layer discovery failed: {0}")]
    Layers(String),
    /// An update names a parameter the model does not have.
    #[error("unknown parameter {name:?} in the update (the model has {known:?})")]
    UnknownParameter {
        /// The unknown parameter name.
        name: String,
        /// The model's parameter names.
        known: Vec<String>,
    },
    /// An update's tensor does not have the parameter's shape.
    #[error("parameter {name}: the update has shape {got:?}, the model {expected:?}")]
    ParameterShape {
        /// The parameter name.
        name: String,
        /// The model parameter's shape.
        expected: Vec<i64>,
        /// The update's shape.
        got: Vec<i64>,
    },
    /// The policy could not be read, parsed or fitted to the model.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A new policy was rejected; the one in force stays.
    #[error("new policy rejected, the policy in force (hash {kept}) stays: {source}")]
    PolicyRejected {
        /// Hash of the policy that stays in force.
        kept: String,
        /// Why the new policy was rejected.
        #[source]
        source: PolicyError,
    },
    /// The audit log failed: the decision is not acknowledged.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// The guard's saved state cannot be used or written (missing, rolled back, unreadable):
    /// the guard must not release until an operator resets it.
    #[error(transparent)]
    StateFile(#[from] crate::decide::StateFileError),
    /// A defence failed to transform a gradient.
    #[error("a defence failed: {0}")]
    Defence(#[from] gradguard_defenses::DefenceError),
    /// A libtorch call failed.
    #[error("libtorch error while {context}: {source}")]
    Torch {
        /// What the guard was doing.
        context: &'static str,
        /// The libtorch error.
        #[source]
        source: TchError,
    },
}

/// The informative line of a libtorch message (a `TchError`'s text, or the message of a panic
/// of tch's panicking forms): for a TorchScript interpreter error the `RuntimeError: ...` line
/// at the end of its traceback, otherwise the first line (a C++ backtrace follows on later
/// lines), without tch's prefix.
pub fn torch_message(text: &str) -> String {
    // A panic of `unwrap` shows the error's Debug form: `...: Torch("message\nException ...")`.
    let text = match text.split_once("Torch(\"") {
        Some((_, inner)) => inner.replace("\\n", "\n"),
        None => text.to_string(),
    };
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.first().is_some_and(|l| l.contains("TorchScript interpreter")) {
        let raised = lines.iter().rev().find_map(|l| l.split_once("Error: ").filter(|(kind, _)| !kind.contains(' ')).map(|(_, msg)| msg));
        if let Some(message) = raised {
            return message.to_string();
        }
    }
    let line = lines.first().copied().unwrap_or("unknown error");
    line.trim_start_matches("Internal torch error: ").to_string()
}

/// The guard's result type, with [`GuardError`] by default.
pub type Result<T, E = GuardError> = std::result::Result<T, E>;

/// Adds what the guard was doing to a libtorch error.
pub(crate) trait TorchContext<T> {
    fn during(self, context: &'static str) -> Result<T>;
}

impl<T> TorchContext<T> for std::result::Result<T, TchError> {
    fn during(self, context: &'static str) -> Result<T> {
        self.map_err(|source| GuardError::Torch { context, source })
    }
}

/// A policy that could not be read, parsed or fitted to the model.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy file could not be read.
    #[error("cannot read policy {path}: {why}")]
    Io {
        /// The policy file's path.
        path: String,
        /// The I/O error.
        why: String,
    },
    /// The policy text is not valid TOML or does not fit the format.
    #[error("policy {origin}: {message}")]
    Syntax {
        /// Where the policy came from (its path, or a description).
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// The policy declares a version this build does not read.
    #[error("policy {origin}: version {found} is not supported (this build reads versions 1 to {POLICY_VERSION})")]
    Version {
        /// Where the policy came from.
        origin: String,
        /// The declared version.
        found: u32,
    },
    /// A policy value is outside its valid range.
    #[error("policy {origin}, {location}: {why}")]
    Invalid {
        /// Where the policy came from.
        origin: String,
        /// The offending entry, e.g. a rule and its key.
        location: String,
        /// What is wrong.
        why: String,
    },
    /// A rule's layer pattern matches no layer of the model (with `strict_layers`).
    #[error("policy {origin}, rule '{rule}': layer pattern '{pattern}' matches no layer of the model (layers: {layers:?})")]
    UnmatchedPattern {
        /// Where the policy came from.
        origin: String,
        /// The rule's name.
        rule: String,
        /// The pattern that matched nothing.
        pattern: String,
        /// The model's layer names.
        layers: Vec<String>,
    },
}

/// The audit log could not be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log's parent folder could not be created.
    #[error("audit log {path}: cannot create its folder: {source}")]
    CreateDir {
        /// The log file's path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The log could not be opened for appending.
    #[error("audit log {path}: cannot open for appending: {source}")]
    Open {
        /// The log file's path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A record could not be encoded as JSON.
    #[error("audit log {path}: cannot encode the record for step {step}, layer '{layer}': {source}")]
    Encode {
        /// The log file's path.
        path: PathBuf,
        /// The record's step.
        step: u64,
        /// The record's layer.
        layer: String,
        /// The encoding error.
        source: serde_json::Error,
    },
    /// A record could not be written (it is not acknowledged).
    #[error(
        "audit log {path}: write failed (the record for step {step}, layer '{layer}' is not acknowledged): {source}"
    )]
    Write {
        /// The log file's path.
        path: PathBuf,
        /// The record's step.
        step: u64,
        /// The record's layer.
        layer: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The log could not be read.
    #[error("audit log {path}: cannot read: {source}")]
    Read {
        /// The log file's path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A complete line of the log is not a decision record.
    #[error("audit log {path}, line {line}: not a decision record: {why}")]
    Corrupt {
        /// The log file's path.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why it does not parse.
        why: String,
    },
}
