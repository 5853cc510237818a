//! Batches in, reports out: checking a batch, and assembling the report and manifest of a step.
use super::Guard;
use crate::decide::protection::Decision;
use crate::error::{GuardError, Result};
use crate::measure::Batch;
use crate::report::{GradientStats, GuardHealth, LayerReport, Manifest, Metric, Report};

impl Guard {
    pub(super) fn check_batch(&mut self, batch: &Batch) -> Result<usize> {
        let n = batch.validate()?;
        let shape = batch.sample_shape();
        match &self.sample_shape {
            Some(expected) if *expected != shape => return Err(GuardError::InputShape { expected: expected.clone(), got: shape }),
            Some(_) => {}
            None => self.sample_shape = Some(shape),
        }
        Ok(n)
    }

    /// Writes the decision's records to the audit log, then builds the report and the
    /// manifest of the release.
    pub(super) fn finish(&mut self, step: u64, samples: usize, estimated: bool, stats: Vec<Metric<GradientStats>>, decision: &Decision) -> Result<(Report, Manifest)> {
        let policy = self.protection.policy();
        let manifest = Manifest {
            step,
            policy_hash: policy.hash().to_string(),
            policy_version: policy.version(),
            samples,
            aggregation_floor: self.protection.floor(),
            estimate_step: self.latest.estimate_step,
            outcome: decision.outcome.clone(),
            layers: decision.layers.clone(),
            release_reconstruction_bound_bits: None,
            bound_note: None,
        };
        // The seeds `protect` applied the chains with: this step's, derived again.
        let manifest = with_seeds(with_bounds(manifest, decision), &self.release_seeds(step));
        // The ledger takes the release's Fisher information only if it leaves.
        if matches!(decision.outcome, crate::report::ReleaseOutcome::Released) {
            self.ledger.commit();
        } else {
            self.ledger.discard();
        }
        let report = self.assemble(step, samples, estimated, stats, Some(manifest.clone()));
        if let Some(trail) = self.audit.as_mut() {
            trail.decided(step, &decision.records, &report)?;
        }
        Ok((report, manifest))
    }

    pub(super) fn assemble(&self, step: u64, n: usize, estimated: bool, stats: Vec<Metric<GradientStats>>, release: Option<Manifest>) -> Report {
        let levels = self.protection.layer_levels();
        let latent = self.latest.latent.lock().as_ref().map(|t| t.raw.clone());
        let bounds = self.protection.bounds();
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
                sensitivity: self.latest.sensitivity[l].clone(),
                subspace: latent.as_ref().map_or_else(|| Metric::absent("not estimated yet"), |raw| raw[l].clone()),
                protection_level: levels[l],
                reconstruction_bound: bounds.layers[l].clone(),
            })
            .collect();
        let settings = self.policy().settings();
        Report {
            step,
            batch_size: n,
            seed: settings.seed,
            estimated,
            estimate_seconds: if estimated { self.latest.estimate_seconds } else { None },
            layers,
            release,
            health: GuardHealth {
                estimate_age_steps: self.latest.estimate_step.map(|s| step.saturating_sub(s)),
                budget_share: settings.budget_share,
                spent_share: self.scheduler.spent_share(),
                estimate_share: self.scheduler.estimate_share(),
                over_budget_estimates: self.scheduler.over_budget_estimates(),
                estimates_dropped: self.workers.estimator.as_ref().map_or(0, |w| w.dropped()),
                reports_dropped: self.workers.fan_out.as_ref().map_or(0, |w| w.dropped()),
                worker_failures: self.workers.all().map(|w| w.failures()).sum(),
                worker_error: self.workers.all().find_map(|w| w.last_error()),
                policy_reload_failures: self.reload_failures,
            },
            release_reconstruction_bound: bounds.release.clone(),
            release_reconstruction_bound_bits: bounds.release.measured().and_then(|b| b.reconstruction_bound_bits),
            ledger: Some(self.ledger.report(&self.layers.names(), settings)),
            bound_limit: Some(crate::report::BOUND_CAVEAT.to_string()),
            loss: self.step_loss,
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
