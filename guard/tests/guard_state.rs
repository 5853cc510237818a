//! A guard's state (`Guard::state`, `Guard::restore_state`): the levels it escalated to and its
//! step count go on in a new guard of the same policy, and a state that does not fit is
//! refused without changing anything.
mod common;

use gradguard_guard::{Batch, Guard, GuardState, LayerMap, Policy, Release, decide::StateError};
use tch::{nn, Device, Kind, Tensor};

// fc0's threshold is always crossed: the ladder climbs to clip, then withholds.
const POLICY: &str = r#"version = 1
[settings]
seed = 0
estimate_before_release = true
background_estimates = false
budget_share = 1.0
aggregation_floor = 1
on_violation = "withhold"

[[rule]]
name = "tight"
metric = "sensitivity_rms"
layers = ["fc0"]
act_above = 1e-12
relax_below = 1e-13
ladder = [{ action = "clip", max_norm = 0.05 }, { action = "withhold" }]
"#;

fn release(guard: &mut Guard, vs: &nn::VarStore, mlp: &common::Mlp) -> Release {
    let x = common::gaussian(16, 6, 3, Kind::Float);
    let y = Tensor::from_slice(&(0..16).map(|i| i % 3).collect::<Vec<i64>>());
    let update: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.ones_like())).collect();
    let loss = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
    guard.release(&update, &Batch::new(&x, &y), &loss).unwrap()
}

#[test]
fn levels_and_steps_go_on_in_a_new_guard() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[6, 8, 3]);
    let policy = Policy::from_toml_str(POLICY, "t").unwrap();
    let mut first = Guard::new(LayerMap::from_var_store(&vs).unwrap(), policy.clone()).unwrap();
    let r = release(&mut first, &vs, &mlp);
    assert!(!r.manifest().unwrap().layers[0].released, "fc0 is withheld in the first round");
    let state = first.state();
    assert_eq!(state.step, 1);
    assert_eq!(state.levels["tight"]["fc0"], 2);
    let text = serde_json::to_string(&state).unwrap();

    let ledger = state.ledger.as_ref().expect("the state carries the run ledger");
    assert_eq!(ledger.releases, 1);

    let mut second = Guard::new(LayerMap::from_var_store(&vs).unwrap(), policy.clone()).unwrap();
    second.restore_state(&serde_json::from_str::<GuardState>(&text).unwrap()).unwrap();
    assert_eq!(second.protection().layer_levels()[0], 2);
    assert_eq!(second.state().ledger, state.ledger, "the ledger goes on where it was");
    let r = release(&mut second, &vs, &mlp);
    assert_eq!(r.manifest().unwrap().step, 1);
    let check = &r.manifest().unwrap().layers[0].checks[0];
    assert_eq!(check.level, 2, "the second guard starts at the rung the first reached");

    // A state that does not fit: nothing changes.
    let mut third = Guard::new(LayerMap::from_var_store(&vs).unwrap(), policy).unwrap();
    let mut bad = state.clone();
    bad.levels.get_mut("tight").unwrap().insert("fc0".into(), 7);
    assert!(matches!(third.restore_state(&bad), Err(StateError::Mismatch(m)) if m.contains("level 7")));
    let mut other = state.clone();
    other.policy_hash = "0".repeat(64);
    assert!(matches!(third.restore_state(&other), Err(StateError::OtherPolicy { .. })));
    let mut short = state.clone();
    short.ledger.as_mut().unwrap().base.layers.pop();
    assert!(matches!(third.restore_state(&short), Err(StateError::Mismatch(m)) if m.contains("layers")));
    let mut unknown = state;
    unknown.levels.insert("gone".into(), Default::default());
    assert!(matches!(third.restore_state(&unknown), Err(StateError::Mismatch(m)) if m.contains("gone")));
    assert_eq!(third.protection().layer_levels(), vec![0, 0]);
    assert_eq!(third.step(), 0);
}
