//! The guard: holds the layer map, the policy and its protection state; inspects each step's
//! released gradient, schedules the M1/M2 estimates, and decides every release (closed loop,
//! fail closed).
use crate::audit::AuditLog;
use crate::batch::Batch;
use crate::error::{GuardError, Result, TorchContext};
use crate::layers::LayerMap;
use crate::loss::LossFn;
use crate::policy::{LeakageMetric, Policy};
use crate::latent_table::LatentTable;
use crate::release::{Decision, Manifest, Protection, ReleaseOutcome};
use crate::report::{GradientStats, GuardHealth, LayerReport, Metric, Report, Sensitivity};
use crate::schedule::{Clock, Scheduler, SystemClock};
use crate::sensitivity::{estimate_sensitivity, jvp_samples, JvpSamples, SensitivitySettings};
use crate::stats::{current_grads, gradient_stats};
use crate::subspace::{subspace_samples, SubspaceSettings};
use crate::worker::Worker;
use gradguard_defenses::{apply_all, GradientAccumulator};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tch::{nn::VarStore, Tensor};

/// Called with every report, on the worker thread (an exporter, a log).
pub type ReportSink = Arc<dyn Fn(&Report) + Send + Sync>;

/// Guard settings. Serde so that a policy file can carry them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    /// Seed of every random choice (probes, splits, noise): the same seed gives the same report.
    pub seed: u64,
    /// Estimate M1/M2 every this many steps (1: every step).
    pub estimate_every: u64,
    pub sensitivity: SensitivitySettings,
    pub subspace: SubspaceSettings,
    /// The share of wall time the guard may spend, in (0, 1]. The budget can only make
    /// estimates rarer than `estimate_every`.
    pub budget_share: f64,
    /// M2's linear algebra and report sinks on a worker thread (false: inline, deterministic).
    pub background: bool,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            estimate_every: 10,
            sensitivity: SensitivitySettings::default(),
            subspace: SubspaceSettings::default(),
            budget_share: 1.0,
            background: true,
        }
    }
}

impl GuardConfig {
    pub fn validate(&self) -> Result<()> {
        if self.estimate_every == 0 {
            return Err(GuardError::Config { setting: "estimate_every", why: "must be at least 1".into() });
        }
        if !(self.budget_share > 0.0 && self.budget_share <= 1.0) {
            return Err(GuardError::Config { setting: "budget_share", why: format!("must be in (0, 1], got {}", self.budget_share) });
        }
        self.sensitivity.validate()?;
        self.subspace.validate()
    }

    /// The settings a policy file declares.
    pub fn from_policy(policy: &Policy) -> Self {
        let s = &policy.settings;
        Self {
            seed: s.seed,
            estimate_every: s.estimate_every,
            sensitivity: SensitivitySettings { probes: s.probes, ..Default::default() },
            subspace: SubspaceSettings::default(),
            budget_share: s.budget_share,
            background: s.background_estimates,
        }
    }
}

/// Micro-batches held back until the release covers the aggregation floor.
struct Held {
    grads: GradientAccumulator,
    inputs: Vec<Tensor>,
    targets: Vec<Tensor>,
    attributes: Vec<Tensor>,
}

/// What a decision does to one layer's tensors.
enum LayerRelease {
    Unchanged,
    Replaced(Vec<Tensor>),
    Withheld,
}

/// The protected update of the explicit release API: per-parameter tensors of the released
/// layers (withheld layers absent) and the manifest of what was done to each layer.
pub struct ProtectedUpdate {
    pub tensors: Vec<(String, Tensor)>,
    pub manifest: Manifest,
}

/// Per-layer leakage estimation and protection for one model.
pub struct Guard {
    config: GuardConfig,
    layers: LayerMap,
    protection: Protection,
    step: u64,
    sample_shape: Option<Vec<i64>>,
    latest_sensitivity: Vec<Metric<Sensitivity>>,
    /// The latest M2 results, written by the worker.
    latent: Arc<Mutex<Option<LatentTable>>>,
    last_estimate_step: Option<u64>,
    last_estimate_seconds: Option<f64>,
    held: Option<Held>,
    audit: Option<AuditLog>,
    last_report: Option<Report>,
    scheduler: Scheduler,
    /// M2's linear algebra.
    worker: Option<Worker>,
    /// Report sinks, on a queue of their own so that a slow sink never costs an estimate.
    fan_out: Option<Worker>,
    sinks: Vec<ReportSink>,
}

