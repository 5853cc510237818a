//! The policy file: global settings, then rules. A rule names a metric, the layers it covers
//! (names or globs), a threshold to act above, a lower one to relax below, and an escalation
//! ladder of actions. See `examples/policy.toml`.
use crate::error::{PolicyError, POLICY_VERSION};
use crate::measure::{IsolationSettings, SensitivitySettings, SubspaceSettings};
use crate::report::{JvpMethod, LeakageMetric};
use gradguard_defenses::Defence;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;


/// What happens to a release the guard cannot make compliant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnViolation {
    /// The whole release is refused.
    #[default]
    Block,
    /// The offending layer is withheld; the rest is released.
    Withhold,
}

/// The guard's settings: the one settings type, read from a policy's `[settings]` table (a
/// guard without a policy file uses [`Settings::default`], with its 5% budget).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Seed of every random draw (0 ..= 2^63 - 1: TOML integers are signed 64-bit).
    pub seed: u64,
    /// Steps between estimates.
    pub estimate_every: u64,
    /// Estimate before every release (federated rounds) instead of every `estimate_every`.
    pub estimate_before_release: bool,
    /// Steps after which an estimate is stale: the guard then fails closed.
    pub max_estimate_age_steps: u64,
    /// Samples a release must cover at least (accumulating micro-batches).
    pub aggregation_floor: usize,
    /// The floor escalation may raise to, at most.
    pub aggregation_ceiling: usize,
    /// What happens when a layer stays above a threshold after its whole ladder.
    pub on_violation: OnViolation,
    /// A layer pattern that matches no layer is an error (true) or a warning (false).
    pub strict_layers: bool,
    /// Withheld layers still update the local model (only the release omits them).
    pub withheld_layers_train_locally: bool,
    /// Probes K for M1.
    pub probes: usize,
    /// How M1's JVPs are formed.
    pub jvp_method: JvpMethod,
    /// M1 by enumerating a basis instead of probing (small models and tests).
    pub exact_sensitivity: bool,
    /// m, the samples each M1 probe runs on (METRICS.md, M1, sub-batch probes): unset, the
    /// whole batch; m below the batch size, a fresh random sub-batch of m samples per probe
    /// where the samples do not interact (a model with batch norm in training mode keeps the
    /// whole batch). At least 1. Version 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_samples: Option<usize>,
    /// The share of wall time the guard may spend (estimates included), in (0, 1].
    pub budget_share: f64,
    /// Run M2's linear algebra and report fan-out on a worker thread (false: all inline, and
    /// reports are deterministic step by step).
    pub background_estimates: bool,
    /// How M2 picks and compares per-sample gradients (`[settings.subspace]`).
    pub subspace: SubspaceSettings,
    /// M5's prior variance v per input dimension (None: measured on each estimate's batch).
    /// Version 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior_variance: Option<f64>,
    /// N, the size of the data set the batches are drawn from: the run ledger counts the
    /// average sample at sampling rate n/N (without it and without sample ids, every release
    /// counts in full for every sample). Version 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset_size: Option<u64>,
    /// The cap on the run ledger's cumulative bound, bits per input dimension, for the whole
    /// release and for each layer: a release that would cross it is blocked, or the layers that
    /// would are withheld (`on_violation`). Version 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_cap_bits: Option<f64>,
    /// z: a calibrated noise rung sizes its sigma for S_l^2 + z SE(S_l^2) over the probes,
    /// not the point estimate, so the bound holds with z standard errors of margin against the
    /// probes' error (0: the point estimate; METRICS.md, M5, estimated as S_l is). Version 2.
    pub calibration_margin_se: f64,
    /// Steps M2's last result may age before an estimate measures M2 again (0: every estimate
    /// measures it; default 500). M2 costs 2m per-sample backward passes, so measuring it less
    /// often buys more M1 estimates within the budget; the report's M2 then carries the step it
    /// was measured at. Ignored while a rule reads M2 (`subspace_separation`): such a policy
    /// measures M2 at every estimate. A value other than the default needs version 2.
    pub subspace_every_steps: u64,
    /// Steps M6's last measurement may age before an estimate measures M6 again (0: every
    /// estimate; default 500). M6 costs n passes of one sample, or n backward passes of the
    /// whole batch where the samples interact (batch norm), several M1 estimates' worth; the
    /// report's M6 carries the step it was measured at. Ignored while a rule reads M6
    /// (`exposed_fraction`, `isolated_share`): such a policy measures M6 at every estimate.
    /// Version 2.
    pub isolation_every_steps: u64,
    /// How M6 (sample isolation) is measured (`[settings.isolation]`: `tau`, the share at
    /// which a unit isolates its dominant sample). M6 is measured at estimates (see
    /// `isolation_every_steps`) and by `Guard::vet_parameters`.
    pub isolation: IsolationSettings,
    /// What `Guard::vet_parameters` checks beside the policy's M6 rules (`[settings.vetting]`).
    pub vetting: VettingSettings,
}

