//! The estimators observe the model and leave it as they found it: buffers (batch norm's
//! running statistics) are restored after every estimator's passes, also when it fails; a
//! model that cannot run on one sample has M2 and M3 absent with the reason, not an error.
mod common;

use common::cross_entropy;
use gradguard_guard::{Batch, Inspection, LayerMap, Metric, measure::{SensitivitySettings, SubspaceSettings, UsableSettings}};
use tch::{nn, nn::ModuleT, Device, Kind, TchError, Tensor};

/// fc -> batch norm (training mode) -> relu -> fc.
struct BnMlp {
    fc1: nn::Linear,
    bn: nn::BatchNorm,
    fc2: nn::Linear,
}

impl BnMlp {
    fn new(vs: &nn::VarStore) -> Self {
        let root = vs.root();
        Self {
            fc1: nn::linear(&root / "fc1", 6, 8, Default::default()),
            bn: nn::batch_norm1d(&root / "bn", 8, Default::default()),
            fc2: nn::linear(&root / "fc2", 8, 3, Default::default()),
        }
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let h = x.f_linear(&self.fc1.ws, self.fc1.bs.as_ref())?;
        let h = self.bn.forward_t(&h, true).f_relu()?;
        cross_entropy(&h.f_linear(&self.fc2.ws, self.fc2.bs.as_ref())?, y)
    }
}

fn data() -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(3);
    let x = Tensor::randn([16, 6], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(3, [16], (Kind::Int64, Device::Cpu));
    let a = Tensor::from_slice(&(0..16).map(|i| i % 2).collect::<Vec<i64>>());
    (x, y, a)
}

fn buffers(map: &LayerMap) -> Vec<Tensor> {
    map.buffers().iter().map(|(_, t)| t.detach().copy()).collect()
}

fn unchanged(before: &[Tensor], map: &LayerMap) -> bool {
    before.iter().zip(map.buffers()).all(|(b, (_, t))| b.equal(t))
}

#[test]
fn a_var_stores_untrainable_variables_are_the_buffers_and_frozen_parameters_are_not() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = BnMlp::new(&vs);
    let map = LayerMap::from_var_store(&vs).unwrap();
    let mut names: Vec<&str> = map.buffers().iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["bn.running_mean", "bn.running_var"]);
    assert_eq!(map.names(), ["fc1", "bn", "fc2"], "buffers form no layer");
    let _frozen = vs.root().var("frozen", &[2], nn::Init::Const(1.0)).set_requires_grad(false);
    let map = LayerMap::from_var_store(&vs).unwrap();
    assert_eq!(map.buffers().len(), 2, "a frozen trainable variable is not a buffer");
}

#[test]
fn every_estimator_restores_the_buffers_bit_for_bit() {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = BnMlp::new(&vs);
    let map = LayerMap::from_var_store(&vs).unwrap();
    let (x, y, a) = data();
    let loss_fn = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let look = Inspection::new(&map, &loss_fn, Batch::new(&x, &y).with_attribute(&a)).seeded(1, 0);
    let before = buffers(&map);
    look.sensitivity(&SensitivitySettings::default()).unwrap();
    assert!(unchanged(&before, &map), "M1 (probes)");
    look.jvp_samples(&SensitivitySettings::default()).unwrap();
    assert!(unchanged(&before, &map), "M1 (kept JVPs)");
    look.subspace(&SubspaceSettings { samples_per_group: 4, ..Default::default() }).unwrap();
    assert!(unchanged(&before, &map), "M2");
    // The per-sample passes of a batch norm on one value per channel: M3 absent, buffers back.
    let m3 = look.usable_information(&UsableSettings { min_samples: 8, ..Default::default() }).unwrap();
    assert!(unchanged(&before, &map), "M3");
    assert!(matches!(&m3[0], Metric::Absent { reason } if reason.contains("bn.running_var non-finite")), "{:?}", m3[0]);
    // The loss itself moved them once per call, outside any estimator.
    let _ = loss_fn(&x, &y).unwrap();
    assert!(!unchanged(&before, &map), "a training-mode forward pass moves the running statistics");
}

#[test]
fn a_failing_estimator_restores_the_buffers_too() {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = BnMlp::new(&vs);
    let map = LayerMap::from_var_store(&vs).unwrap();
    let (x, y, _) = data();
    // Runs the model (moving the statistics), then returns a loss that is not a scalar.
    let not_scalar = |x: &Tensor, y: &Tensor| net.loss(x, y)?.f_reshape([1])?.f_repeat([2]);
    let before = buffers(&map);
    let failed = Inspection::new(&map, &not_scalar, Batch::new(&x, &y)).sensitivity(&SensitivitySettings::default());
    assert!(failed.is_err());
    assert!(unchanged(&before, &map));
}

#[test]
fn a_loss_that_fails_or_panics_on_one_sample_leaves_m2_and_m3_absent_with_its_message() {
    let vs = nn::VarStore::new(Device::Cpu);
    let fc = nn::linear(vs.root() / "fc", 6, 3, Default::default());
    let map = LayerMap::from_var_store(&vs).unwrap();
    let (x, y, a) = data();
    // What a scripted PyTorch batch norm returns on one sample, as an error and as tch's
    // panicking `nn` forms raise it.
    let message = "Expected more than 1 value per channel when training, got input size [1, 3]\nException raised from batch_norm";
    let erring = |x: &Tensor, y: &Tensor| {
        if x.size()[0] == 1 {
            return Err(TchError::Torch(message.into()));
        }
        cross_entropy(&x.f_linear(&fc.ws, fc.bs.as_ref())?, y)
    };
    let panicking = |x: &Tensor, y: &Tensor| {
        assert!(x.size()[0] > 1, "{:?}", TchError::Torch(message.into()));
        cross_entropy(&x.f_linear(&fc.ws, fc.bs.as_ref())?, y)
    };
    let subspace = SubspaceSettings { samples_per_group: 4, ..Default::default() };
    let usable = UsableSettings { min_samples: 8, ..Default::default() };
    for loss in [&erring as &dyn gradguard_guard::LossFn, &panicking] {
        let look = Inspection::new(&map, loss, Batch::new(&x, &y).with_attribute(&a));
        assert!(look.sensitivity(&SensitivitySettings::default()).unwrap()[0].measured().is_some(), "M1 runs on the batch");
        let m2 = look.subspace(&subspace).unwrap();
        let m3 = look.usable_information(&usable).unwrap();
        for reason in [m2[0].absent_reason(), m3[0].absent_reason()] {
            let reason = reason.expect("absent");
            assert!(reason.contains("one sample") && reason.ends_with("got input size [1, 3]"), "{reason}");
        }
        assert!(matches!(look.per_sample_gradients(), Err(gradguard_guard::GuardError::NoPerSampleGradients { .. })));
    }
}
