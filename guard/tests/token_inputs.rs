//! M1 on discrete inputs (METRICS.md, M1, discrete inputs): a text classifier on token ids,
//! embedding -> mean over the sequence -> linear -> softmax cross-entropy, measured on the
//! embedding representation against its closed form; and token ids without a split, where M1
//! is absent with its reason, training goes on and a rule on M1 fails closed.
//!
//! Closed form. Sample i has tokens t_1..t_L, embedding block X_i (L x E), m_i = (1/L) sum_t
//! X_i[t], p_i = softmax(W m_i + b), r_i = p_i - e_{y_i}, A_i = diag(p_i) - p_i p_i^T and c_{i,v}
//! the count of token v in the sample. The released gradient (mean over n samples) is
//! G_W = (1/n) sum_i r_i m_i^T, G_b = (1/n) sum_i r_i, G_emb[v] = (1/(nL)) sum_i c_{i,v} W^T r_i.
//! Moving X_i[t, e] moves r_i by u = (1/L) A_i W e_e whatever t is, so per (t, e):
//!   dG_W = (1/n) (u m_i^T + (1/L) r_i e_e^T),  dG_b = (1/n) u,  dG_emb[v] = (1/(nL)) c_{i,v} W^T u,
//! and ||J_{l,i}||_F^2 sums the squares over e and the L positions.
mod common;
use gradguard_guard::{Batch, Guard, Inspection, LayerMap, Metric, Policy, Release, Settings, SplitLoss, measure::SensitivitySettings, report::{JvpMethod, Representation, Sensitivity}};
use tch::{nn, Device, Kind, TchError, Tensor};

const VOCAB: i64 = 7;
const DIM: i64 = 3;
const CLASSES: i64 = 3;
const LENGTH: i64 = 4;

struct TokenModel {
    vs: nn::VarStore,
    emb: Tensor,
    w: Tensor,
    b: Tensor,
}

impl TokenModel {
    /// Layers `emb` (VOCAB x DIM) and `fc` (CLASSES x DIM, CLASSES), in `kind`.
    fn new(kind: Kind) -> Self {
        tch::manual_seed(5);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _ = vs.root().sub("emb").var("weight", &[VOCAB, DIM], nn::Init::Randn { mean: 0.0, stdev: 1.0 });
        let _ = vs.root().sub("fc").var("weight", &[CLASSES, DIM], nn::Init::Randn { mean: 0.0, stdev: 0.8 });
        let _ = vs.root().sub("fc").var("bias", &[CLASSES], nn::Init::Randn { mean: 0.0, stdev: 0.3 });
        if kind == Kind::Double {
            vs.double();
        }
        let v = vs.variables();
        let (emb, w, b) = (v["emb.weight"].shallow_clone(), v["fc.weight"].shallow_clone(), v["fc.bias"].shallow_clone());
        Self { vs, emb, w, b }
    }

    fn layers(&self) -> LayerMap {
        LayerMap::from_var_store(&self.vs).unwrap()
    }

    fn embed(&self, tokens: &Tensor) -> Result<Tensor, TchError> {
        Tensor::f_embedding(&self.emb, tokens, -1, false, false)
    }

    fn loss_from_embedded(&self, e: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        common::cross_entropy(&e.f_mean_dim(1, false, e.kind())?.f_linear(&self.w, Some(&self.b))?, y)
    }

    fn loss(&self, tokens: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.loss_from_embedded(&self.embed(tokens)?, y)
    }

    /// The plain loss on tokens, split at the embeddings.
    fn split_loss(&self) -> SplitLoss<'_> {
        SplitLoss::new(|t: &Tensor, y: &Tensor| self.loss(t, y), |t: &Tensor| self.embed(t), |e: &Tensor, y: &Tensor| self.loss_from_embedded(e, y))
    }
}

fn tokens(n: i64, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let t = Tensor::randint(VOCAB, [n, LENGTH], (Kind::Int64, Device::Cpu));
    let y = Tensor::randint(CLASSES, [n], (Kind::Int64, Device::Cpu));
    (t, y)
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.reshape([-1]).to_kind(Kind::Double)).unwrap()
}

