//! The run loop around the guarded step, written once for every front end that drives a run:
//! stop signals, the policy reload, counting releases, closing the audit log, and what the
//! summary needs.
use crate::error::Result;
use crate::reload::{PolicyReloader, ReloadOutcome};
use crate::stop::StopSignal;
use crate::summary::{GuardSummary, ReleaseCounts, RunSummary};
use gradguard_guard::measure::OwnedBatch;
use gradguard_guard::{Batch, Guard, LossFn, Release, Report};
use gradguard_tch::GuardedOptimizer;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn;

/// What trains: the guarded optimizer, or the same loop without a guard (the baseline a
/// guarded run is compared with).
pub enum Stepper<'a> {
    /// Every step through [`GuardedOptimizer::train_step`].
    Guarded(Box<GuardedOptimizer<'a>>),
    /// zero_grad, the loss forward and backward, step: what the guarded step does without the
    /// guard.
    Unguarded {
        /// The optimizer.
        optimizer: nn::Optimizer,
        /// The batch's mean loss.
        loss: Box<dyn LossFn + 'a>,
    },
}

impl Stepper<'_> {
    /// The guarded optimizer, if the run is guarded.
    pub fn guarded(&self) -> Option<&GuardedOptimizer<'_>> {
        match self {
            Self::Guarded(opt) => Some(opt),
            Self::Unguarded { .. } => None,
        }
    }

    /// One step: the release (guarded runs) and the batch's mean loss.
    fn step(&mut self, batch: &Batch) -> Result<(Option<Release>, f64)> {
        match self {
            Self::Guarded(opt) => {
                // The stored loss runs once: on an estimate step its graph serves the estimate too.
                let release = opt.train_step(batch)?;
                let loss = release.report().loss.unwrap_or(f64::NAN);
                Ok((Some(release), loss))
            }
            Self::Unguarded { optimizer, loss } => {
                optimizer.zero_grad();
                let value = loss.loss(batch.inputs(), batch.targets())?;
                value.f_backward()?;
                optimizer.step();
                Ok((None, value.f_double_value(&[])?))
            }
        }
    }
}

/// One step, as the loop's callback sees it.
pub struct StepProgress<'r> {
    /// The step (from 0).
    pub step: usize,
    /// The batch's mean training loss.
    pub loss: f64,
    /// Releases so far (guarded runs; zero otherwise).
    pub counts: ReleaseCounts,
    /// The guard's release of this step (None unguarded).
    pub release: Option<&'r Release>,
    /// A policy reload done before this step, if one was asked for.
    pub reload: Option<&'r ReloadOutcome>,
    /// The guard after the step (guarded runs): its policy and protection in force.
    pub guard: Option<&'r Guard>,
}

/// The loop's options: what may end or change a run between steps.
#[derive(Default)]
pub struct RunLoop {
    /// Ends the run between steps when a stop is requested (SIGINT, SIGTERM).
    pub stop: Option<StopSignal>,
    /// Reloads the policy between steps when asked (SIGHUP).
    pub reload: Option<PolicyReloader>,
}

/// What a run did, for its report and summary.
#[derive(Debug)]
pub struct RunOutcome {
    /// Steps run.
    pub steps: usize,
    /// The step a stop request ended the run before, if one did.
    pub stopped_at: Option<usize>,
    /// Wall time of the loop.
    pub seconds: f64,
    /// Releases by kind (guarded runs).
    pub counts: ReleaseCounts,
    /// The guard's report of the last step (guarded runs).
    pub last: Option<Report>,
}

impl RunLoop {
    /// Runs `steps` steps of `stepper` on the data `data(step)` gives, calling `on_step` after
    /// each. Between steps: a stop request ends the run, a reload request reloads the policy.
    /// At the end (a stop included) the guard's audit log gets its last checkpoint and its
    /// `closed` record. A step's error ends the run with it.
    pub fn run(
        &self,
        stepper: &mut Stepper<'_>,
        steps: usize,
        mut data: impl FnMut(usize) -> Result<OwnedBatch>,
        mut on_step: impl FnMut(&StepProgress<'_>),
    ) -> Result<RunOutcome> {
        let started = Instant::now();
        let mut outcome = RunOutcome { steps: 0, stopped_at: None, seconds: 0.0, counts: ReleaseCounts::default(), last: None };
        for step in 0..steps {
            if self.stop.as_ref().is_some_and(StopSignal::requested) {
                outcome.stopped_at = Some(step);
                break;
            }
            let reload = match (&mut *stepper, &self.reload) {
                (Stepper::Guarded(opt), Some(reloader)) => reloader.poll(opt.guard_mut()),
                _ => None,
            };
            let step_data = data(step)?;
            let (release, loss) = stepper.step(&step_data.batch())?;
            outcome.steps = step + 1;
            if let Some(release) = &release {
                outcome.counts.count(release);
            }
            let guard = stepper.guarded().map(GuardedOptimizer::guard);
            on_step(&StepProgress { step, loss, counts: outcome.counts, release: release.as_ref(), reload: reload.as_ref(), guard });
            if let Some(release) = release {
                outcome.last = Some(release.into_report());
            }
        }
        if let Stepper::Guarded(opt) = stepper {
            // The last checkpoint and the `closed` record, before the summary reads the log.
            opt.guard_mut().close_audit_log()?;
        }
        outcome.seconds = started.elapsed().as_secs_f64();
        Ok(outcome)
    }
}

impl RunOutcome {
    /// The end-of-run summary: `score` says how the model does, `report` is where the run's
    /// report is; a guarded run's decisions are read back from its closed `audit_log`.
    pub fn summary(&self, score: String, report: PathBuf, audit_log: Option<&Path>) -> Result<RunSummary> {
        let guard = audit_log.map(|log| GuardSummary::read(self.counts, self.last.as_ref(), log)).transpose()?;
        Ok(RunSummary { steps: self.steps, seconds: self.seconds, score, guard, report })
    }
}
