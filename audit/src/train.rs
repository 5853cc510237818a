//! Guarded training of a TorchScript model on checked data: the loop behind `gradguard train`.
//!
//! The model comes from [`crate::ModelSource::TorchScript`] and its data from
//! [`AuditData::load`], checked as `gradguard audit` checks them. [`train`] runs seeded
//! mini-batches in training mode through an SGD or Adam optimizer, wrapped by
//! [`GuardedOptimizer::builder_for_torchscript`] unless the run is the unguarded baseline, and
//! writes the trained module (`model.pt`, for `torch.jit.load`), the [`TrainReport`]
//! (`report.json`) and, guarded, the audit log (`audit.jsonl`).
//!
//! It lives in this crate, not in the hooks, because it trains on what this crate loads and
//! checks (the model source and the .npy data); the hooks only wrap the optimizer.
//!
//! ```no_run
//! use gradguard_audit::{train, AuditData, DataSpec, ModelSource, TrainOptions};
//! use tch::Device;
//!
//! let mut model = ModelSource::TorchScript("net.pt".into()).load(0, Device::Cpu)?;
//! let spec = DataSpec { inputs: Some("x.npy".into()), labels: Some("y.npy".into()), ..Default::default() };
//! let data = AuditData::load(&spec, &model, Device::Cpu)?;
//! let outcome = train(&mut model, &data, &TrainOptions::default(), "out".as_ref(), |_| {})?;
//! print!("{}", outcome.summary);
//! # Ok::<(), gradguard_audit::AuditError>(())
//! ```
use crate::error::{create_dir, AuditError, Result};
use crate::inputs::AuditData;
use crate::source::{seeded_batch, AuditModel, LossKind};
use gradguard_exporter::MetricsServer;
use gradguard_guard::{Batch, GuardError, LossFn, Policy, Release, Report};
use gradguard_hooks::{GuardSummary, GuardedOptimizer, PolicyReloader, ReleaseCounts, ReloadOutcome, RunSummary, StopSignal};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, nn::OptimizerConfig, Kind, Tensor};

/// Samples per forward pass when evaluating on the whole training data.
const EVAL_CHUNK: usize = 512;

/// The optimizer of a training run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// Plain SGD (no momentum, no weight decay).
    Sgd,
    /// Adam with tch's defaults (betas 0.9, 0.999).
    #[default]
    Adam,
}

impl OptimizerKind {
    /// The learning rate used when none is given: 0.05 for SGD, 1e-3 for Adam.
    pub fn default_learning_rate(self) -> f64 {
        match self {
            Self::Sgd => 0.05,
            Self::Adam => 1e-3,
        }
    }

    fn build(self, vs: &nn::VarStore, lr: f64) -> Result<nn::Optimizer> {
        Ok(match self {
            Self::Sgd => nn::Sgd::default().build(vs, lr)?,
            Self::Adam => nn::Adam::default().build(vs, lr)?,
        })
    }
}

/// The guard of a guarded run.
#[derive(Clone, Debug, Default)]
pub struct GuardOptions {
    /// The policy to enforce; None: measure and release what is finite (observe only).
    pub policy: Option<Policy>,
    /// Serve the guard's metrics here (`/metrics`, `/healthz`, `/report`) while training.
    pub metrics_addr: Option<SocketAddr>,
    /// Reload the policy between steps when asked (SIGHUP in `gradguard train`).
    pub reload: Option<PolicyReloader>,
    /// Rotate the audit log at this size (None: the default, 64 MiB).
    pub audit_max_file_bytes: Option<u64>,
    /// Steps between the audit log's checkpoints (None: the default, 100).
    pub checkpoint_every: Option<u64>,
    /// End the run early, between steps, when a stop is requested (SIGINT/SIGTERM in
    /// `gradguard train`); the report then gives the steps run.
    pub stop: Option<StopSignal>,
}

