//! How the guard recomputes the loss of a batch: the one thing it needs from the user's model.
use crate::error::{torch_message, GuardError, Result, TorchContext};
use tch::{Kind, TchError, Tensor};

/// Recomputes the mean loss of a batch from its inputs. M1 differentiates the released gradient
/// with respect to the inputs, so the guard must rebuild the graph from inputs that require
/// grad; M2 calls it on one sample (or one micro-batch) at a time.
///
/// Any `Fn(&Tensor, &Tensor) -> Result<Tensor, TchError>` is a `LossFn`:
/// ```
/// use gradguard_guard::LossFn;
/// use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let net = nn::linear(vs.root() / "fc", 4, 3, Default::default());
/// let loss_fn = |x: &Tensor, y: &Tensor| net.forward(x).f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0);
/// let (x, y) = (Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)), Tensor::from_slice(&[0i64, 2]));
/// assert_eq!(loss_fn.loss(&x, &y)?.numel(), 1);
/// # Ok::<(), tch::TchError>(())
/// ```
/// The closure should compute the loss the way the training step does (same mode, mean
/// reduction); a model with dropout should be called in a mode that gives the same mask on
/// repeated calls when central differences are used.
pub trait LossFn {
    /// The mean loss of the batch `inputs` with labels `targets`, as a scalar tensor.
    fn loss(&self, inputs: &Tensor, targets: &Tensor) -> std::result::Result<Tensor, TchError>;

    /// The model's split at its first continuous representation, for discrete inputs (token
    /// ids, categorical codes): M1 is then measured on the embeddings. None (the default, and
    /// what a closure gives): M1 is measured on the inputs, which must be floating point.
    fn embedding(&self) -> Option<&dyn EmbeddingSplit> {
        None
    }
}

/// The split of a model on discrete inputs at its first continuous representation (METRICS.md,
/// M1, discrete inputs): `embed(tokens)` gives the embeddings (samples along dimension 0, e.g.
/// [n, L, E] for L tokens), and `loss_from_embedded(embed(tokens), targets)` equals the loss on
/// the tokens. M1 perturbs the embeddings additively, `loss_from_embedded(embed(tokens) +
/// delta)`, and differentiates at delta = 0, so the embedding table's own gradient, part of
/// the released gradient, stays in the graph.
///
/// A pair of closures `(embed, loss_from_embedded)` is a split; [`SplitLoss`] carries one with
/// the plain loss.
pub trait EmbeddingSplit {
    /// The embeddings of a batch of discrete inputs (floating point, one row per sample).
    fn embed(&self, inputs: &Tensor) -> std::result::Result<Tensor, TchError>;

    /// The mean loss of the batch from its embeddings, computed as the plain loss is.
    fn loss_from_embedded(&self, embedded: &Tensor, targets: &Tensor) -> std::result::Result<Tensor, TchError>;
}

impl<E, F> EmbeddingSplit for (E, F)
where
    E: Fn(&Tensor) -> std::result::Result<Tensor, TchError>,
    F: Fn(&Tensor, &Tensor) -> std::result::Result<Tensor, TchError>,
{
    fn embed(&self, inputs: &Tensor) -> std::result::Result<Tensor, TchError> {
        (self.0)(inputs)
    }

    fn loss_from_embedded(&self, embedded: &Tensor, targets: &Tensor) -> std::result::Result<Tensor, TchError> {
        (self.1)(embedded, targets)
    }
}

impl<S: EmbeddingSplit + ?Sized> EmbeddingSplit for Box<S> {
    fn embed(&self, inputs: &Tensor) -> std::result::Result<Tensor, TchError> {
        (**self).embed(inputs)
    }

    fn loss_from_embedded(&self, embedded: &Tensor, targets: &Tensor) -> std::result::Result<Tensor, TchError> {
        (**self).loss_from_embedded(embedded, targets)
    }
}

/// A loss on discrete inputs with its embedding split declared: the plain loss on the inputs
/// (what the training step, M2 and M3 use), and the split M1 is measured through.
///
/// ```
/// use gradguard_guard::{Batch, Inspection, LayerMap, SplitLoss, measure::SensitivitySettings, report::Representation};
/// use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let (emb, fc) = (nn::embedding(vs.root() / "emb", 50, 8, Default::default()), nn::linear(vs.root() / "fc", 8, 2, Default::default()));
/// let from_embedded = |e: &Tensor, y: &Tensor| fc.forward(&e.f_mean_dim(1, false, Kind::Float)?).f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0);
/// let embed = |tokens: &Tensor| Ok::<_, tch::TchError>(emb.forward(tokens));
/// let loss = SplitLoss::new(|t: &Tensor, y: &Tensor| from_embedded(&emb.forward(t), y), embed, &from_embedded);
/// let (tokens, y) = (Tensor::randint(50, [4, 6], (Kind::Int64, Device::Cpu)), Tensor::from_slice(&[0i64, 1, 1, 0]));
/// let layers = LayerMap::from_var_store(&vs)?;
/// let m1 = Inspection::new(&layers, &loss, Batch::new(&tokens, &y)).sensitivity(&SensitivitySettings::default())?;
/// assert!(m1.iter().all(|m| m.measured().is_some_and(|s| s.representation == Representation::Embedding)));
/// # Ok::<(), gradguard_guard::GuardError>(())
/// ```
pub struct SplitLoss<'a> {
    loss: Box<dyn LossFn + 'a>,
    split: Box<dyn EmbeddingSplit + 'a>,
}

