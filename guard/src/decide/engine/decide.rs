//! The decide stage: the protection levels the policy drives and the run ledger, deciding a
//! release from values the estimate stage measured; and the policy replaced while training.
use super::estimate::Estimate;
use super::Guard;
use crate::decide::audit_record::{DecisionRecord, Outcome};
use crate::decide::ledger::RunLedger;
use crate::decide::policy::Policy;
use crate::decide::protection::{Decision, Measurements, Protection, ReleaseProbe};
use crate::decide::release::BlockReason;
use crate::error::{GuardError, PolicyError, Result};
use crate::measure::Batch;
use std::path::Path;

/// The decide stage's state: the policy with its protection levels, and the M5 run ledger.
pub(super) struct Decide {
    pub(super) protection: Protection,
    /// M5 summed over the run's releases.
    pub(super) ledger: RunLedger,
}

impl Decide {
    /// Decides the release of `batch` at `step` on the estimate stage's values: a block when
    /// nothing vouches for it, the levels in force between estimates, a measured decision on a
    /// fresh estimate; then the run ledger's cap on what it would release. Fails closed (in the
    /// decision) on M2 results that are too old.
    pub(super) fn decide(&mut self, step: u64, batch: &Batch, estimate: &Estimate, seeds: &[u64]) -> Result<Decision> {
        let mut decision = match estimate {
            Estimate::Failed { what, .. } => self.protection.block(step, BlockReason::GuardFailure { what: what.clone() }),
            Estimate::Reused { last } => self.protection.reuse(step, *last),
            Estimate::Fresh { jvps, latent, isolation } => {
                let settings = self.protection.policy().settings();
                let m = Measurements {
                    jvps: jvps.as_ref().map(|j| j as &dyn ReleaseProbe).map_err(Clone::clone),
                    latent: latent.as_ref(),
                    isolation,
                    step,
                    max_age_steps: settings.max_estimate_age_steps,
                    seeds,
                    prior_variance: settings.prior_variance,
                };
                self.protection.decide(step, &m)?
            }
        };
        // The run ledger's cap, on what the decision would release.
        let n = batch.validate()?;
        let ids = batch.sample_id_values()?;
        let policy = self.protection.policy();
        self.ledger.check(&mut decision, ids, n, policy.settings(), policy.hash(), step);
        Ok(decision)
    }
}

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
        self.record.reload_failures
    }

    fn apply_reload(&mut self, checked: std::result::Result<Protection, PolicyError>, origin: &str) -> Result<()> {
        let kept = self.policy().hash().to_string();
        let protection = match checked {
            Ok(p) => p,
            Err(source) => {
                self.record.reload_failures += 1;
                if let Some(trail) = self.record.audit.as_mut() {
                    let why = format!("{origin}: {source}");
                    trail.event(&DecisionRecord::event(self.step, Outcome::PolicyRejected, &kept, Some(why)))?;
                }
                return Err(GuardError::PolicyRejected { kept: self.policy().short_hash().to_string(), source });
            }
        };
        if let Some(trail) = self.record.audit.as_mut() {
            let mut record = DecisionRecord::event(self.step, Outcome::PolicyLoaded, protection.policy().hash(), Some(format!("from {origin}, in force from step {}", self.step)));
            record.previous_policy_hash = Some(kept);
            trail.event(&record)?;
        }
        self.estimates.scheduler.set_share(protection.policy().settings().budget_share);
        self.decide.protection = protection;
        self.estimates.estimate_step = None;
        Ok(())
    }
}
