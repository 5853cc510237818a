//! M1's sub-batch probes (METRICS.md, M1, "Sub-batch probes"): on a model whose samples do not
//! interact, probes on random sub-batches of m < n samples estimate the same S_l as the full
//! batch (within 3 standard errors of exact mode; unbiased over seeds); the same seed gives the
//! same numbers; a batch norm in training mode keeps the full batch and says so; every number
//! reports its m as `probe_samples`.
mod common;

use common::cross_entropy;
use gradguard_guard::report::{JvpMethod, Sensitivity};
use gradguard_guard::{measure::SensitivitySettings, Batch, Inspection, LayerMap, Metric, Policy, Settings};
use tch::{nn, nn::OptimizerConfig, Device, Kind, TchError, Tensor};

/// fc0 (6 -> 12) -> [batch norm] -> tanh -> fc1 (12 -> 3), in f64. Smooth, so that central
/// differences are held to exact mode too.
struct Net {
    fc0: nn::Linear,
    bn: Option<nn::BatchNorm>,
    fc1: nn::Linear,
    training: bool,
}

impl Net {
    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let mut h = x.f_linear(&self.fc0.ws, self.fc0.bs.as_ref())?;
        if let Some(bn) = &self.bn {
            h = h.f_batch_norm(bn.ws.as_ref(), bn.bs.as_ref(), Some(&bn.running_mean), Some(&bn.running_var), self.training, 0.1, 1e-5, false)?;
        }
        cross_entropy(&h.f_tanh()?.f_linear(&self.fc1.ws, self.fc1.bs.as_ref())?, y)
    }
}

/// Tests in this binary may run on parallel threads and libtorch's generator is global:
/// seeding and drawing under one lock gives every call the same model and batch.
static DRAWS: std::sync::Mutex<()> = std::sync::Mutex::new(());

const N: i64 = 16;

/// The net (with a batch norm in training or eval mode, or none) and a batch of N samples.
fn setup(batch_norm: Option<bool>) -> (nn::VarStore, Net, Tensor, Tensor) {
    let _draws = DRAWS.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(11);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let net = Net {
        fc0: nn::linear(&root / "fc0", 6, 12, Default::default()),
        bn: batch_norm.map(|_| nn::batch_norm1d(&root / "bn", 12, Default::default())),
        fc1: nn::linear(&root / "fc1", 12, 3, Default::default()),
        training: batch_norm.unwrap_or(false),
    };
    vs.double();
    let x = Tensor::randn([N, 6], (Kind::Double, Device::Cpu));
    let y = Tensor::randint(3, [N], (Kind::Int64, Device::Cpu));
    (vs, net, x, y)
}

fn with(method: JvpMethod, probes: usize, probe_samples: Option<usize>) -> SensitivitySettings {
    SensitivitySettings { probes, method, exact: false, probe_samples }
}

fn exact() -> SensitivitySettings {
    SensitivitySettings { exact: true, ..Default::default() }
}

fn measured(metrics: &[Metric<Sensitivity>]) -> Vec<&Sensitivity> {
    metrics.iter().map(|m| m.measured().expect("measured")).collect()
}

/// M1 of every layer of the net on its batch, the probes picked by (seed, step).
fn measure(batch_norm: Option<bool>, settings: &SensitivitySettings, seed: u64, step: u64) -> Vec<Metric<Sensitivity>> {
    let (vs, net, x, y) = setup(batch_norm);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    Inspection::new(&layers, &loss, Batch::new(&x, &y)).seeded(seed, step).sensitivity(settings).unwrap()
}

#[test]
fn sub_batch_estimates_agree_with_exact_mode_within_three_standard_errors() {
    let exact = measure(None, &exact(), 0, 0);
    for method in [JvpMethod::DoubleBackward, JvpMethod::CentralDifference] {
        let sub = measure(None, &with(method, 64, Some(4)), 3, 1);
        for (l, (e, s)) in measured(&exact).iter().zip(measured(&sub)).enumerate() {
            assert_eq!(s.probe_samples, Some(4), "{method:?} layer {l}");
            assert!(s.sensitivity_se > 0.0, "{method:?} layer {l}");
            let gap = (s.sensitivity - e.sensitivity).abs();
            assert!(gap < 3.0 * s.sensitivity_se, "{method:?} layer {l}: sub-batch {} ± {} vs exact {}", s.sensitivity, s.sensitivity_se, e.sensitivity);
            // The denominator of R_l is the whole batch's ||G_l||, as in exact mode.
            let norm = |m: &Sensitivity| m.sensitivity / m.relative_sensitivity.unwrap();
            assert!((norm(s) - norm(e)).abs() < 1e-9 * norm(e), "{method:?} layer {l}: ||G_l|| of the whole batch");
        }
    }
    assert!(measured(&exact).iter().all(|e| e.probe_samples == Some(N as usize)), "exact mode covers every sample");
}

