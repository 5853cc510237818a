//! The guard's state kept on disk beside its audit log, so that a process that dies and starts
//! again goes on from where it stopped: its protection levels, step count and M5 ledger. A
//! ledger cap that a restart could reset would be no cap.
//!
//! Every save is atomic (a temporary file written and synced, renamed over the old one, the
//! folder synced) and its SHA-256 is written to the chained audit log (a `state_saved` record).
//! On start the file is checked against the log's last such record: a state that is missing
//! after a logged save, rolled back, altered or unreadable is refused, never silently replaced
//! by a fresh one, until an operator resets it with a logged command ([`reset_state`]).
use super::audit_log::{AuditLog, DecisionRecord, Outcome};
use super::audit_record::line_hash;
use super::state::GuardState;
use crate::error::AuditError;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a saved state cannot be used: the guard must not release until an operator resets it.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The audit log records a saved state but the file is gone.
    #[error("{path}: the guard state is missing, but the audit log {log} records one saved at step {step} (sha256 {hash}); refusing to release until an operator resets it (gradguard log reset-state {log})")]
    Missing {
        /// The state file.
        path: PathBuf,
        /// The audit log.
        log: PathBuf,
        /// The step of the last logged save.
        step: u64,
        /// The hash the log records.
        hash: String,
    },
    /// The file is not the state the log last recorded (rolled back or altered).
    #[error("{path}: the guard state (sha256 {found}) is not the one the audit log {log} last recorded (sha256 {logged}, step {step}): rolled back or altered; refusing to release until an operator resets it (gradguard log reset-state {log})")]
    Mismatch {
        /// The state file.
        path: PathBuf,
        /// The audit log.
        log: PathBuf,
        /// The file's hash.
        found: String,
        /// The logged hash.
        logged: String,
        /// The step of the last logged save.
        step: u64,
    },
    /// A state file the audit log never recorded (the log was replaced or deleted).
    #[error("{path}: a guard state exists that the audit log {log} does not record; refusing to release until an operator resets it (gradguard log reset-state {log})")]
    NotLogged {
        /// The state file.
        path: PathBuf,
        /// The audit log.
        log: PathBuf,
    },
    /// The file cannot be read or parsed (truncated, not a state).
    #[error("{path}: the guard state cannot be read ({why}); refusing to release until an operator resets it (gradguard log reset-state {log})")]
    Unreadable {
        /// The state file.
        path: PathBuf,
        /// The audit log.
        log: PathBuf,
        /// What failed.
        why: String,
    },
    /// Writing the state failed.
    #[error("{path}: the guard state cannot be written: {why}")]
    Write {
        /// The state file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
    /// The audit log could not be read or written.
    #[error(transparent)]
    Log(#[from] AuditError),
}

/// The state file of the audit log at `log`: `<log>.state.json`.
pub fn state_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".state.json");
    log.with_file_name(name)
}

/// A state loaded from disk and checked against the audit log.
#[derive(Debug)]
pub struct SavedState {
    /// The state.
    pub state: GuardState,
    /// Its file's SHA-256 (hex).
    pub hash: String,
}

/// The last state-related record of the chain: a save (its hash and step) or a reset.
enum LastMark {
    None,
    Saved { hash: String, step: u64 },
    Reset,
}

fn last_mark(log: &Path) -> Result<LastMark, StateFileError> {
    if !log.exists() {
        return Ok(LastMark::None);
    }
    let records = AuditLog::read_chain(log)?;
    Ok(records
        .iter()
        .rev()
        .find_map(|r| match r.outcome {
            Outcome::StateSaved => Some(LastMark::Saved { hash: r.reason.clone().unwrap_or_default(), step: r.step }),
            Outcome::StateReset => Some(LastMark::Reset),
            _ => None,
        })
        .unwrap_or(LastMark::None))
}

