//! The noise a release carries is unpredictable to whoever knows the policy: each guard draws a
//! secret key that enters every noise seed, and the seed never leaves in a serialised
//! manifest. A federated server holds the policy text (its seed) and sees the step; without
//! the key it cannot regenerate the noise and subtract it.
mod common;
use gradguard_guard::{Batch, Guard, LayerMap, Policy, Release};
use tch::{nn, Device, Kind, Tensor};

const POLICY: &str = r#"
version = 2
[settings]
seed = 7
estimate_every = 1
[[rule]]
name = "noise-everything"
metric = "reconstruction_bound_bits"
layers = ["*"]
act_above = 1.0
relax_below = 0.5
ladder = [{ action = "noise", clip_norm = 1.0, multiplier = 0.5 }]
"#;

/// The released update of one explicit release of the same model, batch and gradient, by a
/// new guard (with `key`, or the key it drew), and the release's manifest as JSON.
fn release(key: Option<u64>) -> (Vec<(String, Tensor)>, String, Vec<Option<u64>>) {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[6, 8, 3]);
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), Policy::from_toml_str(POLICY, "test").unwrap()).unwrap();
    if let Some(key) = key {
        guard.set_noise_key(key);
    }
    let x = common::gaussian(16, 6, 1, Kind::Float);
    let y = Tensor::from_slice(&(0..16).map(|i| i % 3).collect::<Vec<i64>>());
    let mut update: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.ones_like() * 0.01)).collect();
    update.sort_by(|a, b| a.0.cmp(&b.0));
    let loss = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
    match guard.release(&update, &Batch::new(&x, &y), &loss).unwrap() {
        Release::Released { update, report } => {
            let manifest = report.release.expect("a release has its manifest");
            assert!(manifest.layers.iter().all(|l| l.actions.iter().any(|a| a.name() == "noise")), "every layer noised: {manifest:?}");
            let seeds = manifest.layers.iter().map(|l| l.seed).collect();
            (update, serde_json::to_string(&manifest).unwrap(), seeds)
        }
        other => panic!("expected a release, got {other:?}"),
    }
}

fn same(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.iter().zip(b).all(|((n, x), (m, y))| n == m && x.equal(y))
}

#[test]
fn two_guards_with_one_policy_draw_different_noise() {
    let (first, _, first_seeds) = release(None);
    let (second, _, second_seeds) = release(None);
    assert!(!same(&first, &second), "the policy's seed alone decided the noise");
    assert_ne!(first_seeds, second_seeds);
}

#[test]
fn a_chosen_key_reproduces_the_noise_and_no_seed_is_serialised() {
    let (first, json, seeds) = release(Some(3));
    let (second, _, _) = release(Some(3));
    assert!(same(&first, &second), "the same key, policy and step give the same noise");
    assert!(seeds.iter().all(Option::is_some), "the seeds are known in the process: {seeds:?}");
    assert!(!json.contains("\"seed\""), "a serialised manifest carries no seed: {json}");
}
