//! M5's series from real guard reports: the per-layer and release bounds of the latest release
//! (+Inf for a layer released without noise), the run ledger and its cap.
mod common;
use common::{reports_under, samples, value};
use gradguard_exporter::Exporter;
use gradguard_guard::Policy;

const POLICY: &str = "version = 2\n[settings]\nestimate_every = 1\nbackground_estimates = false\nbudget_share = 1.0\n\
[[rule]]\nname = \"bits\"\nmetric = \"reconstruction_bound_bits\"\nlayers = [\"fc1\"]\nact_above = 0.1\nrelax_below = 0.01\n\
ladder = [{ action = \"noise\", clip_norm = 1.0, target = \"threshold\" }]\n";

#[test]
fn bounds_and_the_ledger_are_exported() {
    let reports = reports_under(Policy::from_toml_str(POLICY, "test").unwrap());
    let ex = Exporter::for_layers(&common::LAYERS).unwrap();
    let fresh = samples(&ex.render());
    assert!(fresh["gradguard_layer_leakage{layer=\"fc1\",metric=\"reconstruction_bound_bits\"}"].is_nan(), "NaN before a report");
    for r in &reports {
        ex.observe_report(r).unwrap();
    }
    let text = ex.render();
    let last = reports.last().unwrap();
    let fc1 = last.layer("fc1").unwrap().reconstruction_bound.measured().unwrap().reconstruction_bound_bits.unwrap();
    assert!(fc1 > 0.0 && fc1 <= 0.1, "calibrated to the threshold: {fc1}");
    assert_eq!(value(&text, "gradguard_layer_leakage{layer=\"fc1\",metric=\"reconstruction_bound_bits\"}"), fc1);
    // fc2 is released without noise: no bound, and none for the release or the run.
    assert_eq!(value(&text, "gradguard_layer_leakage{layer=\"fc2\",metric=\"reconstruction_bound_bits\"}"), f64::INFINITY);
    assert_eq!(value(&text, "gradguard_release_reconstruction_bound"), f64::INFINITY);
    assert!(value(&text, "gradguard_ledger_cap").is_nan(), "no cap in the policy");
    let ledger = last.ledger.as_ref().unwrap();
    assert_eq!(value(&text, "gradguard_ledger_reconstruction_bound{layer=\"fc1\"}"), ledger.layer_dfil[0].bound_bits.unwrap());
    assert!(ledger.layer_dfil[0].bound_bits.unwrap() > fc1, "two releases carry more than one");
    assert_eq!(value(&text, "gradguard_ledger_release_reconstruction_bound"), f64::INFINITY);
    assert_eq!(ledger.releases, 2);
}
