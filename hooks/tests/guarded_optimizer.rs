//! The optimizer wrapper applies the step after the guard, and fails closed.
use gradguard_guard::{Batch, BlockReason, Release, Settings};
use gradguard_hooks::GuardedOptimizer;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

fn params(vs: &nn::VarStore) -> Vec<Tensor> {
    vs.trainable_variables().iter().map(|t| t.detach().copy()).collect()
}

#[test]
fn steps_after_the_guard_and_refuses_non_finite_gradients() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let lin = nn::linear(vs.root() / "fc", 4, 3, Default::default());
    let loss_fn = |x: &Tensor, y: &Tensor| {
        x.f_linear(&lin.ws, lin.bs.as_ref())?.f_log_softmax(-1, None)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100)
    };
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
