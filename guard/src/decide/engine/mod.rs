//! The guard: holds the layer map, the policy and its protection state; inspects each step's
//! released gradient, schedules the M1/M2 estimates, and decides every release (closed loop,
//! fail closed). The flows live here; `estimates.rs` runs the estimators, `gradients.rs`
//! applies a decision to the tensors, `reports.rs` assembles what a step reports.
use super::audit_trail::AuditTrail;
use super::ledger::RunLedger;
use super::policy::Policy;
use super::protection::{Decision, Protection};
use super::release::{BlockReason, Release};
#[cfg(any(test, feature = "testing"))]
use super::schedule::Clock;
use super::schedule::{Scheduler, SystemClock};
use super::state::{GuardState, StateError};
use super::worker::Worker;
use crate::error::{GuardError, Result};
use crate::measure::{current_grads, gradient_stats, Batch, LatentTable, LayerMap, LossFn, StepGraph};
use crate::report::JvpMethod;
use crate::report::{GradientStats, Metric, Report, ReleaseOutcome, Sensitivity};
use parking_lot::Mutex;
use std::sync::Arc;
use tch::Tensor;

mod audit;
mod estimates;
mod gradients;
mod reload;
mod reports;

use gradients::{Held, LayerRelease};


/// Called with every report, on the fan-out worker thread (an exporter, a log).
pub type ReportSink = Arc<dyn Fn(&Report) + Send + Sync>;

/// Per-layer leakage estimation and protection for one model.
///
/// A guard is built from the model's [`LayerMap`] and a [`Policy`] (whose settings it runs
/// with; [`Policy::permissive`] measures and releases what is finite). Training loops wrap it
/// with `gradguard_hooks::GuardedOptimizer`; a federated client calls [`Guard::release`].
pub struct Guard {
    layers: LayerMap,
    protection: Protection,
    step: u64,
    sample_shape: Option<Vec<i64>>,
    /// What the estimators last found, and when.
    latest: Latest,
    held: Option<Held>,
    audit: Option<AuditTrail>,
    /// Reloads rejected so far (exported as gradguard_policy_reload_failures_total).
    reload_failures: u64,
    scheduler: Scheduler,
    workers: Workers,
    sinks: Vec<ReportSink>,
    /// M5 summed over the run's releases.
    ledger: RunLedger,
    /// The training step's own graph during [`Guard::train_step`] on an estimate step.
    step_graph: Option<StepGraph>,
    /// The training loss [`Guard::train_step`] computed, for the step's report.
    step_loss: Option<f64>,
    /// Enters every release's noise seed; secret (see [`Guard::set_noise_key`]).
    noise_key: u64,
}

/// The latest estimates the decisions and reports rest on.
struct Latest {
    sensitivity: Vec<Metric<Sensitivity>>,
    /// M2 results, written by the estimator's worker.
    latent: Arc<Mutex<Option<LatentTable>>>,
    estimate_step: Option<u64>,
    estimate_seconds: Option<f64>,
}

/// The background threads: M2's linear algebra, and the report sinks on a queue of their own
/// so that a slow sink never costs an estimate. None when estimates run inline.
struct Workers {
    estimator: Option<Worker>,
    fan_out: Option<Worker>,
}

impl Workers {
    fn all(&self) -> impl Iterator<Item = &Worker> {
        self.estimator.iter().chain(&self.fan_out)
    }
}

impl Guard {
    /// A guard over `layers` that enforces `policy` with the policy's settings.
    pub fn new(layers: LayerMap, policy: Policy) -> Result<Self> {
        let protection = Protection::new(policy, layers.names())?;
        let settings = protection.policy().settings().clone();
        let spawn = |capacity| {
            Worker::spawn(capacity).map_err(|e| GuardError::Config { setting: "background_estimates", why: format!("cannot start a worker thread: {e}") })
        };
        let workers = if settings.background_estimates {
            Workers { estimator: Some(spawn(2)?), fan_out: Some(spawn(8)?) }
        } else {
            Workers { estimator: None, fan_out: None }
        };
        let l = layers.len();
        Ok(Self {
            scheduler: Scheduler::new(settings.budget_share, Box::new(SystemClock::default())),
            layers,
            protection,
            step: 0,
            sample_shape: None,
            latest: Latest {
                sensitivity: (0..l).map(|_| Metric::absent("not estimated yet")).collect(),
                latent: Arc::new(Mutex::new(None)),
                estimate_step: None,
                estimate_seconds: None,
            },
            held: None,
            audit: None,
            reload_failures: 0,
            workers,
            sinks: Vec::new(),
            ledger: RunLedger::new(l),
            step_graph: None,
            step_loss: None,
            noise_key: rand::random(),
        })
    }