impl Guard {
    /// A guard that measures every trainable parameter of the VarStore and releases what is
    /// finite (a policy with no rules).
    pub fn new(vs: &VarStore, config: GuardConfig) -> Result<Self> {
        Self::build(LayerMap::from_var_store(vs)?, config, Policy::permissive())
    }

    /// A guard that enforces `policy` (its settings replace the defaults).
    pub fn with_policy(vs: &VarStore, policy: Policy) -> Result<Self> {
        let config = GuardConfig::from_policy(&policy);
        Self::build(LayerMap::from_var_store(vs)?, config, policy)
    }

    pub fn from_layers(layers: LayerMap, config: GuardConfig) -> Result<Self> {
        Self::build(layers, config, Policy::permissive())
    }

    pub fn build(layers: LayerMap, config: GuardConfig, policy: Policy) -> Result<Self> {
        config.validate()?;
        let protection = Protection::new(policy, layers.names()).map_err(GuardError::Policy)?;
        let l = layers.len();
        let spawn = |capacity| {
            Worker::spawn(capacity).map_err(|e| GuardError::Config { setting: "background", why: format!("cannot start a worker thread: {e}") })
        };
        let (worker, fan_out) = if config.background { (Some(spawn(2)?), Some(spawn(8)?)) } else { (None, None) };
        Ok(Self {
            scheduler: Scheduler::new(config.budget_share, Box::new(SystemClock::default())),
            config,
            layers,
            protection,
            step: 0,
            sample_shape: None,
            latest_sensitivity: (0..l).map(|_| Metric::absent("not estimated yet")).collect(),
            latent: Arc::new(Mutex::new(None)),
            last_estimate_step: None,
            last_estimate_seconds: None,
            held: None,
            audit: None,
            last_report: None,
            worker,
            fan_out,
            sinks: Vec::new(),
        })
    }

    /// Replaces the clock the budget is measured with (tests drive a synthetic one).
    pub fn set_clock(&mut self, clock: Box<dyn Clock>) {
        self.scheduler = Scheduler::new(self.config.budget_share, clock);
    }

    /// Every report is also handed to `sink`, on the worker thread (inline without one). A
    /// sink that falls behind loses reports (counted), it never slows training.
    pub fn add_report_sink(&mut self, sink: ReportSink) {
        self.sinks.push(sink);
    }

    /// The estimator's worker, when estimates run in the background.
    pub fn worker(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    /// The report sinks' worker, when they run in the background.
    pub fn fan_out_worker(&self) -> Option<&Worker> {
        self.fan_out.as_ref()
    }

    /// Replaces the policy while training. An invalid policy (or one that does not fit this
    /// model) is rejected and the policy in force stays, which the error says. A new policy
    /// starts from level 0 and forces a fresh estimate at the next release, so its first
    /// decision is a measured one.
    pub fn reload_policy(&mut self, text: &str, origin: &str) -> Result<()> {
        let kept = || self.protection.policy().short_hash().to_string();
        let policy = Policy::from_toml_str(text, origin)
            .map_err(|e| GuardError::PolicyRejected { kept: kept(), source: e })?;
        let protection = Protection::new(policy, self.layers.names())
            .map_err(|e| GuardError::PolicyRejected { kept: kept(), source: e })?;
        self.config = GuardConfig { subspace: self.config.subspace.clone(), ..GuardConfig::from_policy(protection.policy()) };
        self.config.validate()?;
        self.scheduler.set_share(self.config.budget_share);
        self.protection = protection;
        self.last_estimate_step = None;
        Ok(())
    }

    /// Every decision from now on is appended to this log before the release it decides.
    pub fn set_audit_log(&mut self, log: AuditLog) {
        self.audit = Some(log);
    }

    pub fn config(&self) -> &GuardConfig {
        &self.config
    }

    pub fn layers(&self) -> &LayerMap {
        &self.layers
    }

    pub fn policy(&self) -> &Policy {
        self.protection.policy()
    }

    pub fn protection(&self) -> &Protection {
        &self.protection
    }

    /// Steps inspected so far; the next call of `after_backward` reports this step.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn last_report(&self) -> Option<&Report> {
        self.last_report.as_ref()
    }