/// How to train (the flags of `gradguard train`).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Optimizer steps.
    pub steps: usize,
    /// Samples per step (capped at the data's n).
    pub batch_size: usize,
    /// The optimizer.
    pub optimizer: OptimizerKind,
    /// Its learning rate.
    pub learning_rate: f64,
    /// Seed of the mini-batch order: the same seed draws the same batches.
    pub seed: u64,
    /// The device, as recorded in the report (the model and data must already be on it).
    pub device: String,
    /// The guard; None: the unguarded baseline (every step applied, no audit log).
    pub guard: Option<GuardOptions>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { steps: 300, batch_size: 64, optimizer: OptimizerKind::Adam, learning_rate: 1e-3, seed: 0, device: "cpu".into(), guard: Some(GuardOptions::default()) }
    }
}

impl TrainOptions {
    /// Rejects options that cannot train (the messages name the flags).
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(AuditError::Usage("--steps must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(AuditError::Usage("--batch-size must be at least 1".into()));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(AuditError::Usage(format!("--lr must be a positive number, not {}", self.learning_rate)));
        }
        Ok(())
    }

    /// Rejects a model these options cannot train: not TorchScript, or a policy whose layer
    /// patterns do not fit its layers (checked again when the guard is built).
    pub fn check_model(&self, model: &AuditModel) -> Result<()> {
        if model.torchscript().is_none() {
            return Err(AuditError::Usage(format!("{}: training needs a TorchScript model (gradguard demo trains the built-in CNN)", model.label())));
        }
        if let Some(policy) = self.guard.as_ref().and_then(|g| g.policy.as_ref()) {
            policy.coverage(&model.layer_names()?).map_err(GuardError::from)?;
        }
        Ok(())
    }
}

/// One training step, as the progress callback of [`train`] sees it.
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
}

/// The model's mean loss and (cross-entropy) accuracy on the whole training data.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Evaluation {
    /// Mean loss.
    pub loss: f64,
    /// Share of samples whose largest output is the label (cross-entropy only).
    pub accuracy: Option<f64>,
}

/// The policy a guarded run enforced.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyInfo {
    /// Where it came from (the file, or the built-in permissive policy).
    pub origin: String,
    /// The SHA-256 of its text, as the audit log records it.
    pub hash: String,
}

/// What a training run did, as `report.json` holds it.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    /// How the model is named, e.g. `TorchScript net.pt`.
    pub model: String,
    /// The data, e.g. `x.npy (256 of 256 samples)`.
    pub data: String,
    /// Training samples.
    pub samples: usize,
    /// The training loss.
    pub loss: LossKind,
    /// The optimizer.
    pub optimizer: OptimizerKind,
    /// Its learning rate.
    pub learning_rate: f64,
    /// Steps run.
    pub steps: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Seed of the mini-batch order.
    pub seed: u64,
    /// The device.
    pub device: String,
    /// Whether the guard ran.
    pub guarded: bool,
    /// The policy the guard enforced (guarded runs).
    pub policy: Option<PolicyInfo>,
    /// On the training data before training (eval mode).
    pub before: Evaluation,
    /// On the training data after training (eval mode).
    pub after: Evaluation,
    /// Wall time of the training loop.
    pub seconds: f64,
    /// Releases by kind (guarded runs).
    pub releases: Option<ReleaseCounts>,
    /// The guard's report of the last step (guarded runs).
    pub last_report: Option<Report>,
}

impl TrainReport {
    /// How the trained model scores, for the summary.
    pub fn score(&self) -> String {
        let (b, a) = (&self.before, &self.after);
        match (b.accuracy, a.accuracy) {
            (Some(before), Some(after)) => format!("training accuracy {after:.3} (untrained {before:.3}), loss {:.4} (untrained {:.4})", a.loss, b.loss),
            _ => format!("training loss {:.4} (untrained {:.4})", a.loss, b.loss),
        }
    }
}

/// What [`train`] wrote and what it prints.
pub struct TrainOutcome {
    /// The report (also in `report.json`).
    pub report: TrainReport,
    /// The end-of-run summary, for printing.
    pub summary: RunSummary,
    /// The trained module, `model.pt` in the output folder.
    pub model_path: PathBuf,
}

