//! gradguard for tch: one way to wrap a training loop.
//!
//! [`GuardedOptimizer::builder`] takes the model's `VarStore` and its optimizer; the policy,
//! the loss function (stored once) and the audit log are options; Prometheus is a report sink the
//! caller adds (`gradguard_exporter::attach(opt.guard_mut(), addr)`), so that this crate needs no
//! server.
//! The loop then calls [`GuardedOptimizer::train_step`] on each batch (the stored loss runs
//! once per step, its graph serving the estimate on a step that estimates), or
//! [`GuardedOptimizer::backward_step`] where it called the optimizer's, after its own forward
//! (the slower path):
//!
//! ```
//! use gradguard_guard::{Batch, Policy, Release};
//! use gradguard_tch::GuardedOptimizer;
//! use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = nn::linear(vs.root() / "fc", 64, 10, Default::default());
//! let loss = |x: &Tensor, y: &Tensor| net.forward(x).f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0);
//! let policy = Policy::from_toml_str(r#"
//!     version = 2
//!     [settings]
//!     estimate_every = 5
//!     aggregation_floor = 64
//!     [[rule]]
//!     name = "bound"
//!     metric = "reconstruction_bound_bits"
//!     layers = ["fc"]
//!     act_above = 0.1
//!     relax_below = 0.05
//!     ladder = [{ action = "noise", clip_norm = 1.0, target = "threshold" }]
//! "#, "inline")?;
//! let log = std::env::temp_dir().join(format!("gradguard-doc-{}.jsonl", std::process::id()));
//! let mut opt = GuardedOptimizer::builder(&vs, nn::Adam::default().build(&vs, 1e-3)?)
//!     .policy(policy)
//!     .loss(&loss)
//!     .audit_log(&log)
//!     .build()?;
//! let mut stepped = 0;
//! for step in 0..20 {
//!     let (x, y) = (Tensor::randn([32, 64], (Kind::Float, Device::Cpu)), Tensor::zeros([32], (Kind::Int64, Device::Cpu)));
//!     match opt.train_step(&Batch::new(&x, &y))? {
//!         Release::Released { report, .. } if report.estimated => println!("{}", opt.guard().table(&report)),
//!         Release::Released { .. } => stepped += 1,
//!         Release::Held { .. } => {}                        // 32 of the floor's 64 samples: no step yet
//!         Release::Blocked { reason, .. } => println!("step {step}: blocked: {reason}"),
//!     }
//! }
//! assert!(stepped > 0);
//! # std::fs::remove_file(&log).ok();
//! # Ok(()) }
//! ```
//!
//! TorchScript models saved from PyTorch (`torch.jit.save`) load with [`TorchScriptModel`],
//! train in its VarStore and wrap the same way, through
//! [`GuardedOptimizer::builder_for_torchscript`]; the trained module saves back for
//! `torch.jit.load`:
//!
//! ```no_run
//! use gradguard_guard::Batch;
//! use gradguard_tch::{GuardedOptimizer, TorchScriptModel};
//! use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut model = TorchScriptModel::load("net.pt", Device::Cpu)?;
//! model.set_train()?; // dropout and batch norm as in training
//! let loss = |x: &Tensor, y: &Tensor| model.f_forward(x)?.f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0);
//! let mut opt = GuardedOptimizer::builder_for_torchscript(&model, nn::Adam::default().build(model.var_store(), 1e-3)?)
//!     .loss(&loss)
//!     .build()?;
//! let (x, y) = (Tensor::randn([32, 1, 8, 8], (Kind::Float, Device::Cpu)), Tensor::zeros([32], (Kind::Int64, Device::Cpu)));
//! opt.train_step(&Batch::new(&x, &y))?;
//! drop(opt);
//! model.set_eval()?;
//! model.save("trained.pt")?; // torch.jit.load("trained.pt") in PyTorch
//! # Ok(()) }
//! ```
//!
//! A model on token ids (or other discrete inputs) declares where its first continuous
//! representation is, and M1 is measured on the embeddings; the plain loss stays what the
//! training step, M2 and M3 use:
//!
//! ```no_run
//! use gradguard_guard::Batch;
//! use gradguard_tch::GuardedOptimizer;
//! use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Reduction, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vs = nn::VarStore::new(Device::Cpu);
//! let emb = nn::embedding(vs.root() / "emb", 1000, 32, Default::default());
//! let fc = nn::linear(vs.root() / "fc", 32, 2, Default::default());
//! let from_embeddings = |e: &Tensor, y: &Tensor| fc.forward(&e.f_mean_dim(1, false, Kind::Float)?).f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0);
//! let loss = |tokens: &Tensor, y: &Tensor| from_embeddings(&emb.forward(tokens), y);
//! let mut opt = GuardedOptimizer::builder(&vs, nn::Adam::default().build(&vs, 1e-3)?)
//!     .loss(&loss)
//!     .embedding(|tokens: &Tensor| Ok(emb.forward(tokens)), &from_embeddings)
//!     .build()?;
//! let (tokens, y) = (Tensor::randint(1000, [16, 12], (Kind::Int64, Device::Cpu)), Tensor::zeros([16], (Kind::Int64, Device::Cpu)));
//! let release = opt.backward_step(&loss(&tokens, &y)?, &Batch::new(&tokens, &y))?; // M1 on the embeddings
//! # Ok(()) }
//! ```
#![deny(missing_docs, unreachable_pub)]

