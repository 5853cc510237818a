//! Policy files: every bad input is rejected with a message that names the problem; coverage
//! of layer globs; the hash; the shipped example.
use gradguard_defenses::Defence;
use gradguard_guard::{Policy, PolicyError, decide::{LadderStep, OnViolation}, report::LeakageMetric};
use gradguard_guard::LayerMap;
use std::path::PathBuf;
use tch::{nn, Device};

fn cnn_layers() -> Vec<String> {
    ["conv1", "conv2", "fc1", "fc2"].iter().map(|s| s.to_string()).collect()
}

/// A valid policy with one rule whose ladder / thresholds / layers the tests replace.
fn policy_with(rule_body: &str) -> String {
    format!("version = 1\n\n[[rule]]\nname = \"r\"\n{rule_body}\n")
}

const GOOD_RULE: &str = r#"metric = "sensitivity_rms"
layers = ["conv1"]
act_above = 0.01
relax_below = 0.006
ladder = [{ action = "clip", max_norm = 1.0 }]"#;

fn load(text: &str) -> Result<Policy, PolicyError> {
    Policy::from_toml_str(text, "test.toml")
}

fn load_err(text: &str) -> (PolicyError, String) {
    let err = load(text).expect_err("the policy must be rejected");
    let msg = err.to_string();
    assert!(msg.contains("test.toml"), "the message names the origin: {msg}");
    (err, msg)
}

fn assert_contains(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "message lacks {n:?}:\n{msg}");
    }
}

#[test]
fn a_good_rule_loads() {
    let p = load(&policy_with(GOOD_RULE)).unwrap();
    assert_eq!(p.version(), 1);
    assert_eq!(p.rules().len(), 1);
    assert_eq!(p.rules()[0].metric, LeakageMetric::SensitivityRms);
    assert_eq!(p.rules()[0].ladder, vec![LadderStep::Defence(Defence::Clip { max_norm: 1.0 })]);
    assert_eq!(p.origin(), "test.toml");
}

#[test]
fn syntax_error_reports_line_and_column() {
    // Line 3: an unterminated string.
    let (err, msg) = load_err("version = 1\n[settings]\nseed = \"zero\n");
    assert!(matches!(err, PolicyError::Syntax { .. }), "{err:?}");
    assert_contains(&msg, &["line 3", "column"]);

    // A bare word where a value belongs, in a rule.
    let (err, msg) = load_err("version = 1\n\n[[rule]]\nname = r\n");
    assert!(matches!(err, PolicyError::Syntax { .. }), "{err:?}");
    assert_contains(&msg, &["line 4", "column 8"]);
}

#[test]
fn unknown_metric_names_the_bad_value() {
    let (err, msg) = load_err(&policy_with(&GOOD_RULE.replace("\"sensitivity_rms\"", "\"leakiness\"")));
    assert!(matches!(err, PolicyError::Syntax { .. }), "{err:?}");
    assert_contains(&msg, &["leakiness", "metric", "sensitivity_rms", "line 5, column 10"]);
}

#[test]
fn a_metric_not_estimated_online_is_rejected() {
    let (err, msg) = load_err(&policy_with(&GOOD_RULE.replace("\"sensitivity_rms\"", "\"usable_information_bits\"")));
    assert!(matches!(err, PolicyError::Invalid { ref location, .. } if location.contains("metric")), "{err:?}");
    assert_contains(&msg, &["usable_information_bits", "rule 1 ('r')"]);
}

#[test]
fn negative_threshold_is_rejected() {
    let (err, msg) = load_err(&policy_with(&GOOD_RULE.replace("act_above = 0.01", "act_above = -0.1")));
    assert!(matches!(err, PolicyError::Invalid { ref location, .. } if location.ends_with("act_above")), "{err:?}");
    assert_contains(&msg, &["act_above", "-0.1", ">= 0", "rule 1 ('r')"]);

    let (err, msg) = load_err(&policy_with(&GOOD_RULE.replace("relax_below = 0.006", "relax_below = -1")));
    assert!(matches!(err, PolicyError::Invalid { ref location, .. } if location.ends_with("relax_below")), "{err:?}");
    assert_contains(&msg, &["relax_below", "-1"]);

    let (err, msg) = load_err(&policy_with(&GOOD_RULE.replace("act_above = 0.01", "act_above = nan")));
    assert!(matches!(err, PolicyError::Invalid { .. }), "{err:?}");
    assert_contains(&msg, &["act_above", "finite"]);
}