/// Trains the TorchScript `model` on `data` for `options.steps` steps and writes into `out`
/// (created if needed): `model.pt` (the trained module in eval mode, for `torch.jit.load`),
/// `report.json` ([`TrainReport`]) and, guarded, `audit.jsonl` (an earlier run's log there is
/// kept: this run appends to its chain). Training runs in training mode; the model is left
/// in eval mode. `progress` sees every step.
pub fn train(model: &mut AuditModel, data: &AuditData, options: &TrainOptions, out: &Path, progress: impl FnMut(&StepProgress<'_>)) -> Result<TrainOutcome> {
    options.validate()?;
    options.check_model(model)?;
    create_dir(out)?;
    // An earlier run's log is kept: this run continues its chain.
    let audit_log = out.join("audit.jsonl");
    let before = evaluate(model, data)?;
    model.set_training(true)?;
    let run = run_steps(model, data, options, &audit_log, progress);
    model.set_training(false)?;
    let run = run?;
    let after = evaluate(model, data)?;
    let model_path = out.join("model.pt");
    model.save(&model_path)?;
    let report = TrainReport {
        model: model.label(),
        data: data.source.clone(),
        samples: data.n,
        loss: data.loss,
        optimizer: options.optimizer,
        learning_rate: options.learning_rate,
        steps: run.steps,
        batch_size: options.batch_size.min(data.n),
        seed: options.seed,
        device: options.device.clone(),
        guarded: options.guard.is_some(),
        policy: run.policy,
        before,
        after,
        seconds: run.seconds,
        releases: options.guard.is_some().then_some(run.counts),
        last_report: run.last,
    };
    let report_path = out.join("report.json");
    crate::error::write_file(&report_path, &serde_json::to_string_pretty(&report)?, "writing the training report")?;
    let guard = match report.guarded {
        true => Some(GuardSummary::read(run.counts, report.last_report.as_ref(), &audit_log)?),
        false => None,
    };
    let summary = RunSummary { steps: run.steps, seconds: report.seconds, score: report.score(), guard, report: report_path };
    Ok(TrainOutcome { report, summary, model_path })
}

/// What the loop leaves for the report.
struct Steps {
    /// Steps run (fewer than asked when a stop was requested).
    steps: usize,
    seconds: f64,
    counts: ReleaseCounts,
    last: Option<Report>,
    policy: Option<PolicyInfo>,
}

/// The optimizer, wrapped by the guard or not.
enum Stepper<'a> {
    Plain(nn::Optimizer),
    Guarded {
        opt: Box<GuardedOptimizer<'a>>,
        /// Serves the guard's metrics while the run lasts (held for its lifetime).
        _metrics: Option<MetricsServer>,
    },
}