/// S_l for `emb` and `fc` from the closed form, in plain f64 arithmetic.
fn closed_form(model: &TokenModel, tokens: &Tensor, y: &Tensor) -> (f64, f64) {
    let (v, e, c, l) = (VOCAB as usize, DIM as usize, CLASSES as usize, LENGTH as usize);
    let n = tokens.size()[0] as usize;
    let (table, w, b) = (values(&model.emb), values(&model.w), values(&model.b));
    let ids: Vec<usize> = values(tokens).into_iter().map(|t| t as usize).collect();
    let labels: Vec<usize> = values(y).into_iter().map(|t| t as usize).collect();
    let (nf, lf) = (n as f64, l as f64);
    let (mut emb_sq, mut fc_sq) = (0.0, 0.0);
    for i in 0..n {
        let sample = &ids[i * l..(i + 1) * l];
        let m: Vec<f64> = (0..e).map(|j| sample.iter().map(|&t| table[t * e + j]).sum::<f64>() / lf).collect();
        let z: Vec<f64> = (0..c).map(|k| b[k] + (0..e).map(|j| w[k * e + j] * m[j]).sum::<f64>()).collect();
        let top = z.iter().cloned().fold(f64::MIN, f64::max);
        let ex: Vec<f64> = z.iter().map(|v| (v - top).exp()).collect();
        let p: Vec<f64> = ex.iter().map(|v| v / ex.iter().sum::<f64>()).collect();
        let r: Vec<f64> = (0..c).map(|k| p[k] - if labels[i] == k { 1.0 } else { 0.0 }).collect();
        let a = |k: usize, q: usize| if k == q { p[k] - p[k] * p[q] } else { -p[k] * p[q] };
        let counts: Vec<f64> = (0..v).map(|tok| sample.iter().filter(|&&t| t == tok).count() as f64).collect();
        let count_sq: f64 = counts.iter().map(|c| c * c).sum();
        for dir in 0..e {
            let u: Vec<f64> = (0..c).map(|k| (0..c).map(|q| a(k, q) * w[q * e + dir]).sum::<f64>() / lf).collect();
            let mut dw = 0.0;
            for k in 0..c {
                for j in 0..e {
                    let entry = (u[k] * m[j] + if j == dir { r[k] / lf } else { 0.0 }) / nf;
                    dw += entry * entry;
                }
            }
            let db: f64 = u.iter().map(|x| (x / nf).powi(2)).sum();
            let wtu_sq: f64 = (0..e).map(|j| (0..c).map(|k| w[k * e + j] * u[k]).sum::<f64>().powi(2)).sum();
            // Every position t of the sample gives the same block: L of them.
            fc_sq += lf * (dw + db);
            emb_sq += lf * count_sq * wtu_sq / (nf * lf).powi(2);
        }
    }
    ((emb_sq / nf).sqrt(), (fc_sq / nf).sqrt())
}

fn by_name<'m>(layers: &LayerMap, m1: &'m [Metric<Sensitivity>], name: &str) -> &'m Sensitivity {
    let l = layers.names().iter().position(|n| n == name).unwrap();
    m1[l].measured().unwrap_or_else(|| panic!("{name}: M1 absent: {:?}", m1[l].absent_reason()))
}

#[test]
fn exact_m1_on_the_embeddings_matches_the_closed_form_in_f64() {
    let model = TokenModel::new(Kind::Double);
    let layers = model.layers();
    let loss = model.split_loss();
    // n = 2: 24 embedding scalars <= 33 parameters (input basis); n = 3: 36 > 33 (parameter basis).
    for n in [2, 3] {
        let (t, y) = tokens(n, 10 + n);
        let (s_emb, s_fc) = closed_form(&model, &t, &y);
        let settings = SensitivitySettings { exact: true, ..Default::default() };
        let m1 = Inspection::new(&layers, &loss, Batch::new(&t, &y)).sensitivity(&settings).unwrap();
        for (name, expected) in [("emb", s_emb), ("fc", s_fc)] {
            let s = by_name(&layers, &m1, name);
            assert_eq!(s.representation, Representation::Embedding);
            assert!(s.exact);
            assert!(((s.sensitivity - expected) / expected).abs() < 1e-6, "n = {n}, {name}: exact {} vs closed form {expected}", s.sensitivity);
        }
    }
}

