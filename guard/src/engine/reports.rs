//! Batches in, reports out: checking a batch, and assembling the report and manifest of a step.
use super::*;

impl Guard {
    pub(super) fn check_batch(&mut self, batch: &Batch) -> Result<usize> {
        let n = batch.validate()?;
        let shape = batch.sample_shape();
        match &self.sample_shape {
            Some(expected) if *expected != shape => {
                return Err(GuardError::InputShape { expected: expected.clone(), got: shape })
            }
            Some(_) => {}
            None => self.sample_shape = Some(shape),
        }
        Ok(n)
    }

    /// Builds the report with the decision's manifest and writes its records to the audit log.
    pub(super) fn finish(
        &mut self,
        step: u64,
        n: usize,
        estimated: bool,
        stats: Vec<Metric<GradientStats>>,
        decision: &Decision,
        samples: Option<usize>,
    ) -> Result<Report> {
        let policy = self.protection.policy();
        let manifest = Manifest {
            step,
            policy_hash: policy.hash.clone(),
            policy_version: policy.version,
            samples: samples.unwrap_or(n),
            aggregation_floor: self.protection.floor(),
            estimate_step: self.last_estimate_step,
            outcome: decision.outcome.clone(),
            layers: decision.layers.clone(),
        };
        if let Some(log) = self.audit.as_mut() {
            for record in &decision.records {
                log.record(record)?;
            }
        }
        Ok(self.assemble(step, n, estimated, stats, Some(manifest)))
    }

    pub(super) fn assemble(&self, step: u64, n: usize, estimated: bool, stats: Vec<Metric<GradientStats>>, release: Option<Manifest>) -> Report {
        let levels = self.protection.layer_levels();
        let latent = self.latent.lock().as_ref().map(|t| t.raw.clone());
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
                sensitivity: self.latest_sensitivity[l].clone(),
                subspace: latent.as_ref().map_or_else(|| Metric::absent("not estimated yet"), |raw| raw[l].clone()),
                protection_level: levels[l],
            })
            .collect();
        Report {
            step,
            batch_size: n,
            seed: self.config.seed,
            estimated,
            estimate_seconds: if estimated { self.last_estimate_seconds } else { None },
            layers,
            release,
            health: GuardHealth {
                estimate_age_steps: self.last_estimate_step.map(|s| step.saturating_sub(s)),
                budget_share: self.config.budget_share,
                spent_share: self.scheduler.spent_share(),
                estimate_share: self.scheduler.estimate_share(),
                over_budget_estimates: self.scheduler.over_budget_estimates(),
                estimates_dropped: self.worker.as_ref().map_or(0, |w| w.dropped()),
                reports_dropped: self.fan_out.as_ref().map_or(0, |w| w.dropped()),
                worker_failures: self.worker.iter().chain(&self.fan_out).map(|w| w.failures()).sum(),
                worker_error: self.worker.iter().chain(&self.fan_out).find_map(|w| w.last_error()),
            },
        }
    }
}
