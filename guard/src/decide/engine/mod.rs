//! The guard: one model's layer map, step count and the stages a release goes through, each
//! with its own state: holding micro-batches for the aggregation floor (`hold.rs`),
//! estimating (`estimate.rs`, over the estimators of `measure`), deciding (`decide.rs`),
//! applying the decision to the gradients (`apply.rs`) and recording it (`record.rs`). The
//! flows below read a step top to bottom as those stages' calls (closed loop, fail closed).
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
use crate::measure::{current_grads, gradient_stats, Batch, Inspection, LayerMap, LossFn, StepGraph};
use crate::report::JvpMethod;
use crate::report::{GradientStats, Metric, Report, ReleaseOutcome};
use parking_lot::Mutex;
use std::sync::Arc;
use tch::Tensor;

mod apply;
mod decide;
mod estimate;
mod hold;
mod probe_route;
mod record;
mod vet;

use apply::{Apply, Written};
use decide::Decide;
use estimate::{Estimate, Estimates, Look};
use hold::Hold;
use probe_route::ProbeRoute;
use record::Record;

/// Called with every report, on the fan-out worker thread (an exporter, a log).
pub type ReportSink = Arc<dyn Fn(&Report) + Send + Sync>;

/// Per-layer leakage estimation and protection for one model.
///
/// A guard is built from the model's [`LayerMap`] and a [`Policy`] (whose settings it runs
/// with; [`Policy::permissive`] measures and releases what is finite). Training loops wrap it
/// with `gradguard_tch::GuardedOptimizer`; a federated client calls [`Guard::release`].
pub struct Guard {
    layers: LayerMap,
    step: u64,
    /// The shape of one sample, fixed by the first batch.
    sample_shape: Option<Vec<i64>>,
    hold: Hold,
    estimates: Estimates,
    decide: Decide,
    apply: Apply,
    record: Record,
}

impl Guard {
    /// A guard over `layers` that enforces `policy` with the policy's settings.
    pub fn new(layers: LayerMap, policy: Policy) -> Result<Self> {
        let protection = Protection::new(policy, layers.names())?;
        let settings = protection.policy().settings().clone();
        let spawn = |capacity| {
            Worker::spawn(capacity).map_err(|e| GuardError::Config { setting: "background_estimates", why: format!("cannot start a worker thread: {e}") })
        };
        let (estimator, fan_out) = if settings.background_estimates { (Some(spawn(2)?), Some(spawn(8)?)) } else { (None, None) };
        let l = layers.len();
        Ok(Self {
            estimates: Estimates {
                sensitivity: (0..l).map(|_| Metric::absent("not estimated yet")).collect(),
                isolation: (0..l).map(|_| Metric::absent("not estimated yet")).collect(),
                latent: Arc::new(Mutex::new(None)),
                estimate_step: None,
                isolation_step: None,
                probe_route: ProbeRoute::Uncalibrated,
                autograd_check: None,
                secondary_costs: Default::default(),
                estimate_seconds: None,
                scheduler: Scheduler::new(settings.budget_share, Box::new(SystemClock::default())),
                worker: estimator,
                step_graph: None,
                step_loss: None,
            },
            layers,
            step: 0,
            sample_shape: None,
            hold: Hold::default(),
            decide: Decide { protection, ledger: RunLedger::new(l) },
            apply: Apply { noise_key: rand::random() },
            record: Record { audit: None, sinks: Vec::new(), fan_out, reload_failures: 0 },
        })
    }

    /// Replaces the secret key that enters every release's noise seed, which `Guard::new` draws
    /// from the operating system's entropy. With a key of its choosing a test or an audit can
    /// reproduce a guard's noise bit for bit; whoever knows the key (and the policy and the
    /// step, which a federated server does) can regenerate the noise and subtract it, so a
    /// guard that releases to anyone keeps its drawn key.
    pub fn set_noise_key(&mut self, key: u64) {
        self.apply.noise_key = key;
    }

    /// Replaces the clock the budget is measured with (tests drive a synthetic one; the
    /// `testing` feature).
    #[cfg(any(test, feature = "testing"))]
    pub fn set_clock(&mut self, clock: Box<dyn Clock>) {
        self.estimates.scheduler = Scheduler::new(self.policy().settings().budget_share, clock);
    }

