//! M4's attack suite: the analytic attack gives back a trap-weight model's batch exactly, the
//! differences variant an imprint layer's, the bias gradient the batch's labels; attacks that do
//! not apply are absent with their reason; scoring matches a hand computation.
use gradguard_guard::measure::attacks::{analytic, analytic_differences, recover_labels, score, AttackKind, AttackSettings, LinearRelease, RECOVERY_PSNR_DB};
use gradguard_guard::{Batch, GuardError, Inspection, LayerMap};
use tch::{nn, Device, Kind, Reduction, TchError, Tensor};

/// Linear(d, k) - ReLU - Linear(k, c), layers fc0 and fc1.
struct Mlp {
    fc0: nn::Linear,
    fc1: nn::Linear,
}

impl Mlp {
    fn new(vs: &nn::VarStore, d: i64, k: i64, c: i64, bias: bool) -> Self {
        let config = nn::LinearConfig { bias, ..Default::default() };
        Self { fc0: nn::linear(vs.root() / "fc0", d, k, config), fc1: nn::linear(vs.root() / "fc1", k, c, config) }
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let h = x.f_linear(&self.fc0.ws, self.fc0.bs.as_ref())?.f_relu()?;
        h.f_linear(&self.fc1.ws, self.fc1.bs.as_ref())?.f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0)
    }

    /// fc0's weight and bias gradients of the batch's mean loss.
    fn fc0_grads(&self, x: &Tensor, y: &Tensor) -> (Tensor, Tensor) {
        let bias = self.fc0.bs.as_ref().unwrap();
        let g = Tensor::run_backward(&[self.loss(x, y).unwrap()], &[&self.fc0.ws, bias], false, false);
        (g[0].shallow_clone(), g[1].shallow_clone())
    }
}

fn set(param: &Tensor, value: &Tensor) {
    tch::no_grad(|| param.shallow_clone().copy_(value));
}

/// Uniform inputs in [0, 1)^d.
fn uniform(n: i64, d: i64, seed: i64, kind: Kind) -> Tensor {
    tch::manual_seed(seed);
    Tensor::rand([n, d], (kind, Device::Cpu))
}

fn no_optimisation() -> AttackSettings {
    AttackSettings { peak: Some(1.0), optimisation: None, ..Default::default() }
}

const D: i64 = 64;
const UNITS: i64 = 256;
const BATCH: i64 = 32;

/// Trap weights (Boenisch et al. 2021): random rows, each bias set so that its unit fires for
/// 1 input in 32 of a reference sample of the input distribution.
fn trap_model(vs: &nn::VarStore) -> Mlp {
    let net = Mlp::new(vs, D, UNITS, 10, true);
    tch::manual_seed(11);
    let w = Tensor::randn([UNITS, D], (Kind::Float, Device::Cpu));
    let reference = uniform(8192, D, 12, Kind::Float);
    let q = reference.matmul(&w.tr()).quantile_scalar(1.0 - 1.0 / 32.0, 0, false, "linear");
    set(&net.fc0.ws, &w);
    set(net.fc0.bs.as_ref().unwrap(), &(-q));
    net
}

fn batch(n: i64, seed: i64) -> (Tensor, Tensor) {
    let x = uniform(n, D, seed, Kind::Float);
    tch::manual_seed(seed + 1000);
    (x, Tensor::randint(10, [n], (Kind::Int64, Device::Cpu)))
}

