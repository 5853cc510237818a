//! `gradguard train` end to end, through the built binary, on the fixtures of tests/fixtures/
//! (make_fixtures.py's, and those tests/fixtures/train_check.py makes into the test's scratch
//! folder). PyTorch checks what the command wrote: train_check.py loads it with
//! `torch.jit.load`, in the venv's python (`$VIRTUAL_ENV`, else `.venv`).
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name).display().to_string()
}

fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("train_cli").join(name)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn python() -> PathBuf {
    match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => PathBuf::from(venv).join("bin").join("python"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv").join("bin").join("python"),
    }
}

/// Runs tests/fixtures/train_check.py with `args`.
fn check_py(args: &[&str]) -> Output {
    Command::new(python()).arg(fixture("train_check.py")).args(args).output().expect("the venv's python runs")
}

/// The extra fixtures (made once per test binary): a scripted CNN with batch norm, and the
/// first 16 samples of digits_x.npy.
fn made(name: &str) -> String {
    static MADE: OnceLock<PathBuf> = OnceLock::new();
    let dir = MADE.get_or_init(|| {
        let dir = scratch("fixtures");
        let out = check_py(&["make", path(&dir)]);
        assert!(out.status.success(), "train_check.py make: {}", String::from_utf8_lossy(&out.stderr));
        dir
    });
    path(&dir.join(name)).to_string()
}

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gradguard")).arg("train").args(args).output().expect("the gradguard binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Trains `model` on the digits fixtures into a fresh scratch folder `out`, with `extra`
/// flags; the run must succeed.
fn train_ok(model: &str, out: &str, extra: &[&str]) -> (PathBuf, String) {
    let dir = scratch(out);
    let _ = std::fs::remove_dir_all(&dir);
    let (x, y) = (fixture("digits_x.npy"), fixture("digits_y.npy"));
    let mut args = vec!["--model", model, "--inputs", &x, "--labels", &y, "--out", path(&dir)];
    args.extend_from_slice(extra);
    let run = train(&args);
    assert_eq!(run.status.code(), Some(0), "args {args:?}:\n{}{}", text(&run.stdout), text(&run.stderr));
    (dir, text(&run.stdout))
}

