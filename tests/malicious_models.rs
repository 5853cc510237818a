//! `gradguard audit` on models a malicious server could send (tests/fixtures/malicious_models.py,
//! made with the venv's torch): M4's attack suite at the user's batch size and M6 see what S_l
//! does not.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn python() -> PathBuf {
    match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => PathBuf::from(venv).join("bin").join("python"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv").join("bin").join("python"),
    }
}

/// The fixtures' folder, made once per test binary.
fn made() -> &'static Path {
    static MADE: OnceLock<PathBuf> = OnceLock::new();
    MADE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("malicious_models");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join("malicious_models.py");
        let out = Command::new(python()).arg(script).arg(&dir).output().expect("the venv's python runs");
        assert!(out.status.success(), "malicious_models.py: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
}

/// The audit's JSON of `model` at `batch` samples per release.
fn audit(model: &str, batch: usize) -> Value {
    let dir = made();
    let json = dir.join(format!("{model}-{batch}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_gradguard"))
        .args(["audit", "--model"])
        .arg(dir.join(format!("{model}.pt")))
        .arg("--inputs")
        .arg(dir.join("data/x.npy"))
        .arg("--labels")
        .arg(dir.join("data/y.npy"))
        .args(["--batch-size", &batch.to_string(), "--json"])
        .arg(&json)
        .output()
        .expect("the gradguard binary runs");
    assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

fn layer<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["layers"].as_array().unwrap().iter().find(|l| l["name"] == name).unwrap()
}

#[test]
fn trap_weights_are_seen_by_the_attack_and_m6_where_s_l_ranks_them_below_the_honest_model() {
    let (trap, honest) = (audit("trap", 32), audit("honest", 32));
    let (t, h) = (layer(&trap, "fc0"), layer(&honest, "fc0"));
    // S_l ranks the trap model's first layer as the less sensitive one...
    assert!(t["sensitivity"].as_f64().unwrap() < h["sensitivity"].as_f64().unwrap(), "S_l trap {} honest {}", t["sensitivity"], h["sensitivity"]);
    // ...while the analytic attack gives back most of each batch of 32 and M6 says why.
    let samples = (t["details"]["attacks"]["n"].as_u64().unwrap() * t["details"]["attacks"]["releases"].as_u64().unwrap()) as f64;
    assert_eq!(t["strongest_attack"], "analytic");
    assert!(t["samples_recovered"].as_f64().unwrap() >= 0.7 * samples, "trap recovered {} of {samples}", t["samples_recovered"]);
    assert!(h["samples_recovered"].as_f64().unwrap() <= 0.1 * samples, "honest recovered {} of {samples}", h["samples_recovered"]);
    assert!(t["exposed_fraction"].as_f64().unwrap() >= 0.75 && h["exposed_fraction"].as_f64().unwrap() <= 0.25, "M6 trap {} honest {}", t["exposed_fraction"], h["exposed_fraction"]);
    assert_eq!(t["details"]["attacks"]["attacks"]["analytic"]["exact"], true);
}

#[test]
fn an_imprint_layer_is_caught_by_the_differences_attack_and_missed_by_m6() {
    let imprint = audit("imprint", 32);
    let fc0 = layer(&imprint, "fc0");
    assert_eq!(fc0["strongest_attack"], "analytic_differences");
    assert!(fc0["recovered_fraction"].as_f64().unwrap() >= 0.5, "{}", fc0["recovered_fraction"]);
    assert!(fc0["exposed_fraction"].as_f64().unwrap() <= 0.1, "M6 misses imprint: {}", fc0["exposed_fraction"]);
}

#[test]
fn a_model_without_biases_has_the_attacks_absent_with_the_reason_not_zero() {
    let report = audit("no_bias", 32);
    for l in report["layers"].as_array().unwrap() {
        assert!(l["samples_recovered"].is_null() && l["recovered_fraction"].is_null(), "{l}");
        let reason = l["absent"]["recovered_fraction"].as_str().unwrap();
        assert!(reason.contains("no bias"), "{reason}");
    }
    assert_eq!(report["labels_recovered"]["status"], "absent");
}

#[test]
fn a_batch_of_one_is_exposed_by_definition_and_given_back() {
    let report = audit("honest", 1);
    let fc0 = layer(&report, "fc0");
    assert_eq!(fc0["exposed_fraction"].as_f64(), Some(1.0));
    assert_eq!(fc0["details"]["attacks"]["n"].as_u64(), Some(1));
    assert_eq!(fc0["samples_recovered"].as_u64(), fc0["details"]["attacks"]["releases"].as_u64(), "one sample per release, each given back");
}
