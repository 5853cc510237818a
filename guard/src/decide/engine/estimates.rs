//! When and how the guard estimates: the schedule, the estimators, the fan-out of reports.
use super::Guard;
use crate::decide::protection::{Decision, Measurements};
use crate::decide::release::BlockReason;
use crate::error::{GuardError, Result};
use crate::measure::{Batch, Inspection, JvpSamples, LatentTable, LossFn};
use crate::report::{LeakageMetric, Metric, Report};

impl Guard {
    /// Decides with fresh measurements when due (the interval has passed and the budget
    /// allows, the last estimate is about to exceed the policy's age bound, or the policy forces
    /// an estimate before every release), else reuses the levels in force. Fails closed on a
    /// failed worker, a failed estimate, and (in the decision) on M2 results that are too old.
    pub(super) fn decide(&mut self, batch: &Batch, loss_fn: &dyn LossFn, step: u64, seeds: &[u64]) -> Result<(Decision, bool)> {
        let (mut decision, estimated) = self.decide_levels(batch, loss_fn, step, seeds)?;
        // The run ledger's cap, on what the decision would release.
        let n = batch.validate()?;
        let ids = batch.sample_id_values()?;
        let settings = self.protection.policy().settings().clone();
        let hash = self.protection.policy().hash().to_string();
        self.ledger.check(&mut decision, ids, n, &settings, &hash, step);
        Ok((decision, estimated))
    }

    fn decide_levels(&mut self, batch: &Batch, loss_fn: &dyn LossFn, step: u64, seeds: &[u64]) -> Result<(Decision, bool)> {
        let has_rules = !self.policy().rules().is_empty();
        if let Some(error) = self.workers.all().find_map(|w| w.last_error()) {
            if has_rules {
                let what = format!("the estimator worker failed: {error}");
                return Ok((self.protection.block(step, BlockReason::GuardFailure { what }), false));
            }
        }
        let settings = self.policy().settings().clone();
        let forced = settings.estimate_before_release;
        let (due, in_budget) = self.estimate_due(step);
        match self.latest.estimate_step {
            Some(last) if !due => return Ok((self.protection.reuse(step, last), false)),
            _ => {}
        }
        // M1 and M5 of the release are measured on the kept JVPs (no extra backward pass).
        let keep = self.protection.needs_jvps();
        // M2 inline when forced (the decision needs this estimate), before the first result,
        // or when the worker's last result (one estimate behind) could outlive the age bound
        // before the next estimate lands.
        let latent_age = self.latest.latent.lock().as_ref().map(|t| step.saturating_sub(t.step));
        let inline = forced || latent_age.is_none_or(|a| a.saturating_mul(2) > settings.max_estimate_age_steps);
        let started = self.scheduler.now();
        let measured = self.measure(batch, loss_fn, step, keep, inline);
        self.scheduler.record_estimate(self.scheduler.now() - started, !forced && !in_budget);
        let jvps = match measured {
            Ok(kept) => kept,
            Err(e) if has_rules => {
                let what = format!("the estimate failed: {e}");
                return Ok((self.protection.block(step, BlockReason::GuardFailure { what }), true));
            }
            Err(e) => return Err(e),
        };
        let latent = self.latest.latent.lock().clone();
        // Without kept JVPs (M1 absent, e.g. discrete inputs without a split) a rule on M1
        // fails closed with the reason M1 is absent.
        let absent = self.latest.sensitivity.iter().find_map(|m| m.absent_reason());
        let jvps = jvps.as_ref().ok_or_else(|| match (keep, absent) {
            (true, Some(absent)) => format!("sensitivity is absent: {absent}"),
            (true, None) => "sensitivity was not estimated".to_string(),
            // Nothing needed them: no M1 or M5 rule, no noise in force until this decision.
            (false, _) => "M1's probe JVPs were not kept at this estimate (no noise was in force before it): measured from the next estimate".to_string(),
        });
        let m = Measurements { jvps, latent: latent.as_ref(), step, max_age_steps: settings.max_estimate_age_steps, seeds, prior_variance: settings.prior_variance };
        Ok((self.protection.decide(step, &m)?, true))
    }