    /// Replaces the secret key that enters every release's noise seed, which `Guard::new` draws
    /// from the operating system's entropy. With a key of its choosing a test or an audit can
    /// reproduce a guard's noise bit for bit; whoever knows the key (and the policy and the
    /// step, which a federated server does) can regenerate the noise and subtract it, so a
    /// guard that releases to anyone keeps its drawn key.
    pub fn set_noise_key(&mut self, key: u64) {
        self.noise_key = key;
    }

    /// Replaces the clock the budget is measured with (tests drive a synthetic one; the
    /// `testing` feature).
    #[cfg(any(test, feature = "testing"))]
    pub fn set_clock(&mut self, clock: Box<dyn Clock>) {
        self.scheduler = Scheduler::new(self.policy().settings().budget_share, clock);
    }

    /// Every report is also handed to `sink`, on the fan-out worker (inline without one). A
    /// sink that falls behind loses reports (counted), it never slows training.
    pub fn add_report_sink(&mut self, sink: ReportSink) {
        self.sinks.push(sink);
    }

    /// The estimator's worker, when estimates run in the background.
    pub fn worker(&self) -> Option<&Worker> {
        self.workers.estimator.as_ref()
    }

    /// The report sinks' worker, when they run in the background.
    pub fn fan_out_worker(&self) -> Option<&Worker> {
        self.workers.fan_out.as_ref()
    }

    /// What this guard would need to go on in another process: the protection levels in
    /// force, the step count and the M5 run ledger ([`GuardState`], serde).
    pub fn state(&self) -> GuardState {
        GuardState { policy_hash: self.policy().hash().to_string(), step: self.step, levels: self.protection.saved_levels(), ledger: Some(self.ledger.saved()) }
    }

    /// Goes on from a saved state: the levels (hysteresis) and the step count. The state must
    /// be of this guard's policy and fit its layers; on an error nothing changes. The next
    /// release is still a measured one (no estimate carries over).
    pub fn restore_state(&mut self, state: &GuardState) -> std::result::Result<(), StateError> {
        let current = self.policy().hash();
        if state.policy_hash != current {
            return Err(StateError::OtherPolicy { saved: state.policy_hash.clone(), current: current.to_string() });
        }
        let ledger = state.ledger.as_ref().map(|l| RunLedger::from_saved(self.layers.len(), l)).transpose().map_err(StateError::Mismatch)?;
        self.protection.restore_levels(&state.levels)?;
        if let Some(ledger) = ledger {
            self.ledger = ledger;
        }
        self.step = state.step;
        self.latest.estimate_step = None;
        Ok(())
    }

    /// The model's layers.
    pub fn layers(&self) -> &LayerMap {
        &self.layers
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        self.protection.policy()
    }

    /// The protection levels the policy drives.
    pub fn protection(&self) -> &Protection {
        &self.protection
    }

    /// The per-layer table of a report with this guard's thresholds and the protection in
    /// force ([`Report::policy_table`]): what `gradguard demo` prints at each estimate.
    pub fn table(&self, report: &Report) -> String {
        report.policy_table(&self.protection.thresholds())
    }

