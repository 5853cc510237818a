//! The run ledger (METRICS.md, M5, over a run): Fisher information adds over releases, so each
//! sample's dFIL is summed over the releases that contained it, per layer and for the whole
//! release, and the cumulative bound is 0.5 log2(1 + v sum dFIL).
//!
//! Which releases contained a sample: exactly, when batches carry sample ids; otherwise each
//! release counts for the average sample at the sampling rate n/N of a declared data set size N,
//! or in full for every sample (the worst case) without one. What each release adds is its
//! batch's dFIL for the average sample (M1's probes do not separate the samples of a batch).
//! A release with a layer released without noise has no bound, and the run's becomes +Inf.
//!
//! A cap (`ledger_cap_bits`) is checked before a release: one that would take the whole
//! release's or a layer's cumulative bound above the cap is blocked, or the layers that would
//! are withheld (`on_violation`), with a decision record.
use super::audit_log::{unix_ms_now, DecisionRecord, Outcome};
use super::policy::{OnViolation, Settings};
use super::protection::Decision;
use super::release::BlockReason;
use crate::measure::reconstruction_bound_bits;
use crate::report::{Ledger, LedgerLayer, LeakageMetric, ReleaseOutcome};
use gradguard_defenses::Defence;
use std::collections::HashMap;

mod saved;
pub use saved::{LedgerState, SavedSums};

/// Cumulative dFIL per layer and for the whole release (+Inf: unbounded).
#[derive(Debug, Clone, PartialEq)]
struct Sums {
    layers: Vec<f64>,
    release: f64,
}

impl Sums {
    fn zero(layers: usize) -> Self {
        Self { layers: vec![0.0; layers], release: 0.0 }
    }

    fn add(&mut self, other: &Sums, weight: f64) {
        for (a, b) in self.layers.iter_mut().zip(&other.layers) {
            *a += weight * b;
        }
        self.release += weight * other.release;
    }

    fn plus(&self, other: &Sums, weight: f64) -> Sums {
        let mut out = self.clone();
        out.add(other, weight);
        out
    }
}

/// What one release adds (staged by the check, committed when the release leaves).
struct Staged {
    contribution: Sums,
    ids: Option<Vec<i64>>,
    weight: f64,
    prior_variance: Option<f64>,
}

/// The ledger of one guard's run.
pub struct RunLedger {
    /// What every sample has received from releases without ids (weighted by the sampling rate).
    base: Sums,
    /// What each identified sample has received on top of `base`.
    per_sample: HashMap<i64, Sums>,
    releases: u64,
    capped: u64,
    prior_variance: f64,
    staged: Option<Staged>,
    layers: usize,
}

