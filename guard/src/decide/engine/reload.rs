//! Replacing the policy of a running guard: checked against the model first, logged either
//! way, counted when rejected.
use super::Guard;
use crate::decide::audit_record::{DecisionRecord, Outcome};
use crate::decide::policy::Policy;
use crate::decide::protection::Protection;
use crate::error::{GuardError, PolicyError, Result};
use std::path::Path;

impl Guard {
    /// Replaces the policy while training with the one in `text` (`origin` names it in
    /// errors and in the log). An invalid policy (or one that does not fit this model) is
    /// rejected and the policy in force stays, which the error says; the rejection is logged
    /// (`policy_rejected`) and counted ([`Guard::policy_reload_failures`], exported as
    /// `gradguard_policy_reload_failures_total`). A policy that passes takes effect at the
    /// next release, logged as `policy_loaded` with both hashes. A new policy starts from
    /// level 0 and forces a fresh estimate at the next release, so its first decision is a
    /// measured one (the levels of the old policy end with it: no per-layer `relaxed` record
    /// is written for them). Its settings take effect, except `background_estimates`, which is fixed
    /// when the guard is built.
    pub fn reload_policy(&mut self, text: &str, origin: &str) -> Result<()> {
        let checked = Policy::from_toml_str(text, origin).and_then(|policy| Protection::new(policy, self.layers.names()));
        self.apply_reload(checked, origin)
    }

    /// [`Guard::reload_policy`] from a file; a file that cannot be read is a rejection too.
    pub fn reload_policy_file(&mut self, path: &Path) -> Result<()> {
        let checked = Policy::load(path).and_then(|policy| Protection::new(policy, self.layers.names()));
        self.apply_reload(checked, &path.display().to_string())
    }

    /// Policy reloads rejected so far.
    pub fn policy_reload_failures(&self) -> u64 {
        self.reload_failures
    }

    fn apply_reload(&mut self, checked: std::result::Result<Protection, PolicyError>, origin: &str) -> Result<()> {
        let kept = self.protection.policy().hash().to_string();
        let protection = match checked {
            Ok(p) => p,
            Err(source) => {
                self.reload_failures += 1;
                if let Some(trail) = self.audit.as_mut() {
                    let why = format!("{origin}: {source}");
                    trail.event(&DecisionRecord::event(self.step, Outcome::PolicyRejected, &kept, Some(why)))?;
                }
                return Err(GuardError::PolicyRejected { kept: self.protection.policy().short_hash().to_string(), source });
            }
        };
        if let Some(trail) = self.audit.as_mut() {
            let mut record = DecisionRecord::event(self.step, Outcome::PolicyLoaded, protection.policy().hash(), Some(format!("from {origin}, in force from step {}", self.step)));
            record.previous_policy_hash = Some(kept);
            trail.event(&record)?;
        }
        self.scheduler.set_share(protection.policy().settings().budget_share);
        self.protection = protection;
        self.latest.estimate_step = None;
        Ok(())
    }
}
