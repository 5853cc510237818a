//! The record stage: the audit trail, the report and manifest of each step, and the report
//! sinks they fan out to.
use super::{Guard, ReportSink};
use crate::decide::audit_log::{AuditLog, DecisionRecord, Outcome};
use crate::decide::audit_trail::{AuditTrail, DEFAULT_CHECKPOINT_EVERY};
use crate::decide::protection::Decision;
use crate::decide::worker::Worker;
use crate::error::Result;
use crate::report::{GradientStats, GuardHealth, LayerReport, Manifest, Metric, Report};

/// The record stage's state: where decisions and reports go, and the reloads rejected so far.
pub(super) struct Record {
    pub(super) audit: Option<AuditTrail>,
    pub(super) sinks: Vec<ReportSink>,
    /// The report sinks on a queue of their own, so that a slow sink never costs an estimate;
    /// None when they run inline.
    pub(super) fan_out: Option<Worker>,
    /// Reloads rejected so far (exported as gradguard_policy_reload_failures_total).
    pub(super) reload_failures: u64,
}

impl Record {
    /// Hands the report to the sinks, on the worker when there is one.
    pub(super) fn fan_out(&self, report: &Report) {
        for sink in &self.sinks {
            match &self.fan_out {
                Some(worker) => {
                    let (sink, report) = (sink.clone(), report.clone());
                    worker.submit(Box::new(move || {
                        sink(&report);
                        Ok(())
                    }));
                }
                None => sink(report),
            }
        }
    }
}

impl Guard {
    /// Writes the decision's records to the audit log, then builds the report and the
    /// manifest of the release (`seeds`: those the apply stage used).
    pub(super) fn finish(&mut self, step: u64, samples: usize, estimated: bool, stats: Vec<Metric<GradientStats>>, decision: &Decision) -> Result<Report> {
        let protection = &self.decide.protection;
        let policy = protection.policy();
        let manifest = Manifest {
            step,
            policy_hash: policy.hash().to_string(),
            policy_version: policy.version(),
            samples,
            aggregation_floor: protection.floor(),
            estimate_step: self.estimates.estimate_step,
            outcome: decision.outcome.clone(),
            layers: decision.layers.clone(),
            release_reconstruction_bound_bits: None,
            bound_note: None,
        };
        // The seeds `protect` applied the chains with: this step's, derived again.
        let manifest = with_seeds(with_bounds(manifest, decision), &self.seeds(step));
        // The ledger takes the release's Fisher information only if it leaves.
        if matches!(decision.outcome, crate::report::ReleaseOutcome::Released) {
            self.decide.ledger.commit();
        } else {
            self.decide.ledger.discard();
        }
        let report = self.assemble(step, samples, estimated, stats, Some(manifest));
        if let Some(trail) = self.record.audit.as_mut() {
            trail.decided(step, &decision.records, &report)?;
        }
        Ok(report)
    }

    /// The report of a step: every stage's state as the step leaves it.
    pub(super) fn assemble(&self, step: u64, n: usize, estimated: bool, stats: Vec<Metric<GradientStats>>, release: Option<Manifest>) -> Report {
        let (protection, estimates) = (&self.decide.protection, &self.estimates);
        let levels = protection.layer_levels();
        let latent = estimates.latent.lock().as_ref().map(|t| t.raw.clone());
        let bounds = protection.bounds();
        let layers = self
            .layers
            .layers()
            .iter()
            .zip(stats)
            .enumerate()
            .map(|(l, (layer, gradient))| LayerReport {
                name: layer.name.clone(),
                params: layer.numel(),
                gradient,
                sensitivity: estimates.sensitivity[l].clone(),
                subspace: latent.as_ref().map_or_else(|| Metric::absent("not estimated yet"), |raw| raw[l].clone()),
                protection_level: levels[l],
                reconstruction_bound: bounds.layers[l].clone(),
                sample_isolation: estimates.isolation[l].clone(),
            })
            .collect();
        let settings = self.policy().settings();
        let scheduler = &estimates.scheduler;
        Report {
            step,
            batch_size: n,
            seed: settings.seed,
            estimated,
            estimate_seconds: if estimated { estimates.estimate_seconds } else { None },
            layers,
            release,
            health: GuardHealth {
                estimate_age_steps: estimates.estimate_step.map(|s| step.saturating_sub(s)),
                budget_share: settings.budget_share,
                spent_share: scheduler.spent_share(),
                estimate_share: scheduler.estimate_share(),
                over_budget_estimates: scheduler.over_budget_estimates(),
                estimates_dropped: estimates.worker.as_ref().map_or(0, |w| w.dropped()),
                reports_dropped: self.record.fan_out.as_ref().map_or(0, |w| w.dropped()),
                worker_failures: self.workers().map(|w| w.failures()).sum(),
                worker_error: self.worker_error(),
                policy_reload_failures: self.record.reload_failures,
                autograd_check: estimates.autograd_check.clone(),
            },
            release_reconstruction_bound: bounds.release.clone(),
            release_reconstruction_bound_bits: bounds.release.measured().and_then(|b| b.reconstruction_bound_bits),
            ledger: Some(self.decide.ledger.report(&self.layers.names(), settings)),
            bound_limit: Some(crate::report::BOUND_CAVEAT.to_string()),
            loss: estimates.step_loss,
        }
    }