#[test]
fn trap_weights_give_the_batch_back_exactly_and_an_honest_init_does_not() {
    let (x, y) = batch(BATCH, 1);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = trap_model(&vs);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let suite = Inspection::new(&layers, &loss, Batch::new(&x, &y)).attack_suite(&no_optimisation()).unwrap();
    assert!(!net.fc0.ws.grad().defined(), "the suite leaves the parameters' gradients alone");
    let fc0 = &suite.layers[0];
    let a = fc0.analytic.measured().expect("fc0 is a Linear on the input with a bias");
    println!("trap weights, fc0 analytic: {}/{} samples at >= 30 dB, {:.2} bits/dim, {} candidates", a.samples_recovered, a.n, a.bits_per_dim, a.candidates);
    assert_eq!((a.n, a.dims, a.peak, a.oracle_matching, a.samples_recovered_exact), (32, 64, 1.0, true, true));
    assert!(a.samples_recovered >= 24, "{} of 32 recovered", a.samples_recovered);
    assert_eq!(a.recovered_fraction, a.samples_recovered as f64 / 32.0);
    assert_eq!(fc0.strongest, Some(AttackKind::Analytic));
    assert!(fc0.analytic_differences.absent_reason().unwrap().starts_with("no two units' weight rows point the same way"), "{:?}", fc0.analytic_differences);
    assert!(suite.layers[1].analytic.absent_reason().unwrap().contains("not a layer on the model input"));
    assert_eq!(suite.strongest().map(|(l, o)| (l.layer.as_str(), o.attack)), Some(("fc0", AttackKind::Analytic)));

    // Exact: every sample that alone fires some unit comes back to f32 rounding.
    let (gw, gb) = net.fc0_grads(&x, &y);
    let release = LinearRelease { weight: &net.fc0.ws, bias: net.fc0.bs.as_ref().unwrap(), grad_weight: &gw, grad_bias: &gb };
    let recon = analytic(&release, 1e-6).unwrap();
    let recon = recon.measured().unwrap();
    let fires = tch::no_grad(|| x.linear(&net.fc0.ws, net.fc0.bs.as_ref()).gt(0.0)); // [n, K]
    let fires_per_unit = Vec::<i64>::try_from(fires.sum_dim_intlist(0, false, Kind::Int64)).unwrap();
    let fires: Vec<Vec<i64>> = (0..BATCH).map(|i| Vec::<i64>::try_from(fires.get(i).to_kind(Kind::Int64)).unwrap()).collect();
    let isolated: Vec<usize> = (0..BATCH as usize).filter(|&i| (0..UNITS as usize).any(|u| fires_per_unit[u] == 1 && fires[i][u] == 1)).collect();
    let xd = x.to_kind(Kind::Double);
    let mut worst: f64 = 0.0;
    for &i in &isolated {
        let err = (&recon.candidates - xd.get(i as i64).unsqueeze(0)).abs().amax(1, false).min().double_value(&[]);
        worst = worst.max(err);
    }
    println!("trap weights: {} samples alone fire a unit; worst max |x - x_hat| over them {worst:.2e} (range 1)", isolated.len());
    assert!(isolated.len() >= 24 && worst < 1e-4, "{} isolated samples, worst error {worst:e}", isolated.len());
    assert!(a.samples_recovered >= isolated.len());

    // The same architecture at its default initialisation.
    tch::manual_seed(5);
    let honest_vs = nn::VarStore::new(Device::Cpu);
    let honest = Mlp::new(&honest_vs, D, UNITS, 10, true);
    let honest_layers = LayerMap::from_var_store(&honest_vs).unwrap();
    let honest_loss = |x: &Tensor, y: &Tensor| honest.loss(x, y);
    let settings = AttackSettings { optimisation: Some(Default::default()), ..no_optimisation() };
    let suite = Inspection::new(&honest_layers, &honest_loss, Batch::new(&x, &y)).attack_suite(&settings).unwrap();
    let h = suite.layers[0].analytic.measured().unwrap();
    let o = suite.layers[0].optimisation.measured().unwrap();
    println!(
        "honest init, fc0 analytic: {}/{} samples at >= 30 dB, {:.3} bits/dim, PSNR {:.1} dB; optimisation (300 Adam steps, batch of 32): >= {} samples, {:.3} bits/dim, PSNR {:.1} dB",
        h.samples_recovered, h.n, h.bits_per_dim, h.psnr, o.samples_recovered, o.bits_per_dim, o.psnr
    );
    assert!(h.samples_recovered < a.samples_recovered);
    assert!(!o.samples_recovered_exact && o.sample_psnr.is_empty() && o.mean_sample_psnr.is_none());
}