/// The checks of parameters set from outside beside the M6 rules (`[settings.vetting]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VettingSettings {
    /// Refuse parameters on which M4's analytic attacks (single unit, differences of aligned
    /// units) recover more than this share of the vetting batch from some layer's release (the
    /// client knows its inputs, so it scores the attack exactly). None: the attack is run and
    /// reported, and refuses nothing.
    pub max_recovered_fraction: Option<f64>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            seed: 0,
            estimate_every: 10,
            estimate_before_release: false,
            max_estimate_age_steps: 50,
            aggregation_floor: 1,
            aggregation_ceiling: 1024,
            on_violation: OnViolation::Block,
            strict_layers: true,
            withheld_layers_train_locally: true,
            probes: 8,
            jvp_method: JvpMethod::default(),
            exact_sensitivity: false,
            probe_samples: None,
            subspace: SubspaceSettings::default(),
            budget_share: 0.05,
            background_estimates: true,
            prior_variance: None,
            dataset_size: None,
            ledger_cap_bits: None,
            calibration_margin_se: 0.0,
            subspace_every_steps: SECONDARY_EVERY_STEPS,
            isolation_every_steps: SECONDARY_EVERY_STEPS,
            isolation: IsolationSettings::default(),
            vetting: VettingSettings::default(),
        }
    }
}

/// One rung of an escalation ladder.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum LadderStep {
    /// A transformation of the layer's released gradient.
    Defence(Defence),
    /// Raise the aggregation floor by `factor` (up to the ceiling): releases cover more samples.
    Aggregate {
        /// Multiplier of the aggregation floor.
        factor: f64,
    },
    /// Clip to `clip_norm`, then add the Gaussian noise that brings the layer's M5 bound to the
    /// rule's `act_above` (METRICS.md, M5, Calibration): `{ action = "noise", clip_norm = C,
    /// target = "threshold" }`, only in a `reconstruction_bound_bits` rule. It resolves at each
    /// measured decision into a concrete `noise(clip_norm=C, multiplier=sigma/C)`.
    CalibratedNoise {
        /// The clip before the noise.
        clip_norm: f64,
    },
}

impl LadderStep {
    /// The action's name: the defence's name, or `"aggregate"`.
    pub fn name(&self) -> &'static str {
        match self {
            LadderStep::Defence(d) => d.name(),
            LadderStep::Aggregate { .. } => "aggregate",
            LadderStep::CalibratedNoise { .. } => "noise",
        }
    }
}

impl std::fmt::Display for LadderStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LadderStep::Defence(d) => write!(f, "{d}"),
            LadderStep::Aggregate { factor } => write!(f, "aggregate(factor={factor})"),
            LadderStep::CalibratedNoise { clip_norm } => write!(f, "noise(clip_norm={clip_norm},target=threshold)"),
        }
    }
}

/// A rule: act on `metric` of the covered layers above `act_above`, relax below `relax_below`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    /// The rule's name, as cited in decisions and errors.
    pub name: String,
    /// The metric the rule acts on.
    pub metric: LeakageMetric,
    /// Layer names or glob patterns the rule covers.
    pub layers: Vec<String>,
    /// Escalate a layer whose metric is above this.
    pub act_above: f64,
    /// Relax a layer whose metric is below this (at most `act_above`).
    pub relax_below: f64,
    /// Escalation rungs, applied in order as the level rises.
    pub ladder: Vec<LadderStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u32,
    #[serde(default)]
    settings: Settings,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    metric: LeakageMetric,
    layers: Vec<String>,
    act_above: f64,
    relax_below: f64,
    ladder: Vec<toml::Value>,
}

/// A validated policy with the hash of its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    version: u32,
    settings: Settings,
    rules: Vec<Rule>,
    /// sha256 of the file's text, hex: part of every decision record.
    hash: String,
    /// Where it came from (a path or a label).
    origin: String,
}

/// Which layers each rule covers on a given model.
#[derive(Debug, Clone, PartialEq)]
pub struct Coverage {
    /// For each rule (in policy order), the covered layer indices in model order.
    pub rule_layers: Vec<Vec<usize>>,
    /// Patterns that matched nothing (only when `strict_layers` is false).
    pub warnings: Vec<String>,
}

