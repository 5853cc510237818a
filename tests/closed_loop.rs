//! The closed loop on the digits CNN: measured leakage -> threshold -> defence -> measured
//! again on the release -> release or block.
use gradguard::data::Digits;
use gradguard::guard::{AuditLog, BlockReason, LayerMap, Policy, Release, decide::Outcome, report::{LeakageMetric, ReleaseOutcome}};
use gradguard::models::DigitsCnn;
use gradguard::{Batch, Guard, GuardError};
use tch::{nn, Device, Kind, Tensor};

#[path = "support/digits_step.rs"]
mod digits_step;
use digits_step::digits_step;

struct Setup {
    vs: nn::VarStore,
    net: DigitsCnn,
    digits: Digits,
}

fn setup() -> Setup {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = DigitsCnn::new(&vs.root());
    Setup { vs, net, digits: Digits::embedded().unwrap() }
}

/// A guard over every variable of `vs` that enforces `policy`.
fn guard_for(vs: &nn::VarStore, policy: Policy) -> Guard {
    Guard::new(LayerMap::from_var_store(vs).unwrap(), policy).unwrap()
}

fn policy(rules: &str, settings: &str) -> Policy {
    Policy::from_toml_str(&format!("version = 1\n[settings]\n{settings}\n{rules}"), "test policy").unwrap()
}