fn report(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

/// The accuracy PyTorch measures for the module at `model` on the digits fixtures.
fn pytorch_accuracy(model: &str) -> f64 {
    let out = check_py(&["accuracy", model, &fixture("digits_x.npy"), &fixture("digits_y.npy")]);
    assert!(out.status.success(), "train_check.py accuracy {model}: {}", text(&out.stderr));
    text(&out.stdout).trim().parse().unwrap()
}

/// Whether PyTorch finds the two modules' parameters and buffers bit-identical.
fn same_state(a: &Path, b: &Path) -> (bool, String) {
    let out = check_py(&["same", path(&a.join("model.pt")), path(&b.join("model.pt"))]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "train_check.py same: {}", text(&out.stderr));
    (out.status.success(), text(&out.stdout))
}

#[test]
fn a_trained_module_reloads_in_pytorch_and_fits_its_training_data_better() {
    let cnn = fixture("cnn_traced.pt");
    let (dir, stdout) = train_ok(&cnn, "trained", &["--attribute", &fixture("digits_a.npy"), "--steps", "150", "--seed", "1"]);
    for file in ["model.pt", "report.json", "audit.jsonl"] {
        assert!(dir.join(file).is_file(), "{file} written");
    }
    for line in ["layers: conv1, conv2, fc1, fc2", "done: 150 steps", "releases: 150 released", "decisions: ", "model: "] {
        assert!(stdout.contains(line), "stdout lacks {line:?}:\n{stdout}");
    }

    let untrained = pytorch_accuracy(&cnn);
    let trained = pytorch_accuracy(path(&dir.join("model.pt")));
    // Ten classes: the untrained module is near chance; 150 Adam steps fit 256 digits well.
    assert!(trained >= untrained + 0.5, "accuracy on the training data: untrained {untrained}, trained {trained}");

    // The report agrees with PyTorch (the same function, evaluated in eval mode).
    let r = report(&dir);
    assert_eq!((r["guarded"].as_bool(), r["steps"].as_u64(), r["samples"].as_u64()), (Some(true), Some(150), Some(256)));
    assert_eq!(r["releases"]["released"].as_u64(), Some(150));
    assert!((r["after"]["accuracy"].as_f64().unwrap() - trained).abs() <= 1.0 / 256.0, "report {} vs PyTorch {trained}", r["after"]["accuracy"]);
    assert!((r["before"]["accuracy"].as_f64().unwrap() - untrained).abs() <= 1.0 / 256.0);
    assert!(r["last_report"]["layers"].as_array().is_some_and(|l| l.len() == 4));
}

/// Observe-only (no policy) and unguarded, same seed: bit-identical parameters and buffers.
fn observe_only_matches_unguarded(model: &str, name: &str) {
    let steps = ["--steps", "40", "--batch-size", "32", "--seed", "5"];
    let (guarded, _) = train_ok(model, &format!("{name}_guarded"), &steps);
    let (unguarded, stdout) = train_ok(model, &format!("{name}_unguarded"), &[&steps[..], &["--no-guard"]].concat());
    assert!(stdout.contains("guard: off"), "{stdout}");
    assert!(guarded.join("audit.jsonl").is_file() && !unguarded.join("audit.jsonl").exists(), "an audit log only when guarded");
    assert_eq!(report(&unguarded)["guarded"].as_bool(), Some(false));
    let (same, why) = same_state(&guarded, &unguarded);
    assert!(same, "{name}: observe-only training changed the trained module: {why}");
}

#[test]
fn observe_only_training_is_bit_identical_to_the_unguarded_run() {
    let cnn = fixture("cnn_traced.pt");
    observe_only_matches_unguarded(&cnn, "cnn");
    // The seed decides the mini-batches: another seed trains another module.
    let (other, _) = train_ok(&cnn, "cnn_other_seed", &["--steps", "40", "--batch-size", "32", "--seed", "6", "--no-guard"]);
    let (same, why) = same_state(&scratch("cnn_unguarded"), &other);
    assert!(!same, "seeds 5 and 6 trained the same module: {why}");
}

#[test]
fn a_token_model_without_a_split_trains_with_m1_absent_and_says_why() {
    let model = made("tokens_dropout.pt");
    let (x, y) = (fixture("tokens_x.npy"), fixture("tokens_y.npy"));
    let run_in = |name: &str, extra: &[&str]| {
        let dir = scratch(name);
        let _ = std::fs::remove_dir_all(&dir);
        let mut args = vec!["--model", &model, "--inputs", &x, "--labels", &y, "--out", path(&dir), "--steps", "30", "--batch-size", "16", "--seed", "3"];
        args.extend_from_slice(extra);
        let run = train(&args);
        assert_eq!(run.status.code(), Some(0), "args {args:?}:\n{}{}", text(&run.stdout), text(&run.stderr));
        (dir, text(&run.stdout))
    };
    let (guarded, stdout) = run_in("tokens_guarded", &[]);
    let said: Vec<&str> = stdout.lines().filter(|l| l.starts_with("M1: absent")).collect();
    assert_eq!(said.len(), 1, "one line says why M1 is absent:\n{stdout}");
    assert!(said[0].contains("Int64") && said[0].contains("no embedding split"), "{}", said[0]);
    let last = &report(&guarded)["last_report"]["layers"];
    let reasons: Vec<&str> = last.as_array().unwrap().iter().map(|l| l["sensitivity"]["reason"].as_str().unwrap_or("")).collect();
    assert!(!reasons.is_empty() && reasons.iter().all(|r| r.contains("no embedding split")), "M1 absent in the report: {last}");
    // Observe-only with dropout: the guard's passes leave the random stream where it was.
    let (unguarded, _) = run_in("tokens_unguarded", &["--no-guard"]);
    let (same, why) = same_state(&guarded, &unguarded);
    assert!(same, "observe-only training of a dropout token model changed the trained module: {why}");
}

#[test]
fn observe_only_training_of_a_batch_norm_model_is_bit_identical_to_the_unguarded_run() {
    observe_only_matches_unguarded(&made("cnn_bn_scripted.pt"), "bn");
}

/// Runs a training that must fail: exit code 1 (an error, not a panic) and every substring
/// in its stderr.
fn fails_with(args: &[&str], expected: &[&str]) {
    let out_dir = scratch("failed");
    let mut args = args.to_vec();
    args.extend(["--out", path(&out_dir)]);
    let out = train(&args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "args {args:?}: exit {:?}, stderr:\n{err}", out.status.code());
    assert!(!err.contains("panicked"), "args {args:?} panicked:\n{err}");
    for s in expected {
        assert!(err.contains(s), "args {args:?}: stderr lacks {s:?}:\n{err}");
    }
}

#[test]
fn bad_input_is_an_error_that_names_the_file() {
    let (x, y) = (fixture("digits_x.npy"), fixture("digits_y.npy"));
    let cnn = fixture("cnn_traced.pt");
    fails_with(&["--model", &fixture("missing.pt"), "--inputs", &x, "--labels", &y], &["missing.pt: no such file"]);
    fails_with(&["--model", &fixture("not_torchscript.pt"), "--inputs", &x, "--labels", &y], &["not_torchscript.pt is not a TorchScript module"]);
    fails_with(&["--model", &cnn, "--inputs", &made("x16.npy"), "--labels", &fixture("y_out_of_range.npy")], &["labels", "y_out_of_range.npy", "value 12 at index 5", "outside 0..10"]);
    fails_with(
        &["--model", &cnn, "--inputs", &fixture("x_wrong_shape.npy"), "--labels", &fixture("y16.npy")],
        &["inputs", "x_wrong_shape.npy", "do not fit the model", "cnn_traced.pt", "to have 1 channels, but got 3"],
    );
    fails_with(&["--model", &fixture("mlp_scripted.pt"), "--inputs", &x, "--labels", &y, "--policy", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml")], &["policy.toml", "matches no layer", "body.1"]);
    fails_with(&["--model", &cnn, "--inputs", &x, "--labels", &y, "--steps", "0"], &["--steps must be at least 1"]);
}

/// The malicious-server fixtures (tests/fixtures/malicious_models.py), made once.
fn malicious(name: &str) -> String {
    static MADE: OnceLock<PathBuf> = OnceLock::new();
    let dir = MADE.get_or_init(|| {
        let dir = scratch("malicious");
        let out = Command::new(python()).arg(fixture("malicious_models.py")).arg(&dir).output().expect("the venv's python runs");
        assert!(out.status.success(), "malicious_models.py: {}", String::from_utf8_lossy(&out.stderr));
        dir
    });
    path(&dir.join(name)).to_string()
}

#[test]
fn someone_elses_trap_model_is_refused_before_training_and_an_honest_one_trains() {
    let policy = scratch("isolation.toml");
    std::fs::create_dir_all(policy.parent().unwrap()).unwrap();
    std::fs::write(&policy, "version = 2\n[[rule]]\nname = \"isolation\"\nmetric = \"exposed_fraction\"\nlayers = [\"fc0\", \"fc1\"]\nact_above = 0.1\nrelax_below = 0.05\nladder = [{ action = \"withhold\" }]\n").unwrap();
    let (x, y) = (malicious("data/x.npy"), malicious("data/y.npy"));
    let run = |model: &str, out: &str| {
        let dir = scratch(out);
        let _ = std::fs::remove_dir_all(&dir);
        let args = ["--model", model, "--inputs", &x, "--labels", &y, "--policy", path(&policy), "--steps", "5", "--batch-size", "32", "--out", path(&dir)];
        (train(&args), dir)
    };
    let (refused, dir) = run(&malicious("trap.pt"), "trap");
    assert_ne!(refused.status.code(), Some(0));
    let err = text(&refused.stderr);
    assert!(err.contains("refused: the global model isolates") && err.contains("in fc0"), "{err}");
    assert!(!dir.join("model.pt").exists(), "nothing is trained on a refused model");
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"outcome\":\"refused\"")).count(), 1, "{log}");
    let (honest, dir) = run(&malicious("honest.pt"), "honest");
    assert_eq!(honest.status.code(), Some(0), "{}", text(&honest.stderr));
    assert!(dir.join("model.pt").exists());
}