mod script_module;
mod torchscript;

pub use torchscript::{first_line, var_store_names, TorchScriptError, TorchScriptModel};

use gradguard_guard::{AuditLog, Batch, EmbeddingSplit, Guard, GuardError, LayerMap, LossFn, Policy, Release, Settings, SplitLoss, decide::{LogOptions, ReportSink}, report::Vetting};
use std::path::PathBuf;
use tch::{nn, TchError, Tensor};

/// An `nn::Optimizer` whose `backward_step` runs the guard between backward and step.
pub struct GuardedOptimizer<'a> {
    optimizer: nn::Optimizer,
    guard: Guard,
    loss: Box<dyn LossFn + 'a>,
}

/// Options of a [`GuardedOptimizer`]; [`GuardBuilder::build`] checks them all.
pub struct GuardBuilder<'a> {
    layers: Result<LayerMap, BuildError>,
    optimizer: nn::Optimizer,
    policy: Option<Policy>,
    settings: Option<Settings>,
    loss: Option<Box<dyn LossFn + 'a>>,
    embedding: Option<Box<dyn EmbeddingSplit + 'a>>,
    audit_log: Option<PathBuf>,
    audit_options: LogOptions,
    checkpoint_every: u64,
    sinks: Vec<ReportSink>,
}

/// Why a guarded optimizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The guard rejected the model, the policy or the settings.
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// The TorchScript model's parameters do not form a layer map.
    #[error(transparent)]
    TorchScript(#[from] TorchScriptError),
    /// An option is missing or contradicts another.
    #[error("guarded optimizer: {0}")]
    Options(&'static str),
}

impl<'a> GuardBuilder<'a> {
    /// The policy to enforce (its settings included). Without one the guard measures and
    /// releases what is finite ([`Policy::permissive`]).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Settings for a guard without a policy file (a policy carries its own).
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// The loss the guard differentiates: it recomputes the batch's mean loss from inputs and
    /// targets the way the training step does. Required.
    pub fn loss(mut self, loss: impl LossFn + 'a) -> Self {
        self.loss = Some(Box::new(loss));
        self
    }

    /// For discrete inputs (token ids, categorical codes): the model's split at its first
    /// continuous representation, `embed(tokens)` and the loss from the embeddings, with
    /// `loss_from_embedded(embed(tokens), y)` equal to the loss. M1 is then measured on the
    /// embeddings (METRICS.md, M1, discrete inputs); without a split, M1 of integer inputs is
    /// absent and training goes on.
    pub fn embedding(
        mut self,
        embed: impl Fn(&Tensor) -> Result<Tensor, TchError> + 'a,
        loss_from_embedded: impl Fn(&Tensor, &Tensor) -> Result<Tensor, TchError> + 'a,
    ) -> Self {
        self.embedding = Some(Box::new((embed, loss_from_embedded)));
        self
    }

    /// Logs every change of state to this hash-chained JSON-lines file, before the release
    /// it decides, with the unchanged releases counted in checkpoints. An existing log is
    /// never truncated: the run continues its chain.
    pub fn audit_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.audit_log = Some(path.into());
        self
    }

    /// Rotates the audit log when a file reaches `max_file_bytes` (default 64 MiB).
    pub fn audit_rotation(mut self, max_file_bytes: u64) -> Self {
        self.audit_options.max_file_bytes = max_file_bytes;
        self
    }

    /// Steps between the audit log's checkpoints (default 100).
    pub fn audit_checkpoint_every(mut self, steps: u64) -> Self {
        self.checkpoint_every = steps;
        self
    }

    /// Hands every report to `sink` as well (on the guard's fan-out worker).
    pub fn report_sink(mut self, sink: ReportSink) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Builds the guard and wraps the optimizer.
    pub fn build(self) -> Result<GuardedOptimizer<'a>, BuildError> {
        let loss = self.loss.ok_or(BuildError::Options("no loss function given (.loss(...)): the guard needs it to measure"))?;
        let loss: Box<dyn LossFn + 'a> = match self.embedding {
            None => loss,
            Some(split) => Box::new(SplitLoss::with_split(move |x: &Tensor, y: &Tensor| loss.loss(x, y), split)),
        };
        let policy = match (self.policy, self.settings) {
            (Some(_), Some(_)) => return Err(BuildError::Options("give a policy or settings, not both: a policy carries its settings")),
            (Some(policy), None) => policy,
            (None, Some(settings)) => Policy::permissive_with(settings).map_err(GuardError::from)?,
            (None, None) => Policy::permissive(),
        };
        let mut guard = Guard::new(self.layers?, policy)?;
        if let Some(path) = self.audit_log {
            guard.set_audit_log_every(AuditLog::open_options(path, self.audit_options).map_err(GuardError::from)?, self.checkpoint_every)?;
        }
        for sink in self.sinks {
            guard.add_report_sink(sink);
        }
        Ok(GuardedOptimizer { optimizer: self.optimizer, guard, loss })
    }
}