#[test]
fn inverted_thresholds_are_rejected() {
    let (err, msg) = load_err(&policy_with(&GOOD_RULE.replace("relax_below = 0.006", "relax_below = 0.02")));
    assert!(matches!(err, PolicyError::Invalid { ref location, .. } if location.ends_with("relax_below")), "{err:?}");
    assert_contains(&msg, &["inverted", "relax_below 0.02", "act_above 0.01"]);
    // Equal thresholds are allowed (no hysteresis band).
    load(&policy_with(&GOOD_RULE.replace("relax_below = 0.006", "relax_below = 0.01"))).unwrap();
}

fn with_ladder(ladder: &str) -> String {
    policy_with(&GOOD_RULE.replace(r#"[{ action = "clip", max_norm = 1.0 }]"#, ladder))
}

#[test]
fn an_action_with_a_missing_parameter_names_it() {
    let (err, msg) = load_err(&with_ladder(r#"[{ action = "withhold" }, { action = "clip" }]"#));
    assert!(matches!(err, PolicyError::Invalid { ref location, .. } if location.ends_with("ladder step 2")), "{err:?}");
    assert_contains(&msg, &["max_norm", "ladder step 2"]);
    let (_, msg) = load_err(&with_ladder(r#"[{ action = "noise", clip_norm = 1.0 }]"#));
    assert_contains(&msg, &["multiplier", "ladder step 1"]);
}

#[test]
fn an_action_with_an_invalid_value_names_parameter_and_value() {
    let (err, msg) = load_err(&with_ladder(r#"[{ action = "sparsify", keep_fraction = 1.5 }]"#));
    assert!(matches!(err, PolicyError::Invalid { ref location, .. } if location.ends_with("ladder step 1")), "{err:?}");
    assert_contains(&msg, &["sparsify", "keep_fraction", "1.5", "(0, 1]"]);
    let (_, msg) = load_err(&with_ladder(r#"[{ action = "clip", max_norm = 0.0 }]"#));
    assert_contains(&msg, &["max_norm", "> 0"]);
    let (_, msg) = load_err(&with_ladder(r#"[{ action = "quantize", bits = 0 }]"#));
    assert_contains(&msg, &["bits", "1..=16"]);
    // A misspelt parameter is not silently ignored.
    let (_, msg) = load_err(&with_ladder(r#"[{ action = "clip", max_norm = 1.0, maxnorm = 2.0 }]"#));
    assert_contains(&msg, &["maxnorm"]);
}

#[test]
fn an_unknown_action_is_named() {
    let (err, msg) = load_err(&with_ladder(r#"[{ action = "blur", radius = 2 }]"#));
    assert!(matches!(err, PolicyError::Invalid { .. }), "{err:?}");
    assert_contains(&msg, &["blur", "ladder step 1", "clip"]);
    let (_, msg) = load_err(&with_ladder(r#"[{ max_norm = 1.0 }]"#));
    assert_contains(&msg, &["action"]);
    let (_, msg) = load_err(&with_ladder(r#"["clip"]"#));
    assert_contains(&msg, &["table"]);
    let (_, msg) = load_err(&with_ladder("[]"));
    assert_contains(&msg, &["ladder", "empty"]);
}

#[test]
fn an_unknown_settings_field_is_named() {
    let (err, msg) = load_err("version = 1\n[settings]\nseed = 1\nestimate_evry = 5\n");
    assert!(matches!(err, PolicyError::Syntax { .. }), "{err:?}");
    assert_contains(&msg, &["estimate_evry", "line 4"]);
    // And an unknown top-level or rule field.
    let (_, msg) = load_err("version = 1\nrules = []\n");
    assert_contains(&msg, &["rules"]);
    let (_, msg) = load_err(&policy_with(&format!("{GOOD_RULE}\nthreshold = 3")));
    assert_contains(&msg, &["threshold"]);
}

#[test]
fn invalid_settings_values_are_named() {
    let (err, msg) = load_err("version = 1\n[settings]\nestimate_every = 0\n");
    assert!(
        matches!(err, PolicyError::Invalid { ref location, .. } if location == "settings.estimate_every"),
        "{err:?}"
    );
    assert_contains(&msg, &["settings.estimate_every"]);
    let (_, msg) = load_err("version = 1\n[settings]\naggregation_floor = 64\naggregation_ceiling = 32\n");
    assert_contains(&msg, &["settings.aggregation_ceiling", "32", "64"]);
    let (_, msg) = load_err("version = 1\n[settings]\non_violation = \"ignore\"\n");
    assert_contains(&msg, &["ignore", "block", "withhold"]);
}

#[test]
fn unsupported_version_is_rejected() {
    let (err, msg) = load_err("version = 3\n");
    assert!(matches!(err, PolicyError::Version { found: 3, .. }), "{err:?}");
    assert_contains(&msg, &["version 3", "versions 1 to 2"]);
    let (err, msg) = load_err("version = 0\n");
    assert!(matches!(err, PolicyError::Version { found: 0, .. }), "{err:?}");
    assert_contains(&msg, &["version 0"]);
    let (err, msg) = load_err("[settings]\nseed = 1\n");
    assert!(matches!(err, PolicyError::Syntax { .. }), "{err:?}");
    assert_contains(&msg, &["version"]);
}

#[test]
fn aggregate_needs_a_factor_above_one() {
    for bad in ["1", "1.0", "0.5", "-2", "inf"] {
        let (err, msg) = load_err(&with_ladder(&format!("[{{ action = \"aggregate\", factor = {bad} }}]")));
        assert!(
            matches!(err, PolicyError::Invalid { ref location, .. } if location.ends_with("ladder step 1")),
            "{bad}: {err:?}"
        );
        assert_contains(&msg, &["aggregate factor", "> 1"]);
    }
    let (_, msg) = load_err(&with_ladder(r#"[{ action = "aggregate", factr = 4 }]"#));
    assert_contains(&msg, &["factr", "factor"]);
    let p = load(&with_ladder(r#"[{ action = "aggregate", factor = 4 }, { action = "aggregate" }]"#)).unwrap();
    assert_eq!(p.rules()[0].ladder, vec![LadderStep::Aggregate { factor: 4.0 }, LadderStep::Aggregate { factor: 2.0 }]);
    assert_eq!(p.rules()[0].ladder[0].to_string(), "aggregate(factor=4)");
}

#[test]
fn an_unmatched_glob_is_an_error_when_strict_and_a_warning_otherwise() {
    let rule = GOOD_RULE.replace(r#"["conv1"]"#, r#"["conv1", "conv9*"]"#);
    let strict = load(&policy_with(&rule)).unwrap();
    assert!(strict.settings().strict_layers, "strict_layers defaults to true");
    let err = strict.coverage(&cnn_layers()).unwrap_err();
    match &err {
        PolicyError::UnmatchedPattern { rule, pattern, layers, .. } => {
            assert_eq!((rule.as_str(), pattern.as_str()), ("r", "conv9*"));
            assert_eq!(layers, &cnn_layers());
        }
        other => panic!("expected UnmatchedPattern, got {other:?}"),
    }
    assert_contains(&err.to_string(), &["conv9*", "rule 'r'", "matches no layer", "conv1"]);

    let lax =
        load(&format!("version = 1\n[settings]\nstrict_layers = false\n\n[[rule]]\nname = \"r\"\n{rule}\n")).unwrap();
    let coverage = lax.coverage(&cnn_layers()).unwrap();
    assert_eq!(coverage.rule_layers, vec![vec![0]]);
    assert_eq!(coverage.warnings.len(), 1);
    assert_contains(&coverage.warnings[0], &["conv9*", "'r'"]);
}

#[test]
fn a_bad_glob_is_rejected_at_load() {
    let (err, msg) = load_err(&policy_with(&GOOD_RULE.replace(r#"["conv1"]"#, r#"["conv[1"]"#)));
    assert!(matches!(err, PolicyError::Invalid { ref location, .. } if location.ends_with("layers")), "{err:?}");
    assert_contains(&msg, &["conv[1"]);
    let (_, msg) = load_err(&policy_with(&GOOD_RULE.replace(r#"["conv1"]"#, "[]")));
    assert_contains(&msg, &["layers", "no layer"]);
}

#[test]
fn globs_cover_layers_in_model_order() {
    let rule = GOOD_RULE.replace(r#"["conv1"]"#, r#"["fc*"]"#);
    let p = load(&policy_with(&rule)).unwrap();
    // Model order, whatever the order of the names.
    let layers: Vec<String> = ["fc2", "conv1", "fc1", "conv2"].iter().map(|s| s.to_string()).collect();
    assert_eq!(p.coverage(&layers).unwrap().rule_layers, vec![vec![0, 2]]);
    assert_eq!(p.coverage(&cnn_layers()).unwrap().rule_layers, vec![vec![2, 3]]);
    // Overlapping patterns cover a layer once, still in model order.
    let rule = GOOD_RULE.replace(r#"["conv1"]"#, r#"["fc2", "conv?", "fc*"]"#);
    let p = load(&policy_with(&rule)).unwrap();
    assert_eq!(p.coverage(&cnn_layers()).unwrap().rule_layers, vec![vec![0, 1, 2, 3]]);
    // A glob does not match across a module path separator differently from a name: `fc*`
    // also covers nested `fc1.sub` names, `fc?` does not.
    let nested: Vec<String> = ["fc1", "fc1.sub"].iter().map(|s| s.to_string()).collect();
    let p = load(&policy_with(&GOOD_RULE.replace(r#"["conv1"]"#, r#"["fc?"]"#))).unwrap();
    assert_eq!(p.coverage(&nested).unwrap().rule_layers, vec![vec![0]]);
}

#[test]
fn the_hash_is_stable_and_follows_the_text() {
    let text = policy_with(GOOD_RULE);
    let a = load(&text).unwrap();
    let b = Policy::from_toml_str(&text, "elsewhere.toml").unwrap();
    assert_eq!(a.hash(), b.hash(), "same text, same hash, wherever it comes from");
    assert_eq!(a.hash().len(), 64);
    assert!(a.hash().bytes().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(a.short_hash(), &a.hash()[..12]);
    // Any change, even a comment, changes it.
    let c = load(&format!("# tuned\n{text}")).unwrap();
    assert_ne!(a.hash(), c.hash());
    let d = load(&text.replace("0.006", "0.005")).unwrap();
    assert_ne!(a.hash(), d.hash());
    // The hash is sha256 of the text: a known vector (`printf 'version = 1\n' | sha256sum`).
    assert_eq!(load("version = 1\n").unwrap().hash(), "dbab12665d98aef021ba64953c61b0ed8a908cfb56a1c01e2fcb4b052b71a2a1");
}

fn example_path() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policy.toml"))
}

/// The digits CNN's parameters, created as `gradguard::models::DigitsCnn` does.
fn digits_cnn_layer_names() -> Vec<String> {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let conv = nn::ConvConfig { padding: 1, ..Default::default() };
    let _c1 = nn::conv2d(&p / "conv1", 1, 8, 3, conv);
    let _c2 = nn::conv2d(&p / "conv2", 8, 16, 3, conv);
    let _f1 = nn::linear(&p / "fc1", 256, 64, Default::default());
    let _f2 = nn::linear(&p / "fc2", 64, 10, Default::default());
    LayerMap::from_var_store(&vs).unwrap().names()
}

#[test]
fn the_example_policy_loads_and_covers_the_cnn() {
    let p = Policy::load(&example_path()).unwrap();
    assert_eq!(p.version(), 2);
    assert!(p.origin().ends_with("policy.toml"));
    let s = &p.settings();
    assert_eq!((s.seed, s.estimate_every, s.max_estimate_age_steps), (0, 10, 300));
    assert_eq!(s.budget_share, 0.2);
    assert_eq!((s.aggregation_floor, s.aggregation_ceiling, s.probes), (64, 512, 8));
    assert_eq!(s.on_violation, OnViolation::Block);
    assert!(s.strict_layers);

    assert_eq!(p.rules().len(), 3);
    let bound = &p.rules()[0];
    assert_eq!(bound.metric, LeakageMetric::ReconstructionBoundBits);
    assert_eq!(bound.act_above, 0.05);
    assert_eq!(bound.ladder, vec![LadderStep::CalibratedNoise { clip_norm: 0.05 }]);
    let first = &p.rules()[1];
    assert_eq!(first.metric, LeakageMetric::Sensitivity);
    assert!(first.relax_below < first.act_above);
    let names: Vec<&str> = first.ladder.iter().map(|s| s.name()).collect();
    assert_eq!(names, ["clip", "sparsify", "aggregate", "withhold"]);
    let head = &p.rules()[2];
    assert_eq!(head.metric, LeakageMetric::SubspaceSeparation);
    assert_eq!((head.act_above, head.relax_below), (0.15, 0.08));
    assert_eq!(head.ladder.iter().map(|s| s.name()).collect::<Vec<_>>(), ["noise", "withhold"]);

    let layers = digits_cnn_layer_names();
    assert_eq!(layers, cnn_layers());
    let coverage = p.coverage(&layers).unwrap();
    assert_eq!(coverage.rule_layers, vec![vec![0], vec![0], vec![2, 3]]);
    assert!(coverage.warnings.is_empty());
}

#[test]
fn the_bad_policy_fixtures_are_rejected() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policies"));
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let result = Policy::load(&path).and_then(|p| p.coverage(&cnn_layers()).map(|_| p));
        let err = result.expect_err(&format!("{name} must be rejected"));
        let msg = err.to_string();
        assert!(msg.contains(&name), "{name}: the message names the file: {msg}");
        // Each fixture says in its first line what the message must mention.
        let first = std::fs::read_to_string(&path).unwrap().lines().next().unwrap_or_default().to_string();
        let expected =
            first.strip_prefix("# expect: ").unwrap_or_else(|| panic!("{name}: first line is `# expect: ...`"));
        for needle in expected.split(" && ") {
            assert!(msg.contains(needle), "{name}: message lacks {needle:?}:\n{msg}");
        }
    }
    assert!(seen >= 4, "fixtures found: {seen}");
    let err = Policy::load(&dir.join("does-not-exist.toml")).unwrap_err();
    assert!(matches!(err, PolicyError::Io { .. }) && err.to_string().contains("does-not-exist.toml"));
}

#[test]
fn bits_rules_and_calibrated_rungs_need_version_2_and_parse_there() {
    let rule = |metric: &str, ladder: &str| {
        format!("[[rule]]\nname = \"b\"\nmetric = \"{metric}\"\nlayers = [\"conv1\"]\nact_above = 0.05\nrelax_below = 0.01\nladder = [{ladder}]\n")
    };
    let calibrated = "{ action = \"noise\", clip_norm = 0.5, target = \"threshold\" }";
    let p = load(&format!("version = 2\n{}", rule("reconstruction_bound_bits", calibrated))).unwrap();
    assert_eq!(p.rules()[0].ladder, vec![LadderStep::CalibratedNoise { clip_norm: 0.5 }]);
    // A fixed multiplier still works in a bits rule.
    let fixed = load(&format!("version = 2\n{}", rule("reconstruction_bound_bits", "{ action = \"noise\", clip_norm = 0.5, multiplier = 1.0 }"))).unwrap();
    assert_eq!(fixed.rules()[0].ladder, vec![LadderStep::Defence(Defence::Noise { clip_norm: 0.5, multiplier: 1.0 })]);
    // Version 1 files keep parsing, without the new features.
    let (_, msg) = load_err(&format!("version = 1\n{}", rule("reconstruction_bound_bits", calibrated)));
    assert_contains(&msg, &["version = 2", "reconstruction_bound_bits"]);
    let (_, msg) = load_err("version = 1\n[settings]\nledger_cap_bits = 1.0\n");
    assert_contains(&msg, &["ledger_cap_bits", "version = 2"]);
    // A calibrated rung targets bits: not in a rule on another metric.
    let (_, msg) = load_err(&format!("version = 2\n{}", rule("sensitivity", calibrated)));
    assert_contains(&msg, &["calibrated", "reconstruction_bound_bits", "sensitivity"]);
    let (_, msg) = load_err(&format!("version = 2\n{}", rule("reconstruction_bound_bits", "{ action = \"noise\", clip_norm = 0.5, target = \"0.1\" }")));
    assert_contains(&msg, &["target", "threshold"]);
    let (_, msg) = load_err(&format!("version = 2\n{}", rule("reconstruction_bound_bits", "{ action = \"noise\", clip_norm = 0.5, multiplier = 1.0, target = \"threshold\" }")));
    assert_contains(&msg, &["not both"]);
    let (_, msg) = load_err("version = 2\n[settings]\nprior_variance = -1.0\n");
    assert_contains(&msg, &["prior_variance", "> 0"]);
    let (_, msg) = load_err("version = 2\n[settings]\ndataset_size = 0\n");
    assert_contains(&msg, &["dataset_size"]);
}