#[test]
fn differences_of_an_imprint_layer_recover_what_single_units_do_not() {
    let (n, bins) = (8i64, 64i64);
    let opts = (Kind::Double, Device::Cpu);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs, D, bins, 10, true);
    vs.double();
    // Every row the same direction (the mean of the pixels), biases at the bins' edges: unit k
    // fires for the inputs whose mean is above the k/bins quantile of the data.
    let reference = uniform(8192, D, 21, Kind::Double).mean_dim(1, false, Kind::Double);
    let edges = reference.quantile(&Tensor::arange(bins, opts).divide_scalar(bins as f64), 0, false, "linear");
    set(&net.fc0.ws, &Tensor::ones([bins, D], opts).divide_scalar(D as f64));
    set(net.fc0.bs.as_ref().unwrap(), &(-edges));
    // The layer after treats the bins alike (one column repeated), as an imprint module's does.
    tch::manual_seed(22);
    set(&net.fc1.ws, &Tensor::randn([10, 1], opts).expand([10, bins], false));
    let x = uniform(n, D, 23, Kind::Double);
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let suite = Inspection::new(&layers, &loss, Batch::new(&x, &y)).attack_suite(&no_optimisation()).unwrap();
    let fc0 = &suite.layers[0];
    let single = fc0.analytic.measured().unwrap();
    let diff = fc0.analytic_differences.measured().unwrap();
    println!(
        "imprint layer ({bins} bins, batch of {n}): single units {}/{n} ({:.2} bits/dim), differences {}/{n} ({:.2} bits/dim, {} candidates)",
        single.samples_recovered, single.bits_per_dim, diff.samples_recovered, diff.bits_per_dim, diff.candidates
    );
    assert!(single.samples_recovered <= 1, "single units recover {}", single.samples_recovered);
    assert!(diff.samples_recovered >= 6, "differences recover {}", diff.samples_recovered);
    assert_eq!(diff.candidates, (bins - 1) as usize - count_equal_neighbours(&net, &x, &y));
    assert_eq!(fc0.strongest, Some(AttackKind::AnalyticDifferences));
    // The recovered ones are exact to double rounding.
    for (i, p) in diff.sample_psnr.iter().enumerate() {
        assert!(*p < RECOVERY_PSNR_DB || *p > 200.0, "sample {i}: {p:.1} dB");
    }
}

/// Consecutive bins whose bias gradients are equal (no sample between their edges): the
/// differences attack skips them.
fn count_equal_neighbours(net: &Mlp, x: &Tensor, y: &Tensor) -> usize {
    let (_, gb) = net.fc0_grads(x, y);
    let gb = Vec::<f64>::try_from(gb).unwrap();
    let largest = gb.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    gb.windows(2).filter(|p| (p[0] - p[1]).abs() <= 1e-6 * largest).count()
}