#[test]
fn probe_estimates_on_the_embeddings_are_within_three_standard_errors() {
    let model = TokenModel::new(Kind::Double);
    let layers = model.layers();
    let loss = model.split_loss();
    let (t, y) = tokens(3, 13);
    let (s_emb, s_fc) = closed_form(&model, &t, &y);
    for method in [JvpMethod::DoubleBackward, JvpMethod::CentralDifference] {
        let settings = SensitivitySettings { probes: 64, method, exact: false, probe_samples: None };
        let m1 = Inspection::new(&layers, &loss, Batch::new(&t, &y)).seeded(11, 0).sensitivity(&settings).unwrap();
        for (name, expected) in [("emb", s_emb), ("fc", s_fc)] {
            let s = by_name(&layers, &m1, name);
            assert_eq!(s.representation, Representation::Embedding);
            assert!(s.sensitivity_se > 0.0);
            let z = (s.sensitivity - expected).abs() / s.sensitivity_se;
            assert!(z < 3.0, "{method:?} {name}: {} ± {} vs closed form {expected} ({z:.2} se)", s.sensitivity, s.sensitivity_se);
        }
    }
}

#[test]
fn a_split_declared_on_the_inspection_is_the_same_as_one_carried_by_the_loss() {
    let model = TokenModel::new(Kind::Double);
    let layers = model.layers();
    let (t, y) = tokens(3, 14);
    let plain = |t: &Tensor, y: &Tensor| model.loss(t, y);
    let split = (|t: &Tensor| model.embed(t), |e: &Tensor, y: &Tensor| model.loss_from_embedded(e, y));
    let settings = SensitivitySettings { exact: true, ..Default::default() };
    let declared = Inspection::new(&layers, &plain, Batch::new(&t, &y)).with_embedding(&split).sensitivity(&settings).unwrap();
    let carried = Inspection::new(&layers, &model.split_loss(), Batch::new(&t, &y)).sensitivity(&settings).unwrap();
    assert_eq!(declared, carried);
}

#[test]
fn an_identity_split_of_continuous_inputs_gives_the_input_numbers() {
    // Continuous inputs: embed = identity measures the same Jacobian as no split.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = common::Mlp::new(&vs.root(), &[5, 4, 3]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let x = common::gaussian(6, 5, 2, Kind::Float);
    let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
    let plain = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let identity = SplitLoss::new(plain, |x: &Tensor| Ok(x.shallow_clone()), plain);
    for method in [JvpMethod::DoubleBackward, JvpMethod::CentralDifference] {
        let settings = SensitivitySettings { probes: 8, method, exact: false, probe_samples: None };
        let on_inputs = Inspection::new(&layers, &plain, Batch::new(&x, &y)).seeded(4, 0).sensitivity(&settings).unwrap();
        let on_identity = Inspection::new(&layers, &identity, Batch::new(&x, &y)).seeded(4, 0).sensitivity(&settings).unwrap();
        for (a, b) in on_inputs.iter().zip(&on_identity) {
            let (a, b) = (a.measured().unwrap(), b.measured().unwrap());
            assert_eq!(a.representation, Representation::Input);
            assert_eq!(b.representation, Representation::Embedding);
            assert!((a.sensitivity - b.sensitivity).abs() <= 1e-4 * a.sensitivity, "{method:?}: {} vs {}", a.sensitivity, b.sensitivity);
        }
    }
}

/// The reason M1 gives for token ids without a split: the guard's own words only.
fn assert_clean_reason(reason: &str) {
    assert!(reason.contains("Int64") && reason.contains("no embedding split"), "{reason}");
    for libtorch in ["libtorch", "Internal torch error", "Exception raised from", "frame #", "requires_grad", "floating point and complex dtype"] {
        assert!(!reason.contains(libtorch), "libtorch text {libtorch:?} in {reason}");
    }
    assert_eq!(reason.lines().count(), 1, "{reason}");
}

