//! The closed loop: measured leakage -> declared threshold -> a defence on that layer (or a
//! higher aggregation floor) -> the leakage measured again on what would be released ->
//! release, or block. Levels persist between releases (hysteresis): a rule's level rises while
//! the release stays above `act_above` and falls one rung per release while the raw gradient
//! is below `relax_below`.
use super::audit_log::{DecisionRecord, Outcome};
use super::policy::{Coverage, LadderStep, OnViolation, Policy};
use super::release::BlockReason;
use super::state::StateError;
use crate::error::{PolicyError, Result};
use crate::measure::{LatentTable, LayerFisher, ReleaseSensitivity};
use crate::report::{Metric, PriorSource, ReconstructionBound, SampleIsolation};
use crate::report::{LayerManifest, LeakageMetric, ReleaseOutcome, RuleCheck};
use gradguard_defenses::Defence;
use std::collections::BTreeMap;

mod bounds;
mod calibrate;

pub use calibrate::CALIBRATION_REASON;
pub use bounds::Bounds;

/// What deciding may ask of the estimate's kept M1 JVPs: M1 and M5 of a defended release,
/// re-measured on the probes the estimate already drew (no pass over the model). The closed
/// loop needs them for chains it only chooses while deciding (escalation, calibrated noise), so
/// they cannot be measured before; the estimate stage implements this for its kept samples
/// and the decision sees only this capability, never the estimators.
pub trait ReleaseProbe {
    /// M1 of layer `l`'s release through `chain` (None: the layer is not used by the loss).
    fn release_sensitivity(&self, l: usize, chain: &[Defence], seed: u64) -> Result<Option<ReleaseSensitivity>>;
    /// The Fisher information of layer `l`'s release through `chain`, per probe.
    fn release_fisher(&self, l: usize, chain: &[Defence], seed: u64) -> Result<Option<LayerFisher>>;
    /// M5 of a dFIL estimate (None: unbounded) under the prior `prior`.
    fn reconstruction_bound(&self, dfil: Option<(f64, f64)>, noise_std: Option<f64>, prior: (f64, PriorSource)) -> ReconstructionBound;
    /// The estimate batch's per-dimension input variance (M5's prior without a setting).
    fn batch_variance(&self) -> f64;
    /// The input dimensions D the bounds are per.
    fn input_dims(&self) -> usize;
}

/// The measurements a decision can use. Each is optional: a rule whose metric is missing fails
/// closed.
pub struct Measurements<'a> {
    /// The kept M1 JVPs, or why there are none.
    pub jvps: std::result::Result<&'a dyn ReleaseProbe, String>,
    /// The latest M2 table (computed on the worker), with the current step and the age bound.
    pub latent: Option<&'a LatentTable>,
    /// M6 of the estimate, per layer.
    pub isolation: &'a [Metric<SampleIsolation>],
    pub step: u64,
    pub max_age_steps: u64,
    /// Seed of the defences' randomness for this release, per layer.
    pub seeds: &'a [u64],
    /// M5's prior variance from the settings (None: the estimate's batch variance).
    pub prior_variance: Option<f64>,
}

/// A metric value on a release: None when nothing is released (withheld or unused layer).
type Measured = std::result::Result<Option<f64>, String>;