#[test]
fn labels_of_a_batch_come_back_from_the_bias_gradient() {
    tch::manual_seed(31);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs, 20, 32, 10, true);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    // Distinct labels: every one recovered, with its count.
    let x = uniform(6, 20, 32, Kind::Float);
    let y = Tensor::from_slice(&[7i64, 0, 3, 9, 2, 5]);
    let suite = Inspection::new(&layers, &loss, Batch::new(&x, &y)).attack_suite(&no_optimisation()).unwrap();
    let labels = suite.labels.measured().unwrap();
    let truth = labels.truth.as_ref().unwrap();
    println!("distinct labels: recovered {:?}, counts {:?}, count error {}", labels.recovered, labels.counts, truth.count_error);
    assert_eq!(labels.recovered, [0, 2, 3, 5, 7, 9]);
    assert!(truth.set_exact && truth.correct == 6 && truth.count_error == 0);
    assert_eq!((labels.n, labels.classes), (6, 10));

    // Repeated labels, batch of 32 over 10 classes: the sign rule names present classes only.
    let x = uniform(32, 20, 33, Kind::Float);
    tch::manual_seed(34);
    let y = Tensor::randint(4, [32], (Kind::Int64, Device::Cpu)).multiply_scalar(2); // classes 0, 2, 4, 6
    let suite = Inspection::new(&layers, &loss, Batch::new(&x, &y)).attack_suite(&no_optimisation()).unwrap();
    let labels = suite.labels.measured().unwrap();
    let truth = labels.truth.as_ref().unwrap();
    println!(
        "32 samples of 4 classes: recovered {:?} of {:?}, counts {:?} (true {:?}), count error {} of 32",
        labels.recovered,
        truth.present,
        labels.counts,
        (0..10).map(|c| Vec::<i64>::try_from(&y).unwrap().iter().filter(|&&v| v == c).count()).collect::<Vec<_>>(),
        truth.count_error
    );
    assert_eq!(truth.correct, labels.recovered.len(), "the sign rule named an absent class");
    assert!(truth.set_exact);
    // The counts assume a uniform prediction; an initialised model's is not quite: they sum to
    // about n, and are off by a few each.
    let total: usize = labels.counts.iter().sum();
    assert!(total.abs_diff(32) <= 5, "counts sum to {total}");
    assert!(truth.count_error < 16, "count error {}", truth.count_error);
}

#[test]
fn attacks_that_do_not_apply_are_absent_with_their_reason() {
    let (x, y) = batch(4, 41);
    // No layer has a bias.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs, D, 16, 10, false);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let suite = Inspection::new(&layers, &loss, Batch::new(&x, &y)).attack_suite(&no_optimisation()).unwrap();
    for layer in &suite.layers {
        for m in [&layer.analytic, &layer.analytic_differences] {
            assert_eq!(m.absent_reason(), Some("no bias: the analytic attack needs a layer with a bias whose input is the model input"));
        }
        assert!(layer.optimisation.absent_reason().unwrap().starts_with("not run"));
        assert_eq!(layer.strongest, None);
    }
    assert!(suite.strongest().is_none());
    assert!(suite.labels.absent_reason().unwrap().starts_with("no layer with a weight matrix and a bias"));
    // In JSON: absent with the reason, no number.
    let json = serde_json::to_value(&suite.layers[0].analytic).unwrap();
    assert_eq!(json["status"], "absent");
    assert!(json.get("samples_recovered").is_none());

    // Token inputs: nothing continuous to reconstruct.
    let tokens = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([4, 1]);
    let vs = nn::VarStore::new(Device::Cpu);
    let emb = nn::embedding(vs.root() / "emb", 8, 4, Default::default());
    let fc = nn::linear(vs.root() / "fc", 4, 10, Default::default());
    let token_loss = |t: &Tensor, y: &Tensor| {
        Tensor::f_embedding(&emb.ws, t, -1, false, false)?.f_mean_dim(1, false, Kind::Float)?.f_linear(&fc.ws, fc.bs.as_ref())?.f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0)
    };
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let suite = Inspection::new(&layers, &token_loss, Batch::new(&tokens, &y)).attack_suite(&no_optimisation()).unwrap();
    assert!(suite.layers.iter().all(|l| l.analytic.absent_reason().unwrap().starts_with("M4 reconstructs continuous inputs")));
    assert!(suite.labels.measured().is_some(), "labels do not need continuous inputs");
    assert_eq!((suite.peak, suite.dims), (None, None));
}

