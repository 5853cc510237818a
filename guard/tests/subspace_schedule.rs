//! `subspace_every_steps`: M2 is measured again only once its last result is that old, while M1
//! is estimated at every estimate; a policy with a rule on M2 measures it at every estimate
//! whatever the setting; version 1 policies cannot set it.
mod common;
use gradguard_guard::{Batch, Guard, LayerMap, Policy, Report, Settings};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

/// Steps of an MLP under `guard`, estimating at every step; the reports.
fn run(guard: impl FnOnce(&nn::VarStore) -> Guard, steps: usize) -> Vec<Report> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[10, 12, 3]);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let mut guard = guard(&vs);
    let x = common::gaussian(40, 10, 1, Kind::Float);
    let y = Tensor::from_slice(&(0..40).map(|i| i % 3).collect::<Vec<i64>>());
    let a = Tensor::from_slice(&(0..40).map(|i| (i / 2) % 2).collect::<Vec<i64>>());
    let loss_fn = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
    (0..steps)
        .map(|_| {
            opt.zero_grad();
            mlp.loss(&x, &y).unwrap().backward();
            let r = guard.after_backward(&Batch::new(&x, &y).with_attribute(&a), &loss_fn).unwrap().into_report();
            opt.step();
            r
        })
        .collect()
}

fn settings(every: u64) -> Settings {
    Settings { estimate_every: 1, background_estimates: false, subspace_every_steps: every, ..common::unbudgeted() }
}

/// (M1's step, M2's step) of the first layer in each report.
fn steps_measured(reports: &[Report]) -> Vec<(u64, u64)> {
    reports.iter().map(|r| (r.layers[0].sensitivity.measured().unwrap().step, r.layers[0].subspace.measured().unwrap().step)).collect()
}

#[test]
fn m2_is_measured_again_once_its_result_is_subspace_every_steps_old() {
    let reports = run(|vs| common::guard(vs, settings(3)), 7);
    let expected: Vec<(u64, u64)> = (0..7).map(|s| (s, s - s % 3)).collect();
    assert_eq!(steps_measured(&reports), expected);
    assert!(reports.iter().all(|r| r.estimated), "every step estimates M1");
    // The default measures M2 at every estimate.
    let every = run(|vs| common::guard(vs, settings(0)), 4);
    assert_eq!(steps_measured(&every), (0..4).map(|s| (s, s)).collect::<Vec<_>>());
}

#[test]
fn a_rule_on_m2_measures_it_at_every_estimate_whatever_the_setting() {
    let policy = "version = 2\n[settings]\nestimate_every = 1\nbudget_share = 1.0\nbackground_estimates = false\nsubspace_every_steps = 100\n\
        [[rule]]\nname = \"latent\"\nmetric = \"subspace_separation\"\nlayers = [\"*\"]\nact_above = 0.99\nrelax_below = 0.5\nladder = [{ action = \"withhold\" }]\n";
    let policy = Policy::from_toml_str(policy, "t").unwrap();
    let reports = run(|vs| Guard::new(LayerMap::from_var_store(vs).unwrap(), policy).unwrap(), 4);
    assert_eq!(steps_measured(&reports), (0..4).map(|s| (s, s)).collect::<Vec<_>>());
}

#[test]
fn version_1_policies_cannot_set_it() {
    let err = Policy::from_toml_str("version = 1\n[settings]\nsubspace_every_steps = 10\n", "t").unwrap_err().to_string();
    assert!(err.contains("subspace_every_steps"), "{err}");
}