#[test]
fn token_ids_without_a_split_leave_m1_absent_and_m2_measured() {
    let model = TokenModel::new(Kind::Float);
    let layers = model.layers();
    let loss = |t: &Tensor, y: &Tensor| model.loss(t, y);
    let (t, y) = tokens(32, 15);
    let attribute = Tensor::from_slice(&(0..32).map(|i| i % 2).collect::<Vec<i64>>());
    let look = Inspection::new(&layers, &loss, Batch::new(&t, &y).with_attribute(&attribute));
    for settings in [SensitivitySettings::default(), SensitivitySettings { exact: true, ..Default::default() }] {
        let m1 = look.sensitivity(&settings).unwrap();
        assert_eq!(m1.len(), 2);
        for m in &m1 {
            assert_clean_reason(m.absent_reason().expect("M1 absent"));
        }
    }
    let m2 = look.subspace(&gradguard_guard::measure::SubspaceSettings { samples_per_group: 8, ..Default::default() }).unwrap();
    assert!(m2.iter().all(|m| m.measured().is_some()), "{m2:?}");
    assert!(look.per_sample_gradients().unwrap().iter().all(Option::is_some));
}

const M1_RULE: &str = "[[rule]]\nname = \"m1\"\nmetric = \"sensitivity\"\nlayers = [\"emb\"]\nact_above = 1e6\nrelax_below = 1e5\nladder = [{ action = \"withhold\" }]\n";

/// Steps of plain SGD under `guard`; returns the releases and whether the parameters moved.
fn train(model: &TokenModel, guard: &mut Guard, loss: &dyn gradguard_guard::LossFn, steps: i64) -> (Vec<Release>, bool) {
    let before: Vec<Tensor> = model.vs.trainable_variables().iter().map(|p| p.detach().copy()).collect();
    let mut releases = Vec::new();
    for s in 0..steps {
        let (t, y) = tokens(16, 100 + s);
        for p in model.vs.trainable_variables() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        model.loss(&t, &y).unwrap().backward();
        let release = guard.after_backward(&Batch::new(&t, &y), loss).unwrap();
        if release.is_released() {
            tch::no_grad(|| {
                for mut p in model.vs.trainable_variables() {
                    let g = p.grad();
                    let _ = p.f_sub_(&(g * 0.5)).unwrap();
                }
            });
        }
        releases.push(release);
    }
    let after = model.vs.trainable_variables();
    let moved = before.iter().zip(&after).any(|(a, b)| !a.equal(b));
    (releases, moved)
}

#[test]
fn training_on_token_ids_without_a_split_goes_on_and_an_m1_rule_fails_closed() {
    let settings = Settings { estimate_every: 1, background_estimates: false, ..common::unbudgeted() };
    // No policy rules: every step is released, M1 absent with its reason.
    let model = TokenModel::new(Kind::Float);
    let loss = |t: &Tensor, y: &Tensor| model.loss(t, y);
    let mut guard = Guard::new(model.layers(), Policy::permissive_with(settings.clone()).unwrap()).unwrap();
    let (releases, moved) = train(&model, &mut guard, &loss, 3);
    assert!(moved, "the parameters change");
    for r in &releases {
        assert!(r.is_released(), "{:?}", r.block_reason());
        for layer in &r.report().layers {
            assert_clean_reason(layer.sensitivity.absent_reason().expect("M1 absent"));
        }
    }
    // A rule on M1: every release blocks, between estimates too (the default interval of 10).
    let model = TokenModel::new(Kind::Float);
    let loss = |t: &Tensor, y: &Tensor| model.loss(t, y);
    let toml = format!("version = 1\n[settings]\nbudget_share = 1.0\nbackground_estimates = false\n{M1_RULE}");
    let mut guard = Guard::new(model.layers(), Policy::from_toml_str(&toml, "test").unwrap()).unwrap();
    let (releases, moved) = train(&model, &mut guard, &loss, 3);
    assert!(!moved, "a blocked release is not applied");
    for r in &releases {
        let reason = r.block_reason().expect("blocked").to_string();
        assert!(reason.contains("emb") && reason.contains("sensitivity"), "{reason}");
    }
    let records = &releases[0].manifest().unwrap().layers;
    assert!(records.iter().all(|l| !l.released));
}