impl<'a> SplitLoss<'a> {
    /// The plain `loss` on the inputs, split at `embed` and `loss_from_embedded`.
    pub fn new(
        loss: impl LossFn + 'a,
        embed: impl Fn(&Tensor) -> std::result::Result<Tensor, TchError> + 'a,
        loss_from_embedded: impl Fn(&Tensor, &Tensor) -> std::result::Result<Tensor, TchError> + 'a,
    ) -> Self {
        Self::with_split(loss, (embed, loss_from_embedded))
    }

    /// The plain `loss` with a split given as one value (a TorchScript model's, say).
    pub fn with_split(loss: impl LossFn + 'a, split: impl EmbeddingSplit + 'a) -> Self {
        Self { loss: Box::new(loss), split: Box::new(split) }
    }
}

impl LossFn for SplitLoss<'_> {
    fn loss(&self, inputs: &Tensor, targets: &Tensor) -> std::result::Result<Tensor, TchError> {
        self.loss.loss(inputs, targets)
    }

    fn embedding(&self) -> Option<&dyn EmbeddingSplit> {
        Some(self.split.as_ref())
    }
}

impl<F> LossFn for F
where
    F: Fn(&Tensor, &Tensor) -> std::result::Result<Tensor, TchError>,
{
    fn loss(&self, inputs: &Tensor, targets: &Tensor) -> std::result::Result<Tensor, TchError> {
        self(inputs, targets)
    }
}

/// Calls the loss function and checks it returned a finite scalar.
/// `check_finite` costs one host read; probe loops skip it and check their result instead.
pub(crate) fn scalar_loss(
    loss_fn: &dyn LossFn,
    x: &Tensor,
    y: &Tensor,
    step: u64,
    check_finite: bool,
) -> Result<Tensor> {
    let loss = loss_fn.loss(x, y).during("computing the loss from the batch")?;
    if !loss.defined() || loss.numel() != 1 {
        return Err(GuardError::LossNotScalar(if loss.defined() { loss.size() } else { vec![] }));
    }
    if !check_finite {
        return Ok(loss);
    }
    let value = loss
        .f_reshape([-1])
        .and_then(|l| l.f_to_kind(Kind::Double))
        .and_then(|l| l.f_double_value(&[0]))
        .during("reading the loss")?;
    if !value.is_finite() {
        return Err(GuardError::NonFiniteLoss { step, value });
    }
    Ok(loss)
}

/// The loss of a batch of one sample (the per-sample passes of M2 and M3). A loss that cannot
/// be computed on one sample is [`GuardError::NoPerSampleGradients`], whether it returns an error or
/// panics (tch's `nn` modules panic on a libtorch error: `nn::batch_norm1d` in training mode
/// on one sample, say); the estimators then report M2 and M3 absent with that reason instead of
/// stopping training. The panic's message still reaches stderr through the panic hook.
pub(crate) fn one_sample_loss(loss_fn: &dyn LossFn, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let no_per_sample = |message: &str| GuardError::NoPerSampleGradients { why: torch_message(message) };
    let loss = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loss_fn.loss(x, y))) {
        Ok(Ok(loss)) => loss,
        Ok(Err(e)) => return Err(no_per_sample(&e.to_string())),
        Err(payload) => {
            let message = payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
            return Err(no_per_sample(message.unwrap_or("the loss panicked")));
        }
    };
    if !loss.defined() || loss.numel() != 1 {
        return Err(GuardError::LossNotScalar(if loss.defined() { loss.size() } else { vec![] }));
    }
    Ok(loss)
}

/// Plain parameter gradients of the loss at `x` (no graph kept); undefined where a parameter
/// is not reached.
pub(crate) fn parameter_grads(
    loss_fn: &dyn LossFn,
    x: &Tensor,
    y: &Tensor,
    params: &[Tensor],
    step: u64,
    check_finite: bool,
) -> Result<Vec<Tensor>> {
    let loss = scalar_loss(loss_fn, x, y, step, check_finite)?;
    Tensor::f_run_backward(&[&loss], params, false, false).during("computing parameter gradients")
}
