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