impl RunLedger {
    /// An empty ledger over `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self { base: Sums::zero(layers), per_sample: HashMap::new(), releases: 0, capped: 0, prior_variance: 1.0, staged: None, layers }
    }

    /// The worst sample's sums: the most-released identified sample's (per figure), or the
    /// average sample's without ids.
    fn worst(&self) -> Sums {
        let mut out = self.base.clone();
        if let Some(first) = self.per_sample.values().next() {
            let mut extra = first.clone();
            for s in self.per_sample.values() {
                for (a, b) in extra.layers.iter_mut().zip(&s.layers) {
                    *a = a.max(*b);
                }
                extra.release = extra.release.max(s.release);
            }
            out.add(&extra, 1.0);
        }
        out
    }

    /// The worst sample's sums if this release (on samples `ids`, weight `weight`) left.
    fn projected(&self, add: &Sums, ids: Option<&[i64]>, weight: f64) -> Sums {
        match ids {
            None => self.worst().plus(add, weight),
            Some(ids) => {
                let mut out = self.worst();
                for id in ids {
                    let mine = self.base.plus(self.per_sample.get(id).unwrap_or(&Sums::zero(self.layers)), 1.0).plus(add, 1.0);
                    for (a, b) in out.layers.iter_mut().zip(&mine.layers) {
                        *a = a.max(*b);
                    }
                    out.release = out.release.max(mine.release);
                }
                out
            }
        }
    }

    /// Checks a decided release against the cap, blocking it or withholding layers when it
    /// would cross, and stages what it adds. `ids`: the release's sample ids; `n` its samples.
    pub fn check(&mut self, decision: &mut Decision, ids: Option<Vec<i64>>, n: usize, settings: &Settings, policy_hash: &str, step: u64) {
        self.staged = None;
        if !matches!(decision.outcome, ReleaseOutcome::Released) {
            return;
        }
        let v = decision.bounds.release.measured().map(|b| b.prior_variance).or(settings.prior_variance);
        let weight = match (&ids, settings.dataset_size) {
            (Some(_), _) => 1.0,
            (None, Some(total)) => (n as f64 / total as f64).min(1.0),
            (None, None) => 1.0,
        };
        let count = self.layers;
        let dfil = |decision: &Decision| -> Sums {
            let layers: Vec<f64> = (0..count)
                .map(|l| match decision.bounds.ledger_dfil(l, decision.chains.get(l).is_some_and(Option::is_some)) {
                    None => 0.0,
                    Some(d) => d.unwrap_or(f64::INFINITY),
                })
                .collect();
            let release = layers.iter().sum();
            Sums { layers, release }
        };
        let mut add = dfil(decision);
        if let Some(cap) = settings.ledger_cap_bits {
            let at = CapAt { step, cap, policy_hash };
            let bits = |d: f64| v.map_or(f64::INFINITY, |v| if d.is_finite() { reconstruction_bound_bits(v, d) } else { f64::INFINITY });
            let over = |s: &Sums| -> Vec<usize> { (0..count).filter(|&l| bits(s.layers[l]) > cap).collect() };
            let mut projected = self.projected(&add, ids.as_deref(), weight);
            if settings.on_violation == OnViolation::Withhold {
                // Withhold the layers that would cross, then the largest contributors until the
                // release fits.
                let mut withhold: Vec<usize> = over(&projected).into_iter().filter(|&l| add.layers[l] > 0.0).collect();
                let mut order: Vec<usize> = (0..count).filter(|&l| add.layers[l] > 0.0).collect();
                order.sort_by(|&a, &b| add.layers[b].total_cmp(&add.layers[a]));
                let mut order = order.into_iter();
                loop {
                    for &l in &withhold {
                        if decision.chains[l].is_some() {
                            self.withhold(decision, l, bits(projected.layers[l]), bits(projected.release), &at);
                        }
                    }
                    add = dfil(decision);
                    projected = self.projected(&add, ids.as_deref(), weight);
                    if bits(projected.release) <= cap && over(&projected).iter().all(|&l| add.layers[l] == 0.0) {
                        break;
                    }
                    match order.find(|&l| decision.chains[l].is_some()) {
                        Some(l) => withhold = vec![l],
                        None => break,
                    }
                }
            }
            let crossing = over(&projected).into_iter().find(|&l| add.layers[l] > 0.0);
            if bits(projected.release) > cap || crossing.is_some() {
                let (layer, value) = match crossing {
                    Some(l) => (decision.layers.get(l).map_or("*".to_string(), |m| m.name.clone()), bits(projected.layers[l])),
                    None => ("*".to_string(), bits(projected.release)),
                };
                self.block(decision, layer, value, &at);
                return;
            }
        }
        self.staged = Some(Staged { contribution: add, ids, weight, prior_variance: v });
    }

    fn withhold(&mut self, decision: &mut Decision, l: usize, layer_bits: f64, release_bits: f64, at: &CapAt) {
        self.capped += 1;
        let cap = at.cap;
        decision.chains[l] = None;
        let name = decision.layers[l].name.clone();
        decision.layers[l].released = false;
        decision.layers[l].actions = vec![Defence::Withhold];
        decision.bounds.withhold(l, "withheld: the run ledger's cap");
        decision.records.push(at.record(
            &name,
            Outcome::Withheld,
            Some(layer_bits.min(release_bits)),
            format!("the run ledger's cumulative bound would reach {layer_bits:.4e} bits/dim on this layer ({release_bits:.4e} for the release), above the cap {cap} (on_violation = withhold)"),
        ));
    }

    fn block(&mut self, decision: &mut Decision, layer: String, value: f64, at: &CapAt) {
        self.capped += 1;
        let reason = BlockReason::LedgerCap { layer: layer.clone(), bits: value, cap: at.cap };
        decision.records.push(at.record(&layer, Outcome::Blocked, Some(value), reason.to_string()));
        decision.outcome = ReleaseOutcome::Blocked { reason: reason.to_string() };
        decision.block = Some(reason);
        decision.chains = vec![None; decision.chains.len()];
        for layer in &mut decision.layers {
            layer.released = false;
        }
    }

    /// The staged release left: its Fisher information is now the samples'.
    pub fn commit(&mut self) {
        let Some(staged) = self.staged.take() else { return };
        self.releases += 1;
        if let Some(v) = staged.prior_variance {
            self.prior_variance = v;
        }
        match staged.ids {
            None => self.base.add(&staged.contribution, staged.weight),
            Some(ids) => {
                for id in ids {
                    self.per_sample.entry(id).or_insert_with(|| Sums::zero(self.layers)).add(&staged.contribution, 1.0);
                }
            }
        }
    }

    /// Drops what the last check staged (the release did not leave).
    pub fn discard(&mut self) {
        self.staged = None;
    }

    /// The ledger as reports carry it.
    pub fn report(&self, names: &[String], settings: &Settings) -> Ledger {
        let worst = self.worst();
        let v = self.prior_variance;
        let finite = |d: f64| d.is_finite().then_some(d);
        let accounting = if !self.per_sample.is_empty() {
            "per_sample_ids"
        } else if settings.dataset_size.is_some() {
            "sampling_rate"
        } else {
            "every_release"
        };
        Ledger {
            releases: self.releases,
            accounting: accounting.into(),
            dataset_size: settings.dataset_size,
            layer_dfil: names
                .iter()
                .zip(&worst.layers)
                .map(|(name, &d)| LedgerLayer { name: name.clone(), dfil: finite(d), bound_bits: finite(d).map(|d| reconstruction_bound_bits(v, d)) })
                .collect(),
            release_dfil: finite(worst.release),
            release_bound_bits: finite(worst.release).map(|d| reconstruction_bound_bits(v, d)),
            cap_bits: settings.ledger_cap_bits,
            capped: self.capped,
            prior_variance: v,
        }
    }
}

/// The release a cap check is about: its step, the cap, and the policy in force.
struct CapAt<'a> {
    step: u64,
    cap: f64,
    policy_hash: &'a str,
}

impl CapAt<'_> {
    /// The audit record of the cap withholding a layer or blocking the release.
    fn record(&self, layer: &str, outcome: Outcome, value: Option<f64>, reason: String) -> DecisionRecord {
        let action = if outcome == Outcome::Withheld { "withhold" } else { "block" };
        DecisionRecord {
            time_unix_ms: unix_ms_now(),
            step: self.step,
            layer: layer.to_string(),
            rule: Some("ledger_cap_bits".into()),
            metric: Some(LeakageMetric::ReconstructionBoundBits.name().into()),
            value: value.filter(|v| v.is_finite()),
            threshold: Some(self.cap),
            level: 0,
            action: action.into(),
            outcome,
            reason: Some(reason),
            policy_hash: self.policy_hash.to_string(),
            previous_policy_hash: None,
            checkpoint: None,
        }
    }
}