impl Settings {
    /// The M1 estimator's settings these settings imply.
    pub fn sensitivity(&self) -> SensitivitySettings {
        SensitivitySettings { probes: self.probes, method: self.jvp_method, exact: self.exact_sensitivity, probe_samples: self.probe_samples }
    }
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError::Io { path: path.display().to_string(), why: e.to_string() })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// A policy with no rules: the guard measures and releases, checking only finiteness and
    /// staleness.
    pub fn permissive() -> Self {
        let settings = Settings::default();
        let hash = hex(&Sha256::digest(PERMISSIVE.as_bytes()));
        Self { version: POLICY_VERSION, settings, rules: vec![], hash, origin: "built-in permissive policy".into() }
    }

    /// A policy with no rules and these settings, validated as a file's would be (its hash is
    /// that of the equivalent file's text).
    pub fn permissive_with(settings: Settings) -> Result<Self, PolicyError> {
        let origin = "built-in permissive policy";
        #[derive(Serialize)]
        struct File<'a> {
            version: u32,
            settings: &'a Settings,
        }
        let text = toml::to_string(&File { version: POLICY_VERSION, settings: &settings })
            .map_err(|e| PolicyError::Invalid { origin: origin.into(), location: "settings".into(), why: e.to_string() })?;
        Self::from_toml_str(&text, origin)
    }

    /// Parses and validates a policy's text; `origin` names it in errors and reports.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text)
            .map_err(|e| PolicyError::Syntax { origin: origin.into(), message: e.to_string().trim_end().to_string() })?;
        if !(1..=POLICY_VERSION).contains(&file.version) {
            return Err(PolicyError::Version { origin: origin.into(), found: file.version });
        }
        let invalid = |location: String, why: String| PolicyError::Invalid { origin: origin.into(), location, why };
        validate_settings(&file.settings).map_err(|(field, why)| invalid(format!("settings.{field}"), why))?;
        let needs_v2 = |what: &str| format!("{what} needs `version = 2` (this file declares version 1)");
        if file.version < 2 {
            let s = &file.settings;
            for (field, set) in [("prior_variance", s.prior_variance.is_some()), ("dataset_size", s.dataset_size.is_some()), ("ledger_cap_bits", s.ledger_cap_bits.is_some()), ("calibration_margin_se", s.calibration_margin_se != 0.0), ("subspace_every_steps", s.subspace_every_steps != SECONDARY_EVERY_STEPS), ("isolation_every_steps", s.isolation_every_steps != SECONDARY_EVERY_STEPS), ("probe_samples", s.probe_samples.is_some())] {
                if set {
                    return Err(invalid(format!("settings.{field}"), needs_v2(field)));
                }
            }
        }
        let mut rules = Vec::new();
        for (i, r) in file.rules.into_iter().enumerate() {
            let at = |field: &str| format!("rule {} ('{}'), {field}", i + 1, r.name);
            if r.name.trim().is_empty() {
                return Err(invalid(format!("rule {}", i + 1), "name must not be empty".into()));
            }
            if r.metric == LeakageMetric::UsableInformationBits {
                return Err(invalid(
                    at("metric"),
                    "usable_information_bits is not estimated online by this build: a rule on it could never be checked".into(),
                ));
            }
            if r.metric == LeakageMetric::ReconstructionBoundBits && file.version < 2 {
                return Err(invalid(at("metric"), needs_v2("reconstruction_bound_bits")));
            }
            if r.metric == LeakageMetric::ReconstructionBoundBits && !(r.act_above > 0.0) {
                return Err(invalid(at("act_above"), format!("a bound in bits/dim must be > 0 (a release always carries some information), got {}", r.act_above)));
            }
            if !(r.act_above.is_finite() && r.act_above >= 0.0) {
                return Err(invalid(at("act_above"), format!("must be a finite number >= 0, got {}", r.act_above)));
            }
            if !(r.relax_below.is_finite() && r.relax_below >= 0.0) {
                return Err(invalid(at("relax_below"), format!("must be a finite number >= 0, got {}", r.relax_below)));
            }
            if r.relax_below > r.act_above {
                return Err(invalid(
                    at("relax_below"),
                    format!("inverted thresholds: relax_below {} is above act_above {}", r.relax_below, r.act_above),
                ));
            }
            if r.layers.is_empty() {
                return Err(invalid(at("layers"), "names no layer".into()));
            }
            for pattern in &r.layers {
                globset::Glob::new(pattern).map_err(|e| invalid(at("layers"), format!("bad pattern '{pattern}': {e}")))?;
            }
            if r.ladder.is_empty() {
                return Err(invalid(at("ladder"), "is empty: a rule needs at least one action".into()));
            }
            let ladder = r
                .ladder
                .iter()
                .enumerate()
                .map(|(k, v)| parse_step(v).map_err(|why| invalid(at(&format!("ladder step {}", k + 1)), why)))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(k) = ladder.iter().position(|s| matches!(s, LadderStep::CalibratedNoise { .. })) {
                let at_step = at(&format!("ladder step {}", k + 1));
                if file.version < 2 {
                    return Err(invalid(at_step, needs_v2("a calibrated noise rung (target = \"threshold\")")));
                }
                if r.metric != LeakageMetric::ReconstructionBoundBits {
                    return Err(invalid(
                        at_step,
                        format!("a calibrated noise rung targets a bound in bits/dim: the rule's metric must be reconstruction_bound_bits, not {}", r.metric.name()),
                    ));
                }
            }
            rules.push(Rule {
                name: r.name.clone(),
                metric: r.metric,
                layers: r.layers.clone(),
                act_above: r.act_above,
                relax_below: r.relax_below,
                ladder,
            });
        }
        let hash = hex(&Sha256::digest(text.as_bytes()));
        Ok(Self { version: file.version, settings: file.settings, rules, hash, origin: origin.into() })
    }

    /// The same rules under other settings (a command-line override, say), validated as a
    /// file's settings are. Its hash is the sha256 of this policy's hash and the new settings
    /// written out, so a decision record never names the original policy for the changed one.
    pub fn with_settings(&self, settings: Settings) -> Result<Self, PolicyError> {
        let origin = format!("{} (settings overridden)", self.origin);
        validate_settings(&settings).map_err(|(field, why)| PolicyError::Invalid { origin: origin.clone(), location: format!("settings.{field}"), why })?;
        let written = toml::to_string(&settings).map_err(|e| PolicyError::Invalid { origin: origin.clone(), location: "settings".into(), why: e.to_string() })?;
        let hash = hex(&Sha256::digest(format!("{}\n{written}", self.hash).as_bytes()));
        // The rules' layer patterns and ladders do not depend on the settings: they stay valid.
        Ok(Self { version: self.version, settings, rules: self.rules.clone(), hash, origin })
    }

    /// The policy format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// sha256 (hex) of the policy's text.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Where the policy came from (a path or a label).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Matches each rule's patterns against the model's layer names.
    pub fn coverage(&self, layer_names: &[String]) -> Result<Coverage, PolicyError> {
        let mut rule_layers = Vec::new();
        let mut warnings = Vec::new();
        for rule in &self.rules {
            let mut covered = Vec::new();
            for pattern in &rule.layers {
                let matcher = globset::Glob::new(pattern)
                    .map_err(|e| PolicyError::Invalid { origin: self.origin.clone(), location: format!("rule '{}', layers", rule.name), why: format!("bad pattern '{pattern}': {e}") })?
                    .compile_matcher();
                let hits: Vec<usize> = (0..layer_names.len()).filter(|&i| matcher.is_match(&layer_names[i])).collect();
                if hits.is_empty() {
                    if self.settings.strict_layers {
                        return Err(PolicyError::UnmatchedPattern {
                            origin: self.origin.clone(),
                            rule: rule.name.clone(),
                            pattern: pattern.clone(),
                            layers: layer_names.to_vec(),
                        });
                    }
                    warnings.push(format!("rule '{}': layer pattern '{pattern}' matches no layer", rule.name));
                }
                covered.extend(hits);
            }
            covered.sort_unstable();
            covered.dedup();
            rule_layers.push(covered);
        }
        Ok(Coverage { rule_layers, warnings })
    }

    /// The short form of the hash used in logs and labels.
    pub fn short_hash(&self) -> &str {
        Self::short(&self.hash)
    }

    /// The short form of a policy hash (its first 12 hex digits), as logs, labels and
    /// messages show it.
    pub fn short(hash: &str) -> &str {
        hash.get(..12).unwrap_or(hash)
    }
}

