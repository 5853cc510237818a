//! The same seed gives bit-identical reports on CPU; another seed gives other probes.
mod common;
use gradguard_guard::{Batch, Report, Settings};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

fn run(seed: u64) -> Vec<Report> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[10, 12, 3]);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    // Inline M2 (no worker), so that each report holds its own step's results; M1's route
    // pinned (unset, the third estimate's route is chosen by measured time).
    let settings = Settings { seed, estimate_every: 1, background_estimates: false, probe_samples: Some(10), ..common::unbudgeted() };
    let mut guard = common::guard(&vs, settings);
    let x = common::gaussian(40, 10, 1, Kind::Float);
    let y = Tensor::from_slice(&(0..40).map(|i| i % 3).collect::<Vec<i64>>());
    let a = Tensor::from_slice(&(0..40).map(|i| (i / 2) % 2).collect::<Vec<i64>>());
    let loss_fn = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
    (0..3)
        .map(|_| {
            opt.zero_grad();
            mlp.loss(&x, &y).unwrap().backward();
            let r = guard.after_backward(&Batch::new(&x, &y).with_attribute(&a), &loss_fn).unwrap().into_report();
            opt.step();
            // Wall times are the fields that are measured, not computed.
            let mut r = Report { estimate_seconds: None, ..r };
            r.health.spent_share = 0.0;
            r.health.estimate_share = 0.0;
            r
        })
        .collect()
}

#[test]
fn same_seed_gives_bit_identical_reports() {
    let a = run(42);
    let b = run(42);
    assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    assert!(a[2].layers[0].subspace.measured().is_some());
    let c = run(43);
    let s = |r: &[Report]| r[0].layers[0].sensitivity.measured().unwrap().sensitivity;
    assert_ne!(s(&a), s(&c), "another seed draws other probes");
}