impl<'a> GuardedOptimizer<'a> {
    /// Starts wrapping `optimizer`, which trains the variables of `vs`.
    pub fn builder(vs: &nn::VarStore, optimizer: nn::Optimizer) -> GuardBuilder<'a> {
        Self::builder_for_layers(LayerMap::from_var_store(vs), optimizer)
    }

    /// Starts wrapping `optimizer` over an explicit layer map (a TorchScript model's
    /// [`TorchScriptModel::layer_map`], say).
    pub fn builder_for_layers(layers: Result<LayerMap, GuardError>, optimizer: nn::Optimizer) -> GuardBuilder<'a> {
        Self::wrapping(layers.map_err(BuildError::from), optimizer)
    }

    /// Starts wrapping `optimizer`, which trains the parameters of a TorchScript model (built
    /// on [`TorchScriptModel::var_store`]); the guard's layers are the model's, with PyTorch's
    /// names (`conv1.weight`, `conv1.bias` form layer `conv1`). Train in the mode the loop
    /// trains in ([`TorchScriptModel::set_train`]): the guard differentiates the loss as given.
    pub fn builder_for_torchscript(model: &TorchScriptModel, optimizer: nn::Optimizer) -> GuardBuilder<'a> {
        Self::wrapping(model.layer_map().map_err(BuildError::from), optimizer)
    }

    fn wrapping(layers: Result<LayerMap, BuildError>, optimizer: nn::Optimizer) -> GuardBuilder<'a> {
        GuardBuilder { layers, optimizer, policy: None, settings: None, loss: None, embedding: None, audit_log: None, audit_options: LogOptions::default(), checkpoint_every: gradguard_guard::decide::DEFAULT_CHECKPOINT_EVERY, sinks: Vec::new() }
    }

    /// The guarded training step, the fast path: zero_grad, then the stored loss forward and
    /// backward once on the batch, the guard, and the optimizer's step when the release is
    /// [`Release::Released`]. On a step that estimates, the one forward and backward serves
    /// the estimate too ([`Guard::train_step`]), so the loss is computed once per step.
    /// Held and blocked releases leave `.grad()` zeroed and the parameters as they were; on an
    /// error the step is not applied and the gradients are cleared.
    pub fn train_step(&mut self, batch: &Batch) -> Result<Release, GuardError> {
        self.optimizer.zero_grad();
        let release = self.guard.train_step(batch, self.loss.as_ref());
        self.stepped(release)
    }

    /// For loops that must run backward themselves (the slower path: on a step that estimates,
    /// the guard runs the loss forward and backward again for M1; [`GuardedOptimizer::train_step`]
    /// runs it once). zero_grad, backward, guard, step. The step is applied only when the release is
    /// [`Release::Released`]: while micro-batches are held for the aggregation floor, and on a
    /// block, `.grad()` is zeroed and the parameters stay. On an error (bad input, a libtorch
    /// error) the step is not applied and the gradients are cleared: nothing unchecked is used.
    pub fn backward_step(&mut self, loss: &Tensor, batch: &Batch) -> Result<Release, GuardError> {
        self.optimizer.zero_grad();
        loss.f_backward().map_err(|source| GuardError::Torch { context: "running backward on the training loss", source })?;
        let release = self.guard.after_backward(batch, self.loss.as_ref());
        self.stepped(release)
    }

    /// Steps the optimizer on a released gradient; clears the gradients after an error.
    fn stepped(&mut self, release: Result<Release, GuardError>) -> Result<Release, GuardError> {
        match release {
            Ok(release) => {
                if release.is_released() {
                    self.optimizer.step();
                }
                Ok(release)
            }
            Err(e) => {
                self.optimizer.zero_grad();
                Err(e)
            }
        }
    }

    /// Vets the model's parameters as they are now on `batch` with the stored loss, before
    /// training on parameters this loop did not train (a downloaded model, a federated round's
    /// global model): M6 against the policy's rules, M4's analytic attacks against
    /// `vetting.max_recovered_fraction`, non-finite values ([`Guard::vet_parameters`]). Nothing
    /// is trained; act on [`Vetting::refusal`].
    pub fn vet_parameters(&mut self, batch: &Batch) -> Result<Vetting, GuardError> {
        self.guard.vet_parameters(batch, self.loss.as_ref())
    }

    /// The guard.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// The guard, to reload its policy or estimate on demand.
    pub fn guard_mut(&mut self) -> &mut Guard {
        &mut self.guard
    }

    /// The wrapped optimizer (to change its learning rate, say).
    pub fn optimizer_mut(&mut self) -> &mut nn::Optimizer {
        &mut self.optimizer
    }

    /// The optimizer and the guard, unwrapped.
    pub fn into_parts(self) -> (nn::Optimizer, Guard) {
        (self.optimizer, self.guard)
    }
}
