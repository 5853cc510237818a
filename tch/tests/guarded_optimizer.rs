//! The optimizer wrapper applies the step after the guard, and fails closed.
use gradguard_guard::{Batch, BlockReason, Release, Settings};
use gradguard_tch::GuardedOptimizer;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

/// A seeded linear layer from 4 features to 3 classes.
fn linear_classifier() -> (nn::VarStore, nn::Linear) {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let lin = nn::linear(vs.root() / "fc", 4, 3, Default::default());
    (vs, lin)
}

/// Its batch-mean negative log-likelihood.
fn nll(lin: &nn::Linear, x: &Tensor, y: &Tensor) -> Result<Tensor, tch::TchError> {
    x.f_linear(&lin.ws, lin.bs.as_ref())?.f_log_softmax(-1, None)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100)
}

fn params(vs: &nn::VarStore) -> Vec<Tensor> {
    vs.trainable_variables().iter().map(|t| t.detach().copy()).collect()
}

#[test]
fn steps_after_the_guard_and_refuses_non_finite_gradients() {
    let (vs, lin) = linear_classifier();
    let loss_fn = |x: &Tensor, y: &Tensor| nll(&lin, x, y);
    let settings = Settings { estimate_every: 1, ..Default::default() };
    let mut opt = GuardedOptimizer::builder(&vs, nn::Sgd::default().build(&vs, 0.5).unwrap()).settings(settings).loss(loss_fn).build().unwrap();
    let x = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]);

    let before = params(&vs);
    let release = opt.backward_step(&loss_fn(&x, &y).unwrap(), &Batch::new(&x, &y)).unwrap();
    assert!(release.is_released());
    let report = release.report();
    assert_eq!(report.step, 0);
    assert!(report.layers[0].sensitivity.measured().is_some());
    let after = params(&vs);
    assert!(before.iter().zip(&after).any(|(a, b)| !a.equal(b)), "a finite step is applied");

    let poisoned = x.copy();
    let _ = poisoned.get(0).get(0).fill_(f64::INFINITY);
    let release = opt.backward_step(&loss_fn(&poisoned, &y).unwrap(), &Batch::new(&poisoned, &y)).unwrap();
    assert!(
        matches!(&release, Release::Blocked { reason: BlockReason::NonFinite { .. }, report, .. } if report.step == 1),
        "{:?}",
        release.block_reason()
    );
    let unchanged = params(&vs);
    assert!(after.iter().zip(&unchanged).all(|(a, b)| a.equal(b)), "a non-finite step is not applied");
    for p in vs.trainable_variables() {
        assert!(!p.grad().defined() || p.grad().abs().sum(Kind::Double).double_value(&[]) == 0.0, "gradients cleared");
    }
}

#[test]
fn a_torchscript_model_trains_through_the_builder_and_saves_for_torch_jit_load() {
    use gradguard_tch::TorchScriptModel;
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cnn_traced.pt");
    let mut model = TorchScriptModel::load(&fixture, Device::Cpu).unwrap();
    assert!(!model.is_training(), "loads in eval mode");
    model.set_train().unwrap();
    assert!(model.is_training());
    let loss_fn = |x: &Tensor, y: &Tensor| model.f_forward(x)?.f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0);
    let opt = nn::Sgd::default().build(model.var_store(), 0.1).unwrap();
    let mut opt = GuardedOptimizer::builder_for_torchscript(&model, opt).loss(loss_fn).build().unwrap();
    assert_eq!(opt.guard().layers().names(), ["conv1", "conv2", "fc1", "fc2"]);
    let x = Tensor::randn([8, 1, 8, 8], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
    let before: Vec<Tensor> = model.named_parameters().iter().map(|(_, t)| t.detach().copy()).collect();
    assert!(opt.backward_step(&loss_fn(&x, &y).unwrap(), &Batch::new(&x, &y)).unwrap().is_released());
    drop(opt);
    let trained: Vec<Tensor> = model.named_parameters().iter().map(|(_, t)| t.detach().copy()).collect();
    assert!(before.iter().zip(&trained).any(|(a, b)| !a.equal(b)), "the step trained the module's own parameters");

    model.set_eval().unwrap();
    let saved = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hooks_trained.pt");
    model.save(&saved).unwrap();
    let reloaded = TorchScriptModel::load(&saved, Device::Cpu).unwrap();
    let names: Vec<String> = reloaded.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
    assert!(reloaded.named_parameters().iter().zip(&trained).all(|((_, a), b)| a.equal(b)), "the file holds the trained parameters");
    let missing = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("no_such_dir/x.pt");
    assert!(matches!(model.save(&missing), Err(gradguard_tch::TorchScriptError::Save { .. })));
}

/// The step driver fails closed as the user's own backward does: a non-finite loss, on a step
/// that estimates (the graph is built with create_graph) and on one that does not, is blocked
/// by name and nothing is applied; a finite step then trains and reports its loss.
#[test]
fn the_step_driver_blocks_a_non_finite_step_with_or_without_an_estimate() {
    let (vs, lin) = linear_classifier();
    let loss_fn = |x: &Tensor, y: &Tensor| nll(&lin, x, y);
    // Estimates every other step at most (budget unbounded).
    let settings = Settings { estimate_every: 2, budget_share: 1.0, background_estimates: false, ..Default::default() };
    let mut opt = GuardedOptimizer::builder(&vs, nn::Sgd::default().build(&vs, 0.5).unwrap()).settings(settings).loss(loss_fn).build().unwrap();
    let x = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]);
    let poisoned = x.copy();
    let _ = poisoned.get(0).get(0).fill_(f64::NAN);
    let release = opt.train_step(&Batch::new(&x, &y)).unwrap();
    assert!(release.is_released() && release.report().estimated, "step 0 estimates: {:?}", release.block_reason());
    // Step 1 does not estimate (a plain backward), step 2 would (the graph with create_graph).
    for step in 1..3u64 {
        let before = params(&vs);
        let release = opt.train_step(&Batch::new(&poisoned, &y)).unwrap();
        assert!(matches!(&release, Release::Blocked { reason: BlockReason::NonFinite { .. }, .. }), "step {step}: {:?}", release.block_reason());
        assert_eq!(release.report().step, step);
        assert!(release.report().loss.is_some_and(f64::is_nan), "the report carries the step's loss");
        assert!(before.iter().zip(params(&vs)).all(|(a, b)| a.equal(&b)), "step {step}: nothing applied");
    }
    let before = params(&vs);
    let release = opt.train_step(&Batch::new(&x, &y)).unwrap();
    assert!(release.is_released() && release.report().estimated, "step 3 estimates: {:?}", release.block_reason());
    let loss = release.report().loss.unwrap();
    assert!(loss.is_finite() && (loss - loss_fn(&x, &y).unwrap().double_value(&[])).abs() < 1.0, "a finite loss: {loss}");
    assert!(before.iter().zip(params(&vs)).any(|(a, b)| !a.equal(&b)), "a finite step is applied");
}