#[test]
fn one_sample_non_finite_gradients_and_degenerate_layers() {
    // A batch of one: every unit it moves gives it back.
    let (x, y) = batch(1, 51);
    tch::manual_seed(52);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs, D, 16, 10, true);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let suite = Inspection::new(&layers, &loss, Batch::new(&x, &y)).attack_suite(&no_optimisation()).unwrap();
    let a = suite.layers[0].analytic.measured().unwrap();
    assert_eq!((a.n, a.samples_recovered, a.bits_per_dim), (1, 1, 0.0), "bits against the sample's own mean are 0");
    assert!(a.sample_psnr[0] > 100.0);
    let reference = AttackSettings { reference_mean: Some(vec![0.5; D as usize]), ..no_optimisation() };
    let suite = Inspection::new(&layers, &loss, Batch::new(&x, &y)).attack_suite(&reference).unwrap();
    assert!(suite.layers[0].analytic.measured().unwrap().bits_per_dim > 10.0);

    // A finite loss with a NaN gradient (sqrt at 0 times 0): never released, nothing attacked.
    let nan_loss = |x: &Tensor, y: &Tensor| net.loss(x, y)?.f_add(&net.fc0.ws.f_sum(Kind::Float)?.f_mul_scalar(0.0)?.f_sqrt()?);
    let suite = Inspection::new(&layers, &nan_loss, Batch::new(&x, &y)).attack_suite(&no_optimisation()).unwrap();
    assert!(suite.layers[0].analytic.absent_reason().unwrap().starts_with("non-finite gradient"), "{:?}", suite.layers[0].analytic);
    assert!(suite.layers[1].analytic.absent_reason().unwrap().contains("not a layer on the model input"));
    let nan = Tensor::from_slice(&[f32::NAN, 1.0]);
    assert!(recover_labels(&nan, 1, None).unwrap().absent_reason().unwrap().starts_with("non-finite gradient"));

    // A layer with no units, and one whose bias gradient is 0 everywhere.
    let empty_w = Tensor::zeros([0, 4], (Kind::Float, Device::Cpu));
    let empty_b = Tensor::zeros([0], (Kind::Float, Device::Cpu));
    let release = LinearRelease { weight: &empty_w, bias: &empty_b, grad_weight: &empty_w, grad_bias: &empty_b };
    assert_eq!(analytic(&release, 1e-6).unwrap().absent_reason(), Some("the layer has no units"));
    let (w, b) = (Tensor::ones([3, 4], (Kind::Float, Device::Cpu)), Tensor::zeros([3], (Kind::Float, Device::Cpu)));
    let release = LinearRelease { weight: &w, bias: &b, grad_weight: &w, grad_bias: &b };
    assert!(analytic(&release, 1e-6).unwrap().absent_reason().unwrap().starts_with("the bias gradient is 0"));
    assert!(analytic_differences(&release, 1e-6, 1e-6).unwrap().absent_reason().unwrap().starts_with("the bias gradient is 0"));
    // Shapes that disagree and bad settings are errors.
    let release = LinearRelease { weight: &w, bias: &b, grad_weight: &w, grad_bias: &empty_b };
    assert!(matches!(analytic(&release, 1e-6), Err(GuardError::Config { .. })));
    let bad = AttackSettings { peak: Some(f64::NAN), ..no_optimisation() };
    assert!(matches!(Inspection::new(&layers, &loss, Batch::new(&x, &y)).attack_suite(&bad), Err(GuardError::Config { .. })));
    let bad = AttackSettings { reference_mean: Some(vec![0.0; 3]), ..no_optimisation() };
    assert!(matches!(Inspection::new(&layers, &loss, Batch::new(&x, &y)).attack_suite(&bad), Err(GuardError::Config { .. })));
}