    /// Every decision from now on is logged to `log` before the release it decides (see
    /// [`AuditTrail`] for what is written when), with a checkpoint every 100 steps. Writes
    /// the run's `started` record (an error when it cannot be written).
    pub fn set_audit_log(&mut self, log: AuditLog) -> Result<()> {
        self.set_audit_log_every(log, DEFAULT_CHECKPOINT_EVERY)
    }

    /// Like [`Guard::set_audit_log`], with a checkpoint every `checkpoint_every` steps.
    pub fn set_audit_log_every(&mut self, log: AuditLog, checkpoint_every: u64) -> Result<()> {
        self.close_audit_log()?;
        let policy = self.policy().hash().to_string();
        self.record.audit = Some(AuditTrail::start(log, checkpoint_every, self.step, &self.layers.names(), &policy)?);
        Ok(())
    }

    /// Saves the guard's state beside its audit log (atomically, `<log>.state.json`) and records
    /// the file's SHA-256 in the log (`state_saved`), so that the next process on this log
    /// goes on from here ([`crate::decide::load_state`]). Returns the hash; None without an
    /// audit log (nothing to keep the state beside).
    pub fn save_state(&mut self) -> Result<Option<String>> {
        let state = self.state();
        let Some(trail) = self.record.audit.as_mut() else { return Ok(None) };
        let hash = crate::decide::save_state(trail.log().base_path(), &state)?;
        trail.event(&DecisionRecord::event(state.step, Outcome::StateSaved, &state.policy_hash, Some(hash.clone())))?;
        Ok(Some(hash))
    }

    /// Records in the audit log that this process went on from a state saved by another one
    /// (`restarted`, with `why`: where from).
    pub fn record_restart(&mut self, why: String) -> Result<()> {
        let (step, policy) = (self.step, self.policy().hash().to_string());
        if let Some(trail) = self.record.audit.as_mut() {
            trail.event(&DecisionRecord::event(step, Outcome::Restarted, &policy, Some(why)))?;
        }
        Ok(())
    }

    /// The audit log being written, if any.
    pub fn audit_log(&self) -> Option<&AuditLog> {
        self.record.audit.as_ref().map(|t| t.log())
    }

    /// Writes the last checkpoint and a `closed` record, and stops logging. Dropping the guard
    /// does this too (reporting a failure on stderr, as a drop cannot return it).
    pub fn close_audit_log(&mut self) -> Result<()> {
        match self.record.audit.take() {
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

/// The manifest with the seed of each layer it releases (nothing when nothing is released).
fn with_seeds(mut manifest: Manifest, seeds: &[u64]) -> Manifest {
    if matches!(manifest.outcome, crate::report::ReleaseOutcome::Released) {
        for (layer, &seed) in manifest.layers.iter_mut().zip(seeds) {
            if layer.released {
                layer.seed = Some(seed);
            }
        }
    }
    manifest
}

/// The manifest with M5 of what it releases: each released layer's bound and noise std, and
/// the whole release's (nothing when nothing is released).
fn with_bounds(mut manifest: Manifest, decision: &Decision) -> Manifest {
    use crate::report::{ReleaseOutcome, BOUND_CAVEAT, NO_NOISE_NO_BOUND};
    for (layer, bound) in manifest.layers.iter_mut().zip(&decision.bounds.layers) {
        if layer.released {
            let b = bound.measured();
            layer.reconstruction_bound_bits = b.and_then(|b| b.reconstruction_bound_bits);
            layer.noise_std = b.and_then(|b| b.noise_std);
        }
    }
    if !matches!(manifest.outcome, ReleaseOutcome::Released) {
        manifest.bound_note = Some("nothing released".into());
        return manifest;
    }
    manifest.release_reconstruction_bound_bits = decision.bounds.release.measured().and_then(|b| b.reconstruction_bound_bits);
    manifest.bound_note = Some(match (&decision.bounds.release, manifest.release_reconstruction_bound_bits) {
        (_, Some(_)) => BOUND_CAVEAT.into(),
        (crate::report::Metric::Absent { reason }, None) => reason.clone(),
        (_, None) => NO_NOISE_NO_BOUND.into(),
    });
    manifest
}
