//! `gradguard policy check`: the built binary on the shipped example and on bad policies.
use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn gradguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gradguard")).args(args).current_dir(root()).output().expect("run gradguard")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_example_policy_checks_against_the_cnn() {
    let out = gradguard(&["policy", "check", "examples/policy.toml", "--model", "cnn"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}", out.status, text(&out.stderr));
    assert!(stdout.contains("examples/policy.toml: valid"), "{stdout}");
    assert!(stdout.contains("version 2, hash "), "{stdout}");
    assert!(stdout.contains("aggregation_floor") && stdout.contains("= 64"), "{stdout}");
    // Rule 1 is the bound on conv1, in bits, explained in words with its limit; rule 2 the
    // sensitivity of conv1; rule 3 covers fc1 and fc2.
    let first = stdout.find("rule 1 ").expect("rule 1 printed");
    let second = stdout.find("rule 2 ").expect("rule 2 printed");
    let third = stdout.find("rule 3 ").expect("rule 3 printed");
    let bits_rule = &stdout[first..second];
    assert!(bits_rule.contains("metric:     reconstruction_bound_bits\n"), "{bits_rule}");
    assert!(
        bits_rule.contains("no attacker with a Gaussian prior recovers more than 0.05 bits per input dimension of the average sample from conv1's release"),
        "{bits_rule}"
    );
    assert!(bits_rule.contains(gradguard::guard::report::BOUND_CAVEAT), "{bits_rule}");
    assert!(bits_rule.contains("1. noise(clip_norm=0.05,target=threshold)"), "{bits_rule}");
    let second_rule = &stdout[second..third];
    assert!(second_rule.contains("  layers:     conv1\n"), "{second_rule}");
    assert!(second_rule.contains("metric:     sensitivity\n"), "{second_rule}");
    assert!(second_rule.contains("1. clip(max_norm=0.03) -> 2. sparsify("), "{second_rule}");
    assert!(second_rule.contains("4. withhold"), "{second_rule}");
    assert!(stdout[third..].contains("  layers:     fc1, fc2\n"), "{stdout}");
    assert!(stdout.contains("note: no rule covers conv2"), "{stdout}");
}

