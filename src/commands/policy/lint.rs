//! What a policy meant for federated use relies on against a malicious server: one that chooses
//! the parameters it sends (trap weights, whose units each carry one sample of the client's
//! batch) and the round's batch size. Two kinds of rule hold: calibrated noise on every layer
//! with a ledger cap (M5, `reconstruction_bound_bits`), and sample isolation (M6,
//! `exposed_fraction` / `isolated_share`). S_l and R_l thresholds, clipping and the aggregation
//! floor do not. The figures quoted come from `scripts/malicious-server-figures.py` (trap weights
//! sent to a digits MLP, releases of 32 samples, the analytic attack on fc0).
use gradguard::defenses::Defence;
use gradguard::guard::decide::{Coverage, LadderStep, Rule};
use gradguard::guard::report::LeakageMetric;
use gradguard::guard::Policy;

/// Where the figures come from, as the warnings cite it.
const SOURCE: &str = "trap weights sent to a digits MLP, 4 releases of 32 samples, four runs of scripts/malicious-server-figures.py; docs/FEDERATED.md";

/// The lint's findings: what holds, warnings (the policy relies on something that does not
/// hold) and notes.
pub(super) struct Findings {
    /// The protections that hold, in words (empty: none).
    pub(super) holds: Vec<String>,
    /// Each a line, or a first line followed by indented ones.
    pub(super) warnings: Vec<String>,
    /// Weaker remarks.
    pub(super) notes: Vec<String>,
}

fn is_m5(rule: &Rule) -> bool {
    rule.metric == LeakageMetric::ReconstructionBoundBits
}

fn is_m6(rule: &Rule) -> bool {
    matches!(rule.metric, LeakageMetric::ExposedFraction | LeakageMetric::IsolatedShare)
}

/// A pattern that matches every layer name.
fn matches_all(pattern: &str) -> bool {
    pattern.chars().all(|c| c == '*') && !pattern.is_empty()
}

/// Which layers no `reconstruction_bound_bits` rule covers: Some(list) with a model (empty: every
/// layer is covered), Some(empty) without one when a rule covers `*`, None when it cannot be told.
fn unbounded_layers(policy: &Policy, model: Option<(&[String], &Coverage)>) -> Option<Vec<String>> {
    let rules = policy.rules();
    match model {
        Some((layers, coverage)) => Some(
            (0..layers.len())
                .filter(|l| !rules.iter().zip(&coverage.rule_layers).any(|(r, covered)| is_m5(r) && covered.contains(l)))
                .map(|l| layers[l].clone())
                .collect(),
        ),
        None if rules.iter().any(|r| is_m5(r) && r.layers.iter().any(|p| matches_all(p))) => Some(vec![]),
        None if !rules.iter().any(is_m5) => Some(vec!["every layer".into()]),
        None => None,
    }
}

/// What the policy relies on that does not hold against a malicious server, one line each.
fn weak_reliances(policy: &Policy) -> Vec<String> {
    let mut out = Vec::new();
    for rule in policy.rules() {
        let name = &rule.name;
        match rule.metric {
            LeakageMetric::Sensitivity | LeakageMetric::SensitivityRms | LeakageMetric::RelativeSensitivity => out.push(format!(
                "rule '{name}' acts on {} thresholds: trap weights lower the first layer's sensitivity (fc0 S_l 0.083 to 0.091 for the trap, 0.115 to 0.175 honest) while 109 to 118 of 128 samples come back, and a threshold set on one model means nothing on another",
                rule.metric.name()
            )),
            LeakageMetric::SubspaceSeparation => out.push(format!(
                "rule '{name}' acts on subspace_separation (M2): latent attributes, not the samples themselves"
            )),
            _ => {}
        }
        if is_m5(rule) {
            continue;
        }
        let defences: Vec<&Defence> = rule.ladder.iter().filter_map(|s| if let LadderStep::Defence(d) = s { Some(d) } else { None }).collect();
        if defences.iter().any(|d| matches!(d, Defence::Clip { .. })) {
            out.push(format!("clipping (rule '{name}'): it scales dW and db alike, so x = dW_u / db_u is unchanged (the same 109 to 118 of 128 samples come back)"));
        }
        if defences.iter().any(|d| matches!(d, Defence::Noise { .. })) {
            out.push(format!(
                "noise of a fixed multiplier (rule '{name}'): nothing checks the bound it gives; a reconstruction_bound_bits rule calibrates it to one"
            ));
        }
        if rule.ladder.iter().any(|s| matches!(s, LadderStep::Aggregate { .. })) {
            out.push(format!("aggregate rungs (rule '{name}'): the server builds the trap for the batch size it expects"));
        }
    }
    let floor = policy.settings().aggregation_floor;
    if floor > 1 {
        out.push(format!(
            "aggregation_floor {floor}: the server knows it and builds the trap for that batch size (trap weights built for 64 give back 179 to 185 of 256 samples from releases of 64)"
        ));
    }
    out
}