    /// Whether a release decided at `step` estimates first (the interval has passed and the
    /// budget allows, the last estimate is about to exceed the policy's age bound, or the policy
    /// forces one), and whether the budget alone would allow it.
    pub(super) fn estimate_due(&self, step: u64) -> (bool, bool) {
        let settings = self.policy().settings();
        let age = self.latest.estimate_step.map(|last| step.saturating_sub(last));
        let in_budget = age.is_none_or(|age| age >= settings.estimate_every && self.scheduler.within_budget());
        // Freshness comes before the budget: an estimate that would be too old for the policy
        // at this release is renewed now, and the overrun is counted.
        let has_rules = !self.policy().rules().is_empty();
        let keep_fresh = has_rules && age.is_some_and(|age| age >= settings.max_estimate_age_steps);
        (settings.estimate_before_release || in_budget || keep_fresh, in_budget)
    }

    /// Runs the estimators: M1 on this thread (it needs the graph), the per-sample gradients of
    /// M2 here too, and M2's linear algebra on the worker unless `inline`. Returns the kept JVPs
    /// when `keep_jvps` (the closed loop re-measures M1 on transformed releases from them).
    /// Discrete inputs without an embedding split leave M1 absent with the reason (no JVPs),
    /// and M2 is measured as for any input.
    pub(super) fn measure(&mut self, batch: &Batch, loss_fn: &dyn LossFn, step: u64, keep_jvps: bool, inline: bool) -> Result<Option<JvpSamples>> {
        let started = std::time::Instant::now();
        let settings = self.policy().settings().clone();
        // The loss's embedding split, if it has one, comes with it into the inspection.
        let mut look = Inspection::new(&self.layers, loss_fn, *batch).seeded(settings.seed, step);
        if let Some(graph) = &self.step_graph {
            // The training step's own forward and backward of this batch (Guard::train_step).
            look = look.with_graph(graph);
        }
        let mut kept = None;
        if keep_jvps {
            match look.jvp_samples(&settings.sensitivity()) {
                Ok(samples) => {
                    self.latest.sensitivity = samples.sensitivity(&self.layers)?;
                    kept = Some(samples);
                }
                Err(e @ GuardError::DiscreteInputs { .. }) => {
                    self.latest.sensitivity = (0..self.layers.len()).map(|_| Metric::absent(e.to_string())).collect();
                }
                Err(e) => return Err(e),
            }
        } else {
            self.latest.sensitivity = look.sensitivity(&settings.sensitivity())?;
        }
        if self.subspace_due(step) {
            self.measure_subspace(&look, step, inline)?;
        }
        self.latest.estimate_step = Some(step);
        self.latest.estimate_seconds = Some(started.elapsed().as_secs_f64());
        Ok(kept)
    }

    /// M2: the per-sample gradients here (they need the graph), the linear algebra here too
    /// when `inline` or without a worker, else on the worker.
    fn measure_subspace(&self, look: &Inspection, step: u64, inline: bool) -> Result<()> {
        let l = self.layers.len();
        let table = match look.subspace_samples(&self.policy().settings().subspace)? {
            Err(reason) => Some(LatentTable::unavailable(step, l, reason)),
            Ok(samples) => {
                let requests = self.protection.latent_requests();
                match self.workers.estimator.as_ref().filter(|_| !inline) {
                    None => Some(LatentTable::compute(&samples, l, &requests)?),
                    Some(worker) => {
                        let shared = self.latest.latent.clone();
                        // The samples are fresh copies on the model's device, owned by the job.
                        worker.submit(Box::new(move || {
                            let table = LatentTable::compute(&samples, l, &requests).map_err(|e| e.to_string())?;
                            *shared.lock() = Some(table);
                            Ok(())
                        }));
                        None
                    }
                }
            }
        };
        if let Some(table) = table {
            *self.latest.latent.lock() = Some(table);
        }
        Ok(())
    }

    /// Whether this estimate measures M2: always while a rule reads it, else when its last
    /// result is at least `subspace_every_steps` old (or there is none).
    fn subspace_due(&self, step: u64) -> bool {
        let every = self.policy().settings().subspace_every_steps;
        let read_by_a_rule = self.policy().rules().iter().any(|r| r.metric == LeakageMetric::SubspaceSeparation);
        let last = self.latest.latent.lock().as_ref().map(|t| t.step);
        read_by_a_rule || every == 0 || last.is_none_or(|last| step.saturating_sub(last) >= every)
    }

    /// Hands the report to the sinks, on the worker when there is one.
    pub(super) fn fan_out(&self, report: &Report) {
        for sink in &self.sinks {
            match &self.workers.fan_out {
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