    /// Every report is also handed to `sink`, on the fan-out worker (inline without one). A
    /// sink that falls behind loses reports (counted), it never slows training.
    pub fn add_report_sink(&mut self, sink: ReportSink) {
        self.record.sinks.push(sink);
    }

    /// The estimator's worker, when estimates run in the background.
    pub fn worker(&self) -> Option<&Worker> {
        self.estimates.worker.as_ref()
    }

    /// The report sinks' worker, when they run in the background.
    pub fn fan_out_worker(&self) -> Option<&Worker> {
        self.record.fan_out.as_ref()
    }

    /// Both background threads: M2's linear algebra and the report sinks.
    fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.estimates.worker.iter().chain(&self.record.fan_out)
    }

    /// The last error of either background thread, if one failed.
    fn worker_error(&self) -> Option<String> {
        self.workers().find_map(|w| w.last_error())
    }

    /// What this guard would need to go on in another process: the protection levels in
    /// force, the step count and the M5 run ledger ([`GuardState`], serde).
    pub fn state(&self) -> GuardState {
        GuardState { policy_hash: self.policy().hash().to_string(), step: self.step, levels: self.decide.protection.saved_levels(), ledger: Some(self.decide.ledger.saved()) }
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
        self.decide.protection.restore_levels(&state.levels)?;
        if let Some(ledger) = ledger {
            self.decide.ledger = ledger;
        }
        self.step = state.step;
        self.estimates.estimate_step = None;
        Ok(())
    }

    /// The model's layers.
    pub fn layers(&self) -> &LayerMap {
        &self.layers
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        self.decide.protection.policy()
    }

    /// The protection levels the policy drives.
    pub fn protection(&self) -> &Protection {
        &self.decide.protection
    }

    /// The per-layer table of a report with this guard's thresholds and the protection in
    /// force ([`Report::policy_table`]): what `gradguard demo` prints at each estimate.
    pub fn table(&self, report: &Report) -> String {
        report.policy_table(&self.decide.protection.thresholds())
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
        self.estimates.scheduler.enter();
        let result = self.after_backward_timed(batch, loss_fn);
        self.estimates.scheduler.leave();
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
            self.estimates.scheduler.enter();
            let result = self.graph_step(batch, loss_fn);
            self.estimates.step_graph = None;
            self.estimates.scheduler.leave();
            self.concluded(result)
        } else {
            match Inspection::new(&self.layers, loss_fn, *batch).backward() {
                Ok(loss) => {
                    self.estimates.step_loss = Some(loss);
                    self.after_backward(batch, loss_fn)
                }
                Err(e) => {
                    apply::clear_grads(&self.layers)?;
                    Err(e)
                }
            }
        };
        self.estimates.step_loss = None;
        result
    }

    /// Whether the step's release is decided on this batch alone (no micro-batches held for
    /// the aggregation floor) with an estimate whose M1 double-backward graph the training
    /// step can build.
    fn shares_graph(&self, batch: &Batch) -> Result<bool> {
        let n = batch.validate()?;
        let alone = !self.hold.is_holding() && n >= self.decide.protection.floor();
        let double_backward = self.policy().settings().sensitivity().method == JvpMethod::DoubleBackward && !self.estimates.graph_is_cut();
        Ok(alone && double_backward && self.estimates.due(self.policy(), self.step).0)
    }

    /// The training step's forward and backward built once for the step and its estimate,
    /// handed to the estimate stage, then the step decided as after a backward.
    fn graph_step(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Release> {
        let look = Inspection::new(&self.layers, loss_fn, *batch).seeded(self.policy().settings().seed, self.step);
        match StepGraph::build(&look)? {
            Some(graph) => {
                graph.write_grads(&self.layers)?;
                self.estimates.step_loss = Some(graph.loss());
                self.estimates.step_graph = Some(graph);
            }
            // Integer inputs without a split: M1 is absent, a plain backward serves the step.
            None => self.estimates.step_loss = Some(look.backward()?),
        }
        self.after_backward_timed(batch, loss_fn)
    }

    /// The end of an in-place step: on an error nothing unchecked is left in `.grad()`; every
    /// decided release goes to the sinks.
    fn concluded(&mut self, result: Result<Release>) -> Result<Release> {
        if result.is_err() {
            apply::clear_grads(&self.layers)?;
        }
        if let Ok(release) = &result {
            // Blocked steps are reported too: the sinks see every decided release.
            self.record.fan_out(release.report());
        }
        result
    }

    /// One in-place step, stage by stage: check the batch, read the gradients and their
    /// statistics, hold for the aggregation floor, estimate when due, decide, apply, record.
    fn after_backward_timed(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Release> {
        let n = self.check_batch(batch)?;
        let step = self.step;
        self.step += 1;
        let grads = current_grads(&self.layers);
        let stats = gradient_stats(&self.layers, &grads, step)?;
        if let Some(reason) = non_finite(&self.layers, &stats) {
            let decision = self.decide.protection.block(step, reason);
            return self.conclude(step, n, false, stats, decision, Form::InPlace(None));
        }
        let seeds = self.seeds(step);
        let floor = self.decide.protection.floor();
        if !self.hold.needed(n, floor) {
            let estimate = self.run_estimate(batch, loss_fn, step)?;
            let decision = self.decide.decide(step, batch, &estimate, &seeds)?;
            if matches!(decision.outcome, ReleaseOutcome::Held { .. }) {
                // An aggregate rung raised the floor: this batch is the first of the larger
                // release.
                self.hold.add(&self.layers, batch, n, &grads)?;
            }
            let protected = self.apply.protect(&self.layers, &grads, &decision, &seeds)?;
            let written = Written { protected, released: grads, held: false };
            return self.conclude(step, n, estimate.estimated(), stats, decision, Form::InPlace(Some(written)));
        }
        let samples = self.hold.add(&self.layers, batch, n, &grads)?.grads.samples();
        if samples < floor {
            let decision = self.decide.protection.pending(format!("holding {samples} of {floor} samples (aggregation floor)"));
            return self.conclude(step, samples, false, stats, decision, Form::InPlace(None));
        }
        let (joined, mean) = match self.hold.held() {
            Some(held) => (held.joined()?, held.mean_per_layer(&self.layers)?),
            None => return Err(GuardError::Config { setting: "aggregation_floor", why: "the held micro-batches were lost".into() }),
        };
        let Some(mean) = mean else {
            // A block drops the held micro-batches: held on, they would fail every release.
            let what = format!("the mean of the {samples} held samples is not finite (their sum overflowed the gradients' dtype)");
            let decision = self.decide.protection.block(step, BlockReason::GuardFailure { what });
            return self.conclude(step, samples, false, stats, decision, Form::InPlace(None));
        };
        let joined = joined.batch();
        let estimate = self.run_estimate(&joined, loss_fn, step)?;
        let decision = self.decide.decide(step, &joined, &estimate, &seeds)?;
        let protected = self.apply.protect(&self.layers, &mean, &decision, &seeds)?;
        let written = Written { protected, released: mean, held: true };
        self.conclude(step, samples, estimate.estimated(), stats, decision, Form::InPlace(Some(written)))
    }

    /// The explicit release API (federated use): given the update about to be shared (named
    /// per-parameter tensors, as `VarStore::variables()` names them) and the batch it was
    /// computed on, decide what may leave. The update is not edited. The aggregation floor is
    /// not accumulated here: an update that covers fewer samples than the floor is blocked, and
    /// so is one at which an aggregate rung escalates ([`BlockReason::Aggregate`]): this form
    /// never returns [`Release::Held`].
    pub fn release(&mut self, update: &[(String, Tensor)], batch: &Batch, loss_fn: &dyn LossFn) -> Result<Release> {
        self.estimates.scheduler.enter();
        let result = self.release_timed(update, batch, loss_fn);
        self.estimates.scheduler.leave();
        if let Ok(release) = &result {
            self.record.fan_out(release.report());
        }
        result
    }

    /// One explicit release, stage by stage: check the batch and the update, its statistics,
    /// estimate when due, decide (nothing is held: a pending release is refused), apply to a
    /// copy, record.
    fn release_timed(&mut self, update: &[(String, Tensor)], batch: &Batch, loss_fn: &dyn LossFn) -> Result<Release> {
        let n = self.check_batch(batch)?;
        let per_layer = apply::update_per_layer(&self.layers, update)?;
        let step = self.step;
        self.step += 1;
        let stats = gradient_stats(&self.layers, &per_layer, step)?;
        let floor = self.decide.protection.floor();
        let seeds = self.seeds(step);
        let (decision, estimated) = if let Some(reason) = non_finite(&self.layers, &stats) {
            (self.decide.protection.block(step, reason), false)
        } else if n < floor {
            (self.decide.protection.block(step, BlockReason::BelowFloor { samples: n, floor }), false)
        } else {
            let estimate = self.run_estimate(batch, loss_fn, step)?;
            let decision = self.decide.decide(step, batch, &estimate, &seeds)?;
            // An aggregate rung's pending release is refused: this form holds nothing.
            (self.decide.protection.refuse_pending(step, decision), estimate.estimated())
        };
        let protected = self.apply.protect(&self.layers, &per_layer, &decision, &seeds)?;
        let update = apply::released_tensors(&self.layers, protected, &per_layer);
        self.conclude(step, n, estimated, stats, decision, Form::Explicit(update))
    }

    /// Estimates M1 (and M2 when attribute labels are given) on a batch now, without reading
    /// `.grad()`, deciding anything or advancing the step: an audit of the model as it is.
    pub fn estimate(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Report> {
        let n = self.check_batch(batch)?;
        let step = self.step;
        self.estimates.measure(&self.layers, &self.decide.protection, Look { batch, loss_fn, step }, false, true)?;
        let stats = (0..self.layers.len()).map(|_| Metric::absent("audit: no released gradient")).collect();
        Ok(self.assemble(step, n, true, stats, None))
    }

    /// The batch checked, and its sample shape against the first batch's.
    fn check_batch(&mut self, batch: &Batch) -> Result<usize> {
        let n = batch.validate()?;
        let shape = batch.sample_shape();
        match &self.sample_shape {
            Some(expected) if *expected != shape => return Err(GuardError::InputShape { expected: expected.clone(), got: shape }),
            Some(_) => {}
            None => self.sample_shape = Some(shape),
        }
        Ok(n)
    }

    /// The estimate stage on `batch`, told whether a background thread failed.
    fn run_estimate(&mut self, batch: &Batch, loss_fn: &dyn LossFn, step: u64) -> Result<Estimate> {
        let worker_error = self.worker_error();
        self.estimates.run(&self.layers, &self.decide.protection, Look { batch, loss_fn, step }, worker_error)
    }

    /// The seed of each layer's defences at `step` (the apply stage's, keyed by its secret).
    fn seeds(&self, step: u64) -> Vec<u64> {
        self.apply.seeds(self.policy().settings(), self.layers.len(), step)
    }

    /// Records the decision (audit log, report, manifest), then applies it in place (`.grad()`
    /// gets the protected layers, or zeros when nothing may be applied) and returns the typed
    /// release.
    fn conclude(&mut self, step: u64, samples: usize, estimated: bool, stats: Vec<Metric<GradientStats>>, decision: Decision, form: Form) -> Result<Release> {
        let report = self.finish(step, samples, estimated, stats, &decision)?;
        let in_place = matches!(form, Form::InPlace(_));
        match decision.outcome {
            ReleaseOutcome::Released => {
                let update = match form {
                    Form::InPlace(Some(written)) => {
                        apply::write_grads(&self.layers, &written, self.policy().settings().withheld_layers_train_locally)?;
                        self.hold.drop_held();
                        Vec::new()
                    }
                    Form::InPlace(None) => {
                        apply::clear_grads(&self.layers)?;
                        Vec::new()
                    }
                    Form::Explicit(update) => update,
                };
                Ok(Release::Released { update, report })
            }
            ReleaseOutcome::Held { .. } => {
                if in_place {
                    apply::clear_grads(&self.layers)?;
                }
                Ok(Release::Held { report })
            }
            ReleaseOutcome::Blocked { reason } => {
                self.hold.drop_held();
                if in_place {
                    apply::clear_grads(&self.layers)?;
                }
                let reason = decision.block.unwrap_or(BlockReason::GuardFailure { what: reason });
                Ok(Release::Blocked { reason, report })
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
