//! The estimate stage: when the guard estimates (schedule and budget), the estimators of
//! `measure` run on the step's batch, and the measured values handed to the decide stage.
use crate::decide::policy::Policy;
use crate::decide::protection::{Protection, ReleaseProbe};
use crate::decide::schedule::Scheduler;
use super::probe_route::ProbeRoute;
use crate::decide::worker::Worker;
use crate::error::{torch_message, GuardError, Result};
use crate::measure::{Batch, Inspection, JvpSamples, LatentTable, LayerFisher, LayerMap, LossFn, ReleaseSensitivity, SensitivitySettings, StepGraph};
use crate::report::{AutogradCheck, JvpMethod, LeakageMetric, Metric, PriorSource, ReconstructionBound, SampleIsolation, Sensitivity};
use gradguard_defenses::Defence;
use parking_lot::Mutex;
use std::sync::Arc;

/// The estimate stage's state: the latest estimates the decisions and reports rest on, the
/// budget they are scheduled under, M2's worker and the training step's graph hand-off.
pub(super) struct Estimates {
    pub(super) sensitivity: Vec<Metric<Sensitivity>>,
    /// M6, the latest measurement per layer (an estimate's, or a vetting's).
    pub(super) isolation: Vec<Metric<SampleIsolation>>,
    /// M2 results, written by the estimator's worker.
    pub(super) latent: Arc<Mutex<Option<LatentTable>>>,
    pub(super) estimate_step: Option<u64>,
    /// The step of the last M6 measured at an estimate or a vetting.
    pub(super) isolation_step: Option<u64>,
    /// M1's route when the policy leaves `probe_samples` unset, calibrated on the model.
    pub(super) probe_route: ProbeRoute,
    /// Whether the model's autograd record connects every layer's gradient to the inputs, as
    /// the first estimate's M1 found it (`Sensitivity::graph_cut`).
    pub(super) autograd_check: Option<AutogradCheck>,
    /// The last M2 and M6 measurements' times at an estimate (seconds), the guesses for the next.
    pub(super) secondary_costs: SecondaryCosts,
    pub(super) estimate_seconds: Option<f64>,
    pub(super) scheduler: Scheduler,
    /// M2's linear algebra in the background; None when estimates run inline.
    pub(super) worker: Option<Worker>,
    /// The training step's own graph during `Guard::train_step` on an estimate step.
    pub(super) step_graph: Option<StepGraph>,
    /// The training loss `Guard::train_step` computed, for the step's report.
    pub(super) step_loss: Option<f64>,
}

/// What the estimate stage hands the decide stage: values already measured, so that
/// deciding never calls back into the estimators.
pub(super) enum Estimate {
    /// Nothing vouches for the release (a failed worker or estimate): the decision blocks.
    Failed { what: String, estimated: bool },
    /// Not due: the levels of the estimate at step `last` stay in force.
    Reused { last: u64 },
    /// Fresh measurements: the kept M1 JVPs (or why there are none), the latest M2 table and
    /// this estimate's M6.
    Fresh { jvps: std::result::Result<JvpSamples, String>, latent: Option<LatentTable>, isolation: Vec<Metric<SampleIsolation>> },
}

impl Estimate {
    /// Whether the estimators ran for this release (the report's `estimated`).
    pub(super) fn estimated(&self) -> bool {
        match self {
            Estimate::Failed { estimated, .. } => *estimated,
            Estimate::Reused { .. } => false,
            Estimate::Fresh { .. } => true,
        }
    }
}

