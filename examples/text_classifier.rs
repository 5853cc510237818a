//! A text classifier on token ids trained under the guard, with M1 measured on the embeddings
//! (docs/METRICS.md, M1, discrete inputs).
//!
//!     cargo run --release --example text_classifier -- [steps] [estimate_every]
//!
//! The data are synthetic: sequences of 16 token ids from a vocabulary of 200. The label (the
//! "sentiment") is which of two sets of words, ids 0-4 or 5-9, the sequence draws its sentiment
//! words from. The private attribute is planted and independent of the label: token 199, the
//! marker, fills a position with probability 30% for attribute 1 and 3% for attribute 0, so the
//! attribute is recoverable from the gradients (M2's separation) though the task never needs it.
//!
//! The model is embedding (200 x 32) -> mean over the sequence -> hidden (32 -> 32, ReLU) ->
//! out (32 -> 2). Token ids have no derivative, so the model declares its split where it gives
//! the loss: `embed(tokens)` and the loss from the embeddings. The guard then measures M1 with
//! respect to each sample's 16 x 32 embedding block, and the embedding table's own gradient is
//! part of what it measures. Without the split M1 would be absent (the last lines show the
//! reason) and training would go on.
use gradguard::guard::Settings;
use gradguard::{Batch, GuardedOptimizer};
use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Reduction, TchError, Tensor};

#[path = "shared/synthetic.rs"]
mod synthetic;

const VOCAB: i64 = 200;
const LENGTH: i64 = 16;
const DIM: i64 = 32;

/// `n` synthetic sequences of 16 tokens: (token ids [n, 16], labels [n], attribute [n]).
fn synthetic(n: i64, seed: i64) -> Result<(Tensor, Tensor, Tensor), TchError> {
    synthetic::text(n, VOCAB, LENGTH, seed)
}

struct TextClassifier {
    emb: nn::Embedding,
    hidden: nn::Linear,
    out: nn::Linear,
}

impl TextClassifier {
    fn new(p: &nn::Path) -> Self {
        Self {
            emb: nn::embedding(p / "emb", VOCAB, DIM, Default::default()),
            hidden: nn::linear(p / "hidden", DIM, DIM, Default::default()),
            out: nn::linear(p / "out", DIM, 2, Default::default()),
        }
    }

    /// The first continuous representation: [n, 16, 32].
    fn embed(&self, tokens: &Tensor) -> Result<Tensor, TchError> {
        Ok(self.emb.forward(tokens))
    }

    fn logits_from_embeddings(&self, e: &Tensor) -> Result<Tensor, TchError> {
        Ok(self.out.forward(&self.hidden.forward(&e.f_mean_dim(1, false, Kind::Float)?).f_relu()?))
    }

    fn loss_from_embeddings(&self, e: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.logits_from_embeddings(e)?.f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0)
    }

    /// The training loss on token ids: forward(tokens) == forward_embedded(embed(tokens)).
    fn loss(&self, tokens: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.loss_from_embeddings(&self.embed(tokens)?, y)
    }

    fn accuracy(&self, tokens: &Tensor, y: &Tensor) -> Result<f64, TchError> {
        let predicted = tch::no_grad(|| self.logits_from_embeddings(&self.embed(tokens)?))?.f_argmax(-1, false)?;
        predicted.f_eq_tensor(y)?.f_to_kind(Kind::Double)?.f_mean(Kind::Double)?.f_double_value(&[])
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let steps = args.first().copied().unwrap_or(300);
    let estimate_every = args.get(1).copied().unwrap_or(100) as u64;
    let batch = 64i64;
    let (tokens, y, attribute) = synthetic(4096, 0)?;
    let (test_tokens, test_y, _) = synthetic(1024, 1)?;

    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = TextClassifier::new(&vs.root());
    // Estimates every `estimate_every` steps, whatever they cost (this example shows them).
    let settings = Settings { estimate_every, max_estimate_age_steps: estimate_every.max(50), budget_share: 1.0, ..Default::default() };
    let mut opt = GuardedOptimizer::builder(&vs, nn::Adam::default().build(&vs, 3e-3)?)
        .settings(settings.clone())
        .loss(|t: &Tensor, y: &Tensor| net.loss(t, y))
        .embedding(|t: &Tensor| net.embed(t), |e: &Tensor, y: &Tensor| net.loss_from_embeddings(e, y))
        .build()?;
    let samples = tokens.size()[0];
    for step in 0..steps as i64 {
        let start = (step * batch) % samples;
        let (t, yb, ab) = (tokens.f_narrow(0, start, batch)?, y.f_narrow(0, start, batch)?, attribute.f_narrow(0, start, batch)?);
        let release = opt.train_step(&Batch::new(&t, &yb).with_attribute(&ab))?;
        if release.report().estimated {
            println!("{}", release.report().table());
        }
    }
    println!("test accuracy {:.3} after {steps} guarded steps (chance 0.5)\n", net.accuracy(&test_tokens, &test_y)?);

    // The same model without the split: M1 is absent with its reason, the step still applies.
    let mut plain = GuardedOptimizer::builder(&vs, nn::Adam::default().build(&vs, 3e-3)?).settings(settings).loss(|t: &Tensor, y: &Tensor| net.loss(t, y)).build()?;
    let (t, yb) = (tokens.f_narrow(0, 0, batch)?, y.f_narrow(0, 0, batch)?);
    let release = plain.train_step(&Batch::new(&t, &yb))?;
    println!("without the split: released = {}", release.is_released());
    if let Some(reason) = release.report().layers[0].sensitivity.absent_reason() {
        println!("  M1 absent: {reason}");
    }
    Ok(())
}