/// The findings for a policy meant for federated use, with the model's layers when given.
pub(super) fn federated(policy: &Policy, model: Option<(&[String], &Coverage)>) -> Findings {
    let mut warnings = Vec::new();
    let mut notes = Vec::new();
    let m6: Vec<&str> = policy.rules().iter().filter(|r| is_m6(r)).map(|r| r.name.as_str()).collect();
    let unbounded = unbounded_layers(policy, model);
    let every_layer_bounded = unbounded.as_ref().is_some_and(|u| u.is_empty());
    let has_m5 = policy.rules().iter().any(is_m5);

    if m6.is_empty() && !every_layer_bounded {
        let bounded: Vec<&String> = match model {
            Some((layers, _)) => layers.iter().filter(|l| unbounded.as_ref().is_some_and(|u| !u.contains(l))).collect(),
            None => vec![],
        };
        let head = match &unbounded {
            Some(u) if u.len() == 1 && u[0] == "every layer" => "nothing in this policy holds against a malicious server".to_string(),
            Some(u) if !bounded.is_empty() => format!(
                "against a malicious server only the release of {} is bounded (calibrated noise, M5); {} {} no calibrated noise and the policy has no M6 rule",
                bounded.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                u.join(", "),
                if u.len() == 1 { "has" } else { "have" }
            ),
            Some(u) => format!("nothing in this policy holds against a malicious server: no calibrated noise on {} and no M6 rule", u.join(", ")),
            None => "this policy has no M6 rule, and its calibrated noise may not cover every layer (check with --model)".to_string(),
        };
        let mut lines = vec![
            format!("{head}."),
            format!("  It relies on what does not hold against a server that chooses the parameters it sends and the batch size ({SOURCE}):"),
        ];
        let weak = weak_reliances(policy);
        if weak.is_empty() {
            lines.push("  - no rule at all on what the server can recover".into());
        }
        lines.extend(weak.into_iter().map(|w| format!("  - {w}")));
        lines.push(
            "  What holds: calibrated noise on every layer with a ledger cap (a reconstruction_bound_bits rule with { action = \"noise\", clip_norm = C, target = \"threshold\" } on \"*\", and ledger_cap_bits: at 0.01 bits/dim none of 128 samples comes back, best PSNR 7 dB) and an M6 rule (exposed_fraction: the trap's fc0 exposes 0.85 to 0.92 of the batch, the honest model's 0.01). federated/gradguard_federated/policies/default.toml has both; `gradguard policy init --model MODEL` writes them for your layers."
                .into(),
        );
        warnings.push(lines.join("\n"));
    } else {
        match &unbounded {
            Some(u) if !u.is_empty() => warnings.push(format!(
                "{} released without calibrated noise (no reconstruction_bound_bits rule covers {}): the M6 rule withholds layers whose units isolate samples, but leakage spread over units (imprint layers, optimisation attacks) passes it; only noise bounds it",
                u.join(", "),
                if u.len() == 1 { "it" } else { "them" }
            )),
            None => notes.push("which layers the reconstruction_bound_bits rules cover depends on the model: check with --model that they cover every layer".into()),
            _ => {}
        }
        if has_m5 && policy.settings().ledger_cap_bits.is_none() {
            warnings.push("no ledger_cap_bits: each round's release is bounded, but the rounds' bounds add up over the run without limit (set ledger_cap_bits)".into());
        }
        if m6.is_empty() {
            notes.push("no M6 rule (exposed_fraction): a layer whose units each carry one sample (trap weights) is released with its noise rather than withheld".into());
        }
    }
    let mut holds = Vec::new();
    if every_layer_bounded {
        holds.push(if policy.settings().ledger_cap_bits.is_some() { "calibrated noise on every layer with a ledger cap (M5)" } else { "calibrated noise on every layer (M5), per release" }.to_string());
    }
    if !m6.is_empty() {
        holds.push(format!("sample isolation (M6, rule {})", m6.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")));
    }
    Findings { holds, warnings, notes }
}