impl Measurements<'_> {
    fn measure(&self, metric: LeakageMetric, l: usize, chain: &[Defence]) -> Result<Measured> {
        match metric {
            LeakageMetric::Sensitivity | LeakageMetric::SensitivityRms | LeakageMetric::RelativeSensitivity => {
                let jvps = match &self.jvps {
                    Ok(jvps) => jvps,
                    Err(reason) => return Ok(Err(reason.clone())),
                };
                let Some(release) = jvps.release_sensitivity(l, chain, self.seeds[l])? else { return Ok(Ok(None)) };
                Ok(Ok(Some(match metric {
                    LeakageMetric::Sensitivity => release.sensitivity,
                    LeakageMetric::SensitivityRms => release.sensitivity_rms,
                    _ => release.relative_sensitivity,
                })))
            }
            LeakageMetric::SubspaceSeparation => {
                if chain.iter().any(|d| matches!(d, Defence::Withhold)) {
                    return Ok(Ok(None));
                }
                let Some(table) = self.latent else {
                    return Ok(Err("subspace separation not estimated yet (no attribute labels, or the worker has not finished)".into()));
                };
                let age = self.step.saturating_sub(table.step);
                if age > self.max_age_steps {
                    return Ok(Err(format!("subspace estimate is stale: {age} steps old, the policy allows {}", self.max_age_steps)));
                }
                Ok(table.separation(l, chain).map(Some))
            }
            LeakageMetric::UsableInformationBits => Ok(Err("usable information is not estimated online".into())),
            // M6 of a release is the raw gradient's, whatever the chain does short of withholding
            // the layer: clipping scales every unit alike and noise mixes no samples (M5 measures
            // what it hides), so neither changes which sample a unit carries; sparsification and
            // quantisation act per entry, not per unit (the raw value is the conservative one).
            // An aggregate rung lowers it at the next release, measured on the larger batch.
            LeakageMetric::ExposedFraction | LeakageMetric::IsolatedShare => {
                if chain.iter().any(|d| matches!(d, Defence::Withhold)) {
                    return Ok(Ok(None));
                }
                match self.isolation.get(l) {
                    Some(Metric::Measured(s)) => Ok(Ok(Some(if metric == LeakageMetric::ExposedFraction { s.exposed_fraction } else { s.isolated_share }))),
                    Some(Metric::Absent { reason }) => Ok(Err(format!("sample isolation is absent: {reason}"))),
                    None => Ok(Err("sample isolation was not measured".into())),
                }
            }
            LeakageMetric::ReconstructionBoundBits => {
                let jvps = match &self.jvps {
                    Ok(jvps) => *jvps,
                    Err(reason) => return Ok(Err(reason.clone())),
                };
                let Some(fisher) = jvps.release_fisher(l, chain, self.seeds[l])? else { return Ok(Ok(None)) };
                // A release without noise has no bound: +Inf, above every threshold.
                Ok(Ok(Some(bounds::bound(fisher.dfil(), None, self, jvps).bits_or_inf())))
            }
        }
    }
}

/// The decision for one release: a chain per layer (None: withheld) or a block.
pub struct Decision {
    pub chains: Vec<Option<Vec<Defence>>>,
    pub outcome: ReleaseOutcome,
    pub layers: Vec<LayerManifest>,
    pub records: Vec<DecisionRecord>,
    /// What blocked the release, if anything did.
    pub block: Option<BlockReason>,
    /// M5 of the decided chains (before a block zeroes them): what the release carries.
    pub bounds: Bounds,
}

/// Protection levels per rule and layer, and the aggregation floor they imply.
pub struct Protection {
    policy: Policy,
    coverage: Coverage,
    layer_names: Vec<String>,
    /// levels[rule][layer]
    levels: Vec<Vec<usize>>,
    /// Set when the last measured decision found a rule's metric absent: nothing vouches for
    /// a release until a measurement does, so the releases between estimates block too.
    unmeasured: Option<BlockReason>,
    /// The concrete noise each calibrated rung resolved to at the last measured decision,
    /// [rule][layer].
    calibrated: Vec<Vec<Option<Defence>>>,
    /// M5 of the last measured decision's chains, reused between estimates.
    bounds: Bounds,
}

