//! Guarded training of a TorchScript model on checked data: the loop behind `gradguard train`.
//!
//! The model comes from [`gradguard_models::ModelSource::TorchScript`] and its data from
//! [`AuditData::load`], checked as `gradguard audit` checks them. [`train`] runs seeded
//! mini-batches in training mode through an SGD or Adam optimizer, wrapped by
//! [`GuardedOptimizer::builder_for_torchscript`] unless the run is the unguarded baseline, and
//! writes the trained module (`model.pt`, for `torch.jit.load`), the [`TrainReport`]
//! (`report.json`) and, guarded, the audit log (`audit.jsonl`). Its steps go through the
//! [`RunLoop`], as the demo's do.
//!
//! ```no_run
//! use gradguard_models::{AuditData, DataSpec, ModelSource};
//! use gradguard_run::{train, TrainOptions};
//! use tch::Device;
//!
//! let mut model = ModelSource::TorchScript("net.pt".into()).load(0, Device::Cpu)?;
//! let spec = DataSpec { inputs: Some("x.npy".into()), labels: Some("y.npy".into()), ..Default::default() };
//! let data = AuditData::load(&spec, &model, Device::Cpu)?;
//! let outcome = train(&mut model, &data, &TrainOptions::default(), "out".as_ref(), |_| {})?;
//! print!("{}", outcome.summary);
//! # Ok::<(), gradguard_run::RunError>(())
//! ```
use crate::error::{Result, RunError};
use crate::reload::PolicyReloader;
use crate::run_loop::{RunLoop, RunOutcome, StepProgress, Stepper};
use gradguard_guard::measure::OwnedBatch;
use crate::stop::StopSignal;
use crate::summary::{ReleaseCounts, RunSummary};
use gradguard_exporter::MetricsServer;
use gradguard_guard::{GuardError, Policy, Report};
use gradguard_models::files::{create_dir, write_file};
use gradguard_models::{seeded_batch, AuditData, AuditModel, LossKind};
use gradguard_tch::GuardedOptimizer;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
            return Err(RunError::Usage("--steps must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(RunError::Usage("--batch-size must be at least 1".into()));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(RunError::Usage(format!("--lr must be a positive number, not {}", self.learning_rate)));
        }
        Ok(())
    }

    /// Rejects a model these options cannot train: not TorchScript, or a policy whose layer
    /// patterns do not fit its layers (checked again when the guard is built).
    pub fn check_model(&self, model: &AuditModel) -> Result<()> {
        if model.torchscript().is_none() {
            return Err(RunError::Usage(format!("{}: training needs a TorchScript model (gradguard demo trains the built-in CNN)", model.label())));
        }
        if let Some(policy) = self.guard.as_ref().and_then(|g| g.policy.as_ref()) {
            policy.coverage(&model.layer_names()?).map_err(GuardError::from)?;
        }
        Ok(())
    }
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
    let (run, policy) = run?;
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
        policy,
        before,
        after,
        seconds: run.seconds,
        releases: options.guard.is_some().then_some(run.counts),
        last_report: run.last.clone(),
    };
    let report_path = out.join("report.json");
    write_file(&report_path, &serde_json::to_string_pretty(&report)?, "writing the training report")?;
    let summary = run.summary(report.score(), report_path, report.guarded.then_some(audit_log.as_path()))?;
    Ok(TrainOutcome { report, summary, model_path })
}

/// The stepper of a run (guarded or the baseline), with its policy and the metrics it serves.
fn stepper<'a>(model: &'a AuditModel, data: &AuditData, options: &TrainOptions, audit_log: &Path) -> Result<(Stepper<'a>, Option<MetricsServer>)> {
    let optimizer = options.optimizer.build(model.var_store(), options.learning_rate)?;
    let loss = model.loss_fn(data.loss);
    let (Some(guard), Some(script)) = (&options.guard, model.torchscript()) else {
        return Ok((Stepper::Unguarded { optimizer, loss: Box::new(loss) }, None));
    };
    let mut builder = GuardedOptimizer::builder_for_torchscript(script, optimizer).loss(loss).audit_log(audit_log);
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
    Ok((Stepper::Guarded(Box::new(opt)), metrics))
}

/// The run: seeded mini-batches through the run loop. Returns the loop's outcome and the
/// policy a guarded run enforced.
fn run_steps(model: &AuditModel, data: &AuditData, options: &TrainOptions, audit_log: &Path, progress: impl FnMut(&StepProgress<'_>)) -> Result<(RunOutcome, Option<PolicyInfo>)> {
    let (mut stepper, _metrics) = stepper(model, data, options, audit_log)?;
    let policy = stepper.guarded().map(|opt| PolicyInfo { origin: opt.guard().policy().origin().to_string(), hash: opt.guard().policy().hash().to_string() });
    let device = data.x.device();
    let indices: Vec<usize> = (0..data.n).collect();
    let attribute = data.attribute.as_deref().map(|a| Tensor::f_from_slice(a)?.f_to_device(device)).transpose()?;
    let batches = |step: usize| -> Result<OwnedBatch> {
        let idx = Tensor::f_from_slice(&seeded_batch(&indices, options.batch_size, options.seed, step))?.f_to_device(device)?;
        Ok(OwnedBatch {
            inputs: data.x.f_index_select(0, &idx)?,
            targets: data.y.f_index_select(0, &idx)?,
            attribute: attribute.as_ref().map(|a| a.f_index_select(0, &idx)).transpose()?,
            // The sample ids let the run ledger (M5) count each sample's releases exactly.
            sample_ids: Some(idx),
        })
    };
    // A model this run did not train (anyone's file) is vetted on the first batch first.
    if let Stepper::Guarded(opt) = &mut stepper {
        let first = batches(0)?;
        let vetting = opt.vet_parameters(&first.batch())?;
        if let Some(why) = vetting.refusal() {
            opt.guard_mut().close_audit_log()?;
            return Err(RunError::Refused(why));
        }
    }
    let run_loop = RunLoop { stop: options.guard.as_ref().and_then(|g| g.stop), reload: options.guard.as_ref().and_then(|g| g.reload.clone()) };
    let outcome = run_loop.run(&mut stepper, options.steps, batches, progress)?;
    Ok((outcome, policy))
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