#[test]
fn the_sub_batch_estimate_of_s_squared_is_unbiased_over_seeds() {
    let (vs, net, x, y) = setup(None);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let look = Inspection::new(&layers, &loss, Batch::new(&x, &y));
    let exact: Vec<f64> = measured(&look.sensitivity(&exact()).unwrap()).iter().map(|s| s.sensitivity.powi(2)).collect();
    let seeds = 200;
    let settings = with(JvpMethod::DoubleBackward, 2, Some(4));
    let squares: Vec<Vec<f64>> = (0..seeds)
        .map(|seed| measured(&look.seeded(seed, 0).sensitivity(&settings).unwrap()).iter().map(|s| s.sensitivity.powi(2)).collect())
        .collect();
    for (l, truth) in exact.iter().enumerate() {
        let values: Vec<f64> = squares.iter().map(|s| s[l]).collect();
        let (mean, se) = gradguard_guard::measure::mean_and_standard_error(&values);
        assert!((mean - truth).abs() < 4.0 * se, "layer {l}: mean of {seeds} sub-batch estimates of S^2 {mean} ± {se} vs exact {truth}");
        // A wrong scale (m/n off by its factor of 4) would be far outside: the test can see it.
        assert!(4.0 * se < 0.75 * truth, "layer {l}: {seeds} seeds resolve S^2 to {se} against {truth}");
    }
}

#[test]
fn the_same_seed_and_step_give_the_same_numbers_and_another_step_others() {
    for method in [JvpMethod::DoubleBackward, JvpMethod::CentralDifference] {
        let settings = with(method, 8, Some(4));
        let a = measure(None, &settings, 7, 3);
        assert_eq!(a, measure(None, &settings, 7, 3), "{method:?}");
        let b = measure(None, &settings, 7, 4);
        assert_ne!(measured(&a)[0].sensitivity, measured(&b)[0].sensitivity, "{method:?}: another step draws other sub-batches and probes");
    }
}

#[test]
fn batch_norm_in_training_mode_keeps_the_full_batch_and_reports_it() {
    for method in [JvpMethod::DoubleBackward, JvpMethod::CentralDifference] {
        let full = measure(Some(true), &with(method, 8, None), 5, 2);
        let asked = measure(Some(true), &with(method, 8, Some(4)), 5, 2);
        // Detected on the first sub-batch: the full batch's own probes, number for number.
        assert_eq!(asked, full, "{method:?}");
        assert!(measured(&asked).iter().all(|s| s.probe_samples == Some(N as usize)), "{method:?}");
        // In eval mode the batch norm uses its running statistics: the samples do not interact.
        let eval = measure(Some(false), &with(method, 8, Some(4)), 5, 2);
        assert!(measured(&eval).iter().all(|s| s.probe_samples == Some(4)), "{method:?} in eval mode");
    }
}

#[test]
fn a_declared_coupling_keeps_the_full_batch_without_a_check() {
    let (vs, net, x, y) = setup(None);
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let declared = LayerMap::from_var_store(&vs).unwrap().with_coupled_samples();
    assert!(declared.couples_samples());
    let look = Inspection::new(&declared, &loss, Batch::new(&x, &y)).seeded(5, 2);
    let asked = look.sensitivity(&with(JvpMethod::DoubleBackward, 8, Some(4))).unwrap();
    assert_eq!(asked, look.sensitivity(&with(JvpMethod::DoubleBackward, 8, None)).unwrap());
    assert!(measured(&asked).iter().all(|s| s.probe_samples == Some(N as usize)));
}

