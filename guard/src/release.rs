//! The closed loop: measured leakage -> declared threshold -> a defence on that layer (or a
//! higher aggregation floor) -> the leakage measured again on what would be released ->
//! release, or block. Levels persist between releases (hysteresis): a rule's level rises while
//! the release stays above `act_above` and falls one rung per release while the raw gradient
//! is below `relax_below`.
use crate::audit::{DecisionRecord, Outcome};
use crate::error::{Result, TorchContext};
use crate::policy::{Coverage, LadderStep, LeakageMetric, OnViolation, Policy};
use crate::sensitivity::JvpSamples;
use crate::latent_table::LatentTable;
use crate::transform::transform;
use gradguard_defenses::Defence;
use serde::{Deserialize, Serialize};

/// What happened to one release.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReleaseOutcome {
    Released,
    /// Nothing released yet: accumulating samples up to the aggregation floor.
    Pending { reason: String },
    Blocked { reason: String },
}

/// One rule's check of one layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RuleCheck {
    pub rule: String,
    pub metric: LeakageMetric,
    /// Ladder rungs in force.
    pub level: usize,
    /// The metric on the unprotected gradient (None: not re-measured at this release).
    pub raw: Option<f64>,
    /// The metric on the release (None: withheld, or not re-measured).
    pub released: Option<f64>,
    pub act_above: f64,
    pub relax_below: f64,
}

/// What was done to one layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerManifest {
    pub name: String,
    pub released: bool,
    /// The defences applied in order, as `clip(max_norm=1)` etc.
    pub actions: Vec<String>,
    pub checks: Vec<RuleCheck>,
}

/// The manifest of a release: what was done to each layer and why. Carries no gradient value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub step: u64,
    pub policy_hash: String,
    pub policy_version: u32,
    /// Samples the release covers.
    pub samples: usize,
    pub aggregation_floor: usize,
    /// Step of the estimate the decisions rest on.
    pub estimate_step: Option<u64>,
    pub outcome: ReleaseOutcome,
    pub layers: Vec<LayerManifest>,
}

/// The measurements a decision can use. Each is optional: a rule whose metric is missing fails
/// closed.
pub struct Measurements<'a> {
    pub jvps: Option<&'a JvpSamples>,
    /// The latest M2 table (computed on the worker), with the current step and the age bound.
    pub latent: Option<&'a LatentTable>,
    pub step: u64,
    pub max_age_steps: u64,
    /// Seed of the defences' randomness for this release, per layer.
    pub seeds: &'a [u64],
    pub params: &'a [usize],
}

/// A metric value on a release: None when nothing is released (withheld or unused layer).
type Measured = std::result::Result<Option<f64>, String>;

