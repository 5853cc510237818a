//! The one error type of the guard. Every variant names what was wrong so that a user can act
//! on it without reading the source.
use tch::TchError;

/// Errors the guard returns instead of panicking on user input.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("empty batch: the guard needs at least one sample")]
    EmptyBatch,
    #[error("batch mismatch: inputs have {inputs} samples but {what} has {got}")]
    BatchMismatch { what: &'static str, inputs: i64, got: i64 },
    #[error("wrong input shape: expected per-sample shape {expected:?} (as in the first batch), got {got:?}")]
    InputShape { expected: Vec<i64>, got: Vec<i64> },
    #[error("attribute labels must be integer class ids (int64/int32), got dtype {0}")]
    AttributeKind(String),
    #[error("non-finite loss ({value}) at step {step}: nothing was estimated or released")]
    NonFiniteLoss { step: u64, value: f64 },
    #[error("non-finite gradient at step {step} in layer(s) {layers:?}: the update is not applied")]
    NonFiniteGradient { step: u64, layers: Vec<String> },
    #[error("the loss function must return a scalar, got shape {0:?}")]
    LossNotScalar(Vec<i64>),
    #[error("the loss does not depend on the inputs: sensitivity needs a loss computed from them")]
    LossIgnoresInputs,
    #[error("the model has no trainable parameters")]
    NoParameters,
    #[error("unknown device {given:?}: {why}")]
    UnknownDevice { given: String, why: String },
    #[error("invalid setting {setting}: {why}")]
    Config { setting: &'static str, why: String },
    #[error("layer discovery failed: {0}")]
    Layers(String),
    #[error("release blocked at step {step}: layer {layer}, {metric} = {} above threshold {threshold} with every defence of the policy applied", value.map_or("(not measurable)".to_string(), |v| format!("{v:.4e}")))]
    Blocked { step: u64, layer: String, metric: String, value: Option<f64>, threshold: f64 },
    #[error("release refused at step {step}: {reason}")]
    ReleaseRefused { step: u64, reason: String },
    #[error("unknown parameter {name:?} in the update (the model has {known:?})")]
    UnknownParameter { name: String, known: Vec<String> },
    #[error("parameter {name}: the update has shape {got:?}, the model {expected:?}")]
    ParameterShape { name: String, expected: Vec<i64>, got: Vec<i64> },
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("new policy rejected, the policy in force (hash {kept}) stays: {source}")]
    PolicyRejected {
        kept: String,
        #[source]
        source: crate::policy::PolicyError,
    },
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("a defence failed: {0}")]
    Defence(#[from] gradguard_defenses::DefenceError),
    #[error("libtorch error while {context}: {source}")]
    Torch {
        context: &'static str,
        #[source]
        source: TchError,
    },
}

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
