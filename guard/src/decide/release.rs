//! What the guard did with one release, as a value: released (with the protected update),
//! held for the aggregation floor, or blocked (with the reason). Errors are kept for failures
//! (bad input, a libtorch error, an audit log that cannot be written).
use crate::report::{LeakageMetric, Manifest, Report};
use std::fmt;
use tch::Tensor;

/// Why the guard refused a release. Nothing of a blocked release leaves, and in the in-place
/// form its `.grad()` is zeroed.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockReason {
    /// A rule's metric stays above its threshold with every rung of its ladder applied, or
    /// cannot be measured (`value` None): the guard cannot vouch for the release.
    Violation {
        /// The layer whose rule failed.
        layer: String,
        /// The rule's metric.
        metric: LeakageMetric,
        /// The metric on the most protected release, None when it could not be measured.
        value: Option<f64>,
        /// The rule's `act_above`.
        threshold: f64,
    },
    /// The released gradient has NaN or infinite entries in these layers.
    NonFinite {
        /// The layers with non-finite entries.
        layers: Vec<String>,
    },
    /// The explicit release covers fewer samples than the aggregation floor in force.
    BelowFloor {
        /// Samples the update covers.
        samples: usize,
        /// The floor in force.
        floor: usize,
    },
    /// The release would take the run ledger's cumulative reconstruction bound above the
    /// policy's `ledger_cap_bits` (`layer` `"*"`: the whole release's).
    LedgerCap {
        /// The layer whose cumulative bound would cross, or `"*"`.
        layer: String,
        /// The cumulative bound the release would reach, bits per input dimension.
        bits: f64,
        /// The cap.
        cap: f64,
    },
    /// An aggregate rung escalated at an explicit release ([`crate::Guard::release`]): the
    /// policy asks for a release over more samples than the update covers, and the explicit
    /// form does not hold updates to join them.
    Aggregate {
        /// The escalation, in words (layer, metric and value, the floor now in force).
        reason: String,
    },
    /// The guard's own machinery failed (an estimate, the estimator's worker) while a policy
    /// needed it.
    GuardFailure {
        /// What failed.
        what: String,
    },
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockReason::Violation { layer, metric, value, threshold } => write!(
                f,
                "layer {layer}: {} = {} above threshold {threshold} with every defence of the policy applied",
                metric.name(),
                value.map_or("(not measurable)".to_string(), |v| format!("{v:.4e}"))
            ),
            BlockReason::NonFinite { layers } => write!(f, "non-finite gradient in {layers:?}"),
            BlockReason::BelowFloor { samples, floor } => {
                write!(f, "the update covers {samples} samples, below the aggregation floor of {floor}")
            }
            BlockReason::LedgerCap { layer, bits, cap } => write!(
                f,
                "the run ledger's cumulative reconstruction bound would reach {bits:.4e} bits/dim ({}), above the cap ledger_cap_bits = {cap}",
                if layer == "*" { "whole release".to_string() } else { format!("layer {layer}") }
            ),
            BlockReason::Aggregate { reason } => write!(f, "{reason}: the explicit release does not hold updates for a larger release"),
            BlockReason::GuardFailure { what } => f.write_str(what),
        }
    }
}

/// The result of one guarded release. Every variant carries the step's report; the report's
/// `release` is the manifest of what was done to each layer ([`Release::manifest`]), the one
/// copy of it.
#[derive(Debug)]
pub enum Release {
    /// Compliant. `update` holds the protected per-parameter tensors of the released layers
    /// (withheld layers absent) for the explicit form ([`crate::Guard::release`]); for the
    /// in-place form it is empty and `.grad()` holds the protected gradient.
    Released {
        /// `(parameter name, tensor)` of the released layers.
        update: Vec<(String, Tensor)>,
        /// The step's report, with its manifest.
        report: Report,
    },
    /// Held back to reach the aggregation floor; nothing may be applied or shared yet.
    Held {
        /// The step's report, with its (held) manifest.
        report: Report,
    },
    /// Refused: nothing leaves.
    Blocked {
        /// Why.
        reason: BlockReason,
        /// The step's report, with its blocked manifest (every layer unreleased).
        report: Report,
    },
}

impl Release {
    /// The step's report.
    pub fn report(&self) -> &Report {
        match self {
            Release::Released { report, .. } | Release::Held { report, .. } | Release::Blocked { report, .. } => report,
        }
    }

    /// The step's report, owned.
    pub fn into_report(self) -> Report {
        match self {
            Release::Released { report, .. } | Release::Held { report, .. } | Release::Blocked { report, .. } => report,
        }
    }

    /// What was done to each layer: the report's manifest. The guard's releases always carry
    /// one; None only for a `Release` built by hand around a report without it.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.report().release.as_ref()
    }

    /// Whether the optimizer may step on (or the loop may share) the gradient now.
    pub fn is_released(&self) -> bool {
        matches!(self, Release::Released { .. })
    }

    /// The block's reason, when blocked.
    pub fn block_reason(&self) -> Option<&BlockReason> {
        match self {
            Release::Blocked { reason, .. } => Some(reason),
            _ => None,
        }
    }
}
