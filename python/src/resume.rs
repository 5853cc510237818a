//! Where a guard starts: the state a node kept beside its audit log (it survives the process and
//! is checked against the log), else a state the caller kept in memory (Flower's
//! `Context.state`), else fresh. The federated tch client and the PyTorch front end share it.
use crate::errors::{FlError, FlResult};
use gradguard_guard::decide::{load_state, state_path, SavedState};
use gradguard_guard::{Guard, GuardState};
use std::path::Path;

/// Restores the guard from what was kept: the state beside `audit_log` wins over `saved` (a
/// state held in memory, JSON). Returns where it went on from ("fresh", "restored (step N)",
/// ...) and whether that was a restart: the state came from the file and the caller kept none
/// (a new process), which the caller records in the log once it is open. A state that cannot
/// be vouched for (missing after a logged save, rolled back, unreadable) is a `State` error:
/// nothing may be released until an operator resets it.
pub(crate) fn go_on(guard: &mut Guard, saved: Option<&str>, audit_log: Option<&str>) -> FlResult<(String, bool)> {
    let durable = audit_log.map(|p| load_state(Path::new(p))).transpose().map_err(|e| FlError::State(e.to_string()))?.flatten();
    match &durable {
        Some(kept) => Ok((restore_kept(guard, kept, audit_log.unwrap_or_default(), saved.is_none())?, saved.is_none())),
        None => Ok((restore(guard, saved)?, false)),
    }
}

/// Where the guard starts: a saved state of the same policy (restored), or fresh. A state of
/// another policy is not used (a new policy starts from level 0, as `Guard::reload_policy`
/// does); one that cannot be read is an error, never silently dropped.
fn restore(guard: &mut Guard, saved: Option<&str>) -> FlResult<String> {
    let Some(text) = saved.filter(|t| !t.trim().is_empty()) else { return Ok("fresh".into()) };
    let state: GuardState = serde_json::from_str(text).map_err(|e| FlError::Config(format!("the saved guard state is not readable: {e}")))?;
    go_on_from(guard, &state, "", FlError::Config)
}

/// Goes on from the state kept beside the audit log (checked against it by `load_state`): the
/// file wins over a state the caller kept in memory. `restarted`: the caller kept none (a new
/// process), said in the origin.
fn restore_kept(guard: &mut Guard, kept: &SavedState, log: &str, restarted: bool) -> FlResult<String> {
    let path = state_path(Path::new(log));
    let from = if restarted { format!(" from {}", path.display()) } else { String::new() };
    go_on_from(guard, &kept.state, &from, |e| FlError::State(format!("{}: {e}", path.display())))
}

/// Restores `state` into the guard: "restored{from} (step N)", or fresh when it belongs to
/// another policy (a new policy starts from level 0, as `Guard::reload_policy` does); any other
/// mismatch is an error typed by `fail`.
fn go_on_from(guard: &mut Guard, state: &GuardState, from: &str, fail: impl Fn(String) -> FlError) -> FlResult<String> {
    match guard.restore_state(state) {
        Ok(()) => Ok(format!("restored{from} (step {})", state.step)),
        Err(gradguard_guard::decide::StateError::OtherPolicy { saved, current }) => {
            Ok(format!("fresh: the saved state belongs to policy {saved}, the node now enforces {current}"))
        }
        Err(e) => Err(fail(e.to_string())),
    }
}