#[test]
fn scoring_matches_a_hand_computation() {
    let truth = Tensor::from_slice(&[0.0f64, 0.0, 1.0, 1.0]).reshape([2, 2]);
    // Candidates: one 0.1 off in one value, one 0.01 off in one value, one far, one NaN.
    let candidates = Tensor::from_slice(&[0.0f64, 0.1, 1.01, 1.0, 5.0, 5.0, f64::NAN, 0.0]).reshape([4, 2]);
    let s = score(AttackKind::Analytic, &truth, &candidates, 1.0, None).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b.abs().max(1.0);
    // Sample 0: squared error 0.01, MSE 0.005, PSNR 10 log10(1 / 0.005) = 23.0103 dB.
    // Sample 1: squared error 1e-4, MSE 5e-5, PSNR 43.0103 dB: the only one at >= 30 dB.
    assert_eq!((s.n, s.dims, s.candidates, s.matches.as_slice()), (2, 2, 3, [0usize, 1].as_slice()));
    assert!(close(s.sample_psnr[0], 10.0 * (1.0f64 / 0.005).log10()) && (s.sample_psnr[0] - 23.0103).abs() < 1e-4);
    assert!(close(s.sample_psnr[1], 10.0 * (1.0f64 / 5e-5).log10()) && (s.sample_psnr[1] - 43.0103).abs() < 1e-4);
    assert_eq!((s.samples_recovered, s.recovered_fraction), (1, 0.5));
    assert!(close(s.mean_sample_psnr.unwrap(), (s.sample_psnr[0] + s.sample_psnr[1]) / 2.0) && (s.mean_sample_psnr.unwrap() - 33.0103).abs() < 1e-4);
    // MSE = (0.01 + 1e-4) / 4 = 0.002525; baseline: x_bar = (0.5, 0.5), (0.5 + 0.5) / 4 = 0.25.
    assert!(close(s.mse, 0.002525) && close(s.baseline_mse, 0.25));
    assert!(close(s.psnr, 10.0 * (1.0f64 / 0.002525).log10()));
    // bits = 0.5 log2(0.25 / 0.002525) = 0.5 log2(99.0099) = 3.3148.
    assert!(close(s.bits_per_dim, 0.5 * (0.25f64 / 0.002525).log2()) && (s.bits_per_dim - 3.3148).abs() < 1e-4, "{}", s.bits_per_dim);
    // Against a reference mean of 0: baseline (0 + 2) / 4 = 0.5, twice the batch mean's: half a bit more.
    let r = score(AttackKind::Analytic, &truth, &candidates, 1.0, Some(&[0.0, 0.0])).unwrap();
    assert!(close(r.baseline_mse, 0.5) && close(r.bits_per_dim - s.bits_per_dim, 0.5));
    // Peak 2: every PSNR 20 log10(2) = 6.0206 dB higher; sample 0 at 29.03 dB still misses 30.
    let p = score(AttackKind::Analytic, &truth, &candidates, 2.0, None).unwrap();
    assert!(close(p.sample_psnr[0] - s.sample_psnr[0], 20.0 * 2f64.log10()) && p.samples_recovered == 1);
    // No candidate reconstructs below the mean's error: 0 bits, not negative.
    let far = Tensor::from_slice(&[9.0f64, 9.0]).reshape([1, 2]);
    assert_eq!(score(AttackKind::Analytic, &truth, &far, 1.0, None).unwrap().bits_per_dim, 0.0);
    // Errors: mismatched widths, no finite candidate, a bad peak, an empty batch.
    assert!(matches!(score(AttackKind::Analytic, &truth, &Tensor::zeros([2, 3], (Kind::Double, Device::Cpu)), 1.0, None), Err(GuardError::Config { .. })));
    assert!(score(AttackKind::Analytic, &truth, &Tensor::from_slice(&[f64::NAN, 0.0]).reshape([1, 2]), 1.0, None).is_err());
    assert!(score(AttackKind::Analytic, &truth, &far, 0.0, None).is_err());
    assert!(matches!(score(AttackKind::Analytic, &Tensor::zeros([0, 2], (Kind::Double, Device::Cpu)), &far, 1.0, None), Err(GuardError::EmptyBatch)));
    assert!(matches!(score(AttackKind::Analytic, &Tensor::zeros([2, 0], (Kind::Double, Device::Cpu)), &far, 1.0, None), Err(GuardError::Config { .. })));
}
