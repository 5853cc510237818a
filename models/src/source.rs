//! The audited model: a built-in model (`cnn`, `mlp`) or a TorchScript file, behind one type
//! that gives the layer map, the forward pass and the loss. A TorchScript model on token ids
//! that exports `embed` and `forward_embedded` is audited with M1 on its embeddings.
use crate::error::{ModelError, Result};
use crate::models::{DigitsCnn, Mlp, MLP_WIDTHS};
use gradguard_guard::{EmbeddingSplit, LayerMap, LossFn};
use gradguard_tch::TorchScriptModel;
use std::path::{Path, PathBuf};
use tch::{nn, nn::OptimizerConfig, Device, Kind, TchError, Tensor};


/// Which model to audit, resolved from a name: `cnn`, `mlp` or the path of a TorchScript file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// [`DigitsCnn`]: conv1, conv2, fc1, fc2.
    Cnn,
    /// [`Mlp`] of widths 64-128-64-10: fc0, fc1, fc2.
    Mlp,
    /// A `torch.jit.script` or `torch.jit.trace` module saved with `torch.jit.save`.
    TorchScript(PathBuf),
}

impl ModelSource {
    /// Resolves a name: `cnn` and `mlp` are built in; anything else that exists, or looks like
    /// a path (holds a `.` or a `/`), is a TorchScript file. Otherwise
    /// [`ModelError::UnknownModel`].
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "cnn" => Ok(Self::Cnn),
            "mlp" => Ok(Self::Mlp),
            _ if Path::new(name).exists() || name.contains('.') || name.contains('/') => Ok(Self::TorchScript(PathBuf::from(name))),
            _ => Err(ModelError::UnknownModel { name: name.to_string() }),
        }
    }

    /// Builds (built-in: seeded initialisation) or loads (TorchScript) the model on `device`.
    /// Seeds libtorch's global RNG with `seed` first.
    pub fn load(&self, seed: u64, device: Device) -> Result<AuditModel> {
        tch::manual_seed(seed as i64);
        let inner = match self {
            Self::Cnn | Self::Mlp => {
                let vs = nn::VarStore::new(device);
                let net = match self {
                    Self::Cnn => Net::Cnn(Box::new(DigitsCnn::new(&vs.root()))),
                    _ => Net::Mlp(Mlp::new(&vs.root(), &MLP_WIDTHS)),
                };
                Inner::Builtin { vs, net }
            }
            Self::TorchScript(path) => Inner::Script(TorchScriptModel::load(path, device)?),
        };
        Ok(AuditModel { inner })
    }
}

/// A loaded model, ready for the estimators: its layers, forward pass and loss.
pub struct AuditModel {
    inner: Inner,
}

enum Inner {
    Builtin { vs: nn::VarStore, net: Net },
    Script(TorchScriptModel),
}

enum Net {
    Cnn(Box<DigitsCnn>),
    Mlp(Mlp),
}

/// The loss a model is audited with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Mean cross-entropy of the logits against integer class ids.
    #[default]
    CrossEntropy,
    /// Mean squared error against float targets shaped like the output.
    Mse,
}

impl LossKind {
    /// The mean loss of the model's outputs `out` against `y`.
    pub fn of_output(self, out: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        match self {
            Self::CrossEntropy => out.f_log_softmax(-1, None)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100),
            Self::Mse => out.f_mse_loss(y, tch::Reduction::Mean),
        }
    }
}

impl AuditModel {
    /// [`ModelSource::parse`] then [`ModelSource::load`].
    pub fn load(name: &str, seed: u64, device: Device) -> Result<Self> {
        ModelSource::parse(name)?.load(seed, device)
    }

    /// Whether this is a built-in model (trainable by [`crate::AuditOptions::train_steps`]).
    pub fn is_builtin(&self) -> bool {
        matches!(self.inner, Inner::Builtin { .. })
    }

    /// How reports name the model, e.g. `cnn (gradguard::models::DigitsCnn)`.
    pub fn label(&self) -> String {
        match &self.inner {
            Inner::Builtin { net: Net::Cnn(_), .. } => "cnn (gradguard::models::DigitsCnn)".into(),
            Inner::Builtin { net: Net::Mlp(_), .. } => format!("mlp (gradguard::models::Mlp {MLP_WIDTHS:?})"),
            Inner::Script(m) => format!("TorchScript {}", m.path().display()),
        }
    }