impl Estimates {
    /// Estimates when due (the interval has passed and the budget allows, the last estimate
    /// is about to exceed the policy's age bound, or the policy forces an estimate before every
    /// release), else hands on the levels in force. Fails closed (under rules) on a failed
    /// worker (`worker_error`) and a failed estimate.
    pub(super) fn run(&mut self, layers: &LayerMap, protection: &Protection, look: Look, worker_error: Option<String>) -> Result<Estimate> {
        let Look { batch, loss_fn, step } = look;
        let policy = protection.policy();
        let has_rules = !policy.rules().is_empty();
        if let Some(error) = worker_error {
            if has_rules {
                return Ok(Estimate::Failed { what: format!("the estimator worker failed: {error}"), estimated: false });
            }
        }
        let settings = policy.settings();
        let forced = settings.estimate_before_release;
        let (due, in_budget) = self.due(policy, step);
        match self.estimate_step {
            Some(last) if !due => return Ok(Estimate::Reused { last }),
            _ => {}
        }
        // M1 and M5 of the release are measured on the kept JVPs (no extra backward pass).
        let keep = protection.needs_jvps();
        // M2 inline when forced (the decision needs this estimate), or, while a rule reads M2,
        // before the first result or when the worker's last result (one estimate behind) could
        // outlive the age bound before the next estimate lands. Read by no rule, M2 is a report
        // on its own cadence: its linear algebra stays off the training thread.
        let latent_age = self.latent.lock().as_ref().map(|t| step.saturating_sub(t.step));
        let read = policy.rules().iter().any(|r| r.metric == LeakageMetric::SubspaceSeparation);
        let inline = forced || (read && latent_age.is_none_or(|a| a.saturating_mul(2) > settings.max_estimate_age_steps));
        let started = self.scheduler.now();
        let measured = self.measure(layers, protection, Look { batch, loss_fn, step }, keep, inline);
        let secondary = self.secondary_costs.this_estimate;
        self.scheduler.record_estimate(self.scheduler.now() - started, secondary, !forced && !in_budget);
        let jvps = match measured {
            Ok(kept) => kept,
            // The reason reaches reports, the audit log and users: libtorch's informative line,
            // never its C++ backtrace.
            Err(e) if has_rules => return Ok(Estimate::Failed { what: format!("the estimate failed: {}", torch_message(&e.to_string())), estimated: true }),
            Err(e) => return Err(e),
        };
        let latent = self.latent.lock().clone();
        // Without kept JVPs (M1 absent, e.g. discrete inputs without a split) a rule on M1
        // fails closed with the reason M1 is absent.
        let absent = self.sensitivity.iter().find_map(|m| m.absent_reason());
        let jvps = jvps.ok_or_else(|| match (keep, absent) {
            (true, Some(absent)) => format!("sensitivity is absent: {absent}"),
            (true, None) => "sensitivity was not estimated".to_string(),
            // Nothing needed them: no M1 or M5 rule, no noise in force until this decision.
            (false, _) => "M1's probe JVPs were not kept at this estimate (no noise was in force before it): measured from the next estimate".to_string(),
        });
        Ok(Estimate::Fresh { jvps, latent, isolation: self.isolation.clone() })
    }

    /// Whether a release decided at `step` estimates first (the interval has passed and the
    /// budget allows, the last estimate is about to exceed the policy's age bound, or the policy
    /// forces one), and whether the budget alone would allow it.
    pub(super) fn due(&self, policy: &Policy, step: u64) -> (bool, bool) {
        let settings = policy.settings();
        let age = self.estimate_step.map(|last| step.saturating_sub(last));
        let in_budget = age.is_none_or(|age| age >= settings.estimate_every && self.scheduler.within_budget());
        // Freshness comes before the budget: an estimate that would be too old for the policy
        // at this release is renewed now, and the overrun is counted.
        let has_rules = !policy.rules().is_empty();
        let keep_fresh = has_rules && age.is_some_and(|age| age >= settings.max_estimate_age_steps);
        (settings.estimate_before_release || in_budget || keep_fresh, in_budget)
    }

