//! The exposition after real guard reports: names, labels, values, pre-initialised series,
//! absent metrics, counters, bounded labels.
mod common;
use gradguard_defenses::Defence;
use common::{real_reports, samples, value, LAYERS};
use gradguard_exporter::{Exporter, ExporterError, LabelKind, DEFAULT_ACTIONS, LEAKAGE_METRICS};
use gradguard_guard::{Metric, ReleaseKind, Report};
use std::time::Duration;

fn exporter() -> Exporter {
    Exporter::new(&LAYERS, &LEAKAGE_METRICS, &DEFAULT_ACTIONS).expect("exporter")
}

#[test]
fn every_series_exists_before_the_first_report() {
    let text = exporter().render();
    let s = samples(&text);
    for layer in LAYERS {
        for metric in LEAKAGE_METRICS {
            let leak = format!("gradguard_layer_leakage{{layer=\"{layer}\",metric=\"{metric}\"}}");
            assert!(s[&leak].is_nan(), "{leak} starts as NaN (absent)");
            assert_eq!(s[&format!("gradguard_layer_leakage_absent{{layer=\"{layer}\",metric=\"{metric}\"}}")], 1.0);
            assert!(s[&format!("gradguard_layer_threshold{{layer=\"{layer}\",metric=\"{metric}\"}}")].is_nan());
        }
        for action in DEFAULT_ACTIONS {
            assert_eq!(s[&format!("gradguard_defence_actions_total{{action=\"{action}\",layer=\"{layer}\"}}")], 0.0);
        }
        for family in ["gradguard_layer_protection_level", "gradguard_layer_withheld", "gradguard_estimate_age_steps", "gradguard_layer_parameters"] {
            assert_eq!(s[&format!("{family}{{layer=\"{layer}\"}}")], 0.0, "{family}");
        }
        assert!(s.contains_key(&format!("gradguard_estimate_age_seconds{{layer=\"{layer}\"}}")));
        assert!(s[&format!("gradguard_layer_gradient_norm{{layer=\"{layer}\"}}")].is_nan());
    }
    for outcome in ["released", "protected", "blocked"] {
        assert_eq!(s[&format!("gradguard_releases_total{{outcome=\"{outcome}\"}}")], 0.0);
    }
    for label in ["layer", "metric", "action"] {
        assert_eq!(s[&format!("gradguard_exporter_rejected_updates_total{{label=\"{label}\"}}")], 0.0);
    }
    for series in [
        "gradguard_training_steps_total",
        "gradguard_estimates_dropped_total",
        "gradguard_aggregation_floor_samples",
        "gradguard_estimate_duration_seconds_count",
        "gradguard_estimate_duration_seconds_sum",
        "gradguard_estimate_duration_seconds_bucket{le=\"+Inf\"}",
    ] {
        assert_eq!(s[series], 0.0, "{series}");
    }
    assert_eq!(s["gradguard_policy_info{hash=\"none\",version=\"none\"}"], 1.0);
    assert_eq!(s[&format!("gradguard_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))], 1.0);
    // Types and help text are declared.
    for line in [
        "# TYPE gradguard_layer_leakage gauge",
        "# TYPE gradguard_defence_actions_total counter",
        "# TYPE gradguard_releases_total counter",
        "# TYPE gradguard_estimate_duration_seconds histogram",
        "# TYPE gradguard_training_steps_total counter",
        "# HELP gradguard_layer_leakage ",
    ] {
        assert!(text.contains(line), "missing {line:?}");
    }
}

#[test]
fn observe_report_exports_the_measured_values() {
    let reports = real_reports();
    let ex = exporter();
    for r in &reports {
        ex.observe_report(r).expect("known layers");
    }
    let last = reports.last().unwrap();
    assert!(last.layers.iter().all(|l| l.subspace.measured().is_some()), "the tiny model's report carries M2 too");
    assert!(last.layers.iter().all(|l| l.sample_isolation.measured().is_some()), "and M6");
    let text = ex.render();
    for layer in LAYERS {
        let lr = last.layer(layer).unwrap();
        let sens = lr.sensitivity.measured().expect("M1 measured at every step");
        let got = |metric: &str| value(&text, &format!("gradguard_layer_leakage{{layer=\"{layer}\",metric=\"{metric}\"}}"));
        let absent = |metric: &str| value(&text, &format!("gradguard_layer_leakage_absent{{layer=\"{layer}\",metric=\"{metric}\"}}"));
        assert_eq!(got("sensitivity"), sens.sensitivity);
        assert_eq!(got("sensitivity_se"), sens.sensitivity_se);
        assert_eq!(got("sensitivity_rms"), sens.sensitivity_rms);
        assert_eq!(absent("sensitivity"), 0.0);
        match sens.relative_sensitivity {
            Some(r) => assert_eq!(got("relative_sensitivity"), r),
            None => assert!(got("relative_sensitivity").is_nan()),
        }
        match lr.subspace.measured() {
            Some(m) => {
                assert_eq!(got("subspace_distance"), m.subspace_distance);
                assert_eq!(got("subspace_separation"), m.subspace_separation);
                assert_eq!(absent("subspace_distance"), 0.0);
            }
            None => {
                assert!(got("subspace_distance").is_nan(), "absent M2 is NaN, never 0");
                assert_eq!(absent("subspace_distance"), 1.0);
            }
        }
        let m6 = lr.sample_isolation.measured().expect("M6 measured at every estimate");
        assert_eq!(got("exposed_fraction"), m6.exposed_fraction);
        assert_eq!(got("isolated_share"), m6.isolated_share);
        assert_eq!((absent("exposed_fraction"), absent("isolated_share")), (0.0, 0.0));
        let g = lr.gradient.measured().expect("gradient stats");
        assert_eq!(value(&text, &format!("gradguard_layer_gradient_norm{{layer=\"{layer}\"}}")), g.norm);
        assert_eq!(value(&text, &format!("gradguard_layer_gradient_max_abs{{layer=\"{layer}\"}}")), g.max_abs);
        assert_eq!(value(&text, &format!("gradguard_layer_gradient_non_finite{{layer=\"{layer}\"}}")), 0.0);
        assert_eq!(value(&text, &format!("gradguard_layer_parameters{{layer=\"{layer}\"}}")), lr.params as f64);
        // Estimated at the latest step: 0 steps old, seen just now.
        assert_eq!(value(&text, &format!("gradguard_estimate_age_steps{{layer=\"{layer}\"}}")), 0.0);
        assert!(value(&text, &format!("gradguard_estimate_age_seconds{{layer=\"{layer}\"}}")) < 5.0);
    }
    assert_eq!(value(&text, "gradguard_training_steps_total"), 2.0);
    assert_eq!(value(&text, "gradguard_report_step"), 1.0);
    // Re-observing an old report does not count steps again.
    ex.observe_report(&reports[0]).unwrap();
    assert_eq!(value(&ex.render(), "gradguard_training_steps_total"), 2.0);

    // The JSON snapshot is the latest report (statistics only), parseable back.
    let json: serde_json::Value = serde_json::from_str(&ex.snapshot_json()).unwrap();
    assert_eq!(json["training_steps_total"], 2);
    let back: Report = serde_json::from_value(json["report"].clone()).unwrap();
    assert_eq!(&back, &reports[0], "latest observed report");
    assert!(json["estimate_age_seconds"]["fc1"].is_number());
}

/// A real report, rewritten: every layer's gradient measured at `step`, sensitivity measured
/// (S_l = 2, no R_l) and M6 (as measured) at `sens_step` or absent, subspace absent. Built from a real report so it
/// follows the guard's report type as it grows.
fn synthetic(step: u64, sens_step: Option<u64>) -> Report {
    let mut r = real_reports().pop().unwrap();
    r.step = step;
    r.estimated = sens_step == Some(step);
    // The estimate's duration only when one ran at this step (as the guard reports it).
    r.estimate_seconds = r.estimated.then_some(0.010);
    for l in &mut r.layers {
        if let Metric::Measured(g) = &mut l.gradient {
            g.step = step;
            g.non_finite = 0;
        }
        l.sensitivity = match (sens_step, l.sensitivity.measured().cloned()) {
            (Some(s), Some(mut m)) => {
                m.sensitivity = 2.0;
                m.relative_sensitivity = None;
                m.step = s;
                Metric::Measured(m)
            }
            _ => Metric::absent("not estimated yet"),
        };
        l.subspace = Metric::absent("no attribute labels given");
        l.sample_isolation = match (sens_step, l.sample_isolation.measured().cloned()) {
            (Some(s), Some(mut m)) => {
                m.step = s;
                Metric::Measured(m)
            }
            _ => Metric::absent("not estimated yet"),
        };
    }
    r
}

#[test]
fn estimate_age_steps_and_counters() {
    let ex = exporter();
    ex.observe_report(&synthetic(0, None)).unwrap();
    ex.observe_report(&synthetic(1, None)).unwrap();
    let text = ex.render();
    assert_eq!(value(&text, "gradguard_estimate_age_steps{layer=\"fc1\"}"), 2.0, "no estimate yet: steps since start");
    assert!(value(&text, "gradguard_layer_leakage{layer=\"fc1\",metric=\"relative_sensitivity\"}").is_nan());
    ex.observe_report(&synthetic(5, Some(5))).unwrap();
    ex.observe_report(&synthetic(9, Some(5))).unwrap();
    let text = ex.render();
    assert_eq!(value(&text, "gradguard_estimate_age_steps{layer=\"fc1\"}"), 4.0);
    assert_eq!(value(&text, "gradguard_training_steps_total"), 10.0, "skipped steps are counted");
    assert_eq!(value(&text, "gradguard_layer_leakage{layer=\"fc2\",metric=\"sensitivity\"}"), 2.0);
    assert_eq!(value(&text, "gradguard_layer_leakage_absent{layer=\"fc2\",metric=\"relative_sensitivity\"}"), 1.0);
    assert_eq!(value(&text, "gradguard_layer_leakage_absent{layer=\"fc2\",metric=\"subspace_separation\"}"), 1.0);

    ex.set_threshold("fc1", "sensitivity_rms", 0.25).unwrap();
    ex.set_protection_level("fc1", 2).unwrap();
    ex.set_withheld("fc2", true).unwrap();
    ex.record_action("fc1", "clip").unwrap();
    ex.record_action("fc1", "clip").unwrap();
    ex.record_release(ReleaseKind::Protected);
    ex.record_release(ReleaseKind::Blocked);
    ex.set_aggregation_floor(32);
    ex.observe_estimate_duration(Duration::from_millis(30));
    ex.record_dropped_estimates(3);
    ex.set_policy_info("ab12cd", "3").unwrap();
    let text = ex.render();
    for (series, v) in [
        ("gradguard_layer_threshold{layer=\"fc1\",metric=\"sensitivity_rms\"}", 0.25),
        ("gradguard_layer_protection_level{layer=\"fc1\"}", 2.0),
        ("gradguard_layer_withheld{layer=\"fc2\"}", 1.0),
        ("gradguard_defence_actions_total{action=\"clip\",layer=\"fc1\"}", 2.0),
        ("gradguard_defence_actions_total{action=\"noise\",layer=\"fc1\"}", 0.0),
        ("gradguard_releases_total{outcome=\"protected\"}", 1.0),
        ("gradguard_releases_total{outcome=\"blocked\"}", 1.0),
        // The four observed reports carry released manifests with no action.
        ("gradguard_releases_total{outcome=\"released\"}", 4.0),
        ("gradguard_aggregation_floor_samples", 32.0),
        // One 10 ms estimate from the report of step 5, one 30 ms observed by hand.
        ("gradguard_estimate_duration_seconds_count", 2.0),
        ("gradguard_estimate_duration_seconds_bucket{le=\"0.025\"}", 1.0),
        ("gradguard_estimate_duration_seconds_bucket{le=\"0.05\"}", 2.0),
        ("gradguard_estimates_dropped_total", 3.0),
        ("gradguard_policy_info{hash=\"ab12cd\",version=\"3\"}", 1.0),
    ] {
        assert_eq!(value(&text, series), v, "{series}");
    }
    assert!(!text.contains("hash=\"none\""), "the old policy series is replaced, not kept");
    // /report carries the thresholds set (for the live page's overview), none where unset.
    let json: serde_json::Value = serde_json::from_str(&ex.snapshot_json()).unwrap();
    assert_eq!(json["thresholds"]["fc1"], serde_json::json!({"sensitivity_rms": 0.25}));
    assert_eq!(json["thresholds"]["fc2"], serde_json::json!({}));
}

#[test]
fn unknown_labels_are_rejected_and_create_nothing() {
    let ex = exporter();
    let before: Vec<String> = samples(&ex.render()).into_keys().filter(|k| !k.contains("rejected")).collect();
    let err = ex.set_threshold("conv9", "sensitivity", 1.0).unwrap_err();
    assert!(matches!(&err, ExporterError::UnknownLabel { label: LabelKind::Layer, value, .. } if value == "conv9"), "{err}");
    assert!(err.to_string().contains("fc1, fc2"), "names the known layers: {err}");
    let err = ex.set_threshold("fc1", "attack_accuracy", 1.0).unwrap_err();
    assert!(matches!(err, ExporterError::UnknownLabel { label: LabelKind::Metric, .. }), "{err}");
    let err = ex.record_action("fc1", "client-supplied \"{}\"").unwrap_err();
    assert!(matches!(err, ExporterError::UnknownLabel { label: LabelKind::Action, .. }), "{err}");
    assert!(ex.set_protection_level("nope", 1).is_err());
    assert!(ex.set_withheld("nope", true).is_err());
    let mut r = synthetic(0, Some(0));
    r.layers[1].name = "intruder".into();
    let err = ex.observe_report(&r).unwrap_err();
    assert!(matches!(&err, ExporterError::UnknownLayers { names } if names == &["intruder".to_string()]), "{err}");

    let text = ex.render();
    assert!(!text.contains("conv9") && !text.contains("attack_accuracy") && !text.contains("intruder") && !text.contains("client-supplied"));
    let after: Vec<String> = samples(&text).into_keys().filter(|k| !k.contains("rejected")).collect();
    assert_eq!(before, after, "no new series");
    assert_eq!(value(&text, "gradguard_exporter_rejected_updates_total{label=\"layer\"}"), 4.0);
    assert_eq!(value(&text, "gradguard_exporter_rejected_updates_total{label=\"metric\"}"), 1.0);
    assert_eq!(value(&text, "gradguard_exporter_rejected_updates_total{label=\"action\"}"), 1.0);
    // The known layer of that report was still exported.
    assert_eq!(value(&text, "gradguard_layer_leakage{layer=\"fc1\",metric=\"sensitivity\"}"), 2.0);
}

#[test]
fn constructor_and_policy_values_are_checked() {
    assert!(matches!(Exporter::new(&["a", "a"], &LEAKAGE_METRICS, &DEFAULT_ACTIONS), Err(ExporterError::Config(_))));
    assert!(matches!(Exporter::new::<&str, &str, &str>(&[], &[], &[]), Err(ExporterError::Config(_))));
    assert!(matches!(Exporter::new(&["a"], &["made_up"], &DEFAULT_ACTIONS), Err(ExporterError::Config(_))));
    let only_m1 = Exporter::new(&["a"], &["sensitivity"], &["clip"]).unwrap();
    assert!(!only_m1.render().contains("metric=\"subspace_distance\""));
    assert!(only_m1.render().contains("metric=\"sensitivity\""));
    let ex = exporter();
    assert!(ex.set_policy_info("", "1").is_err());
    assert!(ex.set_policy_info(&"x".repeat(500), "1").is_err());
    assert!(ex.set_policy_info("abc", "1\n2").is_err());
}

#[test]
fn a_report_carries_its_decisions_into_the_counters() {
    use gradguard_guard::report::{LayerManifest, ReleaseOutcome as Outcome};
    let ex = exporter();
    let mut r = synthetic(3, None);
    r.layers[0].protection_level = 2;
    let manifest = r.release.as_mut().expect("a release report");
    manifest.aggregation_floor = 128;
    manifest.layers = r
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let actions = match i {
                0 => vec![Defence::Clip { max_norm: 0.03 }, Defence::Sparsify { keep_fraction: 0.25 }],
                1 => vec![Defence::Withhold],
                _ => vec![],
            };
            LayerManifest::new(l.name.clone(), i != 1, actions, vec![])
        })
        .collect();
    let (first, second) = (r.layers[0].name.clone(), r.layers[1].name.clone());
    ex.observe_report(&r).unwrap();
    let mut blocked = r.clone();
    blocked.release.as_mut().unwrap().outcome = Outcome::Blocked { reason: "test".into() };
    ex.observe_report(&blocked).unwrap();
    let text = ex.render();
    for (series, v) in [
        (format!("gradguard_layer_protection_level{{layer=\"{first}\"}}"), 2.0),
        (format!("gradguard_defence_actions_total{{action=\"clip\",layer=\"{first}\"}}"), 1.0),
        (format!("gradguard_defence_actions_total{{action=\"sparsify\",layer=\"{first}\"}}"), 1.0),
        (format!("gradguard_defence_actions_total{{action=\"withhold\",layer=\"{second}\"}}"), 1.0),
        (format!("gradguard_layer_withheld{{layer=\"{second}\"}}"), 0.0),
        ("gradguard_releases_total{outcome=\"protected\"}".to_string(), 1.0),
        ("gradguard_releases_total{outcome=\"blocked\"}".to_string(), 1.0),
        ("gradguard_aggregation_floor_samples".to_string(), 128.0),
    ] {
        assert_eq!(value(&text, &series), v, "{series}");
    }
}

#[test]
fn held_releases_are_counted_under_the_guards_own_names() {
    // 48 samples a step against a floor of 64: the first step is held, the second releases
    // both batches together.
    let settings = gradguard_guard::Settings { aggregation_floor: 64, estimate_every: 1, background_estimates: false, budget_share: 1.0, ..Default::default() };
    let reports = common::reports_under(gradguard_guard::Policy::permissive_with(settings).unwrap());
    let kinds: Vec<ReleaseKind> = reports.iter().map(|r| r.release.as_ref().unwrap().kind()).collect();
    assert_eq!(kinds, [ReleaseKind::Held, ReleaseKind::Released]);
    let ex = exporter();
    let before = samples(&ex.render());
    for kind in ReleaseKind::ALL {
        assert_eq!(before[&format!("gradguard_releases_total{{outcome=\"{kind}\"}}")], 0.0, "{kind} exists from the start");
    }
    for r in &reports {
        ex.observe_report(r).unwrap();
    }
    let after = samples(&ex.render());
    for (kind, count) in [("released", 1.0), ("protected", 0.0), ("held", 1.0), ("blocked", 0.0)] {
        assert_eq!(after[&format!("gradguard_releases_total{{outcome=\"{kind}\"}}")], count, "{kind}");
    }
}