#[test]
fn a_guard_with_an_m1_rule_measures_token_models_on_their_embeddings() {
    let model = TokenModel::new(Kind::Float);
    let loss = model.split_loss();
    let toml = format!("version = 1\n[settings]\nbudget_share = 1.0\nbackground_estimates = false\nestimate_every = 1\n{M1_RULE}");
    let mut guard = Guard::new(model.layers(), Policy::from_toml_str(&toml, "test").unwrap()).unwrap();
    let (releases, moved) = train(&model, &mut guard, &loss, 2);
    assert!(moved);
    for r in &releases {
        assert!(r.is_released(), "{:?}", r.block_reason());
        for layer in &r.report().layers {
            let s = layer.sensitivity.measured().expect("M1 measured");
            assert_eq!(s.representation, Representation::Embedding);
            assert!(s.sensitivity > 0.0);
        }
        let check = &r.manifest().unwrap().layers.iter().find(|l| l.name == "emb").unwrap().checks[0];
        assert!(check.raw.is_some_and(|v| v > 0.0), "the rule saw M1 on the embeddings");
    }
    let json = releases[0].report().to_json();
    assert!(json.contains("\"representation\": \"embedding\""), "{json}");
    assert!(releases[0].report().table().contains("embedding representation"));
}

/// M5 on a token model (METRICS.md, M5): D is the embedding block (L x E), v the embeddings'
/// per-dimension variance over the batch, and a calibrated noise rung on every layer brings
/// each to its threshold and bounds the whole release.
#[test]
fn the_reconstruction_bound_of_a_token_model_is_on_its_embedding_block() {
    let model = TokenModel::new(Kind::Float);
    let loss = model.split_loss();
    let toml = "version = 2\n[settings]\nbudget_share = 1.0\nbackground_estimates = false\nestimate_every = 1\nprobes = 16\n\
                [[rule]]\nname = \"bits\"\nmetric = \"reconstruction_bound_bits\"\nlayers = [\"*\"]\nact_above = 0.1\nrelax_below = 0.01\n\
                ladder = [{ action = \"noise\", clip_norm = 1.0, target = \"threshold\" }]\n";
    let mut guard = Guard::new(model.layers(), Policy::from_toml_str(toml, "test").unwrap()).unwrap();
    let (t, _) = tokens(16, 100);
    let embedded = model.embed(&t).unwrap();
    let variance = gradguard_guard::measure::per_dimension_variance(&embedded, 16).unwrap();
    let (releases, _) = train(&model, &mut guard, &loss, 1);
    let report = releases[0].report();
    assert!(releases[0].is_released(), "{:?}", releases[0].block_reason());
    for layer in &report.layers {
        let b = layer.reconstruction_bound.measured().unwrap_or_else(|| panic!("{}: {:?}", layer.name, layer.reconstruction_bound));
        assert_eq!(b.input_dims, (LENGTH * DIM) as usize, "D is the sample's embedding block");
        assert!((b.prior_variance - variance).abs() < 1e-9 * variance, "v is the embeddings' variance: {} vs {variance}", b.prior_variance);
        let bits = b.reconstruction_bound_bits.unwrap();
        assert!(bits <= 0.1 && bits > 0.0999, "{}: {bits}", layer.name);
    }
    let release = report.release_reconstruction_bound.measured().unwrap();
    let sum: f64 = report.layers.iter().map(|l| l.reconstruction_bound.measured().unwrap().dfil.unwrap()).sum();
    assert!((release.dfil.unwrap() - sum).abs() < 1e-12 * sum, "dFIL adds over the layers");
    assert!(release.reconstruction_bound_bits.unwrap() > 0.1, "two layers together carry more than one");
}