impl Measurements<'_> {
    fn measure(&self, metric: LeakageMetric, l: usize, chain: &[Defence]) -> Result<Measured> {
        match metric {
            LeakageMetric::Sensitivity | LeakageMetric::SensitivityRms | LeakageMetric::RelativeSensitivity => {
                let Some(jvps) = self.jvps else { return Ok(Err("sensitivity was not estimated".into())) };
                let Some(layer) = &jvps.layers[l] else { return Ok(Ok(None)) };
                let Some(t) = transform(chain, &layer.grad, &layer.jvps, self.seeds[l])? else { return Ok(Ok(None)) };
                // One host read for all probes.
                let squares = t.tangents.iter().map(crate::tensors::sum_sq).collect::<Result<Vec<_>>>()?;
                let total: f64 = crate::tensors::to_f64_vec(&tch::Tensor::f_stack(&squares, 0).during("stacking tangent norms")?)?.iter().sum();
                let s = (total / (jvps.probes as f64 * jvps.n as f64)).sqrt();
                Ok(Ok(Some(match metric {
                    LeakageMetric::Sensitivity => s,
                    LeakageMetric::SensitivityRms => s / (self.params[l] as f64).sqrt(),
                    _ => {
                        let norm = t.value.f_norm().and_then(|n| n.f_double_value(&[])).during("the release's norm")?;
                        if norm > 0.0 { s / norm } else { 0.0 }
                    }
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
        }
    }
}

/// The decision for one release: a chain per layer (None: withheld) or a block.
pub struct Decision {
    pub chains: Vec<Option<Vec<Defence>>>,
    pub outcome: ReleaseOutcome,
    pub layers: Vec<LayerManifest>,
    pub records: Vec<DecisionRecord>,
    /// (layer, metric, value, threshold) of the violation that blocked the release.
    pub violation: Option<(String, String, Option<f64>, f64)>,
}

/// Protection levels per rule and layer, and the aggregation floor they imply.
pub struct Protection {
    policy: Policy,
    coverage: Coverage,
    layer_names: Vec<String>,
    /// levels[rule][layer]
    levels: Vec<Vec<usize>>,
}

impl Protection {
    pub fn new(policy: Policy, layer_names: Vec<String>) -> std::result::Result<Self, crate::policy::PolicyError> {
        let coverage = policy.coverage(&layer_names)?;
        let levels = vec![vec![0; layer_names.len()]; policy.rules.len()];
        Ok(Self { policy, coverage, layer_names, levels })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn coverage(&self) -> &Coverage {
        &self.coverage
    }

    /// The protection level of each layer: the highest rung in force over its rules.
    pub fn layer_levels(&self) -> Vec<usize> {
        (0..self.layer_names.len()).map(|l| self.levels.iter().map(|r| r[l]).max().unwrap_or(0)).collect()
    }

    /// The (layer, chain) pairs whose M2 a decision may look up: the raw gradient of every
    /// layer, and for each subspace rule every rung from one below its level in force to the
    /// top, the other rules held at theirs.
    pub fn latent_requests(&self) -> Vec<(usize, Vec<Defence>)> {
        let mut out: Vec<(usize, Vec<Defence>)> = (0..self.layer_names.len()).map(|l| (l, vec![])).collect();
        for (r, rule) in self.policy.rules.iter().enumerate() {
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

    /// Whether any rule acts on this metric.
    pub fn uses(&self, metric: LeakageMetric) -> bool {
        self.policy.rules.iter().zip(&self.coverage.rule_layers).any(|(r, l)| r.metric == metric && !l.is_empty())
    }

    /// The thresholds that apply: (layer, metric, act_above), for the exporter.
    pub fn thresholds(&self) -> Vec<(String, LeakageMetric, f64)> {
        let mut out = Vec::new();
        for (rule, layers) in self.policy.rules.iter().zip(&self.coverage.rule_layers) {
            for &l in layers {
                out.push((self.layer_names[l].clone(), rule.metric, rule.act_above));
            }
        }
        out
    }

    /// The aggregation floor in force: the policy's floor times the factors of the aggregate
    /// rungs in force (the largest product over rules and layers), up to the ceiling.
    pub fn floor(&self) -> usize {
        let s = &self.policy.settings;
        let mut factor: f64 = 1.0;
        for (rule, levels) in self.policy.rules.iter().zip(&self.levels) {
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
        for (r, rule) in self.policy.rules.iter().enumerate() {
            if !self.coverage.rule_layers[r].contains(&l) {
                continue;
            }
            let level = match overridden {
                Some((o, level)) if o == r => level,
                _ => self.levels[r][l],
            };
            for step in &rule.ladder[..level] {
                if let LadderStep::Defence(d) = step {
                    chain.push(d.clone());
                }
            }
        }
        chain
    }

    fn record(&self, step: u64, layer: &str, outcome: Outcome, action: String) -> DecisionRecord {
        DecisionRecord {
            time_unix_ms: crate::audit::unix_ms_now(),
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
            policy_hash: self.policy.hash.clone(),
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
        let mut violation = None;
        for l in 0..self.layer_names.len() {
            let name = self.layer_names[l].clone();
            let rules: Vec<usize> = (0..self.policy.rules.len()).filter(|&r| self.coverage.rule_layers[r].contains(&l)).collect();
            let mut raw = vec![None; self.policy.rules.len()];
            // Hysteresis on the raw gradient.
            for &r in &rules {
                let rule = &self.policy.rules[r];
                let value = match m.measure(rule.metric, l, &[])? {
                    Ok(v) => v,
                    Err(reason) => {
                        violation.get_or_insert((name.clone(), rule.metric.name().to_string(), None, rule.act_above));
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
                let chain = self.chain(l);
                let mut checks = Vec::new();
                let mut failing = None;
                for &r in &rules {
                    let rule = &self.policy.rules[r];
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
                let rule = self.policy.rules[r].clone();
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
                match self.policy.settings.on_violation {
                    OnViolation::Block => {
                        rec.reason = Some("every rung applied and the release is still above the threshold".into());
                        records.push(rec);
                        violation.get_or_insert((name.clone(), rule.metric.name().to_string(), value, rule.act_above));
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
            let actions: Vec<String> = if withheld { vec!["withhold".into()] } else { chain.iter().map(|d| d.to_string()).collect() };
            let outcome = if withheld {
                Outcome::Withheld
            } else if chain.is_empty() {
                Outcome::Released
            } else {
                Outcome::Protected
            };
            for c in &checks {
                let mut rec = self.record(step, &name, outcome, actions.join(" -> "));
                rec.action = if actions.is_empty() { "none".into() } else { actions.join(" -> ") };
                rec.rule = Some(c.rule.clone());
                rec.metric = Some(c.metric.name().into());
                rec.value = c.released;
                rec.threshold = Some(c.act_above);
                rec.level = c.level;
                records.push(rec);
            }
            layers.push(LayerManifest { name, released: !withheld, actions, checks });
            chains.push(if withheld { None } else { Some(chain) });
        }
        if violation.is_some() {
            // A block releases nothing, whatever the other layers' checks said.
            for layer in &mut layers {
                layer.released = false;
            }
            chains = vec![None; self.layer_names.len()];
        }
        let outcome = if let Some((layer, metric, value, threshold)) = &violation {
            ReleaseOutcome::Blocked {
                reason: format!("layer {layer}: {metric} {} above threshold {threshold} with every defence applied (or not measurable)", fmt_opt(*value)),
            }
        } else if let Some(reason) = pending {
            ReleaseOutcome::Pending { reason }
        } else {
            ReleaseOutcome::Released
        };
        Ok(Decision { chains, outcome, layers, records, violation })
    }

    /// Applies the levels in force without re-measuring (between estimates).
    pub fn reuse(&self, step: u64, estimate_step: u64) -> Decision {
        let mut layers = Vec::new();
        let mut chains = Vec::new();
        let mut records = Vec::new();
        let levels = self.layer_levels();
        for l in 0..self.layer_names.len() {
            let chain = self.chain(l);
            let withheld = chain.iter().any(|d| matches!(d, Defence::Withhold));
            let actions: Vec<String> = if withheld { vec!["withhold".into()] } else { chain.iter().map(|d| d.to_string()).collect() };
            let outcome = if withheld { Outcome::Withheld } else if chain.is_empty() { Outcome::Released } else { Outcome::Protected };
            let mut rec = self.record(step, &self.layer_names[l], outcome, if actions.is_empty() { "none".into() } else { actions.join(" -> ") });
            rec.level = levels[l];
            rec.reason = Some(format!("levels from the estimate at step {estimate_step}"));
            records.push(rec);
            layers.push(LayerManifest { name: self.layer_names[l].clone(), released: !withheld, actions, checks: vec![] });
            chains.push(if withheld { None } else { Some(chain) });
        }
        Decision { chains, outcome: ReleaseOutcome::Released, layers, records, violation: None }
    }

    /// A release-wide block (stale or failed estimate, non-finite gradient).
    pub fn block(&self, step: u64, reason: String) -> Decision {
        let mut rec = self.record(step, "*", Outcome::Blocked, "block".into());
        rec.reason = Some(reason.clone());
        Decision {
            chains: vec![None; self.layer_names.len()],
            outcome: ReleaseOutcome::Blocked { reason },
            layers: self
                .layer_names
                .iter()
                .map(|n| LayerManifest { name: n.clone(), released: false, actions: vec!["block".into()], checks: vec![] })
                .collect(),
            records: vec![rec],
            violation: None,
        }
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("(absent)".into(), |v| format!("{v:.4e}"))
}