fn temp_log(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("gradguard-{name}-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// zero_grad + backward on samples [from, from + n), then the guard's in-place decision.
fn guarded_step(s: &Setup, guard: &mut Guard, from: usize, n: usize) -> (Result<Release, GuardError>, Tensor, Tensor) {
    digits_step(&s.vs, &s.net, &s.digits, guard, &(from..from + n).collect::<Vec<_>>())
}

/// conv1's raw M1 on samples [0, n) with the parameters as they are (no policy).
fn raw_conv1(s: &Setup, n: usize) -> gradguard::guard::report::Sensitivity {
    let mut probe = guard_for(&s.vs, Policy::permissive());
    let report = guarded_step(s, &mut probe, 0, n).0.unwrap().into_report();
    report.layer("conv1").unwrap().sensitivity.measured().unwrap().clone()
}

/// A one-rule policy on conv1 with its ladder, thresholds and extra settings.
fn conv1_rule(metric: &str, act: f64, relax: f64, ladder: &str, settings: &str) -> Policy {
    let rule = format!(
        "[[rule]]\nname = \"conv1\"\nmetric = \"{metric}\"\nlayers = [\"conv1\"]\nact_above = {act}\nrelax_below = {relax}\nladder = [{ladder}]\n"
    );
    policy(&rule, settings)
}

fn grad_norm(vs: &nn::VarStore, prefix: &str) -> f64 {
    let vars = vs.variables();
    let mut total = 0.0;
    for (name, t) in vars {
        if name.starts_with(prefix) {
            total += t.grad().square().sum(Kind::Double).double_value(&[]);
        }
    }
    total.sqrt()
}

#[test]
fn a_layer_above_its_threshold_is_protected_until_the_release_is_below_it() {
    let s = setup();
    // Measure the raw first-layer sensitivity, then set the threshold below it.
    let raw = raw_conv1(&s, 64).sensitivity_rms;
    let act = raw * 0.5;
    let ladder = "{ action = \"quantize\", bits = 4 }, { action = \"clip\", max_norm = 0.2 }, { action = \"clip\", max_norm = 0.05 }, { action = \"withhold\" }";
    let log = temp_log("protect");
    let mut guard = guard_for(&s.vs, conv1_rule("sensitivity_rms", act, act * 0.5, ladder, "estimate_every = 1\nmax_estimate_age_steps = 1"));
    guard.set_audit_log(AuditLog::open(&log).unwrap()).unwrap();
    let report = guarded_step(&s, &mut guard, 0, 64).0.unwrap().into_report();
    let manifest = report.release.as_ref().unwrap();
    assert_eq!(manifest.outcome, ReleaseOutcome::Released);
    let conv1 = &manifest.layers[0];
    assert_eq!(conv1.name, "conv1");
    assert!(conv1.released);
    let check = &conv1.checks[0];
    assert_eq!(check.metric, LeakageMetric::SensitivityRms);
    let released = check.released.unwrap();
    assert!(released <= act, "the release's measured metric {released} is at most the threshold {act}");
    let same = (check.raw.unwrap() - raw).abs() / raw;
    assert!(same < 1e-5, "the raw metric is the same measurement up to f32 rounding ({same:e})");
    // Quantisation does not lower M1 (straight-through), so the loop had to go on to a clip.
    assert!(check.level >= 2, "escalated past quantisation: level {}", check.level);
    let max_norm = if check.level == 2 { 0.2 } else { 0.05 };
    assert!(grad_norm(&s.vs, "conv1.") <= max_norm * (1.0 + 1e-5), "the gradient left in .grad() is the clipped one");
    assert!(grad_norm(&s.vs, "fc1.") > 0.0, "other layers are released untouched");
    let records = AuditLog::read_all(&log).unwrap();
    let escalations: Vec<_> = records.iter().filter(|r| r.outcome == Outcome::Escalated && r.layer == "conv1").collect();
    assert_eq!(escalations.len(), check.level, "one escalation record per rung");
    assert!(escalations[0].action.starts_with("quantize"));
    assert!(records.iter().all(|r| r.policy_hash == guard.policy().hash()));
    let final_record = records.iter().find(|r| r.layer == "conv1" && r.outcome == Outcome::Protected).unwrap();
    assert!(final_record.value.unwrap() <= act);
}

#[test]
fn a_threshold_no_defence_can_meet_blocks_and_releases_nothing() {
    let s = setup();
    let rules = "[[rule]]\nname = \"impossible\"\nmetric = \"sensitivity\"\nlayers = [\"conv1\"]\nact_above = 0.0\nrelax_below = 0.0\n\
                 ladder = [{ action = \"clip\", max_norm = 0.01 }, { action = \"sparsify\", keep_fraction = 0.5 }]\n";
    let mut guard = guard_for(&s.vs, policy(rules, "estimate_every = 1"));
    let (result, _, _) = guarded_step(&s, &mut guard, 0, 64);
    let manifest = match result {
        Ok(Release::Blocked { reason: BlockReason::Violation { layer, metric, value, threshold }, report }) => {
            assert_eq!((layer.as_str(), metric, threshold), ("conv1", LeakageMetric::Sensitivity, 0.0));
            assert!(value.unwrap() > 0.0);
            report.release.expect("a blocked release has its manifest")
        }
        other => panic!("expected a block, got {other:?}"),
    };
    for (name, t) in s.vs.variables() {
        let g = t.grad();
        assert!(!g.defined() || g.abs().sum(Kind::Double).double_value(&[]) == 0.0, "{name}: nothing is left to apply");
    }
    assert!(matches!(manifest.outcome, ReleaseOutcome::Blocked { .. }));
    assert!(manifest.layers.iter().all(|l| !l.released));
}

#[test]
fn a_rule_whose_metric_cannot_be_measured_fails_closed() {
    let s = setup();
    let rules = "[[rule]]\nname = \"latent\"\nmetric = \"subspace_separation\"\nlayers = [\"fc*\"]\nact_above = 0.5\nrelax_below = 0.1\nladder = [{ action = \"withhold\" }]\n";
    let mut guard = guard_for(&s.vs, policy(rules, "estimate_every = 1"));
    // No attribute labels: M2 cannot be computed, so the guard cannot vouch for fc1/fc2.
    let (x, y, _) = s.digits.batch(&(0..32).collect::<Vec<_>>(), Device::Cpu).unwrap();
    s.net.f_loss(&x, &y).unwrap().backward();
    let loss = |x: &Tensor, y: &Tensor| s.net.f_loss(x, y);
    let release = guard.after_backward(&Batch::new(&x, &y), &loss).unwrap();
    let reason = release.block_reason();
    assert!(
        matches!(reason, Some(BlockReason::Violation { layer, metric: LeakageMetric::SubspaceSeparation, value: None, .. }) if layer == "fc1"),
        "{reason:?}"
    );
}

#[test]
fn a_failed_estimate_fails_closed() {
    let s = setup();
    let rules = "[[rule]]\nname = \"r\"\nmetric = \"sensitivity\"\nlayers = [\"conv1\"]\nact_above = 100.0\nrelax_below = 50.0\nladder = [{ action = \"withhold\" }]\n";
    // The whole wall time is the guard's budget here, so the estimate is due every 4 steps.
    let p = Policy::from_toml_str(&format!("version = 1\n[settings]\nestimate_every = 4\nmax_estimate_age_steps = 4\nbudget_share = 1.0\n{rules}"), "t").unwrap();
    let mut guard = guard_for(&s.vs, p);
    assert!(guarded_step(&s, &mut guard, 0, 16).0.unwrap().report().estimated);
    for step in 1..4 {
        let report = guarded_step(&s, &mut guard, 16 * step, 16).0.unwrap().into_report();
        assert!(!report.estimated && report.step_allowed(), "levels reused between estimates at step {step}");
    }
    // The estimate due at step 4 fails (NaN inputs; .grad() itself is finite zeros): the
    // guard cannot vouch for the release and refuses it.
    let nan = Tensor::full([16, 1, 8, 8], f64::NAN, (Kind::Float, Device::Cpu));
    let y = Tensor::zeros([16], (Kind::Int64, Device::Cpu));
    for p in s.vs.trainable_variables() {
        let mut g = p.grad();
        let _ = g.zero_();
    }
    let loss = |x: &Tensor, y: &Tensor| s.net.f_loss(x, y);
    let release = guard.after_backward(&Batch::new(&nan, &y), &loss).unwrap();
    let reason = release.block_reason();
    assert!(matches!(reason, Some(BlockReason::GuardFailure { what }) if what.contains("estimate failed")), "{reason:?}");
}

#[test]
fn raising_the_aggregation_floor_from_8_to_64_lowers_every_layers_sensitivity_4x() {
    let s = setup();
    let measure = |floor: usize| -> Vec<f64> {
        let p = Policy::from_toml_str(&format!("version = 1\n[settings]\nestimate_every = 1\naggregation_floor = {floor}\nprobes = 16\n"), "t").unwrap();
        let mut guard = guard_for(&s.vs, p);
        let mut last = None;
        for k in 0..floor / 8 {
            let report = guarded_step(&s, &mut guard, 8 * k, 8).0.unwrap().into_report();
            assert_eq!(report.step_allowed(), (k + 1) * 8 == floor, "released only once the floor is covered");
            last = Some(report);
        }
        let report = last.unwrap();
        assert_eq!(report.release.as_ref().unwrap().samples, floor);
        report.layers.iter().map(|l| l.sensitivity.measured().unwrap().sensitivity).collect()
    };
    let small = measure(8);
    let large = measure(64);
    for ((name, s8), s64) in ["conv1", "conv2", "fc1", "fc2"].iter().zip(&small).zip(&large) {
        assert!(s8 / s64 >= 4.0, "{name}: S_l {s8} at 8 samples vs {s64} at 64 (ratio {:.2})", s8 / s64);
    }
}

#[test]
fn reloading_an_invalid_policy_keeps_the_one_in_force_and_says_so() {
    let s = setup();
    let rules = "[[rule]]\nname = \"r\"\nmetric = \"sensitivity\"\nlayers = [\"conv1\"]\nact_above = 1.0\nrelax_below = 0.5\nladder = [{ action = \"withhold\" }]\n";
    let mut guard = guard_for(&s.vs, policy(rules, ""));
    let before = guard.policy().hash().to_string();
    let err = guard.reload_policy("version = 1\n[[rule]]\nname = \"x\"\nmetric = \"leakiness\"\n", "reload.toml").unwrap_err();
    let message = err.to_string();
    assert!(message.contains("stays") && message.contains(&before[..12]) && message.contains("leakiness"), "{message}");
    assert_eq!(guard.policy().hash(), before);
    let unmatched = rules.replace("conv1", "conv9");
    assert!(matches!(guard.reload_policy(&format!("version = 1\n{unmatched}"), "r2"), Err(GuardError::PolicyRejected { .. })));
    assert_eq!(guard.policy().hash(), before);
    guard.reload_policy(&format!("version = 1\n[settings]\nestimate_every = 2\n{rules}"), "r3").unwrap();
    assert_ne!(guard.policy().hash(), before);
    assert_eq!(guard.policy().settings().estimate_every, 2);
    assert_eq!(guard.policy_reload_failures(), 2, "both rejections are counted");
}

#[test]
fn an_aggregate_rung_raises_the_floor_and_the_larger_release_is_measured_again() {
    let s = setup();
    // Between S(16 samples) and S(32 samples) ~ S(16) / 2.
    let act = raw_conv1(&s, 16).sensitivity * 0.7;
    let ladder = "{ action = \"aggregate\", factor = 2 }, { action = \"aggregate\", factor = 2 }";
    let settings = "estimate_every = 1\naggregation_floor = 16\naggregation_ceiling = 64\nbudget_share = 1.0";
    let log = temp_log("aggregate");
    let mut guard = guard_for(&s.vs, conv1_rule("sensitivity", act, act * 0.1, ladder, settings));
    guard.set_audit_log(AuditLog::open(&log).unwrap()).unwrap();
    let first = guarded_step(&s, &mut guard, 0, 16).0.unwrap().into_report();
    let m = first.release.as_ref().unwrap();
    assert!(matches!(m.outcome, ReleaseOutcome::Held { .. }), "{:?}", m.outcome);
    assert!(!first.step_allowed());
    assert_eq!(m.aggregation_floor, 32, "the rung doubled the floor");
    let second = guarded_step(&s, &mut guard, 16, 16).0.unwrap().into_report();
    let m = second.release.as_ref().unwrap();
    assert_eq!(m.outcome, ReleaseOutcome::Released);
    assert_eq!(m.samples, 32, "the release covers both micro-batches");
    let check = &m.layers[0].checks[0];
    assert!(check.released.unwrap() <= act, "measured on the 32-sample release: {:?} vs {act}", check.released);
    let records = AuditLog::read_all(&log).unwrap();
    assert!(records.iter().any(|r| r.outcome == Outcome::Escalated && r.action.starts_with("aggregate")));
}

/// With `calibration_margin_se = 2` the sigma is sized for S_l^2 + 2 SE over the probes: the
/// re-measured bound sits below the threshold, and the bound at dFIL + 2 SE is the threshold.
#[test]
fn a_calibration_margin_sizes_the_noise_for_the_upper_estimate() {
    let s = setup();
    let rule = "[[rule]]\nname = \"bound\"\nmetric = \"reconstruction_bound_bits\"\nlayers = [\"conv1\"]\nact_above = 0.05\nrelax_below = 0.01\n\
                ladder = [{ action = \"noise\", clip_norm = 0.02, target = \"threshold\" }]\n";
    let policy = Policy::from_toml_str(&format!("version = 2\n[settings]\nestimate_every = 1\ncalibration_margin_se = 2.0\n{rule}"), "test").unwrap();
    let mut guard = guard_for(&s.vs, policy);
    let report = guarded_step(&s, &mut guard, 0, 64).0.unwrap().into_report();
    let b = report.layer("conv1").unwrap().reconstruction_bound.measured().unwrap().clone();
    let (bits, dfil, se) = (b.reconstruction_bound_bits.unwrap(), b.dfil.unwrap(), b.dfil_se.unwrap());
    assert!(se > 0.0 && bits < 0.05 * 0.99, "below the threshold by the margin: {bits} (dfil {dfil} +- {se})");
    let upper = 0.5 * (1.0 + b.prior_variance * (dfil + 2.0 * se)).log2();
    assert!((upper - 0.05).abs() < 1e-5, "the upper estimate meets the threshold: {upper}");
    // Version 1 policies cannot ask for it, and it cannot be negative.
    assert!(Policy::from_toml_str("version = 1\n[settings]\ncalibration_margin_se = 2.0\n", "v1").is_err());
    assert!(Policy::from_toml_str(&format!("version = 2\n[settings]\ncalibration_margin_se = -1.0\n{rule}"), "neg").is_err());
}

/// A bits rule with a calibrated noise rung on the CNN's conv1: one escalation, the sigma
/// computed from the measured S_l after the clip, and the bound re-measured on the release at
/// the threshold; the noise is in `.grad()` and the sigma in the record and the manifest.
#[test]
fn a_calibrated_noise_rung_meets_its_bound_within_one_re_measurement() {
    let s = setup();
    let rule = "[[rule]]\nname = \"bound\"\nmetric = \"reconstruction_bound_bits\"\nlayers = [\"conv1\"]\nact_above = 0.05\nrelax_below = 0.01\n\
                ladder = [{ action = \"noise\", clip_norm = 0.02, target = \"threshold\" }]\n";
    let policy = Policy::from_toml_str(&format!("version = 2\n[settings]\nestimate_every = 1\nmax_estimate_age_steps = 1\n{rule}"), "test").unwrap();
    let log = temp_log("calibrated");
    let mut guard = guard_for(&s.vs, policy);
    guard.set_audit_log(AuditLog::open(&log).unwrap()).unwrap();
    let report = guarded_step(&s, &mut guard, 0, 64).0.unwrap().into_report();
    let manifest = report.release.as_ref().unwrap();
    assert_eq!(manifest.outcome, ReleaseOutcome::Released);
    let conv1 = &manifest.layers[0];
    let check = &conv1.checks[0];
    assert_eq!((check.metric, check.level), (LeakageMetric::ReconstructionBoundBits, 1));
    assert_eq!(check.raw, Some(f64::INFINITY), "the raw gradient has no noise: no bound");
    let released = check.released.unwrap();
    assert!(released <= 0.05 && released > 0.05 * (1.0 - 1e-5), "re-measured at the threshold: {released}");
    // The bound the report gives agrees with its own dFIL, prior and D.
    let b = report.layer("conv1").unwrap().reconstruction_bound.measured().unwrap();
    assert_eq!(b.input_dims, 64);
    assert!((0.5 * (1.0 + b.prior_variance * b.dfil.unwrap()).log2() - released).abs() < 1e-12);
    let sigma = b.noise_std.unwrap();
    let gradguard::defenses::Defence::Noise { clip_norm, multiplier } = conv1.actions[0] else { panic!("{:?}", conv1.actions) };
    assert!((clip_norm * multiplier - sigma).abs() < 1e-15 && conv1.noise_std == Some(sigma));
    // sigma^2 = v S^2 / (D (2^(2b) - 1)) with S the clipped release's M1: dFIL = S^2 / (sigma^2 D).
    assert!(report.release_reconstruction_bound_bits.is_none(), "conv2, fc1 and fc2 carry no noise");
    let records = AuditLog::read_all(&log).unwrap();
    let escalations = records.iter().filter(|r| r.layer == "conv1" && r.outcome == Outcome::Escalated).count();
    assert_eq!(escalations, 1, "one rung, one re-measurement");
    let calibration = records.iter().find(|r| r.reason.as_deref().is_some_and(|w| w.starts_with("calibrated noise"))).expect("the sigma is logged");
    assert!(calibration.reason.as_ref().unwrap().contains(&format!("{sigma:.6e}")), "{calibration:?}");
    // The release in .grad() is clipped and noised: its norm is not the clip's.
    let norm = grad_norm(&s.vs, "conv1.");
    assert!(norm > 0.0 && (norm - 0.02).abs() > 1e-6, "noise was added: ||conv1|| = {norm}");

    // Later estimates at the same level recalibrate on other batches: every new sigma is a
    // change of state the bounded log writes (not a checkpoint tally), and the manifest's.
    let mut sigmas = vec![sigma];
    for from in [64, 128, 192] {
        let report = guarded_step(&s, &mut guard, from, 64).0.unwrap().into_report();
        sigmas.push(report.release.as_ref().unwrap().layers[0].noise_std.unwrap());
    }
    sigmas.dedup();
    assert!(sigmas.len() > 1, "other batches, other S_l: {sigmas:?}");
    guard.close_audit_log().unwrap();
    let logged: Vec<String> = AuditLog::read_all(&log).unwrap().into_iter().filter_map(|r| r.reason).filter(|w| w.starts_with("calibrated noise")).collect();
    assert_eq!(logged.len(), sigmas.len(), "{logged:?}");
    for (why, sigma) in logged.iter().zip(&sigmas) {
        assert!(why.contains(&format!("{sigma:.6e}")), "{why} vs {sigma}");
    }
    // The closing checkpoint carries conv1's bound (what the run report plots against its
    // threshold), the last release's.
    let records = AuditLog::read_all(&log).unwrap();
    let tally = records.iter().filter_map(|r| r.checkpoint.as_ref()).flat_map(|c| &c.layers).filter(|t| t.layer == "conv1").last().expect("a checkpoint");
    let bound = tally.metrics["reconstruction_bound_bits"];
    assert!(bound <= 0.05 && bound > 0.05 * (1.0 - 1e-5), "{tally:?}");
    assert_eq!(tally.thresholds["reconstruction_bound_bits"], 0.05);
}
