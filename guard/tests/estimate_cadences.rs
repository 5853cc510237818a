//! M2's and M6's cadences (`subspace_every_steps`, `isolation_every_steps`): M1 is estimated at
//! every estimate; M2 and M6 again only once their last result is that old, never at the first
//! estimate and never both at one estimate (the one measured longer ago goes first), so that no
//! estimate pays for all three; a policy with a rule on one of them, or a cadence of 0, measures
//! it at every estimate; version 1 policies cannot set them.
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

fn settings(subspace_every: u64, isolation_every: u64) -> Settings {
    Settings { estimate_every: 1, background_estimates: false, subspace_every_steps: subspace_every, isolation_every_steps: isolation_every, ..common::unbudgeted() }
}

/// Per report, the steps of the first layer's M1, M2 and M6 (None where not measured yet).
fn steps_measured(reports: &[Report]) -> Vec<(u64, Option<u64>, Option<u64>)> {
    reports
        .iter()
        .map(|r| {
            let l = &r.layers[0];
            (l.sensitivity.measured().unwrap().step, l.subspace.measured().map(|m| m.step), l.sample_isolation.measured().map(|m| m.step))
        })
        .collect()
}

#[test]
fn m2_is_measured_again_once_its_result_is_subspace_every_steps_old() {
    let reports = run(|vs| common::guard(vs, settings(3, 0)), 8);
    // Step 0 measures M1 (and M6, whose cadence is 0) alone; M2 from the next estimate on.
    let expected: Vec<_> = (0..8u64).map(|s| (s, (s > 0).then(|| s - (s - 1) % 3), Some(s))).collect();
    assert_eq!(steps_measured(&reports), expected);
    assert!(reports.iter().all(|r| r.estimated), "every step estimates M1");
    // A cadence of 0 measures both at every estimate, the first included.
    let every = run(|vs| common::guard(vs, settings(0, 0)), 4);
    assert_eq!(steps_measured(&every), (0..4).map(|s| (s, Some(s), Some(s))).collect::<Vec<_>>());
}

#[test]
fn m2_and_m6_take_turns_and_the_first_estimate_is_m1_alone() {
    let reports = run(|vs| common::guard(vs, settings(3, 3)), 9);
    let measured = steps_measured(&reports);
    assert_eq!(measured[0], (0, None, None), "the first estimate measures M1 alone");
    // M2 first (neither measured yet), M6 at the next estimate, then each every 3 steps.
    let m2: Vec<_> = measured.iter().map(|m| m.1).collect();
    let m6: Vec<_> = measured.iter().map(|m| m.2).collect();
    assert_eq!(m2, [None, Some(1), Some(1), Some(1), Some(4), Some(4), Some(4), Some(7), Some(7)]);
    assert_eq!(m6, [None, None, Some(2), Some(2), Some(2), Some(5), Some(5), Some(5), Some(8)]);
    // No estimate measured both.
    for (s, m) in measured.iter().enumerate() {
        assert!(!(m.1 == Some(s as u64) && m.2 == Some(s as u64)), "step {s} measured M2 and M6");
    }
    // The defaults stagger them the same way (500 steps each).
    let defaults = run(|vs| common::guard(vs, Settings { estimate_every: 1, background_estimates: false, ..common::unbudgeted_with_cadences() }), 3);
    assert_eq!(steps_measured(&defaults), [(0, None, None), (1, Some(1), None), (2, Some(1), Some(2))]);
}

fn rule_policy(metric: &str, settings: &str) -> Policy {
    let policy = format!(
        "version = 2\n[settings]\nestimate_every = 1\nbudget_share = 1.0\nbackground_estimates = false\n{settings}\n\
        [[rule]]\nname = \"r\"\nmetric = \"{metric}\"\nlayers = [\"*\"]\nact_above = 0.99\nrelax_below = 0.5\nladder = [{{ action = \"withhold\" }}]\n"
    );
    Policy::from_toml_str(&policy, "t").unwrap()
}

#[test]
fn a_rule_on_m2_measures_it_at_every_estimate_whatever_the_setting() {
    let policy = rule_policy("subspace_separation", "subspace_every_steps = 100\nisolation_every_steps = 0");
    let reports = run(|vs| Guard::new(LayerMap::from_var_store(vs).unwrap(), policy).unwrap(), 4);
    assert_eq!(steps_measured(&reports), (0..4).map(|s| (s, Some(s), Some(s))).collect::<Vec<_>>());
}

#[test]
fn a_rule_on_m6_measures_it_at_every_estimate_whatever_the_setting() {
    for metric in ["isolated_share", "exposed_fraction"] {
        let policy = rule_policy(metric, "subspace_every_steps = 0\nisolation_every_steps = 100");
        let reports = run(|vs| Guard::new(LayerMap::from_var_store(vs).unwrap(), policy).unwrap(), 4);
        assert_eq!(steps_measured(&reports), (0..4).map(|s| (s, Some(s), Some(s))).collect::<Vec<_>>(), "{metric}");
    }
}

#[test]
fn version_1_policies_cannot_set_them() {
    for field in ["subspace_every_steps", "isolation_every_steps"] {
        let err = Policy::from_toml_str(&format!("version = 1\n[settings]\n{field} = 10\n"), "t").unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
}

#[test]
fn a_policy_that_estimates_before_every_release_measures_both_every_time() {
    // A federated round: the guard is restored each round, so every estimate is its first.
    let settings = Settings { estimate_before_release: true, ..settings(500, 500) };
    let reports = run(|vs| common::guard(vs, settings), 3);
    assert_eq!(steps_measured(&reports), (0..3).map(|s| (s, Some(s), Some(s))).collect::<Vec<_>>());
}
