//! A layer whose gradient moves with the inputs along a path autograd did not record (here a
//! `.detach()` of frozen features; in PyTorch also `torch.no_grad` or a once-differentiable
//! function) is measured, not reported "safe": the double backward would give its M1 as exactly
//! 0 (it differentiates the record). The estimator sees which parameters its double-backward JVPs
//! reach, flags a layer with a nonzero gradient they do not reach (`graph_cut`) and measures M1
//! by central differences instead, for every caller (the guard, `gradguard audit`); the guard
//! names those layers in the report's health and goes on by central differences. The numbers
//! equal those of the same function with the record intact. A model with nothing cut keeps the
//! double backward.
mod common;

use common::{cross_entropy, unbudgeted};
use gradguard_guard::report::{JvpMethod, Report};
use gradguard_guard::{measure::SensitivitySettings, Batch, Guard, Inspection, LayerMap, Policy, Settings};
use tch::{nn, Device, Kind, TchError, Tensor};

/// A frozen feature extractor (tanh(x W0), not a parameter) and a trainable linear head.
struct Probe {
    w0: Tensor,
    head: nn::Linear,
}

impl Probe {
    fn loss(&self, x: &Tensor, y: &Tensor, detach: bool) -> Result<Tensor, TchError> {
        let features = x.f_mm(&self.w0)?.f_tanh()?;
        let features = if detach { features.f_detach()? } else { features };
        cross_entropy(&features.f_linear(&self.head.ws, self.head.bs.as_ref())?, y)
    }
}

/// Tests in this binary may run on parallel threads and libtorch's generator is global:
/// seeding and drawing under one lock gives every call the same model and batch.
static DRAWS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn setup() -> (nn::VarStore, Probe, Tensor, Tensor) {
    let _draws = DRAWS.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let head = nn::linear(vs.root() / "head", 12, 3, Default::default());
    vs.double();
    let w0 = Tensor::randn([6, 12], (Kind::Double, Device::Cpu));
    let x = Tensor::randn([16, 6], (Kind::Double, Device::Cpu));
    let y = Tensor::randint(3, [16], (Kind::Int64, Device::Cpu));
    (vs, Probe { w0, head }, x, y)
}

fn audit(detach: bool, settings: Settings) -> Report {
    let (vs, net, x, y) = setup();
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), Policy::permissive_with(settings).unwrap()).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y, detach);
    guard.estimate(&Batch::new(&x, &y), &loss).unwrap()
}

fn settings() -> Settings {
    Settings { probes: 16, ..unbudgeted() }
}

#[test]
fn a_head_on_detached_features_is_measured_by_central_differences_and_named() {
    let cut = audit(true, settings());
    let check = cut.health.autograd_check.as_ref().expect("checked at the first estimate");
    assert_eq!(check.cut_layers, vec!["head".to_string()]);
    let s = cut.layer("head").unwrap().sensitivity.measured().expect("measured").clone();
    assert_eq!(s.method, JvpMethod::CentralDifference);
    assert!(s.graph_cut);
    // The same function with the record intact, by the double backward, with the same probes.
    let whole = audit(false, settings());
    assert_eq!(whole.health.autograd_check.as_ref().unwrap().cut_layers, Vec::<String>::new());
    let reference = whole.layer("head").unwrap().sensitivity.measured().expect("measured").clone();
    assert_eq!(reference.method, JvpMethod::DoubleBackward);
    assert!(!reference.graph_cut);
    assert!(s.sensitivity > 0.0);
    // f64 central differences with the same probe directions: the same number to rounding.
    let gap = (s.sensitivity - reference.sensitivity).abs();
    assert!(gap <= 1e-5 * reference.sensitivity, "{s:?} vs {reference:?}");
}

#[test]
fn exact_mode_on_a_cut_model_falls_back_to_probes_and_says_so() {
    let cut = audit(true, Settings { exact_sensitivity: true, ..settings() });
    let s = cut.layer("head").unwrap().sensitivity.measured().expect("measured").clone();
    assert!(!s.exact && s.method == JvpMethod::CentralDifference && s.sensitivity > 0.0, "{s:?}");
}

#[test]
fn the_estimator_itself_falls_back_for_every_caller() {
    // What `gradguard audit` calls: the inspection, no guard.
    let (vs, net, x, y) = setup();
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y, true);
    let settings = SensitivitySettings { probes: 8, ..Default::default() };
    let m1 = Inspection::new(&layers, &loss, Batch::new(&x, &y)).sensitivity(&settings).unwrap();
    let s = m1[0].measured().expect("measured");
    assert!(s.graph_cut && s.method == JvpMethod::CentralDifference && s.sensitivity > 0.0, "{s:?}");
    // The kept JVPs (M5, the closed loop, audits of a defended release) too.
    let jv = Inspection::new(&layers, &loss, Batch::new(&x, &y)).jvp_samples(&settings).unwrap();
    assert_eq!((jv.method, jv.graph_cut.clone()), (JvpMethod::CentralDifference, vec![true]));
    let kept = jv.sensitivity(&layers).unwrap();
    assert!((kept[0].measured().unwrap().sensitivity - s.sensitivity).abs() <= 1e-9 * s.sensitivity);
}
