//! What one line of the audit log says: a decision, a checkpoint that summarises the unchanged
//! releases since the last one, or an event of the run (started, policy loaded or rejected, a
//! worker failure, a rotation, closed); and the chain fields that link each line to the one
//! before it.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// What happened to a layer (or to the whole release or run, layer `"*"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Released without protection.
    Released,
    /// Released with the protection in force (unchanged level).
    Protected,
    /// The protection level went up.
    Escalated,
    /// The protection level went down.
    Relaxed,
    /// The layer was left out of the release.
    Withheld,
    /// Nothing released yet: held to accumulate samples up to the aggregation floor.
    /// (Written `pending` before; read under either name.)
    #[serde(alias = "pending")]
    Held,
    /// The whole release was refused.
    Blocked,
    /// Parameters set from outside (a federated round's global model) were refused before
    /// anything was trained or released on them (`Guard::vet_parameters`); `reason` says why.
    Refused,
    /// The unchanged releases (released, protected at the same level) since the last
    /// checkpoint, counted per layer, with the metrics of the latest estimate.
    Checkpoint,
    /// A run attached the log (the policy in force is the record's `policy_hash`).
    Started,
    /// A new policy took effect from the next release (`previous_policy_hash` was in force).
    PolicyLoaded,
    /// A new policy was rejected; the one in force (`policy_hash`) stays. `reason` says why.
    PolicyRejected,
    /// A background worker failed (the guard then fails closed). `reason` says what failed.
    WorkerFailure,
    /// The file reached its size limit: the chain goes on in the file named in `reason`.
    Rotated,
    /// The run detached the log cleanly (the last checkpoint is complete).
    Closed,
    /// The guard's state was saved beside the log; `reason` is the state file's SHA-256, so
    /// that a state rolled back or altered on disk is caught on the next start.
    StateSaved,
    /// A process started again and went on from the state saved beside the log (its levels,
    /// step and ledger); `reason` says from where.
    Restarted,
    /// An operator reset the saved state (`gradguard log reset-state`): the next start is
    /// fresh. `reason` says why.
    StateReset,
}

impl Outcome {
    /// The outcome's name as written in the log, e.g. `"withheld"`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Released => "released",
            Outcome::Protected => "protected",
            Outcome::Escalated => "escalated",
            Outcome::Relaxed => "relaxed",
            Outcome::Withheld => "withheld",
            Outcome::Held => "held",
            Outcome::Blocked => "blocked",
            Outcome::Refused => "refused",
            Outcome::Checkpoint => "checkpoint",
            Outcome::Started => "started",
            Outcome::PolicyLoaded => "policy_loaded",
            Outcome::PolicyRejected => "policy_rejected",
            Outcome::WorkerFailure => "worker_failure",
            Outcome::Rotated => "rotated",
            Outcome::Closed => "closed",
            Outcome::StateSaved => "state_saved",
            Outcome::Restarted => "restarted",
            Outcome::StateReset => "state_reset",
        }
    }

    /// Whether a record with this outcome says nothing new when it repeats at the level in
    /// force (a release as before): such records are counted in checkpoints instead of
    /// written one by one. (A withheld record that explains itself, an exhausted ladder, is
    /// a violation and always written.)
    pub fn is_unchanged_release(self) -> bool {
        matches!(self, Outcome::Released | Outcome::Protected | Outcome::Withheld)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One record of the guard: one line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DecisionRecord {
    /// Wall-clock time of the decision, milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// Training step.
    pub step: u64,
    /// Layer name, or `"*"` for a release-wide decision or a run event.
    pub layer: String,
    /// The policy rule that decided, if any.
    pub rule: Option<String>,
    /// METRICS.md name of the metric, e.g. `"sensitivity_rms"`.
    pub metric: Option<String>,
    /// Measured value, on the release after the action; `None` if not measured. Written with
    /// the shortest representation that round-trips; serde_json reads it back exactly only
    /// with its `float_roundtrip` feature (otherwise possibly 1 ulp off).
    pub value: Option<f64>,
    /// The rule's threshold the value was compared with (act_above, or relax_below when relaxing).
    pub threshold: Option<f64>,
    /// Ladder rung in force (0 = unprotected).
    pub level: usize,
    /// The action applied, e.g. `"clip(max_norm=1)"`, `"none"`, `"withhold"`,
    /// `"aggregate(factor=2)"`, `"block"`; for run events the event, e.g. `"checkpoint"`.
    pub action: String,
    /// What the decision did to the layer (or the release), or which run event this is.
    pub outcome: Outcome,
    /// Why, where the outcome needs explaining (an absent metric, an exhausted ladder, a block).
    pub reason: Option<String>,
    /// sha256 (hex) of the policy text in force.
    pub policy_hash: String,
    /// For `policy_loaded`: the policy in force before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_policy_hash: Option<String>,
    /// For `checkpoint`: the counts it summarises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

impl DecisionRecord {
    /// A run event (layer `"*"`, no rule or metric) at `step` under the policy `policy_hash`.
    pub fn event(step: u64, outcome: Outcome, policy_hash: &str, reason: Option<String>) -> Self {
        DecisionRecord {
            time_unix_ms: unix_ms_now(),
            step,
            layer: "*".into(),
            rule: None,
            metric: None,
            value: None,
            threshold: None,
            level: 0,
            action: outcome.name().into(),
            outcome,
            reason,
            policy_hash: policy_hash.into(),
            previous_policy_hash: None,
            checkpoint: None,
        }
    }
}

/// The unchanged releases of steps `from_step ..= to_step`, per layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    /// First step the counts cover.
    pub from_step: u64,
    /// Last step the counts cover.
    pub to_step: u64,
    /// One entry per layer, in the layer map's order.
    pub layers: Vec<LayerTally>,
}

/// One layer's unchanged releases since the last checkpoint and where it stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LayerTally {
    /// Layer name.
    pub layer: String,
    /// Releases without protection.
    pub released: u64,
    /// Releases with the protection in force, at an unchanged level.
    pub protected: u64,
    /// Releases that left the layer out, as the level in force already did.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub withheld: u64,
    /// Protection level in force at the checkpoint.
    pub level: usize,
    /// Step of the estimate the metrics come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_step: Option<u64>,
    /// METRICS.md name -> value at the latest estimate (only the measured ones).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// METRICS.md name -> the threshold (act_above) a rule of the policy in force holds it to.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub thresholds: BTreeMap<String, f64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The chain fields of a line: its place in the chain and the hash of the line before it (for
/// the chain's first line, the policy hash of its record).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChainLink {
    /// 0 for the chain's first record, then +1 per record, across rotated files and runs.
    pub seq: u64,
    /// sha256 (hex) of the previous line's bytes (without its `'\n'`).
    pub prev: String,
}

/// How a line is written: the chain fields first, then the record's.
#[derive(Serialize)]
pub(crate) struct ChainedLine<'a> {
    #[serde(flatten)]
    pub link: ChainLink,
    #[serde(flatten)]
    pub record: &'a DecisionRecord,
}

/// The hash the next line carries as `prev`: sha256 (hex) of this line's bytes.
pub fn line_hash(line: &[u8]) -> String {
    super::policy::hex(&Sha256::digest(line))
}