impl Protection {
    /// Starts every rule unprotected (level 0) on every layer; fails when the policy's layer
    /// patterns do not fit `layer_names`.
    pub fn new(policy: Policy, layer_names: Vec<String>) -> std::result::Result<Self, PolicyError> {
        let coverage = policy.coverage(&layer_names)?;
        let levels = vec![vec![0; layer_names.len()]; policy.rules().len()];
        let calibrated = vec![vec![None; layer_names.len()]; policy.rules().len()];
        let bounds = Bounds::absent(layer_names.len(), "not estimated yet");
        Ok(Self { policy, coverage, layer_names, levels, unmeasured: None, calibrated, bounds })
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The protection level of each layer: the highest rung in force over its rules.
    pub fn layer_levels(&self) -> Vec<usize> {
        (0..self.layer_names.len()).map(|l| self.levels.iter().map(|r| r[l]).max().unwrap_or(0)).collect()
    }

    /// The levels in force, per rule name and covered layer name (for [`super::GuardState`]).
    pub fn saved_levels(&self) -> BTreeMap<String, BTreeMap<String, usize>> {
        let mut out = BTreeMap::new();
        for (r, rule) in self.policy.rules().iter().enumerate() {
            let layers = self.coverage.rule_layers[r].iter().map(|&l| (self.layer_names[l].clone(), self.levels[r][l])).collect();
            out.insert(rule.name.clone(), layers);
        }
        out
    }

    /// Sets the levels from saved ones. Every rule and covered layer of the policy must be
    /// there, with a level within its ladder; nothing changes on an error.
    pub fn restore_levels(&mut self, saved: &BTreeMap<String, BTreeMap<String, usize>>) -> std::result::Result<(), StateError> {
        let mut levels = self.levels.clone();
        for (r, rule) in self.policy.rules().iter().enumerate() {
            let layers = saved.get(&rule.name).ok_or_else(|| StateError::Mismatch(format!("rule {:?} has no saved levels", rule.name)))?;
            for &l in &self.coverage.rule_layers[r] {
                let name = &self.layer_names[l];
                let level = *layers.get(name).ok_or_else(|| StateError::Mismatch(format!("rule {:?}: layer {name} has no saved level", rule.name)))?;
                if level > rule.ladder.len() {
                    return Err(StateError::Mismatch(format!("rule {:?}: layer {name} at level {level}, the ladder has {} rungs", rule.name, rule.ladder.len())));
                }
                levels[r][l] = level;
            }
            if let Some(extra) = layers.keys().find(|n| !self.coverage.rule_layers[r].iter().any(|&l| self.layer_names[l] == **n)) {
                return Err(StateError::Mismatch(format!("rule {:?}: layer {extra} is not covered by the rule", rule.name)));
            }
        }
        if let Some(extra) = saved.keys().find(|n| !self.policy.rules().iter().any(|r| r.name == **n)) {
            return Err(StateError::Mismatch(format!("rule {extra:?} is not in the policy")));
        }
        self.levels = levels;
        Ok(())
    }

    /// The (layer, chain) pairs whose M2 a decision may look up: the raw gradient of every
    /// layer, and for each subspace rule every rung from one below its level in force to the
    /// top, the other rules held at theirs.
    pub fn latent_requests(&self) -> Vec<(usize, Vec<Defence>)> {
        let mut out: Vec<(usize, Vec<Defence>)> = (0..self.layer_names.len()).map(|l| (l, vec![])).collect();
        for (r, rule) in self.policy.rules().iter().enumerate() {
            if rule.metric != LeakageMetric::SubspaceSeparation {
                continue;
            }
            for &l in &self.coverage.rule_layers[r] {
                let from = self.levels[r][l].saturating_sub(1);
                for level in from..=rule.ladder.len() {
                    out.push((l, self.chain_with(l, Some((r, level)))));
                }
            }
        }
        out
    }

    /// Whether a decision needs the kept JVPs (memory K x P): a rule on M1 or M5, or noise in
    /// force on a layer (its M5 is measured through it). A chain without noise has no bound
    /// and needs none; a layer escalated into noise is measured from the next estimate on.
    pub fn needs_jvps(&self) -> bool {
        let m1 = [LeakageMetric::Sensitivity, LeakageMetric::SensitivityRms, LeakageMetric::RelativeSensitivity, LeakageMetric::ReconstructionBoundBits];
        m1.into_iter().any(|m| self.uses(m)) || (0..self.layer_names.len()).any(|l| bounds::adds_noise(&self.chain(l)))
    }

    /// M5 of the chains in force, as measured at the last estimate.
    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    /// Whether any rule acts on this metric.
    pub fn uses(&self, metric: LeakageMetric) -> bool {
        self.policy.rules().iter().zip(&self.coverage.rule_layers).any(|(r, l)| r.metric == metric && !l.is_empty())
    }

    /// Which layers each rule of the policy covers on this model.
    pub fn coverage(&self) -> &Coverage {
        &self.coverage
    }

    /// The thresholds that apply: (layer, metric, act_above), for the exporter.
    pub fn thresholds(&self) -> Vec<crate::report::Threshold> {
        let mut out = Vec::new();
        for (rule, layers) in self.policy.rules().iter().zip(&self.coverage.rule_layers) {
            for &l in layers {
                out.push((self.layer_names[l].clone(), rule.metric, rule.act_above));
            }
        }
        out
    }

    /// The aggregation floor in force: the policy's floor times the factors of the aggregate
    /// rungs in force (the largest product over rules and layers), up to the ceiling.
    pub fn floor(&self) -> usize {
        let s = &self.policy.settings();
        let mut factor: f64 = 1.0;
        for (rule, levels) in self.policy.rules().iter().zip(&self.levels) {
            for &level in levels {
                let f: f64 = rule.ladder[..level]
                    .iter()
                    .filter_map(|step| match step {
                        LadderStep::Aggregate { factor } => Some(*factor),
                        _ => None,
                    })
                    .product();
                factor = factor.max(f);
            }
        }
        ((s.aggregation_floor as f64 * factor).ceil() as usize).min(s.aggregation_ceiling)
    }

    /// The defences in force on layer l, rules in policy order.
    fn chain(&self, l: usize) -> Vec<Defence> {
        self.chain_with(l, None)
    }

    /// The chain of layer l with rule `r` at `level` instead of its level in force.
    fn chain_with(&self, l: usize, overridden: Option<(usize, usize)>) -> Vec<Defence> {
        let mut chain = Vec::new();
        for (r, rule) in self.policy.rules().iter().enumerate() {
            if !self.coverage.rule_layers[r].contains(&l) {
                continue;
            }
            let level = match overridden {
                Some((o, level)) if o == r => level,
                _ => self.levels[r][l],
            };
            for step in &rule.ladder[..level] {
                match step {
                    LadderStep::Defence(d) => chain.push(d.clone()),
                    // Resolved at the last measured decision (unresolved: no noise, no bound).
                    LadderStep::CalibratedNoise { .. } => chain.extend(self.calibrated[r][l].clone()),
                    LadderStep::Aggregate { .. } => {}
                }
            }
        }
        chain
    }

    fn record(&self, step: u64, layer: &str, outcome: Outcome, action: String) -> DecisionRecord {
        DecisionRecord {
            time_unix_ms: crate::decide::audit_log::unix_ms_now(),
            step,
            layer: layer.to_string(),
            rule: None,
            metric: None,
            value: None,
            threshold: None,
            level: 0,
            action,
            outcome,
            reason: None,
            policy_hash: self.policy.hash().to_string(),
            previous_policy_hash: None,
            checkpoint: None,
        }
    }

    /// Decides a release with fresh measurements: relax or escalate each covered layer until
    /// every rule passes on the release, the ladder is exhausted (block or withhold, per
    /// policy), or an aggregate rung raises the floor (pending).
    pub fn decide(&mut self, step: u64, m: &Measurements) -> Result<Decision> {
        let mut records = Vec::new();
        let mut layers = Vec::new();
        let mut chains = Vec::new();
        let mut pending: Option<String> = None;
        let mut block = None;
        let mut unmeasured = None;
        for l in 0..self.layer_names.len() {
            let name = self.layer_names[l].clone();
            let rules: Vec<usize> = (0..self.policy.rules().len()).filter(|&r| self.coverage.rule_layers[r].contains(&l)).collect();
            let mut raw = vec![None; self.policy.rules().len()];
            // Hysteresis on the raw gradient.
            for &r in &rules {
                let rule = &self.policy.rules()[r];
                let value = match m.measure(rule.metric, l, &[])? {
                    Ok(v) => v,
                    Err(reason) => {
                        let reason_block = BlockReason::Violation { layer: name.clone(), metric: rule.metric, value: None, threshold: rule.act_above };
                        unmeasured.get_or_insert_with(|| reason_block.clone());
                        block.get_or_insert(reason_block);
                        let mut rec = self.record(step, &name, Outcome::Blocked, "block".into());
                        rec.rule = Some(rule.name.clone());
                        rec.metric = Some(rule.metric.name().into());
                        rec.threshold = Some(rule.act_above);
                        rec.reason = Some(format!("metric absent, cannot vouch for the release: {reason}"));
                        records.push(rec);
                        continue;
                    }
                };
                raw[r] = value;
                let level = self.levels[r][l];
                let v = value.unwrap_or(0.0);
                if level > 0 && v < rule.relax_below {
                    self.levels[r][l] -= 1;
                    let mut rec = self.record(step, &name, Outcome::Relaxed, format!("relax {}", rule.ladder[level - 1]));
                    rec.rule = Some(rule.name.clone());
                    rec.metric = Some(rule.metric.name().into());
                    rec.value = value;
                    rec.threshold = Some(rule.relax_below);
                    rec.level = level - 1;
                    records.push(rec);
                }
            }
            // Escalate while a rule fails on the release.
            let (chain, checks, withheld) = loop {
                if let Err(reason) = self.calibrate(step, l, m, &mut records)? {
                    let reason_block = BlockReason::GuardFailure { what: reason.clone() };
                    unmeasured.get_or_insert_with(|| reason_block.clone());
                    block.get_or_insert(reason_block);
                    let mut rec = self.record(step, &name, Outcome::Blocked, "block".into());
                    rec.reason = Some(reason);
                    records.push(rec);
                    break (self.chain(l), vec![], false);
                }
                let chain = self.chain(l);
                let mut checks = Vec::new();
                let mut failing = None;
                for &r in &rules {
                    let rule = &self.policy.rules()[r];
                    let released = m.measure(rule.metric, l, &chain)?.unwrap_or(None);
                    let passed = released.is_none_or(|v| v <= rule.act_above);
                    if !passed && failing.is_none() {
                        failing = Some((r, released));
                    }
                    checks.push(RuleCheck {
                        rule: rule.name.clone(),
                        metric: rule.metric,
                        level: self.levels[r][l],
                        raw: raw[r],
                        released,
                        act_above: rule.act_above,
                        relax_below: rule.relax_below,
                    });
                }
                let Some((r, value)) = failing else { break (chain, checks, false) };
                let rule = self.policy.rules()[r].clone();
                let level = self.levels[r][l];
                if level < rule.ladder.len() {
                    self.levels[r][l] += 1;
                    let rung = &rule.ladder[level];
                    let mut rec = self.record(step, &name, Outcome::Escalated, rung.to_string());
                    rec.rule = Some(rule.name.clone());
                    rec.metric = Some(rule.metric.name().into());
                    rec.value = value;
                    rec.threshold = Some(rule.act_above);
                    rec.level = level + 1;
                    records.push(rec);
                    if let LadderStep::Aggregate { .. } = rung {
                        pending.get_or_insert(format!(
                            "layer {name}: {} {} above {} , aggregation floor raised to {} samples",
                            rule.metric.name(),
                            fmt_opt(value),
                            rule.act_above,
                            self.floor()
                        ));
                        break (self.chain(l), checks, false);
                    }
                    continue;
                }
                // The ladder is exhausted.
                let mut rec = self.record(step, &name, Outcome::Blocked, "ladder exhausted".into());
                rec.rule = Some(rule.name.clone());
                rec.metric = Some(rule.metric.name().into());
                rec.value = value;
                rec.threshold = Some(rule.act_above);
                rec.level = level;
                match self.policy.settings().on_violation {
                    OnViolation::Block => {
                        rec.reason = Some("every rung applied and the release is still above the threshold".into());
                        records.push(rec);
                        block.get_or_insert(BlockReason::Violation { layer: name.clone(), metric: rule.metric, value, threshold: rule.act_above });
                        break (chain, checks, false);
                    }
                    OnViolation::Withhold => {
                        rec.outcome = Outcome::Withheld;
                        rec.action = "withhold".into();
                        rec.reason = Some("ladder exhausted: the layer is withheld (on_violation = withhold)".into());
                        records.push(rec);
                        break (chain, checks, true);
                    }
                }
            };
            let withheld = withheld || chain.iter().any(|d| matches!(d, Defence::Withhold));
            let outcome = if withheld {
                Outcome::Withheld
            } else if chain.is_empty() {
                Outcome::Released
            } else {
                Outcome::Protected
            };
            let actions = if withheld { vec![Defence::Withhold] } else { chain };
            for c in &checks {
                let mut rec = self.record(step, &name, outcome, action_text(&actions));
                rec.rule = Some(c.rule.clone());
                rec.metric = Some(c.metric.name().into());
                rec.value = c.released;
                rec.threshold = Some(c.act_above);
                rec.level = c.level;
                records.push(rec);
            }
            chains.push(if withheld { None } else { Some(actions.clone()) });
            layers.push(LayerManifest::new(name, !withheld, actions, checks));
        }
        self.bounds = bounds::measure_bounds(&chains, m)?;
        let bounds = self.bounds.clone();
        if block.is_some() || pending.is_some() {
            // A block releases nothing, whatever the other layers' checks said; nor does a
            // pending release (an aggregate rung holds the batch for a larger release).
            for layer in &mut layers {
                layer.released = false;
            }
            chains = vec![None; self.layer_names.len()];
        }
        let outcome = if let Some(reason) = &block {
            ReleaseOutcome::Blocked { reason: reason.to_string() }
        } else if let Some(reason) = pending {
            ReleaseOutcome::Held { reason }
        } else {
            ReleaseOutcome::Released
        };
        self.unmeasured = unmeasured;
        Ok(Decision { chains, outcome, layers, records, block, bounds })
    }

    /// Applies the levels in force without re-measuring (between estimates); blocks as the
    /// last measured decision did when a rule's metric was absent there.
    pub fn reuse(&self, step: u64, estimate_step: u64) -> Decision {
        if let Some(reason) = &self.unmeasured {
            return self.block(step, reason.clone());
        }
        let mut layers = Vec::new();
        let mut chains = Vec::new();
        let mut records = Vec::new();
        let levels = self.layer_levels();
        for l in 0..self.layer_names.len() {
            let chain = self.chain(l);
            let withheld = chain.iter().any(|d| matches!(d, Defence::Withhold));
            let outcome = if withheld { Outcome::Withheld } else if chain.is_empty() { Outcome::Released } else { Outcome::Protected };
            let actions = if withheld { vec![Defence::Withhold] } else { chain.clone() };
            let mut rec = self.record(step, &self.layer_names[l], outcome, action_text(&actions));
            rec.level = levels[l];
            rec.reason = Some(format!("levels from the estimate at step {estimate_step}"));
            records.push(rec);
            layers.push(LayerManifest::new(self.layer_names[l].clone(), !withheld, actions, vec![]));
            chains.push(if withheld { None } else { Some(chain) });
        }
        Decision { chains, outcome: ReleaseOutcome::Released, layers, records, block: None, bounds: self.bounds.clone() }
    }

    /// Nothing released yet: the release waits for more samples.
    pub fn pending(&self, reason: String) -> Decision {
        Decision {
            chains: vec![None; self.layer_names.len()],
            outcome: ReleaseOutcome::Held { reason },
            layers: vec![],
            records: vec![],
            block: None,
            bounds: Bounds::absent(self.layer_names.len(), "nothing released (pending)"),
        }
    }

    /// A pending decision refused, for the explicit release (which holds nothing): blocked,
    /// with its records and the block's. Any other decision is returned as it is.
    pub fn refuse_pending(&self, step: u64, mut decision: Decision) -> Decision {
        let ReleaseOutcome::Held { reason } = &decision.outcome else { return decision };
        let reason = BlockReason::Aggregate { reason: reason.clone() };
        let mut rec = self.record(step, "*", Outcome::Blocked, "block".into());
        rec.reason = Some(reason.to_string());
        decision.records.push(rec);
        decision.outcome = ReleaseOutcome::Blocked { reason: reason.to_string() };
        decision.block = Some(reason);
        decision.chains = vec![None; decision.chains.len()];
        for layer in &mut decision.layers {
            layer.released = false;
        }
        decision
    }

    /// A release-wide block (stale or failed estimate, non-finite gradient).
    pub fn block(&self, step: u64, reason: BlockReason) -> Decision {
        let mut rec = self.record(step, "*", Outcome::Blocked, "block".into());
        rec.reason = Some(reason.to_string());
        Decision {
            chains: vec![None; self.layer_names.len()],
            outcome: ReleaseOutcome::Blocked { reason: reason.to_string() },
            layers: self
                .layer_names
                .iter()
                .map(|n| LayerManifest::new(n.clone(), false, vec![], vec![]))
                .collect(),
            records: vec![rec],
            block: Some(reason),
            bounds: Bounds::absent(self.layer_names.len(), "nothing released (blocked)"),
        }
    }
}

/// A chain as the audit log writes it: `clip(max_norm=1) -> sparsify(keep_fraction=0.25)`,
/// `none` when nothing is applied.
fn action_text(actions: &[Defence]) -> String {
    if actions.is_empty() {
        return "none".into();
    }
    actions.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" -> ")
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("(absent)".into(), |v| format!("{v:.4e}"))
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::ReleaseOutcome;

    #[test]
    fn subspace_results_older_than_the_bound_fail_closed() {
        let rule = "[[rule]]\nname = \"latent\"\nmetric = \"subspace_separation\"\nlayers = [\"fc*\"]\nact_above = 10.0\nrelax_below = 5.0\nladder = [{ action = \"withhold\" }]\n";
        let policy = Policy::from_toml_str(&format!("version = 1\n{rule}"), "t").unwrap();
        let layers: Vec<String> = ["conv1", "fc1", "fc2"].map(String::from).to_vec();
        let mut protection = Protection::new(policy, layers).unwrap();
        let old = LatentTable::unavailable(0, 3, "never reached: the age check comes first".into());
        let m = Measurements { jvps: Err("not estimated".into()), latent: Some(&old), isolation: &[], step: 10, max_age_steps: 4, seeds: &[0, 0, 0], prior_variance: None };
        let decision = protection.decide(10, &m).unwrap();
        assert!(matches!(decision.outcome, ReleaseOutcome::Blocked { .. }));
        assert!(decision.layers.iter().all(|l| !l.released));
        let reason = decision.records.iter().find_map(|r| r.reason.clone()).unwrap();
        assert!(reason.contains("stale: 10 steps old, the policy allows 4"), "{reason}");
    }
}
