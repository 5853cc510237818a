//! What a guard remembers between processes: the protection level of every rule on every
//! layer (the hysteresis), the step count (the position of its releases in the audit log) and
//! the M5 run ledger (what every sample has released so far).
//! A federated client runs each round in a fresh process; it saves a [`GuardState`] after a
//! round and restores it before the next, so round r+1 starts where round r ended.
use super::ledger::LedgerState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A guard's protection state, serialisable (serde): the policy it belongs to, the next
/// release's step, and the levels in force per rule and layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuardState {
    /// The SHA-256 of the policy the levels were reached under; a state is only restored into
    /// a guard enforcing the same policy.
    pub policy_hash: String,
    /// Releases decided so far: the step the next release reports.
    pub step: u64,
    /// Per rule (by name), the level in force on each layer it covers (by name).
    pub levels: BTreeMap<String, BTreeMap<String, usize>>,
    /// The M5 run ledger; absent in a state saved before the ledger (it then starts empty).
    #[serde(default)]
    pub ledger: Option<LedgerState>,
}

/// Why a state cannot be restored into a guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The state was saved under another policy: its levels mean nothing under this one.
    #[error("the saved guard state belongs to policy {saved}, the guard enforces {current}")]
    OtherPolicy {
        /// The saved state's policy hash.
        saved: String,
        /// The guard's policy hash.
        current: String,
    },
    /// A rule, layer or level the policy and model do not have.
    #[error("the saved guard state does not fit the policy and model: {0}")]
    Mismatch(String),
}