/// Loads the state kept beside the audit log at `log`, checked against the log's last
/// `state_saved` record. `Ok(None)`: nothing saved yet, or reset by an operator since; a fresh
/// guard may start. Every disagreement is an error: the caller must not release.
pub fn load_state(log: &Path) -> Result<Option<SavedState>, StateFileError> {
    let path = state_path(log);
    let bytes = match fs::read(&path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(StateFileError::Unreadable { path, log: log.into(), why: e.to_string() }),
    };
    match (last_mark(log)?, bytes) {
        (LastMark::None | LastMark::Reset, None) => Ok(None),
        (LastMark::None | LastMark::Reset, Some(_)) => Err(StateFileError::NotLogged { path, log: log.into() }),
        (LastMark::Saved { hash, step }, None) => Err(StateFileError::Missing { path, log: log.into(), step, hash }),
        (LastMark::Saved { hash, step }, Some(bytes)) => {
            let found = line_hash(&bytes);
            if found != hash {
                return Err(StateFileError::Mismatch { path, log: log.into(), found, logged: hash, step });
            }
            let state = serde_json::from_slice(&bytes).map_err(|e| StateFileError::Unreadable { path, log: log.into(), why: e.to_string() })?;
            Ok(Some(SavedState { state, hash }))
        }
    }
}

/// Writes `state` atomically beside the audit log at `log` (temporary file, fsync, rename,
/// folder fsync) and returns its SHA-256, which the caller records in the log
/// (`Guard::save_state` does both).
pub fn save_state(log: &Path, state: &GuardState) -> Result<String, StateFileError> {
    let path = state_path(log);
    let fail = |why: String| StateFileError::Write { path: path.clone(), why };
    let bytes = serde_json::to_vec(state).map_err(|e| fail(e.to_string()))?;
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = File::create(&tmp).map_err(|e| fail(format!("{}: {e}", tmp.display())))?;
    file.write_all(&bytes).and_then(|_| file.sync_all()).map_err(|e| fail(format!("{}: {e}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(|e| fail(e.to_string()))?;
    // The rename is durable only once the folder is.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    }
    Ok(line_hash(&bytes))
}


/// What [`reset_state`] did.
#[derive(Debug)]
pub struct Reset {
    /// Where the old state file went (None: there was none).
    pub moved_to: Option<PathBuf>,
}

/// An operator's reset: a `state_reset` record with `reason` appended to the audit log at
/// `log`, and the state file (if any) moved aside to `<file>.reset-<unix ms>`, kept for
/// inspection. The next start is fresh: protection levels at 0, the step and the M5 ledger
/// from zero; the log keeps what came before.
pub fn reset_state(log: &Path, reason: &str) -> Result<Reset, StateFileError> {
    let path = state_path(log);
    let last = if log.exists() { AuditLog::read_chain(log)?.pop() } else { None };
    let (step, policy) = last.map(|r| (r.step, r.policy_hash)).unwrap_or_default();
    let mut audit = AuditLog::open(log)?;
    let now = super::audit_log::unix_ms_now();
    audit.record(&DecisionRecord::event(step, Outcome::StateReset, &policy, Some(format!("operator reset: {reason}"))))?;
    let moved_to = if path.exists() {
        let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(format!(".reset-{now}"));
        let aside = path.with_file_name(name);
        fs::rename(&path, &aside).map_err(|e| StateFileError::Write { path: path.clone(), why: e.to_string() })?;
        Some(aside)
    } else {
        None
    };
    Ok(Reset { moved_to })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> GuardState {
        GuardState { policy_hash: "p".into(), step, levels: Default::default(), ledger: None }
    }

    #[test]
    fn a_saved_state_loads_back_only_while_the_log_vouches_for_it() {
        let dir = std::env::temp_dir().join(format!("gradguard-state-file-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.jsonl");
        assert_eq!(state_path(&log), dir.join("audit.jsonl.state.json"));
        assert!(load_state(&log).unwrap().is_none(), "nothing saved, nothing logged: fresh");
        let hash = save_state(&log, &state(3)).unwrap();
        // Saved but not yet logged: the file alone is not vouched for.
        assert!(matches!(load_state(&log), Err(StateFileError::NotLogged { .. })));
        let mut audit = AuditLog::open(&log).unwrap();
        audit.record(&DecisionRecord::event(3, Outcome::StateSaved, "p", Some(hash.clone()))).unwrap();
        let loaded = load_state(&log).unwrap().unwrap();
        assert_eq!((loaded.state, loaded.hash), (state(3), hash));
        // The write went through a temporary file that is gone.
        assert!(!dir.join("audit.jsonl.state.json.tmp").exists());
        // Another state in the file: refused.
        save_state(&log, &state(1)).unwrap();
        assert!(matches!(load_state(&log), Err(StateFileError::Mismatch { .. })));
        // Reset: logged, the file moved aside, the next start fresh.
        let reset = reset_state(&log, "test").unwrap();
        assert!(reset.moved_to.is_some_and(|p| p.exists()));
        assert!(load_state(&log).unwrap().is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
