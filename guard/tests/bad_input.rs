//! Every bad input gives a typed error or an absent metric with its reason: never a panic or
//! a silent 0.
mod common;
use gradguard_guard::{Batch, BlockReason, GuardError, LayerMap, Policy, PolicyError, Release, Settings, measure::parse_device};
use tch::{nn, Device, Kind, Tensor};

struct Setup {
    vs: nn::VarStore,
    mlp: common::Mlp,
    unused: nn::Linear,
}

fn setup() -> Setup {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[6, 8, 3]);
    let unused = nn::linear(vs.root() / "unused_head", 8, 2, Default::default());
    Setup { vs, mlp, unused }
}

fn data(n: i64) -> (Tensor, Tensor, Tensor) {
    let x = common::gaussian(n, 6, 1, Kind::Float);
    let y = Tensor::from_slice(&(0..n).map(|i| i % 3).collect::<Vec<i64>>());
    let a = Tensor::from_slice(&(0..n).map(|i| i % 2).collect::<Vec<i64>>());
    (x, y, a)
}

fn backward(s: &Setup, x: &Tensor, y: &Tensor) {
    for p in s.vs.trainable_variables() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    s.mlp.loss(x, y).unwrap().backward();
}

#[test]
fn wrong_input_shape_after_the_first_batch() {
    let s = setup();
    let mut guard = common::guard(&s.vs, common::unbudgeted());
    let loss = |x: &Tensor, y: &Tensor| s.mlp.loss(x, y);
    let (x, y, _) = data(8);
    backward(&s, &x, &y);
    guard.after_backward(&Batch::new(&x, &y), &loss).unwrap();
    let wide = Tensor::zeros([8, 7], (Kind::Float, Device::Cpu));
    match guard.after_backward(&Batch::new(&wide, &y), &loss) {
        Err(GuardError::InputShape { expected, got }) => assert_eq!((expected, got), (vec![6], vec![7])),
        other => panic!("expected InputShape, got {other:?}"),
    }
}

#[test]
fn a_model_that_rejects_the_shape_is_a_torch_error_naming_the_step() {
    let s = setup();
    let mut guard = common::guard(&s.vs, common::unbudgeted());
    let loss = |x: &Tensor, y: &Tensor| s.mlp.loss(x, y);
    let wide = Tensor::zeros([8, 7], (Kind::Float, Device::Cpu));
    let (_, y, _) = data(8);
    let err = guard.estimate(&Batch::new(&wide, &y), &loss).unwrap_err();
    assert!(matches!(err, GuardError::Torch { context: "computing the loss from the batch", .. }), "{err}");
}

#[test]
fn attribute_length_and_kind_must_fit_the_batch() {
    let s = setup();
    let mut guard = common::guard(&s.vs, common::unbudgeted());
    let loss = |x: &Tensor, y: &Tensor| s.mlp.loss(x, y);
    let (x, y, _) = data(8);
    let short = Tensor::from_slice(&[0i64, 1, 0]);
    let err = guard.estimate(&Batch::new(&x, &y).with_attribute(&short), &loss).unwrap_err();
    assert!(matches!(err, GuardError::BatchMismatch { what: "attribute labels", inputs: 8, got: 3 }), "{err}");
    let float = Tensor::zeros([8], (Kind::Float, Device::Cpu));
    let err = guard.estimate(&Batch::new(&x, &y).with_attribute(&float), &loss).unwrap_err();
    assert!(matches!(err, GuardError::AttributeKind(_)), "{err}");
    let err = guard.estimate(&Batch::new(&x, &y.narrow(0, 0, 5)), &loss).unwrap_err();
    assert!(matches!(err, GuardError::BatchMismatch { what: "targets", inputs: 8, got: 5 }), "{err}");
}

#[test]
fn empty_batch() {
    let s = setup();
    let mut guard = common::guard(&s.vs, common::unbudgeted());
    let loss = |x: &Tensor, y: &Tensor| s.mlp.loss(x, y);
    let x = Tensor::zeros([0, 6], (Kind::Float, Device::Cpu));
    let y = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    assert!(matches!(guard.estimate(&Batch::new(&x, &y), &loss), Err(GuardError::EmptyBatch)));
}

