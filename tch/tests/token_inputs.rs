//! A guarded text classifier on token ids: with the embedding split declared on the builder M1
//! is measured on the embeddings; without one, training goes on with M1 absent (its reason in
//! the guard's words, no libtorch text) and a rule on M1 blocks.
use gradguard_guard::{Batch, Policy, Release, Settings, report::Representation};
use gradguard_tch::GuardedOptimizer;
use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Reduction, TchError, Tensor};

struct Classifier {
    emb: nn::Embedding,
    fc: nn::Linear,
}

impl Classifier {
    fn new(vs: &nn::VarStore) -> Self {
        tch::manual_seed(1);
        Self { emb: nn::embedding(vs.root() / "emb", 30, 8, Default::default()), fc: nn::linear(vs.root() / "fc", 8, 2, Default::default()) }
    }

    fn embed(&self, tokens: &Tensor) -> Result<Tensor, TchError> {
        Ok(self.emb.forward(tokens))
    }

    fn loss_from_embeddings(&self, e: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.fc.forward(&e.f_mean_dim(1, false, Kind::Float)?).f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0)
    }

    fn loss(&self, tokens: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.loss_from_embeddings(&self.embed(tokens)?, y)
    }
}

fn batch(step: i64) -> (Tensor, Tensor) {
    tch::manual_seed(50 + step);
    (Tensor::randint(30, [16, 10], (Kind::Int64, Device::Cpu)), Tensor::randint(2, [16], (Kind::Int64, Device::Cpu)))
}

fn params(vs: &nn::VarStore) -> Vec<Tensor> {
    vs.trainable_variables().iter().map(|t| t.detach().copy()).collect()
}

fn settings() -> Settings {
    Settings { estimate_every: 1, budget_share: 1.0, background_estimates: false, ..Default::default() }
}

/// Three guarded SGD steps on token ids: the releases, and whether the parameters moved.
fn train(vs: &nn::VarStore, mut opt: GuardedOptimizer, net: &Classifier) -> (Vec<Release>, bool) {
    let before = params(vs);
    let releases = (0..3)
        .map(|step| {
            let (t, y) = batch(step);
            opt.backward_step(&net.loss(&t, &y).unwrap(), &Batch::new(&t, &y)).unwrap()
        })
        .collect();
    (releases, before.iter().zip(params(vs)).any(|(a, b)| !a.equal(&b)))
}

fn sgd(vs: &nn::VarStore) -> nn::Optimizer {
    nn::Sgd::default().build(vs, 0.5).unwrap()
}

#[test]
fn the_split_declared_on_the_builder_gives_m1_on_the_embeddings() {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Classifier::new(&vs);
    let opt = GuardedOptimizer::builder(&vs, sgd(&vs))
        .settings(settings())
        .loss(|t: &Tensor, y: &Tensor| net.loss(t, y))
        .embedding(|t: &Tensor| net.embed(t), |e: &Tensor, y: &Tensor| net.loss_from_embeddings(e, y))
        .build()
        .unwrap();
    let (releases, moved) = train(&vs, opt, &net);
    assert!(moved, "the steps are applied");
    for release in &releases {
        assert!(release.is_released());
        for layer in &release.report().layers {
            let s = layer.sensitivity.measured().unwrap_or_else(|| panic!("{}: {:?}", layer.name, layer.sensitivity.absent_reason()));
            assert_eq!(s.representation, Representation::Embedding);
            assert!(s.sensitivity > 0.0);
        }
    }
}

#[test]
fn without_a_split_training_goes_on_with_m1_absent_and_an_m1_rule_blocks() {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Classifier::new(&vs);
    let opt = GuardedOptimizer::builder(&vs, sgd(&vs)).settings(settings()).loss(|t: &Tensor, y: &Tensor| net.loss(t, y)).build().unwrap();
    let (releases, moved) = train(&vs, opt, &net);
    assert!(moved, "the steps are applied");
    for release in &releases {
        assert!(release.is_released(), "{:?}", release.block_reason());
        for layer in &release.report().layers {
            let reason = layer.sensitivity.absent_reason().expect("M1 absent");
            assert!(reason.contains("Int64") && reason.contains("no embedding split"), "{reason}");
            for libtorch in ["libtorch", "Internal torch error", "Exception raised from", "frame #"] {
                assert!(!reason.contains(libtorch), "{reason}");
            }
        }
        assert!(release.report().table().contains("M1 absent: M1 needs a continuous representation"));
    }

    // The same loop under a rule on M1 (estimates every 10 steps by default): every release
    // fails closed, nothing is applied.
    let rule = "version = 1\n[settings]\nbudget_share = 1.0\nbackground_estimates = false\n[[rule]]\nname = \"m1\"\nmetric = \"relative_sensitivity\"\nlayers = [\"*\"]\nact_above = 1e9\nrelax_below = 1e8\nladder = [{ action = \"withhold\" }]\n";
    let policy = Policy::from_toml_str(rule, "test").unwrap();
    let opt = GuardedOptimizer::builder(&vs, sgd(&vs)).policy(policy).loss(|t: &Tensor, y: &Tensor| net.loss(t, y)).build().unwrap();
    let (releases, moved) = train(&vs, opt, &net);
    assert!(!moved, "a blocked step is not applied");
    for (step, release) in releases.iter().enumerate() {
        let reason = release.block_reason().unwrap_or_else(|| panic!("step {step} released without M1")).to_string();
        assert!(reason.contains("relative_sensitivity"), "{reason}");
    }
}