#[test]
fn without_a_model_and_with_the_mlp() {
    let out = gradguard(&["policy", "check", "examples/policy.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("no --model"));
    // The MLP has no conv1: strict_layers makes that an error naming the pattern.
    let out = gradguard(&["policy", "check", "examples/policy.toml", "--model", "mlp"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("'conv1' matches no layer") && stderr.contains("fc0"), "{stderr}");
}

#[test]
fn malformed_policies_exit_non_zero_naming_the_problem() {
    for (file, needles) in [
        ("examples/policies/syntax_error.toml", &["syntax_error.toml", "line 7", "column"][..]),
        ("examples/policies/unknown_metric.toml", &["leakiness"][..]),
        ("examples/policies/missing_parameter.toml", &["ladder step 2", "max_norm"][..]),
        ("examples/policies/inverted_thresholds.toml", &["inverted thresholds"][..]),
        ("examples/policies/no-such-file.toml", &["cannot read policy", "no-such-file.toml"][..]),
    ] {
        let out = gradguard(&["policy", "check", file]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{file}: accepted\n{}", text(&out.stdout));
        assert!(out.stdout.is_empty(), "{file}: nothing on stdout for a bad policy");
        for n in needles {
            assert!(stderr.contains(n), "{file}: stderr lacks {n:?}:\n{stderr}");
        }
    }
    let out = gradguard(&["policy", "check", "examples/policies/unmatched_layer.toml", "--model", "cnn"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("'conv3' matches no layer"), "{}", text(&out.stderr));
    let out = gradguard(&["policy", "check", "examples/policy.toml", "--model", "resnet"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unknown model 'resnet'"), "{}", text(&out.stderr));
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("policy_cli");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn fixture(name: &str) -> String {
    root().join("tests").join("fixtures").join(name).display().to_string()
}

fn layers_of(model: &str) -> Vec<String> {
    gradguard::models::AuditModel::load(model, 0, tch::Device::Cpu).unwrap().layer_names().unwrap()
}

const DEFAULT: &str = "federated/gradguard_federated/policies/default.toml";

/// The text after "federated use" (the lint's part of the output).
fn lint_part(stdout: &str) -> &str {
    stdout.find("federated use (").map_or("", |i| &stdout[i..])
}

#[test]
fn a_federated_policy_on_thresholds_clipping_and_the_floor_is_warned_about() {
    // estimate_before_release = true declares federated use; the rule is an S_l^rms threshold
    // with a clip, and the floor is 64: none of it holds against a malicious server.
    let out = gradguard(&["policy", "check", "federated/gradguard_federated/policies/tight-first-layer.toml", "--model", "cnn"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "a warning, not an error: {stdout}{}", text(&out.stderr));
    let lint = lint_part(&stdout);
    assert!(lint.starts_with("federated use (estimate_before_release = true"), "{stdout}");
    assert!(lint.contains("warning: nothing in this policy holds against a malicious server: no calibrated noise on conv1, conv2, fc1, fc2 and no M6 rule."), "{lint}");
    for needle in [
        "rule 'first-layer-sensitivity-tight' acts on sensitivity_rms thresholds: trap weights lower",
        "109 to 118 of 128 samples come back",
        "clipping (rule 'first-layer-sensitivity-tight'): it scales dW and db alike, so x = dW_u / db_u is unchanged",
        "aggregation_floor 64: the server knows it and builds the trap for that batch size",
        "What holds: calibrated noise on every layer with a ledger cap",
        "gradguard policy init --model MODEL",
    ] {
        assert!(lint.contains(needle), "lacks {needle:?}:\n{lint}");
    }
    assert!(!lint.contains("  holds:"), "{lint}");
    assert!(!lint.contains("note:"), "{lint}");

    // The example is a training-loop policy: no lint unless asked for; asked, conv1 is bounded
    // (its calibrated noise rule) and the rest is not.
    let plain = text(&gradguard(&["policy", "check", "examples/policy.toml", "--model", "cnn"]).stdout);
    assert!(!plain.contains("federated use") && !plain.contains("warning:"), "{plain}");
    let out = gradguard(&["policy", "check", "examples/policy.toml", "--model", "cnn", "--federated"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    let lint = lint_part(&stdout);
    assert!(lint.starts_with("federated use (--federated)"), "{stdout}");
    assert!(lint.contains("warning: against a malicious server only the release of conv1 is bounded (calibrated noise, M5); conv2, fc1, fc2 have no calibrated noise and the policy has no M6 rule."), "{lint}");
    assert!(lint.contains("aggregate rungs (rule 'first-layer-sensitivity')"), "{lint}");
    assert!(lint.contains("rule 'head-latent-information' acts on subspace_separation (M2)"), "{lint}");
    // Without a model the coverage of the bits rule cannot be told.
    let lint = text(&gradguard(&["policy", "check", "examples/policy.toml", "--federated"]).stdout);
    assert!(lint.contains("its calibrated noise may not cover every layer (check with --model)"), "{lint}");
}

#[test]
fn the_default_federated_policy_fits_any_model_and_holds() {
    for model in ["cnn".to_string(), "mlp".into(), fixture("mlp_scripted.pt"), fixture("token_scripted.pt"), fixture("cnn_traced.pt")] {
        let out = gradguard(&["policy", "check", DEFAULT, "--model", &model]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{model}: {stdout}{}", text(&out.stderr));
        let all = layers_of(&model).join(", ");
        // Both rules cover every layer of the model.
        assert_eq!(stdout.matches(&format!("  layers:     {all}\n")).count(), 2, "{model}: {stdout}");
        assert!(stdout.contains("metric:     exposed_fraction") && stdout.contains("metric:     reconstruction_bound_bits"), "{stdout}");
        assert!(stdout.contains("ledger cap: over the whole run"), "{stdout}");
        assert!(!stdout.contains("warning") && !stdout.contains("note: no rule covers"), "{model}: {stdout}");
        assert!(lint_part(&stdout).contains("  holds: calibrated noise on every layer with a ledger cap (M5), and sample isolation (M6, rule 'sample-isolation')\n"), "{stdout}");
    }
}

#[test]
fn partial_protection_is_warned_about_layer_by_layer() {
    let write = |name: &str, settings: &str, rules: &str| {
        let path = scratch(name);
        std::fs::write(&path, format!("version = 2\n[settings]\nestimate_before_release = true\nestimate_every = 1\nmax_estimate_age_steps = 1\n{settings}\n{rules}")).unwrap();
        path.display().to_string()
    };
    let m6 = "[[rule]]\nname = \"iso\"\nmetric = \"exposed_fraction\"\nlayers = [\"*\"]\nact_above = 0.5\nrelax_below = 0.25\nladder = [{ action = \"withhold\" }]\n";
    let m5 = |layers: &str| format!("[[rule]]\nname = \"bound\"\nmetric = \"reconstruction_bound_bits\"\nlayers = [{layers}]\nact_above = 0.01\nrelax_below = 0.002\nladder = [{{ action = \"noise\", clip_norm = 10.0, target = \"threshold\" }}]\n");

    // M6 alone: the layers without noise are named.
    let p = write("m6-only.toml", "", m6);
    let lint = text(&gradguard(&["policy", "check", &p, "--model", "cnn"]).stdout);
    assert!(lint.contains("warning: conv1, conv2, fc1, fc2 released without calibrated noise (no reconstruction_bound_bits rule covers them)"), "{lint}");
    assert!(lint.contains("  holds: sample isolation (M6, rule 'iso')\n"), "{lint}");
    assert!(!lint.contains("nothing in this policy holds"), "{lint}");
    // M6 and noise on conv1 only.
    let p = write("m6-m5-conv1.toml", "ledger_cap_bits = 1.0", &format!("{m6}{}", m5("\"conv1\"")));
    let lint = text(&gradguard(&["policy", "check", &p, "--model", "cnn"]).stdout);
    assert!(lint.contains("warning: conv2, fc1, fc2 released without calibrated noise"), "{lint}");
    // Noise on every layer without a cap: the rounds add up.
    let p = write("m5-no-cap.toml", "", &format!("{m6}{}", m5("\"*\"")));
    let lint = text(&gradguard(&["policy", "check", &p, "--model", "cnn"]).stdout);
    assert!(lint.contains("warning: no ledger_cap_bits: each round's release is bounded, but the rounds' bounds add up"), "{lint}");
    assert!(lint.contains("  holds: calibrated noise on every layer (M5), per release, and sample isolation (M6, rule 'iso')\n"), "{lint}");
    // Noise on every layer with a cap and no M6: holds, with a note.
    let p = write("m5-cap.toml", "ledger_cap_bits = 1.0", &m5("\"*\""));
    let out = gradguard(&["policy", "check", &p, "--model", "cnn"]);
    let lint = text(&out.stdout);
    assert!(out.status.success() && !lint.contains("warning"), "{lint}");
    assert!(lint.contains("  holds: calibrated noise on every layer with a ledger cap (M5)\n") && lint.contains("note: no M6 rule (exposed_fraction)"), "{lint}");
}

/// `policy init` on `model` (extra arguments after it), written to a scratch file: the file's
/// text, after checking that it loads, that its patterns cover exactly the model's layers, and
/// that `policy check` passes it without a warning.
fn init_and_check(name: &str, model: &str, extra: &[&str]) -> String {
    let out_path = scratch(name);
    let _ = std::fs::remove_file(&out_path);
    let out_arg = out_path.display().to_string();
    let mut args = vec!["policy", "init", "--model", model, "--out", &out_arg];
    args.extend_from_slice(extra);
    let out = gradguard(&args);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{model}: {stdout}{}", text(&out.stderr));
    assert!(stdout.contains(&format!("wrote {out_arg} for ")) && stdout.contains(&format!("check it: gradguard policy check {out_arg} --model {model}")), "{stdout}");
    let written = std::fs::read_to_string(&out_path).unwrap();

    let layers = layers_of(model);
    let policy = gradguard::guard::Policy::from_toml_str(&written, name).unwrap_or_else(|e| panic!("{e}\n{written}"));
    let coverage = policy.coverage(&layers).unwrap();
    let all: Vec<usize> = (0..layers.len()).collect();
    let rules = policy.rules();
    assert_eq!(rules.len(), 2, "{written}");
    assert_eq!(rules[0].metric.name(), "exposed_fraction");
    assert_eq!(rules[1].metric.name(), "reconstruction_bound_bits");
    assert_eq!(coverage.rule_layers[1], all, "the bound covers every layer:\n{written}");
    // The per-layer bound splits 0.05 bits per release over the layers: sum of (2^(2b) - 1) <= 2^0.1 - 1.
    let b = rules[1].act_above;
    assert!(layers.len() as f64 * (2f64.powf(2.0 * b) - 1.0) <= 2f64.powf(0.1) - 1.0 + 1e-12 && b > 0.0, "{b}");
    assert!(matches!(rules[1].ladder[..], [gradguard::guard::decide::LadderStep::CalibratedNoise { .. }]), "{written}");
    assert_eq!(policy.settings().ledger_cap_bits, Some(1.0));
    assert!(policy.settings().estimate_before_release);

    let check = gradguard(&["policy", "check", &out_arg, "--model", model]);
    let checked = text(&check.stdout);
    assert!(check.status.success(), "{checked}{}", text(&check.stderr));
    assert!(!checked.contains("warning") && checked.contains("  holds: calibrated noise on every layer"), "{checked}");
    assert!(!checked.contains("note: no rule covers"), "{checked}");
    written
}

#[test]
fn policy_init_writes_a_policy_that_fits_the_model() {
    // The digits CNN, no data: every layer has units; v is left to each round.
    let cnn = init_and_check("init-cnn.toml", "cnn", &[]);
    assert!(cnn.contains("layers = [\"conv1\", \"conv2\", \"fc1\", \"fc2\"]"), "{cnn}");
    assert!(cnn.contains("# M5's prior variance v is measured on each round's samples"), "{cnn}");
    assert!(!cnn.contains("\nprior_variance"), "{cnn}");
    // 0.05 bits per release over 4 layers: 0.5 log2(1 + (2^0.1 - 1) / 4), written rounded down.
    assert!(cnn.contains("act_above = 0.01282\n"), "{cnn}");
    assert!(cnn.contains("can be in about 41 releases"), "{cnn}");

    // A TorchScript MLP with nested names, measured on its data: v fixed, M6 per layer.
    let mlp = init_and_check("init-mlp.toml", &fixture("mlp_scripted.pt"), &["--inputs", &fixture("digits_x.npy"), "--labels", &fixture("digits_y.npy")]);
    assert!(mlp.contains("layers = [\"body.1\", \"body.3\", \"out_layer\"]"), "{mlp}");
    let v = mlp.lines().find_map(|l| l.strip_prefix("prior_variance = ")).expect("prior_variance written");
    let v: f64 = v.parse().unwrap();
    assert!((0.01..0.2).contains(&v), "digits / 16 have a per-dimension variance near 0.07: {v}");
    assert!(mlp.contains("#   body.1: 32 units, exposed_fraction "), "{mlp}");

    // A token model: M1 on its embeddings, so v is not fixed (the embeddings train); the
    // embedding's rows are units.
    let tokens = init_and_check("init-token.toml", &fixture("token_scripted.pt"), &["--inputs", &fixture("tokens_x.npy"), "--labels", &fixture("tokens_y.npy")]);
    assert!(tokens.contains("layers = [\"emb\", \"fc\"]"), "{tokens}");
    assert!(tokens.contains("# M5 is measured on the embeddings") && !tokens.contains("\nprior_variance"), "{tokens}");
    assert!(tokens.contains("#   emb: 20 units, exposed_fraction"), "{tokens}");

    // Standard output without --out, the same text as the file.
    let out = gradguard(&["policy", "init", "--model", "cnn"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), cnn);
}

#[test]
fn policy_init_errors_are_clear() {
    let missing = root().join("tests/fixtures/no-such-model.pt").display().to_string();
    for (args, needles) in [
        (vec!["--model", missing.as_str()], vec!["no-such-model.pt", "no such file"]),
        (vec!["--model", "resnet"], vec!["unknown model 'resnet'"]),
        (vec!["--model", "tests/fixtures/not_torchscript.pt"], vec!["not_torchscript.pt is not a TorchScript module"]),
        (vec!["--model", "cnn", "--inputs", "tests/fixtures/no-such-x.npy"], vec!["--labels is required with --inputs (no y.npy beside tests/fixtures/no-such-x.npy)"]),
        (vec!["--model", "cnn", "--cap-bits", "0.01"], vec!["--cap-bits must be a finite number of at least --release-bits (0.05), got 0.01"]),
        (vec!["--model", "cnn", "--release-bits", "0"], vec!["--release-bits must be a finite number > 0, got 0"]),
        (vec!["--model", "cnn", "--out", "examples/policy.toml"], vec!["examples/policy.toml exists: pass --force to overwrite it"]),
    ] {
        let mut all = vec!["policy", "init"];
        all.extend(args.iter().copied());
        let out = gradguard(&all);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted:\n{}", text(&out.stdout));
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
        for n in needles {
            assert!(stderr.contains(n), "{args:?}: stderr lacks {n:?}:\n{stderr}");
        }
    }
}