#[test]
fn a_model_that_runs_only_at_its_batch_size_keeps_the_full_batch() {
    let (vs, net, x, y) = setup(None);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    // A forward written for batches of N: an error on a sub-batch, or a panic (tch's
    // non-`f_` forms unwrap libtorch's error).
    let fails = |x: &Tensor, y: &Tensor| net.loss(&x.f_reshape([N, 6])?, y);
    let panics = |x: &Tensor, y: &Tensor| net.loss(&x.reshape([N, 6]), y);
    for (name, loss) in [("error", &fails as &dyn gradguard_guard::LossFn), ("panic", &panics)] {
        for method in [JvpMethod::DoubleBackward, JvpMethod::CentralDifference] {
            let look = Inspection::new(&layers, loss, Batch::new(&x, &y)).seeded(5, 2);
            let asked = look.sensitivity(&with(method, 4, Some(4))).unwrap();
            assert_eq!(asked, look.sensitivity(&with(method, 4, None)).unwrap(), "{name}, {method:?}");
            assert!(measured(&asked).iter().all(|s| s.probe_samples == Some(N as usize)), "{name}, {method:?}");
        }
    }
}

#[test]
fn probe_samples_is_in_the_json_of_m1_and_old_json_still_reads() {
    let m1 = measure(None, &with(JvpMethod::DoubleBackward, 4, Some(4)), 1, 1);
    let json = serde_json::to_value(&m1[0]).unwrap();
    assert_eq!(json["status"], "measured");
    assert_eq!(json["probe_samples"], 4);
    assert_eq!(json["n"], N);
    let mut old = json.clone();
    old.as_object_mut().unwrap().remove("probe_samples");
    let read: Metric<Sensitivity> = serde_json::from_value(old).unwrap();
    assert_eq!(read.measured().unwrap().probe_samples, None);
    assert_eq!(read.measured().unwrap().sensitivity, m1[0].measured().unwrap().sensitivity);
    // m at or above n is the full batch, and says so.
    let full = measure(None, &with(JvpMethod::DoubleBackward, 4, Some(64)), 1, 1);
    assert_eq!(serde_json::to_value(&full[0]).unwrap()["probe_samples"], N);
}

#[test]
fn kept_jvps_give_the_streaming_numbers_on_sub_batches() {
    let (vs, net, x, y) = setup(None);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let look = Inspection::new(&layers, &loss, Batch::new(&x, &y)).seeded(2, 9);
    let settings = with(JvpMethod::DoubleBackward, 8, Some(4));
    let kept = look.jvp_samples(&settings).unwrap();
    assert_eq!((kept.n, kept.probe_samples), (N as usize, 4));
    let from_kept = kept.sensitivity(&layers).unwrap();
    for (a, b) in measured(&from_kept).iter().zip(measured(&look.sensitivity(&settings).unwrap())) {
        assert!((a.sensitivity - b.sensitivity).abs() < 1e-12 * b.sensitivity, "{} vs {}", a.sensitivity, b.sensitivity);
        assert_eq!(a.probe_samples, Some(4));
    }
}

#[test]
fn probe_samples_is_a_version_2_policy_setting_of_at_least_one() {
    let policy = Policy::from_toml_str("version = 2\n[settings]\nprobe_samples = 8\n", "test").unwrap();
    assert_eq!(policy.settings().sensitivity().probe_samples, Some(8));
    assert_eq!(Policy::permissive().settings().sensitivity().probe_samples, None);
    let v1 = Policy::from_toml_str("version = 1\n[settings]\nprobe_samples = 8\n", "test").unwrap_err().to_string();
    assert!(v1.contains("probe_samples") && v1.contains("version = 2"), "{v1}");
    let zero = Policy::from_toml_str("version = 2\n[settings]\nprobe_samples = 0\n", "test").unwrap_err().to_string();
    assert!(zero.contains("probe_samples"), "{zero}");
}

#[test]
fn a_guarded_training_step_probes_sub_batches_through_the_steps_graph() {
    let (vs, net, x, y) = setup(None);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let settings = Settings { estimate_every: 1, background_estimates: false, probe_samples: Some(4), ..common::unbudgeted() };
    let mut guard = common::guard(&vs, settings);
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    for _ in 0..2 {
        opt.zero_grad();
        let report = guard.train_step(&Batch::new(&x, &y), &loss).unwrap().into_report();
        opt.step();
        for layer in &report.layers {
            let s = layer.sensitivity.measured().expect("measured");
            assert_eq!((s.n, s.probe_samples), (N as usize, Some(4)), "{}", layer.name);
            assert!(s.sensitivity > 0.0 && s.sensitivity_se > 0.0);
        }
    }
}