    /// The in-place form, for loops that run `zero_grad(); backward(); step()`: call it between
    /// backward and step. It reads the released gradient from `.grad()`, estimates when due,
    /// decides the release under the policy and edits `.grad()` to the protected gradient.
    ///
    /// - `Ok(report)` with `report.step_allowed()`: `.grad()` holds what may be applied or
    ///   shared (protected layers transformed, withheld layers zeroed unless the policy lets
    ///   them train locally).
    /// - `Ok(report)` without it: the batch was held back to reach the aggregation floor;
    ///   `.grad()` is zeroed and the optimizer must not step.
    /// - `Err(_)`: blocked (or bad input); `.grad()` is zeroed. Nothing unprotected is left.
    pub fn after_backward(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Report> {
        self.scheduler.enter();
        let result = self.after_backward_timed(batch, loss_fn);
        self.scheduler.leave();
        if !self.sinks.is_empty() {
            // Blocked steps are reported too: the sinks see every decided release.
            let decided = match &result {
                Ok(report) => Some(report.clone()),
                Err(_) => self.last_report.clone().filter(|r| r.step + 1 == self.step),
            };
            if let Some(report) = decided {
                self.fan_out(&report);
            }
        }
        result
    }

    fn after_backward_timed(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Report> {
        let n = self.check_batch(batch)?;
        let step = self.step;
        self.step += 1;
        let grads = current_grads(&self.layers);
        let stats = gradient_stats(&self.layers, &grads, step)?;
        let non_finite: Vec<String> = self
            .layers
            .names()
            .into_iter()
            .zip(&stats)
            .filter(|(_, s)| s.measured().is_some_and(|g| g.non_finite > 0))
            .map(|(name, _)| name)
            .collect();
        if !non_finite.is_empty() {
            let decision = self.protection.block(step, format!("non-finite gradient in {non_finite:?}"));
            let report = self.finish(step, n, false, stats, &decision, None)?;
            self.clear_grads()?;
            self.held = None;
            self.last_report = Some(report);
            return Err(GuardError::NonFiniteGradient { step, layers: non_finite });
        }
        let result = self.decide_in_place(batch, loss_fn, step, n, grads, stats);
        if result.is_err() {
            self.clear_grads()?;
        }
        result
    }

    fn decide_in_place(
        &mut self,
        batch: &Batch,
        loss_fn: &dyn LossFn,
        step: u64,
        n: usize,
        grads: Vec<Vec<Tensor>>,
        stats: Vec<Metric<GradientStats>>,
    ) -> Result<Report> {
        let floor = self.protection.floor();
        let owned;
        // Hold micro-batches only while they are needed to reach the floor.
        let held = self.held.is_some() || n < floor;
        let (batch, samples, release_grads) = if held {
            let held = self.hold(batch, n, &grads)?;
            let samples = held.grads.samples();
            if samples < floor {
                let decision = Decision {
                    chains: vec![None; self.layers.len()],
                    outcome: ReleaseOutcome::Pending { reason: format!("holding {samples} of {floor} samples (aggregation floor)") },
                    layers: vec![],
                    records: vec![],
                    violation: None,
                };
                let report = self.finish(step, samples, false, stats, &decision, None)?;
                self.clear_grads()?;
                self.last_report = Some(report.clone());
                return Ok(report);
            }
            let held = self.held.as_ref().expect("just held");
            let mean = held.grads.mean()?;
            owned = (
                Tensor::f_cat(&held.inputs, 0).during("joining held inputs")?,
                Tensor::f_cat(&held.targets, 0).during("joining held targets")?,
                if held.attributes.len() == held.inputs.len() { Some(Tensor::f_cat(&held.attributes, 0).during("joining held attributes")?) } else { None },
            );
            let mut per_layer = Vec::new();
            let mut it = mean.into_iter();
            for layer in self.layers.layers() {
                per_layer.push(layer.params.iter().map(|_| it.next().flatten().unwrap_or_else(Tensor::new)).collect::<Vec<_>>());
            }
            let b = Batch { inputs: &owned.0, targets: &owned.1, attribute: owned.2.as_ref() };
            (b, samples, per_layer)
        } else {
            (*batch, n, grads)
        };
        let (decision, estimated) = self.decide(&batch, loss_fn, step)?;
        let protected = self.protect(&release_grads, &decision, step)?;
        let report = self.finish(step, samples, estimated, stats, &decision, Some(samples))?;
        match &decision.outcome {
            ReleaseOutcome::Released => {
                self.write_grads(&protected, &release_grads, held)?;
                self.held = None;
                self.last_report = Some(report.clone());
                Ok(report)
            }
            ReleaseOutcome::Pending { .. } => {
                // An aggregate rung raised the floor: this batch is the first of the larger
                // release (when it was not held already).
                if !held {
                    self.hold(&batch, samples, &release_grads)?;
                }
                self.clear_grads()?;
                self.last_report = Some(report.clone());
                Ok(report)
            }
            ReleaseOutcome::Blocked { reason } => {
                self.held = None;
                self.last_report = Some(report);
                Err(self.blocked_error(step, &decision, reason))
            }
        }
    }

    /// The explicit release API (federated use): given the update about to be shared (named
    /// per-parameter tensors, as `VarStore::variables()` names them) and the batch it was
    /// computed on, return the protected update and its manifest, or the block. The update is
    /// not edited. The aggregation floor is not accumulated here: an update that covers fewer
    /// samples than the floor is blocked.
    pub fn release(&mut self, update: &[(String, Tensor)], batch: &Batch, loss_fn: &dyn LossFn) -> Result<ProtectedUpdate> {
        self.scheduler.enter();
        let result = self.release_timed(update, batch, loss_fn);
        self.scheduler.leave();
        if let Some(report) = self.last_report.clone().filter(|r| r.step + 1 == self.step && !self.sinks.is_empty()) {
            self.fan_out(&report);
        }
        result
    }

    fn release_timed(&mut self, update: &[(String, Tensor)], batch: &Batch, loss_fn: &dyn LossFn) -> Result<ProtectedUpdate> {
        let n = self.check_batch(batch)?;
        let step = self.step;
        self.step += 1;
        let mut per_layer: Vec<Vec<Tensor>> = self.layers.layers().iter().map(|l| l.params.iter().map(|_| Tensor::new()).collect()).collect();
        for (name, t) in update {
            let (l, p) = self
                .find_param(name)
                .ok_or_else(|| GuardError::UnknownParameter { name: name.clone(), known: self.param_names() })?;
            let expected = &self.layers.layers()[l].params[p].shape;
            if t.size() != *expected {
                return Err(GuardError::ParameterShape { name: name.clone(), expected: expected.clone(), got: t.size() });
            }
            per_layer[l][p] = t.shallow_clone();
        }
        let stats = gradient_stats(&self.layers, &per_layer, step)?;
        let non_finite: Vec<String> =
            self.layers.names().into_iter().zip(&stats).filter(|(_, s)| s.measured().is_some_and(|g| g.non_finite > 0)).map(|(n, _)| n).collect();
        let floor = self.protection.floor();
        let decision = if !non_finite.is_empty() {
            self.protection.block(step, format!("non-finite values in {non_finite:?}"))
        } else if n < floor {
            self.protection.block(step, format!("the update covers {n} samples, below the aggregation floor of {floor}"))
        } else {
            self.decide(batch, loss_fn, step)?.0
        };
        let protected = self.protect(&per_layer, &decision, step)?;
        let report = self.finish(step, n, true, stats, &decision, Some(n))?;
        let manifest = report.release.clone().expect("a release report has a manifest");
        self.last_report = Some(report);
        match &decision.outcome {
            ReleaseOutcome::Blocked { reason } => Err(self.blocked_error(step, &decision, reason)),
            _ => {
                let mut tensors = Vec::new();
                for ((layer, decision), given) in self.layers.layers().iter().zip(protected).zip(&per_layer) {
                    let released: Vec<Tensor> = match decision {
                        LayerRelease::Withheld => continue,
                        LayerRelease::Unchanged => given.iter().map(|t| t.shallow_clone()).collect(),
                        LayerRelease::Replaced(ts) => ts,
                    };
                    for (p, t) in layer.params.iter().zip(released) {
                        if t.defined() {
                            tensors.push((p.name.clone(), t));
                        }
                    }
                }
                Ok(ProtectedUpdate { tensors, manifest })
            }
        }
    }

    /// Estimates M1 (and M2 when attribute labels are given) on a batch now, without reading
    /// `.grad()`, deciding anything or advancing the step: an audit of the model as it is.
    pub fn estimate(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Report> {
        let n = self.check_batch(batch)?;
        let step = self.step;
        self.measure(batch, loss_fn, step, false, true)?;
        let stats = (0..self.layers.len()).map(|_| Metric::absent("audit: no released gradient")).collect();
        let report = self.assemble(step, n, true, stats, None);
        self.last_report = Some(report.clone());
        Ok(report)
    }

    fn blocked_error(&self, step: u64, decision: &Decision, reason: &str) -> GuardError {
        match &decision.violation {
            Some((layer, metric, value, threshold)) => GuardError::Blocked {
                step,
                layer: layer.clone(),
                metric: metric.clone(),
                value: *value,
                threshold: *threshold,
            },
            None => GuardError::ReleaseRefused { step, reason: reason.to_string() },
        }
    }

    /// Decides with fresh measurements when due (the interval has passed and the budget
    /// allows, the last estimate is about to exceed the policy's age bound, or the policy forces
    /// an estimate before every release), else reuses the levels in force. Fails closed on a
    /// failed worker, a failed estimate, and (in the decision) on M2 results that are too old.
    fn decide(&mut self, batch: &Batch, loss_fn: &dyn LossFn, step: u64) -> Result<(Decision, bool)> {
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

    fn release_seeds(&self, step: u64) -> Vec<u64> {
        (0..self.layers.len() as u64).map(|l| gradguard_defenses::derive_seed(self.config.seed ^ step.rotate_left(20), l as usize)).collect()
    }

    /// Runs the estimators: M1 on this thread (it needs the graph), the per-sample gradients of
    /// M2 here too, and M2's linear algebra on the worker unless `inline`. Returns the kept JVPs
    /// when `keep_jvps` (the closed loop re-measures M1 on transformed releases from them).
    fn measure(&mut self, batch: &Batch, loss_fn: &dyn LossFn, step: u64, keep_jvps: bool, inline: bool) -> Result<Option<JvpSamples>> {
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
    fn fan_out(&self, report: &Report) {
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
    fn sensitivity_from(&self, samples: &JvpSamples, seed: u64, step: u64) -> Result<Vec<Metric<Sensitivity>>> {
        let mut out = Vec::new();
        for (layer, kept) in self.layers.layers().iter().zip(&samples.layers) {
            let Some(kept) = kept else {
                out.push(Metric::absent("layer not used by the loss (gradient undefined)"));
                continue;
            };
            let mut per = Vec::new();
            for jv in &kept.jvps {
                per.push(crate::tensors::to_f64_vec(&crate::tensors::sum_sq(jv)?)?[0] / samples.n as f64);
            }
            let norm = crate::tensors::to_f64_vec(&crate::tensors::sum_sq(&kept.grad)?)?[0].sqrt();
            out.push(crate::sensitivity::summarise_layer(&per, norm, layer.numel(), samples, seed, step));
        }
        Ok(out)
    }

    /// Applies each layer's chain to its joined gradient.
    fn protect(&self, grads: &[Vec<Tensor>], decision: &Decision, step: u64) -> Result<Vec<LayerRelease>> {
        if let ReleaseOutcome::Blocked { .. } = decision.outcome {
            return Ok((0..self.layers.len()).map(|_| LayerRelease::Withheld).collect());
        }
        let seeds = self.release_seeds(step);
        let mut out = Vec::new();
        for (l, chain) in decision.chains.iter().enumerate() {
            match chain {
                None => out.push(LayerRelease::Withheld),
                // Finiteness was checked on the whole release before any decision.
                Some(chain) if chain.is_empty() => out.push(LayerRelease::Unchanged),
                Some(chain) => match self.layers.join(l, &grads[l])? {
                    None => out.push(LayerRelease::Unchanged),
                    Some(joined) => match apply_all(chain, &joined, seeds[l])? {
                        None => out.push(LayerRelease::Withheld),
                        Some(released) => out.push(LayerRelease::Replaced(self.layers.split(l, &released)?)),
                    },
                },
            }
        }
        Ok(out)
    }

    fn hold(&mut self, batch: &Batch, n: usize, grads: &[Vec<Tensor>]) -> Result<&Held> {
        let params = self.layers.flat_params().0.len();
        let held = self.held.get_or_insert_with(|| Held {
            grads: GradientAccumulator::new(params),
            inputs: vec![],
            targets: vec![],
            attributes: vec![],
        });
        let flat: Vec<Option<Tensor>> = grads.iter().flatten().map(|g| g.defined().then(|| g.shallow_clone())).collect();
        held.grads.add(&flat, n)?;
        let copy = |t: &Tensor| {
            t.f_empty_like()
                .and_then(|mut out| out.f_copy_(t).map(|_| out))
                .during("holding a micro-batch")
        };
        held.inputs.push(copy(batch.inputs)?);
        held.targets.push(copy(batch.targets)?);
        if let Some(a) = batch.attribute {
            held.attributes.push(copy(a)?);
        }
        Ok(held)
    }

    /// Leaves in `.grad()` what is released: transformed layers replaced, withheld ones zeroed
    /// (unless they train locally), and, for a release of held micro-batches, their mean.
    fn write_grads(&self, protected: &[LayerRelease], released: &[Vec<Tensor>], held: bool) -> Result<()> {
        let local = self.protection.policy().settings.withheld_layers_train_locally;
        tch::no_grad(|| -> Result<()> {
            for ((layer, decision), mean) in self.layers.layers().iter().zip(protected).zip(released) {
                for (i, p) in layer.params.iter().enumerate() {
                    let mut g = p.tensor.grad();
                    if !g.defined() {
                        continue;
                    }
                    match decision {
                        LayerRelease::Replaced(ts) => g.f_copy_(&ts[i]).during("writing the protected gradient")?,
                        LayerRelease::Unchanged if held && mean[i].defined() => g.f_copy_(&mean[i]).during("writing the held mean")?,
                        LayerRelease::Unchanged => {}
                        LayerRelease::Withheld if local && held && mean[i].defined() => g.f_copy_(&mean[i]).during("writing the held mean")?,
                        LayerRelease::Withheld if local => {}
                        LayerRelease::Withheld => {
                            let _ = g.f_zero_().during("zeroing a withheld gradient")?;
                        }
                    }
                }
            }
            Ok(())
        })
    }

    fn clear_grads(&self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for layer in self.layers.layers() {
                for p in &layer.params {
                    let mut g = p.tensor.grad();
                    if g.defined() {
                        let _ = g.f_zero_().during("clearing gradients")?;
                    }
                }
            }
            Ok(())
        })
    }

    fn find_param(&self, name: &str) -> Option<(usize, usize)> {
        self.layers
            .layers()
            .iter()
            .enumerate()
            .find_map(|(l, layer)| layer.params.iter().position(|p| p.name == name).map(|p| (l, p)))
    }

    fn param_names(&self) -> Vec<String> {
        self.layers.layers().iter().flat_map(|l| l.params.iter().map(|p| p.name.clone())).collect()
    }

    fn check_batch(&mut self, batch: &Batch) -> Result<usize> {
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
    fn finish(
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

    fn assemble(&self, step: u64, n: usize, estimated: bool, stats: Vec<Metric<GradientStats>>, release: Option<Manifest>) -> Report {
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
