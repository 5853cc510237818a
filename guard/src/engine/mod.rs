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

mod estimates;
mod gradients;
mod reports;

use gradients::{Held, LayerRelease};

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


}