    /// Steps inspected so far; the next release reports this step.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The in-place form, for a loop between backward and step: reads the released gradient
    /// from `.grad()`, estimates when due, decides the release under the policy and leaves in
    /// `.grad()` what may be applied or shared.
    ///
    /// - [`Release::Released`]: `.grad()` holds the protected gradient (withheld layers zeroed
    ///   unless the policy lets them train locally); the optimizer may step.
    /// - [`Release::Held`]: the batch was held back to reach the aggregation floor; `.grad()`
    ///   is zeroed and the optimizer must not step.
    /// - [`Release::Blocked`]: `.grad()` is zeroed. Nothing unprotected is left.
    ///
    /// An `Err` is a failure (bad input, a libtorch error, an audit log that cannot be
    /// written); `.grad()` is then zeroed too.
    pub fn after_backward(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Release> {
        self.scheduler.enter();
        let result = self.after_backward_timed(batch, loss_fn);
        self.scheduler.leave();
        self.concluded(result)
    }

    /// The step driver: runs `loss_fn` forward and backward on the batch once, leaving its
    /// gradient in `.grad()` (empty or zeroed by the caller before), then decides the release
    /// as [`Guard::after_backward`] does. On a step that estimates, that one forward and
    /// backward is built with create_graph and serves the estimate too (M1 differentiates its
    /// graph), so the loss runs once per step instead of twice; the forward draws from
    /// libtorch's random stream and updates buffers exactly as an unguarded step's does.
    pub fn train_step(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Release> {
        let result = if self.shares_graph(batch)? {
            // The graph's extra cost (create_graph, dL/dx) is the guard's: the build is timed.
            self.scheduler.enter();
            let result = self.graph_step(batch, loss_fn);
            self.step_graph = None;
            self.scheduler.leave();
            self.concluded(result)
        } else {
            match crate::measure::Inspection::new(&self.layers, loss_fn, *batch).backward() {
                Ok(loss) => {
                    self.step_loss = Some(loss);
                    self.after_backward(batch, loss_fn)
                }
                Err(e) => {
                    self.clear_grads()?;
                    Err(e)
                }
            }
        };
        self.step_loss = None;
        result
    }

    /// Whether the step's release is decided on this batch alone (no micro-batches held for
    /// the aggregation floor) with an estimate whose M1 double-backward graph the training
    /// step can build.
    fn shares_graph(&self, batch: &Batch) -> Result<bool> {
        let n = batch.validate()?;
        let alone = self.held.is_none() && n >= self.protection.floor();
        let double_backward = self.policy().settings().sensitivity().method == JvpMethod::DoubleBackward;
        Ok(alone && double_backward && self.estimate_due(self.step).0)
    }

    fn graph_step(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Release> {
        let settings = self.policy().settings();
        let look = crate::measure::Inspection::new(&self.layers, loss_fn, *batch).seeded(settings.seed, self.step);
        match StepGraph::build(&look)? {
            Some(graph) => {
                graph.write_grads(&self.layers)?;
                self.step_loss = Some(graph.loss());
                self.step_graph = Some(graph);
            }
            // Integer inputs without a split: M1 is absent, a plain backward serves the step.
            None => self.step_loss = Some(look.backward()?),
        }
        self.after_backward_timed(batch, loss_fn)
    }

    /// The end of an in-place step: on an error nothing unchecked is left in `.grad()`; every
    /// decided release goes to the sinks.
    fn concluded(&mut self, result: Result<Release>) -> Result<Release> {
        if result.is_err() {
            self.clear_grads()?;
        }
        if let Ok(release) = &result {
            // Blocked steps are reported too: the sinks see every decided release.
            self.fan_out(release.report());
        }
        result
    }

    fn after_backward_timed(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Release> {
        let n = self.check_batch(batch)?;
        let step = self.step;
        self.step += 1;
        let grads = current_grads(&self.layers);
        let stats = gradient_stats(&self.layers, &grads, step)?;
        if let Some(reason) = non_finite(&self.layers, &stats) {
            let decision = self.protection.block(step, reason);
            return self.conclude(step, n, false, stats, decision, Form::InPlace(None));
        }
        let seeds = self.release_seeds(step);
        let floor = self.protection.floor();
        // Hold micro-batches only while they are needed to reach the floor.
        let holding = self.held.is_some() || n < floor;
        if !holding {
            let (decision, estimated) = self.decide(batch, loss_fn, step, &seeds)?;
            if matches!(decision.outcome, ReleaseOutcome::Held { .. }) {
                // An aggregate rung raised the floor: this batch is the first of the larger
                // release.
                self.hold(batch, n, &grads)?;
            }
            let protected = self.protect(&grads, &decision, &seeds)?;
            let written = Written { protected, released: grads, held: false };
            return self.conclude(step, n, estimated, stats, decision, Form::InPlace(Some(written)));
        }
        let samples = self.hold(batch, n, &grads)?.grads.samples();
        if samples < floor {
            let decision = self.protection.pending(format!("holding {samples} of {floor} samples (aggregation floor)"));
            return self.conclude(step, samples, false, stats, decision, Form::InPlace(None));
        }
        let (joined, mean) = match &self.held {
            Some(held) => (held.joined()?, held.mean_per_layer(&self.layers)?),
            None => return Err(GuardError::Config { setting: "aggregation_floor", why: "the held micro-batches were lost".into() }),
        };
        let Some(mean) = mean else {
            // A block drops the held micro-batches: held on, they would fail every release.
            let what = format!("the mean of the {samples} held samples is not finite (their sum overflowed the gradients' dtype)");
            let decision = self.protection.block(step, BlockReason::GuardFailure { what });
            return self.conclude(step, samples, false, stats, decision, Form::InPlace(None));
        };
        let (decision, estimated) = self.decide(&joined.batch(), loss_fn, step, &seeds)?;
        let protected = self.protect(&mean, &decision, &seeds)?;
        let written = Written { protected, released: mean, held: true };
        self.conclude(step, samples, estimated, stats, decision, Form::InPlace(Some(written)))
    }

    /// The explicit release API (federated use): given the update about to be shared (named
    /// per-parameter tensors, as `VarStore::variables()` names them) and the batch it was
    /// computed on, decide what may leave. The update is not edited. The aggregation floor is
    /// not accumulated here: an update that covers fewer samples than the floor is blocked, and
    /// so is one at which an aggregate rung escalates ([`BlockReason::Aggregate`]): this form
    /// never returns [`Release::Held`].
    pub fn release(&mut self, update: &[(String, Tensor)], batch: &Batch, loss_fn: &dyn LossFn) -> Result<Release> {
        self.scheduler.enter();
        let result = self.release_timed(update, batch, loss_fn);
        self.scheduler.leave();
        if let Ok(release) = &result {
            self.fan_out(release.report());
        }
        result
    }

    fn release_timed(&mut self, update: &[(String, Tensor)], batch: &Batch, loss_fn: &dyn LossFn) -> Result<Release> {
        let n = self.check_batch(batch)?;
        let per_layer = self.update_per_layer(update)?;
        let step = self.step;
        self.step += 1;
        let stats = gradient_stats(&self.layers, &per_layer, step)?;
        let floor = self.protection.floor();
        let seeds = self.release_seeds(step);
        let (decision, estimated) = if let Some(reason) = non_finite(&self.layers, &stats) {
            (self.protection.block(step, reason), false)
        } else if n < floor {
            (self.protection.block(step, BlockReason::BelowFloor { samples: n, floor }), false)
        } else {
            // An aggregate rung's pending release is refused: this form holds nothing.
            let (decision, estimated) = self.decide(batch, loss_fn, step, &seeds)?;
            (self.protection.refuse_pending(step, decision), estimated)
        };
        let protected = self.protect(&per_layer, &decision, &seeds)?;
        let update = self.released_tensors(protected, &per_layer);
        self.conclude(step, n, estimated, stats, decision, Form::Explicit(update))
    }

    /// Estimates M1 (and M2 when attribute labels are given) on a batch now, without reading
    /// `.grad()`, deciding anything or advancing the step: an audit of the model as it is.
    pub fn estimate(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Report> {
        let n = self.check_batch(batch)?;
        let step = self.step;
        self.measure(batch, loss_fn, step, false, true)?;
        let stats = (0..self.layers.len()).map(|_| Metric::absent("audit: no released gradient")).collect();
        Ok(self.assemble(step, n, true, stats, None))
    }

    /// Writes the decision's records, applies it (in place: `.grad()` gets the protected
    /// layers, or zeros when nothing may be applied) and returns the typed release.
    fn conclude(&mut self, step: u64, samples: usize, estimated: bool, stats: Vec<Metric<GradientStats>>, decision: Decision, form: Form) -> Result<Release> {
        let (report, manifest) = self.finish(step, samples, estimated, stats, &decision)?;
        let in_place = matches!(form, Form::InPlace(_));
        match decision.outcome {
            ReleaseOutcome::Released => {
                let update = match form {
                    Form::InPlace(Some(written)) => {
                        self.write_grads(&written)?;
                        self.held = None;
                        Vec::new()
                    }
                    Form::InPlace(None) => {
                        self.clear_grads()?;
                        Vec::new()
                    }
                    Form::Explicit(update) => update,
                };
                Ok(Release::Released { update, manifest, report })
            }
            ReleaseOutcome::Held { .. } => {
                if in_place {
                    self.clear_grads()?;
                }
                Ok(Release::Held { manifest, report })
            }
            ReleaseOutcome::Blocked { reason } => {
                self.held = None;
                if in_place {
                    self.clear_grads()?;
                }
                let reason = decision.block.unwrap_or(BlockReason::GuardFailure { what: reason });
                Ok(Release::Blocked { reason, manifest, report })
            }
        }
    }
}

/// Which release form a step takes, and what it leaves behind.
enum Form {
    /// `.grad()` is edited: the protected gradient when there is one to write.
    InPlace(Option<Written>),
    /// The protected update is returned; `.grad()` is not touched.
    Explicit(Vec<(String, Tensor)>),
}

/// What an in-place release writes into `.grad()`: each layer's release, over the gradients it
/// was computed from (the held mean when `held`).
struct Written {
    protected: Vec<LayerRelease>,
    released: Vec<Vec<Tensor>>,
    held: bool,
}

/// The block for a release with non-finite entries, if it has any.
fn non_finite(layers: &LayerMap, stats: &[Metric<GradientStats>]) -> Option<BlockReason> {
    let bad: Vec<String> = layers
        .names()
        .into_iter()
        .zip(stats)
        .filter(|(_, s)| s.measured().is_some_and(|g| g.non_finite > 0))
        .map(|(name, _)| name)
        .collect();
    (!bad.is_empty()).then_some(BlockReason::NonFinite { layers: bad })
}

