//! When and how the guard estimates: the schedule, the estimators, the fan-out of reports.
use super::*;

impl Guard {
    /// Decides with fresh measurements when due (the interval has passed and the budget
    /// allows, the last estimate is about to exceed the policy's age bound, or the policy forces
    /// an estimate before every release), else reuses the levels in force. Fails closed on a
    /// failed worker, a failed estimate, and (in the decision) on M2 results that are too old.
    pub(super) fn decide(&mut self, batch: &Batch, loss_fn: &dyn LossFn, step: u64) -> Result<(Decision, bool)> {
        let has_rules = !self.protection.policy().rules.is_empty();
        let failed = self.worker.iter().chain(&self.fan_out).find_map(|w| w.last_error());
        if let Some(error) = failed {
            if has_rules {
                return Ok((self.protection.block(step, format!("the estimator worker failed: {error}")), false));
            }
        }
        let settings = self.protection.policy().settings.clone();
        let forced = settings.estimate_before_release;
        let age = self.last_estimate_step.map(|last| step.saturating_sub(last));
        let in_budget = age.is_none_or(|age| age >= self.config.estimate_every && self.scheduler.within_budget());
        // Freshness comes before the budget: an estimate that would be too old for the policy
        // at this release is renewed now, and the overrun is counted.
        let keep_fresh = has_rules && age.is_some_and(|age| age >= settings.max_estimate_age_steps);
        let due = forced || in_budget || keep_fresh;
        if !due {
            let last = self.last_estimate_step.expect("not due means estimated before");
            return Ok((self.protection.reuse(step, last), false));
        }
        let keep = self.protection.uses(LeakageMetric::Sensitivity)
            || self.protection.uses(LeakageMetric::SensitivityRms)
            || self.protection.uses(LeakageMetric::RelativeSensitivity);
        // M2 inline when forced (the decision needs this estimate), before the first result,
        // or when the worker's last result (one estimate behind) could outlive the age bound
        // before the next estimate lands.
        let latent_age = self.latent.lock().as_ref().map(|t| step.saturating_sub(t.step));
        let inline = forced || latent_age.is_none_or(|a| a.saturating_mul(2) > settings.max_estimate_age_steps);
        let started = self.scheduler.now();
        let measured = self.measure(batch, loss_fn, step, keep, inline);
        self.scheduler.record_estimate(self.scheduler.now() - started, !forced && !in_budget);
        let jvps = match measured {
            Ok(kept) => kept,
            Err(e) if has_rules => {
                return Ok((self.protection.block(step, format!("the estimate failed: {e}")), true));
            }
            Err(e) => return Err(e),
        };
        let seeds = self.release_seeds(step);
        let params: Vec<usize> = self.layers.layers().iter().map(|l| l.numel()).collect();
        let latent = self.latent.lock().clone();
        let m = crate::release::Measurements {
            jvps: jvps.as_ref(),
            latent: latent.as_ref(),
            step,
            max_age_steps: settings.max_estimate_age_steps,
            seeds: &seeds,
            params: &params,
        };
        Ok((self.protection.decide(step, &m)?, true))
    }

    pub(super) fn release_seeds(&self, step: u64) -> Vec<u64> {
        (0..self.layers.len() as u64).map(|l| gradguard_defenses::derive_seed(self.config.seed ^ step.rotate_left(20), l as usize)).collect()
    }

    /// Runs the estimators: M1 on this thread (it needs the graph), the per-sample gradients of
    /// M2 here too, and M2's linear algebra on the worker unless `inline`. Returns the kept JVPs
    /// when `keep_jvps` (the closed loop re-measures M1 on transformed releases from them).
    pub(super) fn measure(&mut self, batch: &Batch, loss_fn: &dyn LossFn, step: u64, keep_jvps: bool, inline: bool) -> Result<Option<JvpSamples>> {
        let started = std::time::Instant::now();
        let seed = self.config.seed;
        let mut kept = None;
        if keep_jvps {
            let samples = jvp_samples(&self.layers, loss_fn, batch.inputs, batch.targets, &self.config.sensitivity, seed, step)?;
            self.latest_sensitivity = self.sensitivity_from(&samples, seed, step)?;
            kept = Some(samples);
        } else {
            self.latest_sensitivity =
                estimate_sensitivity(&self.layers, loss_fn, batch.inputs, batch.targets, &self.config.sensitivity, seed, step)?;
        }
        let l = self.layers.len();
        match batch.attribute_values()? {
            None => *self.latent.lock() = Some(LatentTable::unavailable(step, l, "no attribute labels given".into())),
            Some(attribute) => {
                let settings = &self.config.subspace;
                match subspace_samples(&self.layers, loss_fn, batch.inputs, batch.targets, &attribute, settings, seed, step)? {
                    Err(reason) => *self.latent.lock() = Some(LatentTable::unavailable(step, l, reason)),
                    Ok(samples) => {
                        let requests = self.protection.latent_requests();
                        match self.worker.as_ref().filter(|_| !inline) {
                            None => *self.latent.lock() = Some(LatentTable::compute(&samples, l, &requests)?),
                            Some(worker) => {
                                let shared = self.latent.clone();
                                // The samples are fresh host copies, owned by the job.
                                worker.submit(Box::new(move || {
                                    let table = LatentTable::compute(&samples, l, &requests).map_err(|e| e.to_string())?;
                                    *shared.lock() = Some(table);
                                    Ok(())
                                }));
                            }
                        }
                    }
                }
            }
        }
        self.last_estimate_step = Some(step);
        self.last_estimate_seconds = Some(started.elapsed().as_secs_f64());
        Ok(kept)
    }

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

    /// M1 of the raw release from kept JVPs (the same numbers the streaming estimator gives).
    pub(super) fn sensitivity_from(&self, samples: &JvpSamples, seed: u64, step: u64) -> Result<Vec<Metric<Sensitivity>>> {
        use crate::tensors::{sum_sq, to_f64_vec};
        // Every layer's K probe norms and gradient norm, read back in one transfer.
        let mut squares = Vec::new();
        for kept in samples.layers.iter().flatten() {
            for jv in &kept.jvps {
                squares.push(sum_sq(jv)?);
            }
            squares.push(sum_sq(&kept.grad)?);
        }
        let values = if squares.is_empty() { vec![] } else { to_f64_vec(&Tensor::f_stack(&squares, 0).during("stacking probe norms")?)? };
        let mut values = values.into_iter();
        let mut out = Vec::new();
        for (layer, kept) in self.layers.layers().iter().zip(&samples.layers) {
            let Some(kept) = kept else {
                out.push(Metric::absent("layer not used by the loss (gradient undefined)"));
                continue;
            };
            let per: Vec<f64> = values.by_ref().take(kept.jvps.len()).map(|v| v / samples.n as f64).collect();
            let norm = values.next().unwrap_or(0.0).sqrt();
            out.push(crate::sensitivity::summarise_layer(&per, norm, layer.numel(), samples, seed, step));
        }
        Ok(out)
    }
}
