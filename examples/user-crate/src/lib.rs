//! A GRU classifier on token ids, with dropout, trained under gradguard.
use gradguard::guard::Policy;
use gradguard::{Batch, GuardedOptimizer, Release};
use tch::{nn, nn::OptimizerConfig, nn::RNN, Device, Kind, Reduction, TchError, Tensor};

/// Vocabulary size, embedding width, hidden width, classes, sequence length.
pub const VOCAB: i64 = 50;
const EMBED: i64 = 16;
const HIDDEN: i64 = 24;
const CLASSES: i64 = 4;
const LENGTH: i64 = 10;

/// The model: embedding, dropout, GRU, the last hidden state through a linear layer.
pub struct GruClassifier {
    emb: nn::Embedding,
    gru: nn::GRU,
    fc: nn::Linear,
}

impl GruClassifier {
    /// A model in `vs`.
    pub fn new(vs: &nn::VarStore) -> Self {
        let root = vs.root();
        Self {
            emb: nn::embedding(&root / "emb", VOCAB, EMBED, Default::default()),
            gru: nn::gru(&root / "gru", EMBED, HIDDEN, Default::default()),
            fc: nn::linear(&root / "fc", HIDDEN, CLASSES, Default::default()),
        }
    }

    /// The embeddings of token ids [n, L] (the model's first continuous representation).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor, TchError> {
        Ok(tokens.apply(&self.emb))
    }

    /// The batch-mean loss from embeddings, dropout in training mode.
    pub fn loss_from_embedded(&self, e: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let (_, state) = self.gru.seq(&e.f_dropout(0.1, true)?);
        let last = state.value().f_select(0, 0)?;
        last.apply(&self.fc).f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0)
    }

    /// The batch-mean loss from token ids.
    pub fn loss(&self, tokens: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.loss_from_embedded(&self.embed(tokens)?, y)
    }
}

/// A seeded batch: token ids whose class is carried by the last token.
pub fn batch(n: i64, device: Device) -> (Tensor, Tensor) {
    let y = Tensor::randint(CLASSES, [n], (Kind::Int64, device));
    let tokens = Tensor::randint(VOCAB, [n, LENGTH], (Kind::Int64, device));
    let _ = tokens.narrow(1, LENGTH - 1, 1).copy_(&y.unsqueeze(1));
    (tokens, y)
}

/// What a guarded run did.
#[derive(Debug, Default)]
pub struct Counts {
    /// Releases the optimizer stepped on.
    pub released: usize,
    /// Batches held back for the aggregation floor (no step).
    pub held: usize,
    /// Releases the guard blocked (no step), with the last reason.
    pub blocked: usize,
    /// Why the last blocked release was blocked.
    pub last_block: Option<String>,
}

/// Trains `steps` guarded steps under `policy` on `device`; the step counts and the mean loss
/// of the last 10 steps (one batch's loss is noisy).
pub fn train(policy: &str, steps: usize, device: Device) -> Result<(Counts, f64), Box<dyn std::error::Error>> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let net = GruClassifier::new(&vs);
    let mut opt = GuardedOptimizer::builder(&vs, nn::Adam::default().build(&vs, 1e-2)?)
        .policy(Policy::from_toml_str(policy, "inline policy")?)
        .loss(|x: &Tensor, y: &Tensor| net.loss(x, y))
        .embedding(|t: &Tensor| net.embed(t), |e: &Tensor, y: &Tensor| net.loss_from_embedded(e, y))
        .build()?;
    let mut counts = Counts::default();
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let (tokens, y) = batch(32, device);
        // The stored loss forward and backward once, the guard, and the optimizer's step.
        let release = opt.train_step(&Batch::new(&tokens, &y))?;
        losses.push(release.report().loss.unwrap_or(f64::NAN));
        match release {
            Release::Released { .. } => counts.released += 1,
            // Waiting for more samples: no step was taken; go on with the next batch.
            Release::Held { .. } => counts.held += 1,
            // Nothing left the guard and no step was taken; say why and go on (or stop).
            Release::Blocked { reason, .. } => {
                counts.blocked += 1;
                counts.last_block = Some(reason.to_string());
            }
        }
    }
    let tail = &losses[losses.len().saturating_sub(10)..];
    Ok((counts, tail.iter().sum::<f64>() / tail.len().max(1) as f64))
}