fn run_steps(model: &AuditModel, data: &AuditData, options: &TrainOptions, audit_log: &Path, mut progress: impl FnMut(&StepProgress<'_>)) -> Result<Steps> {
    let optimizer = options.optimizer.build(model.var_store(), options.learning_rate)?;
    let loss_fn = model.loss_fn(data.loss);
    let mut stepper = match (&options.guard, model.torchscript()) {
        (Some(guard), Some(script)) => {
            let mut builder = GuardedOptimizer::builder_for_torchscript(script, optimizer).loss(loss_fn).audit_log(audit_log);
            if let Some(policy) = &guard.policy {
                builder = builder.policy(policy.clone());
            }
            if let Some(bytes) = guard.audit_max_file_bytes {
                builder = builder.audit_rotation(bytes);
            }
            if let Some(steps) = guard.checkpoint_every {
                builder = builder.audit_checkpoint_every(steps);
            }
            let mut opt = builder.build()?;
            // Prometheus: a report sink of the guard's, served while the run lasts.
            let metrics = guard.metrics_addr.map(|addr| gradguard_exporter::attach(opt.guard_mut(), addr)).transpose()?;
            Stepper::Guarded { opt: Box::new(opt), _metrics: metrics }
        }
        _ => Stepper::Plain(optimizer),
    };
    let policy = match &stepper {
        Stepper::Guarded { opt, .. } => Some(PolicyInfo { origin: opt.guard().policy().origin().to_string(), hash: opt.guard().policy().hash().to_string() }),
        Stepper::Plain(_) => None,
    };
    let device = data.x.device();
    let indices: Vec<usize> = (0..data.n).collect();
    let attribute = data.attribute.as_deref().map(|a| Tensor::f_from_slice(a)?.f_to_device(device)).transpose()?;
    let (mut counts, mut last) = (ReleaseCounts::default(), None);
    let started = Instant::now();
    let stop = options.guard.as_ref().and_then(|g| g.stop);
    let mut steps = 0;
    for step in 0..options.steps {
        if stop.is_some_and(|s| s.requested()) {
            break;
        }
        steps = step + 1;
        let idx = Tensor::f_from_slice(&seeded_batch(&indices, options.batch_size, options.seed, step))?.f_to_device(device)?;
        let x = data.x.f_index_select(0, &idx)?;
        let y = data.y.f_index_select(0, &idx)?;
        let reload = match (&mut stepper, options.guard.as_ref().and_then(|g| g.reload.as_ref())) {
            (Stepper::Guarded { opt, .. }, Some(reloader)) => reloader.poll(opt.guard_mut()),
            _ => None,
        };
        let (release, loss_value) = match &mut stepper {
            Stepper::Plain(opt) => {
                // What GuardedOptimizer::train_step does, without the guard.
                opt.zero_grad();
                let loss = loss_fn.loss(&x, &y)?;
                loss.f_backward()?;
                opt.step();
                (None, loss.f_double_value(&[])?)
            }
            Stepper::Guarded { opt, .. } => {
                let a = attribute.as_ref().map(|a| a.f_index_select(0, &idx)).transpose()?;
                // The sample ids let the run ledger (M5) count each sample's releases exactly.
                let batch = match &a {
                    Some(a) => Batch::new(&x, &y).with_attribute(a),
                    None => Batch::new(&x, &y),
                }
                .with_sample_ids(&idx);
                // The loss runs once: on an estimate step its graph serves the estimate too.
                let release = opt.train_step(&batch)?;
                counts.count(&release);
                let loss = release.report().loss.unwrap_or(f64::NAN);
                (Some(release), loss)
            }
        };
        progress(&StepProgress { step, loss: loss_value, counts, release: release.as_ref(), reload: reload.as_ref() });
        if let Some(release) = release {
            last = Some(release.into_report());
        }
    }
    if let Stepper::Guarded { opt, .. } = &mut stepper {
        // The last checkpoint and the `closed` record, before the summary reads the log.
        opt.guard_mut().close_audit_log()?;
    }
    Ok(Steps { seconds: started.elapsed().as_secs_f64(), counts, last, policy, steps })
}

/// Mean loss and (cross-entropy) accuracy on all of `data`, without gradients.
fn evaluate(model: &AuditModel, data: &AuditData) -> Result<Evaluation> {
    tch::no_grad(|| {
        let (mut loss_sum, mut correct) = (0.0, 0.0);
        for start in (0..data.n).step_by(EVAL_CHUNK) {
            let len = EVAL_CHUNK.min(data.n - start) as i64;
            let x = data.x.f_narrow(0, start as i64, len)?;
            let y = data.y.f_narrow(0, start as i64, len)?;
            let out = model.forward(&x)?;
            loss_sum += data.loss.of_output(&out, &y)?.f_double_value(&[])? * len as f64;
            if data.loss == LossKind::CrossEntropy {
                correct += out.f_argmax(-1, false)?.f_eq_tensor(&y)?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
        }
        let n = data.n as f64;
        Ok(Evaluation { loss: loss_sum / n, accuracy: (data.loss == LossKind::CrossEntropy).then_some(correct / n) })
    })
}