fn parse_step(value: &toml::Value) -> Result<LadderStep, String> {
    let table = value.as_table().ok_or("must be a table such as { action = \"clip\", max_norm = 1.0 }")?;
    let action = table.get("action").and_then(|a| a.as_str()).ok_or("missing field `action`")?;
    if action == "aggregate" {
        let mut factor = 2.0;
        for (k, v) in table {
            match k.as_str() {
                "action" => {}
                "factor" => factor = v.as_float().or(v.as_integer().map(|i| i as f64)).ok_or("`factor` must be a number")?,
                other => return Err(format!("unknown field `{other}` for action `aggregate` (expected `factor`)")),
            }
        }
        if !(factor.is_finite() && factor > 1.0) {
            return Err(format!("aggregate factor must be a finite number > 1, got {factor}"));
        }
        return Ok(LadderStep::Aggregate { factor });
    }
    if action == "noise" && table.contains_key("target") {
        return parse_calibrated(table);
    }
    let defence: Defence = value.clone().try_into().map_err(|e: toml::de::Error| e.to_string().trim_end().to_string())?;
    defence.validate().map_err(|e| e.to_string())?;
    Ok(LadderStep::Defence(defence))
}

/// `{ action = "noise", clip_norm = C, target = "threshold" }`.
fn parse_calibrated(table: &toml::value::Table) -> Result<LadderStep, String> {
    let mut clip_norm = None;
    for (k, v) in table {
        match k.as_str() {
            "action" => {}
            "target" => {
                if v.as_str() != Some("threshold") {
                    return Err(format!("`target` must be \"threshold\" (noise calibrated to the rule's act_above), got {v}"));
                }
            }
            "clip_norm" => clip_norm = Some(v.as_float().or(v.as_integer().map(|i| i as f64)).ok_or("`clip_norm` must be a number")?),
            "multiplier" => return Err("a calibrated noise rung computes its multiplier: give `target` or `multiplier`, not both".into()),
            other => return Err(format!("unknown field `{other}` for a calibrated noise rung (expected `clip_norm`, `target`)")),
        }
    }
    let clip_norm = clip_norm.ok_or("missing field `clip_norm`")?;
    if !(clip_norm.is_finite() && clip_norm > 0.0) {
        return Err(format!("clip_norm must be a finite number > 0, got {clip_norm}"));
    }
    Ok(LadderStep::CalibratedNoise { clip_norm })
}