    /// The model's output for a batch of inputs.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        match &self.inner {
            Inner::Builtin { net: Net::Cnn(net), .. } => net.f_forward(x),
            Inner::Builtin { net: Net::Mlp(net), .. } => net.f_forward(x),
            Inner::Script(m) => m.f_forward(x),
        }
    }

    /// Whether the model declares an embedding split (a TorchScript module exporting `embed` and
    /// `forward_embedded`): its inputs may be token ids, and M1 is measured on the embeddings.
    pub fn has_embedding(&self) -> bool {
        matches!(&self.inner, Inner::Script(m) if m.has_embedding())
    }

    /// The embeddings of a batch of discrete inputs (models with an embedding split).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor, TchError> {
        match &self.inner {
            Inner::Script(m) if m.has_embedding() => m.f_embed(tokens),
            _ => Err(TchError::Kind(format!("{} has no embedding split (embed and forward_embedded)", self.label()))),
        }
    }

    /// The output from a batch of embeddings (models with an embedding split).
    pub fn forward_embedded(&self, embeddings: &Tensor) -> Result<Tensor, TchError> {
        match &self.inner {
            Inner::Script(m) if m.has_embedding() => m.f_forward_embedded(embeddings),
            _ => Err(TchError::Kind(format!("{} has no embedding split (embed and forward_embedded)", self.label()))),
        }
    }

    /// The VarStore holding the parameters.
    pub fn var_store(&self) -> &nn::VarStore {
        match &self.inner {
            Inner::Builtin { vs, .. } => vs,
            Inner::Script(m) => m.var_store(),
        }
    }

    /// The guard's layer map, in model order (TorchScript: PyTorch's dotted names).
    pub fn layers(&self) -> Result<LayerMap> {
        Ok(match &self.inner {
            Inner::Builtin { vs, .. } => LayerMap::from_var_store(vs)?,
            Inner::Script(m) => m.layer_map()?,
        })
    }

    /// The layer names, in model order.
    pub fn layer_names(&self) -> Result<Vec<String>> {
        Ok(self.layers()?.names())
    }

    /// The dtype of the parameters (inputs are converted to it).
    pub fn kind(&self) -> Kind {
        self.var_store().trainable_variables().first().map(|t| t.kind()).unwrap_or(Kind::Float)
    }

    /// The mean loss of a batch.
    pub fn loss(&self, loss: LossKind, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        loss.of_output(&self.forward(x)?, y)
    }

    /// The loss as the guard's estimators take it, with the model's embedding split when it
    /// has one.
    pub fn loss_fn(&self, loss: LossKind) -> AuditLoss<'_> {
        AuditLoss { model: self, kind: loss }
    }

    /// The TorchScript model, when this is one.
    pub fn torchscript(&self) -> Option<&TorchScriptModel> {
        match &self.inner {
            Inner::Script(m) => Some(m),
            Inner::Builtin { .. } => None,
        }
    }

    /// Training mode (`true`) or eval mode. TorchScript models load in eval mode; the built-in
    /// models have no dropout or batch norm, so the mode changes nothing for them.
    pub fn set_training(&mut self, training: bool) -> Result<()> {
        if let Inner::Script(m) = &mut self.inner {
            if training { m.set_train()? } else { m.set_eval()? }
        }
        Ok(())
    }

    /// Writes a TorchScript model, as trained, for `torch.jit.load` (the built-in models are
    /// not TorchScript: a usage error).
    pub fn save(&self, path: &Path) -> Result<()> {
        match &self.inner {
            Inner::Script(m) => Ok(m.save(path)?),
            Inner::Builtin { .. } => Err(ModelError::Usage(format!("{}: only a TorchScript model can be saved as a TorchScript file", self.label()))),
        }
    }
}

/// An audited model's loss (a `gradguard_guard::LossFn`), split at the embeddings when the
/// model declares a split.
#[derive(Clone, Copy)]
pub struct AuditLoss<'a> {
    model: &'a AuditModel,
    kind: LossKind,
}

impl LossFn for AuditLoss<'_> {
    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.model.loss(self.kind, x, y)
    }

    fn embedding(&self) -> Option<&dyn EmbeddingSplit> {
        self.model.has_embedding().then_some(self as &dyn EmbeddingSplit)
    }
}

impl EmbeddingSplit for AuditLoss<'_> {
    fn embed(&self, tokens: &Tensor) -> Result<Tensor, TchError> {
        self.model.embed(tokens)
    }

    fn loss_from_embedded(&self, embedded: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.kind.of_output(&self.model.forward_embedded(embedded)?, y)
    }
}

/// The sample indices of training step `step`: `batch` of `indices` (all of them when fewer)
/// drawn without replacement by a generator seeded from `seed` and the step, so that a run
/// is the same for the same seed whatever else it does.
pub fn seeded_batch(indices: &[usize], batch: usize, seed: u64, step: usize) -> Vec<i64> {
    use rand::{seq::IndexedRandom, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    indices.choose_multiple(&mut rng, batch.min(indices.len())).map(|&i| i as i64).collect()
}

/// Adam (lr 1e-3) on the cross-entropy of seeded mini-batches drawn from `indices`; resumable,
/// so a study can measure between stretches of training.
pub struct Trainer<'a> {
    model: &'a AuditModel,
    x: &'a Tensor,
    y: &'a Tensor,
    indices: Vec<usize>,
    batch: usize,
    seed: u64,
    opt: nn::Optimizer,
    done: usize,
}

impl<'a> Trainer<'a> {
    /// Batches of `batch` samples of `indices` into `x`, `y`.
    pub fn new(model: &'a AuditModel, x: &'a Tensor, y: &'a Tensor, indices: Vec<usize>, batch: usize, seed: u64) -> Result<Self> {
        let opt = nn::Adam::default().build(model.var_store(), 1e-3)?;
        Ok(Self { model, x, y, indices, batch, seed, opt, done: 0 })
    }

    /// Trains until `step` steps are done in all (nothing if already there).
    pub fn train_to(&mut self, step: usize) -> Result<()> {
        for s in self.done..step {
            let idx = seeded_batch(&self.indices, self.batch, self.seed, s);
            let idx = Tensor::f_from_slice(&idx)?.f_to_device(self.x.device())?;
            let xb = self.x.f_index_select(0, &idx)?;
            let yb = self.y.f_index_select(0, &idx)?;
            let loss = self.model.loss(LossKind::CrossEntropy, &xb, &yb)?;
            self.opt.zero_grad();
            loss.f_backward()?;
            self.opt.step();
        }
        self.done = self.done.max(step);
        Ok(())
    }
}
