//! M1's JVP routes agree on a batch-norm CNN in f64 (METRICS.md, M1): exact mode through the
//! input basis (J e_j = d<dL/dx, e_j>/dW, the probes' route) equals exact mode through the
//! parameter basis (one VJP of each G_q, another route through autograd); with the same probes,
//! the double backward and central differences agree on a smooth network; on a ReLU network the
//! double-backward estimator is within 3 standard errors of exact mode. (Central differences
//! are not held to that on ReLU networks: a kink inside [x - e v, x + e v] adds its jump / 2e to
//! the quotient; benches/real_models.rs measures the gap on the ResNet.)
mod common;

use common::cross_entropy;
use gradguard_guard::{Batch, Inspection, LayerMap, Metric, measure::SensitivitySettings, report::JvpMethod};
use tch::{nn, Device, Kind, TchError, Tensor};

/// conv(1 -> 3, 3x3) -> batch norm (training mode) -> activation -> flatten -> linear(3*4*4 -> 2).
struct BnCnn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    fc: nn::Linear,
    smooth: bool,
}

impl BnCnn {
    fn new(vs: &nn::VarStore, smooth: bool) -> Self {
        let root = vs.root();
        Self {
            conv: nn::conv2d(&root / "conv", 1, 3, 3, Default::default()),
            bn: nn::batch_norm2d(&root / "bn", 3, Default::default()),
            fc: nn::linear(&root / "fc", 3 * 4 * 4, 2, Default::default()),
            smooth,
        }
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let h = x.f_conv2d(&self.conv.ws, self.conv.bs.as_ref(), [1, 1], [0, 0], [1, 1], 1)?;
        let h = h.f_batch_norm(self.bn.ws.as_ref(), self.bn.bs.as_ref(), Some(&self.bn.running_mean), Some(&self.bn.running_var), true, 0.1, 1e-5, false)?;
        let h = if self.smooth { h.f_tanh()? } else { h.f_relu()? };
        cross_entropy(&h.f_flatten(1, -1)?.f_linear(&self.fc.ws, self.fc.bs.as_ref())?, y)
    }
}

/// Tests in this binary run on parallel threads and libtorch's generator is global: seeding
/// and drawing under one lock gives every call the same model and batch.
static DRAWS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn setup(smooth: bool) -> (nn::VarStore, BnCnn, Tensor, Tensor) {
    let _draws = DRAWS.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = BnCnn::new(&vs, smooth);
    vs.double();
    let x = Tensor::randn([6, 1, 6, 6], (Kind::Double, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 0, 1, 1, 0]);
    (vs, net, x, y)
}

fn values(metrics: &[Metric<gradguard_guard::report::Sensitivity>]) -> Vec<f64> {
    metrics.iter().map(|m| m.measured().expect("measured").sensitivity).collect()
}

fn standard_errors(metrics: &[Metric<gradguard_guard::report::Sensitivity>]) -> Vec<f64> {
    metrics.iter().map(|m| m.measured().expect("measured").sensitivity_se).collect()
}

fn measure(smooth: bool, settings: &SensitivitySettings) -> Vec<Metric<gradguard_guard::report::Sensitivity>> {
    let (vs, net, x, y) = setup(smooth);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    Inspection::new(&layers, &loss, Batch::new(&x, &y)).seeded(3, 1).sensitivity(settings).unwrap()
}

fn sensitivity(smooth: bool, settings: &SensitivitySettings) -> Vec<f64> {
    values(&measure(smooth, settings))
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

#[test]
fn exact_mode_through_the_input_basis_equals_the_parameter_basis_under_batch_norm() {
    let exact = SensitivitySettings { exact: true, ..Default::default() };
    for smooth in [true, false] {
        // Exact mode enumerates the smaller side: inputs (n x 36) against P = 30 + 6 + 98 = 134.
        let (vs, net, x, y) = setup(smooth);
        let layers = LayerMap::from_var_store(&vs).unwrap();
        let p = layers.numel() as i64;
        let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
        // Three samples (108 inputs <= P): input basis. The same three samples tiled to 12 (432
        // inputs > P) use the parameter basis; tiling k times divides every J_{l,i} by k and
        // keeps the batch statistics, so S_l falls by exactly k.
        let (x3, y3) = (x.narrow(0, 0, 3), y.narrow(0, 0, 3));
        assert!(x3.numel() as i64 <= p && 4 * x3.numel() as i64 > p, "P = {p}");
        let by_inputs = values(&Inspection::new(&layers, &loss, Batch::new(&x3, &y3)).sensitivity(&exact).unwrap());
        let (x12, y12) = (x3.repeat([4, 1, 1, 1]), y3.repeat([4]));
        let by_params = values(&Inspection::new(&layers, &loss, Batch::new(&x12, &y12)).sensitivity(&exact).unwrap());
        for (l, (a, b)) in by_inputs.iter().zip(&by_params).enumerate() {
            assert!(*a > 0.0, "layer {l} has a sensitivity");
            assert!(relative(*a, 4.0 * b) < 1e-9, "smooth={smooth} layer {l}: input basis {a} vs parameter basis {b} x 4");
        }
    }
}

#[test]
fn same_probes_give_the_same_jvps_by_double_backward_and_central_differences_on_a_smooth_net() {
    let with = |method| SensitivitySettings { probes: 8, method, exact: false, probe_samples: None };
    let db = sensitivity(true, &with(JvpMethod::DoubleBackward));
    let cd = sensitivity(true, &with(JvpMethod::CentralDifference));
    for (l, (a, b)) in db.iter().zip(&cd).enumerate() {
        assert!(relative(*b, *a) < 1e-6, "layer {l}: double backward {a} vs central differences {b}");
    }
}

#[test]
fn on_a_relu_net_the_256_probe_double_backward_is_within_three_standard_errors_of_exact_mode() {
    let exact = sensitivity(false, &SensitivitySettings { exact: true, ..Default::default() });
    let probes = |method| SensitivitySettings { probes: 256, method, exact: false, probe_samples: None };
    let db = measure(false, &probes(JvpMethod::DoubleBackward));
    for (l, ((e, d), se)) in exact.iter().zip(values(&db)).zip(standard_errors(&db)).enumerate() {
        assert!(se > 0.0 && (d - e).abs() < 3.0 * se, "layer {l}: 256-probe double backward {d} ± {se} vs exact {e}");
    }
}