fn validate_settings(s: &Settings) -> Result<(), (&'static str, String)> {
    if let Some(v) = s.prior_variance {
        if !(v.is_finite() && v > 0.0) {
            return Err(("prior_variance", format!("must be a finite number > 0, got {v}")));
        }
    }
    if !(s.calibration_margin_se.is_finite() && s.calibration_margin_se >= 0.0) {
        return Err(("calibration_margin_se", format!("must be a finite number >= 0 of standard errors, got {}", s.calibration_margin_se)));
    }
    if s.dataset_size == Some(0) {
        return Err(("dataset_size", "must be at least 1 sample".into()));
    }
    if let Some(c) = s.ledger_cap_bits {
        if !(c.is_finite() && c > 0.0) {
            return Err(("ledger_cap_bits", format!("must be a finite number > 0 of bits per dimension, got {c}")));
        }
    }
    if s.estimate_every == 0 {
        return Err(("estimate_every", "must be at least 1".into()));
    }
    if s.max_estimate_age_steps < s.estimate_every {
        return Err((
            "max_estimate_age_steps",
            format!("{} is below estimate_every {}: every estimate would be stale", s.max_estimate_age_steps, s.estimate_every),
        ));
    }
    if s.aggregation_floor == 0 {
        return Err(("aggregation_floor", "must be at least 1 sample".into()));
    }
    if s.aggregation_ceiling < s.aggregation_floor {
        return Err((
            "aggregation_ceiling",
            format!("{} is below aggregation_floor {}", s.aggregation_ceiling, s.aggregation_floor),
        ));
    }
    if !(s.budget_share > 0.0 && s.budget_share <= 1.0) {
        return Err(("budget_share", format!("must be in (0, 1], got {}", s.budget_share)));
    }
    if !s.exact_sensitivity && s.probes < 2 {
        return Err(("probes", format!("needs at least 2 for a standard error, got {}", s.probes)));
    }
    if s.probe_samples == Some(0) {
        return Err(("probe_samples", "a probe needs at least 1 sample, got 0".into()));
    }
    s.subspace.validate().map_err(|e| ("subspace", e.to_string()))?;
    s.isolation.validate().map_err(|e| ("isolation", e.to_string()))?;
    if let Some(f) = s.vetting.max_recovered_fraction.filter(|f| !(f.is_finite() && (0.0..=1.0).contains(f))) {
        return Err(("vetting.max_recovered_fraction", format!("must be in [0, 1], got {f}")));
    }
    Ok(())
}

/// The default cadence of M2 and M6 between estimates (`subspace_every_steps`,
/// `isolation_every_steps`): M1 renews at every estimate, these two, each costing several M1
/// estimates, at most once per this many steps unless a rule reads them.
const SECONDARY_EVERY_STEPS: u64 = 500;

/// The text of the permissive policy (no settings, no rules).
const PERMISSIVE: &str = "version = 1\n";

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