    /// Runs the estimators: M1 on this thread (it needs the graph), the per-sample gradients of
    /// M2 here too, and M2's linear algebra on the worker unless `inline`; then M6. Returns the
    /// kept JVPs when `keep_jvps` (the closed loop re-measures M1 on transformed releases from them).
    /// Discrete inputs without an embedding split leave M1 absent with the reason (no JVPs),
    /// and M2 is measured as for any input.
    pub(super) fn measure(&mut self, layers: &LayerMap, protection: &Protection, look: Look, keep_jvps: bool, inline: bool) -> Result<Option<JvpSamples>> {
        let started = std::time::Instant::now();
        let Look { batch, loss_fn, step } = look;
        let settings = protection.policy().settings();
        // The loss's embedding split, if it has one, comes with it into the inspection.
        let mut look = Inspection::new(layers, loss_fn, *batch).seeded(settings.seed, step);
        if let Some(graph) = &self.step_graph {
            // The training step's own forward and backward of this batch (Guard::train_step).
            look = look.with_graph(graph);
        }
        let n = batch.validate()?;
        let mut m1_settings = self.probe_route.settings(settings.sensitivity(), n);
        if self.graph_is_cut() {
            // Found at the first estimate: the double backward would measure too little, and
            // the estimator would find that out again only after running it.
            m1_settings = m1_settings.by_differences();
        }
        let m1_started = self.scheduler.now();
        let (sensitivity, kept) = measure_m1(layers, &look, &m1_settings, keep_jvps)?;
        if self.autograd_check.is_none() && m1_settings.method == JvpMethod::DoubleBackward && sensitivity.iter().any(|m| m.measured().is_some()) {
            let cut_layers = layers.layers().iter().zip(&sensitivity).filter(|(_, m)| m.measured().is_some_and(|s| s.graph_cut)).map(|(l, _)| l.name.clone()).collect();
            self.autograd_check = Some(AutogradCheck { step, cut_layers });
        }
        self.sensitivity = sensitivity;
        self.probe_route.observe(&settings.sensitivity(), n, &self.sensitivity, self.scheduler.now() - m1_started);
        let due = self.secondary_due(protection.policy(), step);
        self.secondary_costs.this_estimate = 0.0;
        if due.subspace {
            let started = self.scheduler.now();
            self.measure_subspace(layers.len(), protection, &look, step, inline)?;
            self.secondary_costs.subspace = Some(self.secondary_costs.add(self.scheduler.now() - started));
        }
        if due.isolation {
            // M6 on the release's batch: n passes of one sample (of the whole batch where the
            // samples interact).
            let started = self.scheduler.now();
            self.isolation = look.sample_isolation(&settings.isolation)?;
            self.isolation_step = Some(step);
            self.secondary_costs.isolation = Some(self.secondary_costs.add(self.scheduler.now() - started));
        }
        self.estimate_step = Some(step);
        self.estimate_seconds = Some(started.elapsed().as_secs_f64());
        Ok(kept)
    }

    /// Whether the check found a layer whose dependence on the inputs autograd does not carry.
    pub(super) fn graph_is_cut(&self) -> bool {
        self.autograd_check.as_ref().is_some_and(|c| !c.cut_layers.is_empty())
    }

