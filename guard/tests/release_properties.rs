//! For random policies and updates, the explicit release API never lets out anything the
//! manifest does not account for: every released layer passed its rules on the release, a layer
//! with no action is released as given, a withheld layer is absent, and nothing non-finite
//! leaves.
mod common;
use gradguard_defenses::Defence;
use gradguard_guard::{Batch, Guard, LayerMap, Policy, Release};
use proptest::prelude::*;
use tch::{nn, Device, Kind, Tensor};

fn step_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        (0.01f64..2.0).prop_map(|c| format!("{{ action = \"clip\", max_norm = {c} }}")),
        (0.01f64..2.0, 0.0f64..1.0).prop_map(|(c, m)| format!("{{ action = \"noise\", clip_norm = {c}, multiplier = {m} }}")),
        (0.05f64..1.0).prop_map(|f| format!("{{ action = \"sparsify\", keep_fraction = {f} }}")),
        (1u32..8).prop_map(|b| format!("{{ action = \"quantize\", bits = {b} }}")),
        Just("{ action = \"withhold\" }".to_string()),
    ]
}

fn rule_strategy() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("sensitivity"), Just("sensitivity_rms"), Just("relative_sensitivity"), Just("subspace_separation")],
        prop_oneof![Just("fc0"), Just("fc1"), Just("fc*")],
        0.0f64..0.3,
        0.0f64..1.0,
        prop::collection::vec(step_strategy(), 1..4),
    )
        .prop_map(|(metric, layer, act, relax, ladder)| {
            format!(
                "[[rule]]\nname = \"{metric}-{layer}\"\nmetric = \"{metric}\"\nlayers = [\"{layer}\"]\nact_above = {act}\nrelax_below = {}\nladder = [{}]\n",
                act * relax,
                ladder.join(", ")
            )
        })
}

fn policy_strategy() -> impl Strategy<Value = String> {
    (prop::collection::vec(rule_strategy(), 0..3), prop::bool::ANY, 0u64..(i64::MAX as u64)).prop_map(|(rules, withhold, seed)| {
        let on_violation = if withhold { "withhold" } else { "block" };
        format!("version = 1\n[settings]\nseed = {seed}\nestimate_every = 1\non_violation = \"{on_violation}\"\n{}", rules.join("\n"))
    })
}

/// A released update as the property reads it.
struct Released {
    tensors: Vec<(String, Tensor)>,
    manifest: gradguard_guard::Manifest,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn released_layers_passed_or_carry_their_actions(
        policy_text in policy_strategy(),
        scale in 0.001f64..10.0,
        poison in prop::option::of((0usize..2, 0usize..4)),
        data_seed in 0i64..1000,
    ) {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let mlp = common::Mlp::new(&vs.root(), &[6, 8, 3]);
        let policy = Policy::from_toml_str(&policy_text, "generated").unwrap();
        let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), policy).unwrap();
        let x = common::gaussian(16, 6, data_seed, Kind::Float);
        let y = Tensor::from_slice(&(0..16).map(|i| i % 3).collect::<Vec<i64>>());
        let a = Tensor::from_slice(&(0..16).map(|i| i % 2).collect::<Vec<i64>>());
        tch::manual_seed(data_seed + 1);
        let mut names: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        names.sort_by(|p, q| p.0.cmp(&q.0));
        let update: Vec<(String, Tensor)> = names
            .iter()
            .enumerate()
            .map(|(i, (n, t))| {
                let u = Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * scale;
                if let Some((which, _)) = poison {
                    if which == i % 2 && i < 2 {
                        let _ = u.reshape([-1]).get(0).fill_(f64::NAN);
                    }
                }
                (n.clone(), u)
            })
            .collect();
        let poisoned = update.iter().any(|(_, t)| t.isnan().any().int64_value(&[]) != 0);
        let loss = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
        match guard.release(&update, &Batch::new(&x, &y).with_attribute(&a), &loss) {
            Ok(Release::Released { update: tensors, manifest, .. }) => {
                let released = Released { tensors, manifest };
                prop_assert!(!poisoned, "a non-finite update was released");
                for (name, t) in &released.tensors {
                    prop_assert!(t.isfinite().all().int64_value(&[]) != 0, "{name} is not finite");
                }
                for layer in &released.manifest.layers {
                    let mine: Vec<&(String, Tensor)> = released.tensors.iter().filter(|(n, _)| n.starts_with(&format!("{}.", layer.name))).collect();
                    if !layer.released {
                        prop_assert!(mine.is_empty(), "withheld layer {} is in the update", layer.name);
                        prop_assert_eq!(&layer.actions, &vec![Defence::Withhold]);
                        continue;
                    }
                    prop_assert_eq!(mine.len(), 2);
                    for check in &layer.checks {
                        prop_assert!(check.released.is_none_or(|v| v <= check.act_above), "{}: {:?} above {}", layer.name, check.released, check.act_above);
                    }
                    if layer.actions.is_empty() {
                        for (n, t) in mine {
                            let given = &update.iter().find(|(m, _)| m == n).unwrap().1;
                            prop_assert!(t.equal(given), "{n} changed without an action in the manifest");
                        }
                    }
                }
            }
            Ok(Release::Blocked { manifest, .. }) => {
                prop_assert!(manifest.layers.iter().all(|l| !l.released));
            }
            Ok(Release::Held { .. }) => prop_assert!(false, "the explicit release never holds"),
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}
