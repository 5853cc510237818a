//! The crate's single error type. Every message names what is wrong (the defence, the
//! parameter and its value, the layer index, the shapes) so a policy author can fix the
//! configuration or the training loop without reading this crate's source.

use thiserror::Error;

/// Every failure of this crate. Library code never panics on user input; it returns one of
/// these instead.
#[derive(Debug, Error)]
pub enum DefenceError {
    /// A defence parameter is out of its documented range.
    #[error("{defence}: {parameter} = {value} is invalid: expected {expected}")]
    InvalidParameter {
        /// The defence's name, e.g. `"clip"`.
        defence: &'static str,
        /// The offending parameter, e.g. `"max_norm"`.
        parameter: &'static str,
        /// The value as given.
        value: String,
        /// The accepted range, in words.
        expected: &'static str,
    },

    /// The tensor cannot be processed at all (undefined, sparse, or not a floating dtype).
    #[error("unsupported gradient for {what}: {reason}")]
    UnsupportedTensor {
        /// Which defence or layer received it.
        what: String,
        /// Why it is refused.
        reason: String,
    },

    /// The input gradient holds NaN or infinite entries. Releasing a transformed version of
    /// it would hide a training bug, and norms/levels computed from it are meaningless.
    #[error("non-finite gradient for {what}: {count} of {numel} entries are NaN or infinite")]
    NonFinite {
        /// Which defence or layer received it.
        what: String,
        /// Number of NaN or infinite entries.
        count: i64,
        /// Number of entries in the tensor.
        numel: i64,
    },

    /// A transformation produced NaN or infinite entries (e.g. noise whose standard deviation
    /// overflows the gradient's dtype). Such output is never returned.
    #[error("{what} produced {count} non-finite entries (of {numel}); output refused")]
    NonFiniteOutput {
        /// The defence (with parameters) or accumulator step that produced it.
        what: String,
        /// Number of NaN or infinite entries.
        count: i64,
        /// Number of entries in the tensor.
        numel: i64,
    },

    /// `GradientAccumulator::add` got a gradient list of the wrong length.
    #[error("accumulator expects {expected} layers, got a gradient list of {got}")]
    LayerCount {
        /// Layer count given to `GradientAccumulator::new`.
        expected: usize,
        /// Length of the list passed to `add`.
        got: usize,
    },

    /// `GradientAccumulator::add` was told a micro-batch had zero samples.
    #[error(
        "accumulator add with samples = 0: a micro-batch gradient must cover at least one sample"
    )]
    ZeroSamples,

    /// A layer's gradient shape differs from the one seen in an earlier `add`.
    #[error(
        "layer {layer}: gradient shape {got:?} differs from the shape {expected:?} of earlier adds"
    )]
    ShapeMismatch {
        /// Layer index.
        layer: usize,
        /// Shape from earlier adds.
        expected: Vec<i64>,
        /// Shape in this add.
        got: Vec<i64>,
    },

    /// A layer's gradient dtype or device differs from the one seen in an earlier `add`.
    #[error("layer {layer}: gradient {property} {got} differs from the {property} {expected} of earlier adds")]
    TensorMismatch {
        /// Layer index.
        layer: usize,
        /// `"dtype"` or `"device"`.
        property: &'static str,
        /// Value from earlier adds.
        expected: String,
        /// Value in this add.
        got: String,
    },

    /// `GradientAccumulator::mean` was called before any samples were added.
    #[error("accumulator holds no samples: call add before mean")]
    NothingAccumulated,

    /// libtorch reported an error (device/dtype problems, out of memory, ...).
    /// A defence written as text (`clip(max_norm=1)`) that does not read as one.
    #[error("cannot read '{text}' as a defence: {why}")]
    Unparsable {
        /// The text given.
        text: String,
        /// What is wrong with it.
        why: String,
    },

    /// libtorch failed while transforming the gradient.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's error type.
pub type Result<T, E = DefenceError> = std::result::Result<T, E>;
