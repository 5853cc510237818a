//! The guard's audit log: attached, read, closed (at the latest when the guard is dropped).
use super::Guard;
use crate::decide::audit_log::AuditLog;
use crate::decide::audit_trail::{AuditTrail, DEFAULT_CHECKPOINT_EVERY};
use crate::error::Result;

impl Guard {
    /// Every decision from now on is logged to `log` before the release it decides (see
    /// [`AuditTrail`] for what is written when), with a checkpoint every 100 steps. Writes
    /// the run's `started` record (an error when it cannot be written).
    pub fn set_audit_log(&mut self, log: AuditLog) -> Result<()> {
        self.set_audit_log_every(log, DEFAULT_CHECKPOINT_EVERY)
    }

    /// Like [`Guard::set_audit_log`], with a checkpoint every `checkpoint_every` steps.
    pub fn set_audit_log_every(&mut self, log: AuditLog, checkpoint_every: u64) -> Result<()> {
        self.close_audit_log()?;
        let policy = self.protection.policy().hash().to_string();
        self.audit = Some(AuditTrail::start(log, checkpoint_every, self.step, &self.layers.names(), &policy)?);
        Ok(())
    }

    /// The audit log being written, if any.
    pub fn audit_log(&self) -> Option<&AuditLog> {
        self.audit.as_ref().map(|t| t.log())
    }

    /// Writes the last checkpoint and a `closed` record, and stops logging. Dropping the guard
    /// does this too (reporting a failure on stderr, as a drop cannot return it).
    pub fn close_audit_log(&mut self) -> Result<()> {
        match self.audit.take() {
            Some(mut trail) => Ok(trail.close()?),
            None => Ok(()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.close_audit_log() {
            eprintln!("gradguard: closing the audit log: {e}");
        }
    }
}

