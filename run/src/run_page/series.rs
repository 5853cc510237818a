//! A run's history per layer, read back from its audit log: the metrics at each checkpoint's
//! latest estimate, the thresholds and protection level in force, and the decisions.
use gradguard_guard::decide::{DecisionRecord, Outcome};
use std::collections::BTreeMap;

/// One decision drawn on the charts.
pub(crate) struct Decision {
    pub step: u64,
    pub outcome: Outcome,
    pub metric: Option<String>,
    pub value: Option<f64>,
    /// A blocked release, or a record whose reason says it was refused.
    pub refusal: bool,
    pub text: String,
}

/// What the page draws for one layer.
#[derive(Default)]
pub(crate) struct LayerHistory {
    pub name: String,
    /// metric -> (estimate step, value)
    pub metrics: BTreeMap<String, Vec<(u64, f64)>>,
    /// metric -> (step, act_above)
    pub thresholds: BTreeMap<String, Vec<(u64, f64)>>,
    /// (step, level)
    pub levels: Vec<(u64, f64)>,
    pub decisions: Vec<Decision>,
    /// Unchanged releases counted by the checkpoints.
    pub released: u64,
    pub protected: u64,
    pub withheld: u64,
}

/// The run's history: per layer, plus the release-wide decisions and events.
pub(crate) struct RunHistory {
    pub layers: Vec<LayerHistory>,
    pub global: Vec<Decision>,
    /// The run's first step (its `started` record's) and last.
    pub first_step: u64,
    pub last_step: u64,
    /// Runs the chain holds (`started` records); the page draws the last that ran steps.
    pub runs: usize,
    pub policy_hash: Option<String>,
}

fn describe(r: &DecisionRecord) -> String {
    let mut t = format!("step {} {}: {} {}", r.step, r.layer, r.outcome, r.action);
    if let (Some(m), Some(v)) = (&r.metric, r.value) {
        t += &format!(" ({m} {v:.4}");
        if let Some(th) = r.threshold {
            t += &format!(" vs {th}");
        }
        t += ")";
    }
    if let Some(reason) = &r.reason {
        t += &format!(": {reason}");
    }
    t
}

/// Reads the last run of `records` (from its `started` record on).
pub(crate) fn history(records: &[DecisionRecord], layer_names: &[String]) -> RunHistory {
    let runs = records.iter().filter(|r| r.outcome == Outcome::Started).count();
    // The last run that did anything (a rerun with no steps leaves only started/closed).
    let starts: Vec<usize> = records.iter().enumerate().filter(|(_, r)| r.outcome == Outcome::Started).map(|(i, _)| i).collect();
    let ends: Vec<usize> = starts.iter().skip(1).copied().chain([records.len()]).collect();
    let did_something = |&(a, b): &(usize, usize)| records[a..b].iter().any(|r| !matches!(r.outcome, Outcome::Started | Outcome::Closed | Outcome::StateSaved));
    let spans: Vec<(usize, usize)> = starts.iter().copied().zip(ends).collect();
    let (from, to) = spans.iter().rev().find(|s| did_something(s)).or(spans.last()).copied().unwrap_or((0, records.len()));
    let run = &records[from..to];
    let mut names: Vec<String> = layer_names.to_vec();
    for r in run {
        if let Some(c) = &r.checkpoint {
            for t in &c.layers {
                if !names.contains(&t.layer) {
                    names.push(t.layer.clone());
                }
            }
        }
    }
    let mut layers: Vec<LayerHistory> = names.iter().map(|n| LayerHistory { name: n.clone(), levels: vec![(run.first().map_or(0, |r| r.step), 0.0)], ..Default::default() }).collect();
    let mut global = Vec::new();
    let mut last_step = 0;
    for r in run {
        last_step = last_step.max(r.step);
        if let Some(c) = &r.checkpoint {
            for t in &c.layers {
                let Some(h) = layers.iter_mut().find(|h| h.name == t.layer) else { continue };
                let at = t.estimate_step.unwrap_or(c.to_step);
                for (m, v) in &t.metrics {
                    let s = h.metrics.entry(m.clone()).or_default();
                    match s.last() {
                        None => s.push((at, *v)),
                        Some(p) if p.0 < at => s.push((at, *v)),
                        // A new value under the same estimate step (a metric of a background
                        // worker lands after the estimate it belongs to, the tally keeps one
                        // step per layer): known to be in force at this checkpoint.
                        Some(p) if p.1 != *v && !(p.1.is_nan() && v.is_nan()) => {
                            let when = c.to_step.max(p.0 + 1);
                            s.push((when, *v));
                        }
                        Some(_) => {}
                    }
                }
                for (m, v) in &t.thresholds {
                    h.thresholds.entry(m.clone()).or_default().push((c.to_step, *v));
                }
                h.levels.push((c.to_step, t.level as f64));
                (h.released, h.protected, h.withheld) = (h.released + t.released, h.protected + t.protected, h.withheld + t.withheld);
            }
            continue;
        }
        if r.outcome == Outcome::PolicyLoaded {
            // A new policy starts every layer from level 0.
            for h in &mut layers {
                h.levels.push((r.step, 0.0));
            }
        }
        let refusal = r.outcome == Outcome::Blocked || r.reason.as_deref().is_some_and(|w| w.starts_with("refused"));
        let d = Decision { step: r.step, outcome: r.outcome, metric: r.metric.clone(), value: r.value, refusal, text: describe(r) };
        match layers.iter_mut().find(|h| h.name == r.layer) {
            Some(h) => {
                if matches!(r.outcome, Outcome::Escalated | Outcome::Relaxed) {
                    h.levels.push((r.step, r.level as f64));
                }
                if let (Some(m), Some(th)) = (&r.metric, r.threshold) {
                    if r.outcome != Outcome::Relaxed {
                        h.thresholds.entry(m.clone()).or_default().push((r.step, th));
                    }
                }
                h.decisions.push(d);
            }
            None if !matches!(r.outcome, Outcome::Started | Outcome::Closed | Outcome::Rotated | Outcome::StateSaved) => global.push(d),
            None => {}
        }
    }
    for h in &mut layers {
        for s in h.thresholds.values_mut() {
            s.sort_by_key(|p| p.0);
        }
        h.levels.sort_by_key(|p| p.0);
    }
    let first_step = run.first().map_or(0, |r| r.step).min(last_step);
    RunHistory { layers, global, first_step, last_step, runs, policy_hash: run.first().map(|r| r.policy_hash.clone()) }
}

