//! A run replayed against its audit log: every change of state the releases show (a level up
//! or down, a withheld layer, a policy loaded or rejected) is a record of the log, and the
//! unchanged releases the checkpoints count add up to the ones the run made. On the digits
//! CNN with a threshold at the median of its own first-layer sensitivity, so that the loop
//! escalates and relaxes often.
use gradguard::data::Digits;
use gradguard::guard::{AuditLog, LayerMap, Policy, Release, decide::{verify_chain, Outcome}};
use gradguard::models::DigitsCnn;
use gradguard::Guard;
use std::collections::BTreeMap;
use tch::{nn, Device};

#[path = "support/digits_step.rs"]
mod digits_step;
use digits_step::digits_step;

const STEPS: u64 = 120;
const BATCH: usize = 16;
const CHECKPOINT_EVERY: u64 = 25;

fn step(vs: &nn::VarStore, net: &DigitsCnn, digits: &Digits, guard: &mut Guard, s: u64) -> Release {
    let from = (s as usize * BATCH) % (digits.len() - BATCH);
    digits_step(vs, net, digits, guard, &(from..from + BATCH).collect::<Vec<_>>()).0.unwrap()
}

fn policy_text(act: f64) -> String {
    format!(
        "version = 1\n[settings]\nestimate_every = 1\nmax_estimate_age_steps = 1\nbackground_estimates = false\nbudget_share = 1.0\non_violation = \"withhold\"\n\
         [[rule]]\nname = \"conv1\"\nmetric = \"sensitivity\"\nlayers = [\"conv1\"]\nact_above = {act}\nrelax_below = {}\n\
         ladder = [{{ action = \"clip\", max_norm = 0.02 }}, {{ action = \"clip\", max_norm = 0.005 }}]\n\
         [[rule]]\nname = \"fc2\"\nmetric = \"sensitivity\"\nlayers = [\"fc2\"]\nact_above = 0.0\nrelax_below = 0.0\nladder = [{{ action = \"withhold\" }}]\n",
        act * 0.9
    )
}

#[test]
fn every_state_change_of_a_run_is_in_its_log_and_the_checkpoints_count_the_rest() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = DigitsCnn::new(&vs.root());
    let digits = Digits::embedded().unwrap();
    // conv1's raw sensitivity over a few batches: the threshold sits at its median.
    let mut probe = Guard::new(LayerMap::from_var_store(&vs).unwrap(), Policy::permissive()).unwrap();
    let mut raw: Vec<f64> = (0..15).map(|s| step(&vs, &net, &digits, &mut probe, s).report().layer("conv1").unwrap().sensitivity.measured().unwrap().sensitivity).collect();
    raw.sort_by(f64::total_cmp);
    let act = raw[raw.len() / 2];

    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("replay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log = dir.join("audit.jsonl");
    let first = Policy::from_toml_str(&policy_text(act), "first").unwrap();
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), first).unwrap();
    guard.set_audit_log_every(AuditLog::open(&log).unwrap(), CHECKPOINT_EVERY).unwrap();

    // What the releases show, step by step.
    let mut changes: Vec<(u64, String, Outcome)> = Vec::new();
    let mut unchanged = 0u64;
    let mut levels: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut hashes = Vec::new();
    for s in 0..STEPS {
        if s == 60 {
            // A rejected reload (the layer pattern matches nothing), then a loaded one.
            let bad = policy_text(act).replace("layers = [\"fc2\"]", "layers = [\"nope*\"]");
            assert!(guard.reload_policy(&bad, "bad policy").is_err());
            changes.push((s, "*".into(), Outcome::PolicyRejected));
            hashes.push(guard.policy().hash().to_string());
            guard.reload_policy(&policy_text(act * 1.1), "second").unwrap();
            hashes.push(guard.policy().hash().to_string());
            changes.push((s, "*".into(), Outcome::PolicyLoaded));
            levels.clear();
        }
        let release = step(&vs, &net, &digits, &mut guard, s);
        let manifest = release.manifest().unwrap().clone();
        for layer in &manifest.layers {
            let mut moved = false;
            for c in &layer.checks {
                let before = levels.insert((layer.name.clone(), c.rule.clone()), c.level).unwrap_or(0);
                if c.level > before {
                    changes.push((s, layer.name.clone(), Outcome::Escalated));
                    moved = true;
                } else if c.level < before {
                    changes.push((s, layer.name.clone(), Outcome::Relaxed));
                    moved = true;
                }
            }
            match (layer.released, moved) {
                (false, true) => changes.push((s, layer.name.clone(), Outcome::Withheld)),
                (_, false) => unchanged += layer.checks.len() as u64,
                (true, true) => {}
            }
        }
    }
    guard.close_audit_log().unwrap();
    assert_eq!(guard.policy_reload_failures(), 1);
    let records = AuditLog::read_chain(&log).unwrap();
    let escalations = changes.iter().filter(|c| c.2 == Outcome::Escalated).count();
    let relaxations = changes.iter().filter(|c| c.2 == Outcome::Relaxed).count();
    assert!(escalations >= 3 && relaxations >= 3, "the run must move levels both ways to test anything: {escalations} up, {relaxations} down");
    for (s, layer, outcome) in &changes {
        assert!(records.iter().any(|r| r.step == *s && r.layer == *layer && r.outcome == *outcome), "the {outcome} of {layer} at step {s} is not in the log");
    }
    // The reload records carry both hashes.
    let loaded = records.iter().find(|r| r.outcome == Outcome::PolicyLoaded).unwrap();
    assert_eq!((loaded.previous_policy_hash.as_deref(), loaded.policy_hash.as_str()), (Some(hashes[0].as_str()), hashes[1].as_str()));
    let rejected = records.iter().find(|r| r.outcome == Outcome::PolicyRejected).unwrap();
    assert!(rejected.reason.as_deref().unwrap().contains("nope*"), "{:?}", rejected.reason);
    // The checkpoints count every unchanged release, and nothing else.
    let counted: u64 = records.iter().filter_map(|r| r.checkpoint.as_ref()).flat_map(|c| &c.layers).map(|t| t.released + t.protected + t.withheld).sum();
    let written = records.iter().filter(|r| matches!(r.outcome, Outcome::Released | Outcome::Protected)).count() as u64;
    let withheld: u64 = records.iter().filter_map(|r| r.checkpoint.as_ref()).flat_map(|c| &c.layers).filter(|t| t.layer == "fc2").map(|t| t.withheld).sum();
    assert!(withheld >= STEPS - 2, "fc2 stays withheld and is counted, not written: {withheld}");
    assert_eq!(counted, unchanged, "checkpoint counts vs the unchanged releases of the run");
    assert!(written > 0, "the release at a new level is written, not counted");
    let checkpoints = records.iter().filter(|r| r.outcome == Outcome::Checkpoint).count() as u64;
    assert!(checkpoints >= STEPS / CHECKPOINT_EVERY, "{checkpoints} checkpoints");
    assert_eq!(records.last().unwrap().outcome, Outcome::Closed);
    // Far fewer lines than one per layer and step, and the chain verifies.
    assert!((records.len() as u64) < STEPS / 2, "{} records for {STEPS} steps", records.len());
    let v = verify_chain(&log).unwrap();
    assert_eq!((v.broken, v.records as usize), (None, records.len()));
}
