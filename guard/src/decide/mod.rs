//! What decides: the engine with its state. The policy, the protection levels it drives, the
//! budget scheduler, the background workers, the audit log, and the [`Guard`] that runs them
//! over the estimators of `measure` and returns a typed [`Release`].
mod audit_files;
mod audit_log;
mod audit_read;
mod audit_record;
mod audit_trail;
mod audit_verify;
mod engine;
mod ledger;
mod policy;
mod protection;
mod release;
mod schedule;
mod state;
mod state_file;
mod worker;

pub use audit_files::{chain_files, segment_path};
pub use audit_log::{unix_ms_now, AuditLog, Checkpoint, DecisionRecord, Durability, LayerTally, LogContents, LogOptions, Outcome, DEFAULT_MAX_FILE_BYTES};
pub use audit_record::{line_hash, ChainLink};
pub use audit_trail::{AuditTrail, DEFAULT_CHECKPOINT_EVERY};
pub use audit_verify::{verify_chain, verify_files, BreakKind, ChainBreak, Verification};
pub use engine::{Guard, ReportSink};
pub use policy::{Coverage, LadderStep, OnViolation, Policy, Rule, Settings, VettingSettings};
pub use ledger::{LedgerState, RunLedger, SavedSums};
pub use protection::{Bounds, Protection, CALIBRATION_REASON};
pub use release::{BlockReason, Release};
/// The budget's clock, which tests replace (`Guard::set_clock`, the `testing` feature).
#[cfg(any(test, feature = "testing"))]
pub use schedule::Clock;
pub use state::{GuardState, StateError};
pub use state_file::{load_state, reset_state, save_state, state_path, Reset, SavedState, StateFileError};
pub use worker::Worker;