#[test]
fn a_layer_the_loss_does_not_reach_is_absent_with_its_reason() {
    let s = setup();
    let _ = &s.unused;
    // M2 inline: read by no rule, it would otherwise come from the worker one estimate later.
    let mut guard = common::guard(&s.vs, Settings { estimate_every: 1, background_estimates: false, ..common::unbudgeted() });
    assert_eq!(guard.layers().names(), vec!["fc0", "fc1", "unused_head"]);
    let loss = |x: &Tensor, y: &Tensor| s.mlp.loss(x, y);
    let (x, y, a) = data(16);
    backward(&s, &x, &y);
    let report = guard.after_backward(&Batch::new(&x, &y).with_attribute(&a), &loss).unwrap().into_report();
    let unused = report.layer("unused_head").unwrap();
    assert!(unused.sensitivity.absent_reason().unwrap().contains("not used by the loss"));
    assert!(unused.gradient.absent_reason().unwrap().contains("no gradient"));
    assert!(unused.subspace.absent_reason().is_some());
    assert!(report.layer("fc0").unwrap().sensitivity.measured().is_some());
    assert!(report.layer("fc0").unwrap().subspace.measured().is_some());
}

#[test]
fn too_few_samples_per_attribute_value_is_absent_not_zero() {
    let s = setup();
    let mut guard = common::guard(&s.vs, common::unbudgeted());
    let loss = |x: &Tensor, y: &Tensor| s.mlp.loss(x, y);
    let (x, y, _) = data(8);
    let a = Tensor::from_slice(&[0i64, 0, 0, 0, 0, 0, 1, 1]);
    let report = guard.estimate(&Batch::new(&x, &y).with_attribute(&a), &loss).unwrap();
    let reason = report.layers[0].subspace.absent_reason().unwrap();
    assert!(reason.contains("insufficient samples") && reason.contains("value 1 has 2"), "{reason}");
    let one_value = Tensor::zeros([8], (Kind::Int64, Device::Cpu));
    let report = guard.estimate(&Batch::new(&x, &y).with_attribute(&one_value), &loss).unwrap();
    assert!(report.layers[0].subspace.absent_reason().unwrap().contains("single value"));
}

#[test]
fn non_finite_loss_and_gradients() {
    let s = setup();
    let mut guard = common::guard(&s.vs, common::unbudgeted());
    let loss = |x: &Tensor, y: &Tensor| s.mlp.loss(x, y);
    let (x, y, _) = data(8);
    let poisoned = x.copy();
    let _ = poisoned.get(3).get(2).fill_(f64::NAN);
    match guard.estimate(&Batch::new(&poisoned, &y), &loss) {
        Err(GuardError::NonFiniteLoss { value, .. }) => assert!(value.is_nan()),
        other => panic!("expected NonFiniteLoss, got {other:?}"),
    }
    backward(&s, &poisoned, &y);
    match guard.after_backward(&Batch::new(&poisoned, &y), &loss) {
        Ok(Release::Blocked { reason: BlockReason::NonFinite { layers }, report, .. }) => {
            assert_eq!(layers, vec!["fc0", "fc1"]);
            assert!(report.layer("fc0").unwrap().gradient.measured().unwrap().non_finite > 0);
        }
        other => panic!("expected a block for the non-finite gradient, got {other:?}"),
    }
}

#[test]
fn the_loss_must_be_a_scalar_computed_from_the_inputs() {
    let s = setup();
    let mut guard = common::guard(&s.vs, common::unbudgeted());
    let (x, y, _) = data(8);
    let per_sample = |x: &Tensor, _y: &Tensor| s.mlp.forward(x)?.f_sum_dim_intlist(1, false, Kind::Float);
    assert!(matches!(guard.estimate(&Batch::new(&x, &y), &per_sample), Err(GuardError::LossNotScalar(shape)) if shape == vec![8]));
}

#[test]
fn bad_settings_and_devices() {
    let s = setup();
    let _ = &s;
    let named = |settings: Settings, field: &str| match Policy::permissive_with(settings) {
        Err(PolicyError::Invalid { location, .. }) => assert_eq!(location, format!("settings.{field}")),
        other => panic!("expected settings.{field} to be rejected, got {other:?}"),
    };
    named(Settings { probes: 1, ..Default::default() }, "probes");
    named(Settings { estimate_every: 0, ..Default::default() }, "estimate_every");
    assert!(matches!(parse_device("tpu"), Err(GuardError::UnknownDevice { .. })));
    assert!(matches!(parse_device("cuda:64"), Err(GuardError::UnknownDevice { .. })));
    assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
    let empty = nn::VarStore::new(Device::Cpu);
    assert!(matches!(LayerMap::from_var_store(&empty), Err(GuardError::NoParameters)));
}