/// The colour a decision is marked with.
pub(crate) fn colour(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Escalated => "#d62728",
        Outcome::Relaxed => "#2ca02c",
        Outcome::Withheld => "#7f7f7f",
        Outcome::Blocked => "#000000",
        Outcome::Held => "#bcbd22",
        Outcome::PolicyLoaded => "#17becf",
        Outcome::PolicyRejected => "#e377c2",
        Outcome::WorkerFailure => "#8c564b",
        _ => "#1f77b4",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gradguard_guard::decide::{Checkpoint, LayerTally};

    fn checkpoint(to: u64, estimate: u64, separation: f64) -> DecisionRecord {
        let mut r = DecisionRecord::event(to, Outcome::Checkpoint, "p", None);
        let tally = LayerTally { layer: "fc".into(), estimate_step: Some(estimate), metrics: [("subspace_separation".to_string(), separation)].into(), ..LayerTally::default() };
        r.checkpoint = Some(Checkpoint { from_step: to.saturating_sub(99), to_step: to, layers: vec![tally] });
        r
    }

    #[test]
    fn a_value_that_changes_under_the_same_estimate_step_is_placed_at_its_checkpoint() {
        // A background metric lands after the checkpoint of its estimate's step: the second
        // checkpoint logs a new value under the same estimate step.
        let records = [DecisionRecord::event(0, Outcome::Started, "p", None), checkpoint(99, 96, 0.05), checkpoint(199, 96, -0.08), checkpoint(299, 96, -0.08)];
        let run = history(&records, &["fc".to_string()]);
        assert_eq!(run.layers[0].metrics["subspace_separation"], [(96, 0.05), (199, -0.08)]);
        assert_eq!((run.first_step, run.last_step), (0, 299));
    }

    #[test]
    fn blocks_and_refused_records_are_refusals() {
        let mut refused = DecisionRecord::event(3, Outcome::PolicyRejected, "p", Some("refused: the file does not parse".into()));
        refused.layer = "*".into();
        let records = [DecisionRecord::event(0, Outcome::Started, "p", None), DecisionRecord::event(2, Outcome::Blocked, "p", Some("stale".into())), refused, DecisionRecord::event(4, Outcome::PolicyRejected, "p", Some("bad".into()))];
        let run = history(&records, &[]);
        assert_eq!(run.global.iter().map(|d| (d.step, d.refusal)).collect::<Vec<_>>(), [(2, true), (3, true), (4, false)]);
    }
}
