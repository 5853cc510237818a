//! What the guard writes to its audit log, and when. Every change of state is a record of its
//! own, written before the release it decides: an escalation, a relaxation, a withheld layer,
//! the release at the new level, a block, a held batch, a policy loaded or rejected, a worker failure. A release that
//! changes nothing (released, or protected at the level already in force) is counted instead,
//! and every `checkpoint_every` steps one `checkpoint` record carries the counts per layer
//! and outcome with the metrics of the latest estimate. A long run's log then grows with what
//! the guard did, not with the steps it ran.
//!
//! The counts since the last checkpoint are in memory: a process killed between checkpoints
//! loses them (at most `checkpoint_every` steps of unchanged releases), never a state change.
use super::audit_log::AuditLog;
use super::audit_record::{Checkpoint, DecisionRecord, LayerTally, Outcome};
use super::protection::CALIBRATION_REASON;
use crate::error::AuditError;
use crate::report::Report;
use std::collections::{HashMap, HashSet};

/// Steps between checkpoints unless told otherwise.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 100;

/// The guard's writer of its audit log.
#[derive(Debug)]
pub struct AuditTrail {
    log: AuditLog,
    every: u64,
    tally: Vec<LayerTally>,
    /// Layer name -> its place in `tally`.
    index: HashMap<String, usize>,
    /// First step the counts in `tally` cover (None: nothing counted since the last checkpoint).
    from_step: Option<u64>,
    last_step: u64,
    worker_failures: u64,
    policy_hash: String,
}

impl AuditTrail {
    /// Writes a `started` record for a run over `layers` under the policy `policy_hash`.
    pub fn start(mut log: AuditLog, every: u64, step: u64, layers: &[String], policy_hash: &str) -> Result<Self, AuditError> {
        let reason = format!("{} layers: {}", layers.len(), layers.join(", "));
        log.record(&DecisionRecord::event(step, Outcome::Started, policy_hash, Some(reason)))?;
        let tally = layers.iter().map(|l| LayerTally { layer: l.clone(), ..LayerTally::default() }).collect();
        let index = layers.iter().enumerate().map(|(i, l)| (l.clone(), i)).collect();
        Ok(Self { log, every: every.max(1), tally, index, from_step: None, last_step: step, worker_failures: 0, policy_hash: policy_hash.to_string() })
    }

    /// The log written to.
    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    /// Steps between checkpoints.
    pub fn checkpoint_every(&self) -> u64 {
        self.every
    }

    /// Writes a run event now (a policy loaded or rejected).
    pub fn event(&mut self, record: &DecisionRecord) -> Result<(), AuditError> {
        if record.outcome == Outcome::PolicyLoaded {
            self.policy_hash = record.policy_hash.clone();
        }
        self.log.record(record)
    }

    /// A decided release: its state changes are written, its unchanged releases counted; the
    /// report gives the levels and the latest estimate's metrics for the next checkpoint.
    pub fn decided(&mut self, step: u64, records: &[DecisionRecord], report: &Report) -> Result<(), AuditError> {
        // A layer whose level moved at this release: its release record (protected at the
        // new level, or released at level 0) is a state change too.
        let moved: HashSet<&str> = records.iter().filter(|r| matches!(r.outcome, Outcome::Escalated | Outcome::Relaxed)).map(|r| r.layer.as_str()).collect();
        for r in records {
            let calibration = r.reason.as_deref().is_some_and(|w| w.starts_with(CALIBRATION_REASON));
            let explained = (r.outcome == Outcome::Withheld && r.reason.is_some()) || calibration;
            let slot = self.index.get(&r.layer).copied();
            let Some(l) = slot.filter(|_| r.outcome.is_unchanged_release() && !explained && !moved.contains(r.layer.as_str())) else {
                self.log.record(r)?;
                continue;
            };
            let t = &mut self.tally[l];
            match r.outcome {
                Outcome::Released => t.released += 1,
                Outcome::Withheld => t.withheld += 1,
                _ => t.protected += 1,
            }
            self.from_step.get_or_insert(step);
        }
        if report.health.worker_failures > self.worker_failures {
            let why = report.health.worker_error.clone().unwrap_or_else(|| "a worker job failed".into());
            let new = report.health.worker_failures - self.worker_failures;
            self.log.record(&DecisionRecord::event(step, Outcome::WorkerFailure, &self.policy_hash, Some(format!("{new} new worker failure(s): {why}"))))?;
            self.worker_failures = report.health.worker_failures;
        }
        let manifests = report.release.as_ref().map(|m| m.layers.as_slice()).unwrap_or_default();
        for (l, (t, layer)) in self.tally.iter_mut().zip(&report.layers).enumerate() {
            t.level = layer.protection_level;
            if let Some(m) = manifests.get(l).filter(|m| !m.checks.is_empty()) {
                t.thresholds = m.checks.iter().map(|c| (c.metric.name().to_string(), c.act_above)).collect();
            }
            if let Some(s) = layer.sensitivity.measured() {
                t.estimate_step = Some(s.step);
                t.metrics.insert("sensitivity".into(), s.sensitivity);
                t.metrics.insert("sensitivity_rms".into(), s.sensitivity_rms);
                if let Some(r) = s.relative_sensitivity {
                    t.metrics.insert("relative_sensitivity".into(), r);
                }
            }
            if let Some(m) = layer.subspace.measured() {
                t.metrics.insert("subspace_separation".into(), m.subspace_separation);
            }
            // M5 and the run ledger (finite values only: +Inf is "no bound", not a point).
            if let Some(bits) = layer.reconstruction_bound.measured().and_then(|b| b.reconstruction_bound_bits) {
                t.metrics.insert("reconstruction_bound_bits".into(), bits);
            }
            if let Some(bits) = report.ledger.as_ref().and_then(|g| g.layer_dfil.get(l)).and_then(|x| x.bound_bits) {
                t.metrics.insert("ledger_bound_bits".into(), bits);
            }
        }
        self.last_step = step;
        if self.from_step.is_some_and(|from| step + 1 - from >= self.every) {
            self.checkpoint(step)?;
        }
        Ok(())
    }

    /// Writes the counts since the last checkpoint, if there are any.
    pub fn checkpoint(&mut self, step: u64) -> Result<(), AuditError> {
        let Some(from_step) = self.from_step else { return Ok(()) };
        let mut record = DecisionRecord::event(step, Outcome::Checkpoint, &self.policy_hash, None);
        record.checkpoint = Some(Checkpoint { from_step, to_step: step, layers: self.tally.clone() });
        self.log.record(&record)?;
        for t in &mut self.tally {
            (t.released, t.protected, t.withheld) = (0, 0, 0);
        }
        self.from_step = None;
        Ok(())
    }

    /// Ends the run's part of the log: the last checkpoint, then a `closed` record.
    pub fn close(&mut self) -> Result<(), AuditError> {
        self.checkpoint(self.last_step)?;
        let step = self.last_step;
        self.log.record(&DecisionRecord::event(step, Outcome::Closed, &self.policy_hash, None))
    }
}