    /// M2: the per-sample gradients here (they need the graph), the linear algebra here too
    /// when `inline` or without a worker, else on the worker.
    fn measure_subspace(&self, l: usize, protection: &Protection, look: &Inspection, step: u64, inline: bool) -> Result<()> {
        let table = match look.subspace_samples(&protection.policy().settings().subspace)? {
            Err(reason) => Some(LatentTable::unavailable(step, l, reason)),
            Ok(samples) => {
                let requests = protection.latent_requests();
                match self.worker.as_ref().filter(|_| !inline) {
                    None => Some(LatentTable::compute(&samples, l, &requests)?),
                    Some(worker) => {
                        let shared = self.latent.clone();
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
            *self.latent.lock() = Some(table);
        }
        Ok(())
    }

    /// Which of M2 and M6 this estimate measures beside M1. One a rule reads, or whose cadence
    /// is 0, or under a policy that estimates before every release: at every estimate. Otherwise each on its own cadence (`subspace_every_steps`,
    /// `isolation_every_steps`) where its last cost fits their part of the budget
    /// (`Scheduler::secondary_fits`), and at most one of the two per estimate, the one measured
    /// longer ago, none at the first estimate: each costs several M1 estimates, and an estimate
    /// that ran all three at once would stall the training step that much (METRICS.md keeps
    /// M1 the metric renewed most often).
    fn secondary_due(&self, policy: &Policy, step: u64) -> SecondaryDue {
        let settings = policy.settings();
        let reads = |metrics: &[LeakageMetric]| policy.rules().iter().any(|r| metrics.contains(&r.metric));
        let subspace_read = reads(&[LeakageMetric::SubspaceSeparation]);
        let isolation_read = reads(&[LeakageMetric::ExposedFraction, LeakageMetric::IsolatedShare]);
        let subspace_last = self.latent.lock().as_ref().map(|t| t.step);
        // A policy that estimates before every release (a federated round: the guard is
        // restored from its state each round and is at its first estimate every time) measures
        // both at every estimate, as its release needs them.
        if settings.estimate_before_release {
            return SecondaryDue { subspace: true, isolation: true };
        }
        let first = self.estimate_step.is_none();
        let on_cadence = |last: Option<u64>, every: u64, cost: Option<f64>| !first && last.is_none_or(|last| step.saturating_sub(last) >= every) && self.scheduler.secondary_fits(cost);
        let costs = &self.secondary_costs;
        let subspace = on_cadence(subspace_last, settings.subspace_every_steps, costs.subspace);
        let isolation = on_cadence(self.isolation_step, settings.isolation_every_steps, costs.isolation);
        // Both on cadence: the one measured longer ago (never measured counts as oldest).
        let isolation_first = self.isolation_step.map_or(0, |s| s + 1) < subspace_last.map_or(0, |s| s + 1);
        SecondaryDue {
            subspace: subspace_read || settings.subspace_every_steps == 0 || (subspace && !(isolation && isolation_first)),
            isolation: isolation_read || settings.isolation_every_steps == 0 || (isolation && (isolation_first || !subspace)),
        }
    }
}

/// What M2 and M6 cost at estimates.
#[derive(Default)]
pub(super) struct SecondaryCosts {
    subspace: Option<f64>,
    isolation: Option<f64>,
    /// Seconds in M2 and M6 at the estimate in progress.
    this_estimate: f64,
}

impl SecondaryCosts {
    /// Counts `seconds` to the estimate in progress; returns them.
    fn add(&mut self, seconds: f64) -> f64 {
        self.this_estimate += seconds;
        seconds
    }
}

/// Which of M2 and M6 an estimate measures beside M1.
struct SecondaryDue {
    subspace: bool,
    isolation: bool,
}

/// What the estimators look at: the batch, its loss and the step.
#[derive(Clone, Copy)]
pub(super) struct Look<'a, 'b> {
    pub(super) batch: &'a Batch<'b>,
    pub(super) loss_fn: &'a dyn LossFn,
    pub(super) step: u64,
}

/// The decide stage re-measures the releases it chooses on the kept JVPs through this
/// capability, so that deciding never reaches the estimators themselves.
impl ReleaseProbe for JvpSamples {
    fn release_sensitivity(&self, l: usize, chain: &[Defence], seed: u64) -> Result<Option<ReleaseSensitivity>> {
        JvpSamples::release_sensitivity(self, l, chain, seed)
    }

    fn release_fisher(&self, l: usize, chain: &[Defence], seed: u64) -> Result<Option<LayerFisher>> {
        JvpSamples::release_fisher(self, l, chain, seed)
    }

    fn reconstruction_bound(&self, dfil: Option<(f64, f64)>, noise_std: Option<f64>, prior: (f64, PriorSource)) -> ReconstructionBound {
        JvpSamples::reconstruction_bound(self, dfil, noise_std, prior)
    }

    fn batch_variance(&self) -> f64 {
        self.batch_variance
    }

    fn input_dims(&self) -> usize {
        self.input_dims
    }
}

/// M1 of every layer, and the probe JVPs too when `keep_jvps` (none for integer inputs without
/// a split, whose M1 is absent with the reason).
fn measure_m1(layers: &LayerMap, look: &Inspection, settings: &SensitivitySettings, keep_jvps: bool) -> Result<(Vec<Metric<Sensitivity>>, Option<JvpSamples>)> {
    if !keep_jvps {
        return Ok((look.sensitivity(settings)?, None));
    }
    match look.jvp_samples(settings) {
        Ok(samples) => Ok((samples.sensitivity(layers)?, Some(samples))),
        Err(e @ GuardError::DiscreteInputs { .. }) => Ok(((0..layers.len()).map(|_| Metric::absent(e.to_string())).collect(), None)),
        Err(e) => Err(e),
    }
}
