//! What a guarded run did, counted while it runs and summarised at its end: the summary
//! `gradguard demo` and `gradguard train` print.
use gradguard_guard::{AuditLog, GuardError, Release, Report, decide::{verify_chain, DecisionRecord, Outcome, Verification, CALIBRATION_REASON}, report::{GuardHealth, Ledger}};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Releases of a run by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReleaseCounts {
    /// The optimizer stepped on the (protected) gradient.
    pub released: usize,
    /// Micro-batches held for the aggregation floor.
    pub held: usize,
    /// Blocked: no step.
    pub blocked: usize,
}

impl ReleaseCounts {
    /// Counts one release.
    pub fn count(&mut self, release: &Release) {
        match release {
            Release::Released { .. } => self.released += 1,
            Release::Held { .. } => self.held += 1,
            Release::Blocked { .. } => self.blocked += 1,
        }
    }
}

impl fmt::Display for ReleaseCounts {
    /// `released 10, held 0, blocked 1`, for a progress bar.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "released {}, held {}, blocked {}", self.released, self.held, self.blocked)
    }
}

/// What the guard did over a run: its releases, its health at the last step and the
/// decisions of its audit log.
#[derive(Clone, Debug)]
pub struct GuardSummary {
    /// Releases by kind.
    pub counts: ReleaseCounts,
    /// The guard's health in the last step's report.
    pub health: Option<GuardHealth>,
    /// This run's records of the audit log (from its `started` record on).
    pub records: Vec<DecisionRecord>,
    /// The run ledger at the last step (M5 summed over the run's releases).
    pub ledger: Option<Ledger>,
    /// The audit log (the chain's base file).
    pub audit_log: PathBuf,
    /// The whole chain checked at the end of the run.
    pub chain: Verification,
}

impl GuardSummary {
    /// Reads the run's audit log at `audit_log` (close it first, so that its last checkpoint
    /// is in) and checks its chain.
    pub fn read(counts: ReleaseCounts, last: Option<&Report>, audit_log: &Path) -> Result<Self, GuardError> {
        let all = AuditLog::read_chain(audit_log)?;
        let from = all.iter().rposition(|r| r.outcome == Outcome::Started).unwrap_or(0);
        let records = all[from..].to_vec();
        let chain = verify_chain(audit_log)?;
        Ok(Self { counts, health: last.map(|r| r.health.clone()), records, ledger: last.and_then(|r| r.ledger.clone()), audit_log: audit_log.to_path_buf(), chain })
    }

    /// This run's decisions by outcome: the records written one by one plus the unchanged
    /// releases the checkpoints counted. Run events (started, checkpoint, closed, rotated)
    /// are not decisions.
    pub fn decisions_by_outcome(&self) -> BTreeMap<Outcome, u64> {
        let mut out: BTreeMap<Outcome, u64> = BTreeMap::new();
        for r in &self.records {
            if let Some(c) = &r.checkpoint {
                for t in &c.layers {
                    *out.entry(Outcome::Released).or_default() += t.released;
                    *out.entry(Outcome::Protected).or_default() += t.protected;
                    *out.entry(Outcome::Withheld).or_default() += t.withheld;
                }
            } else if !matches!(r.outcome, Outcome::Started | Outcome::Checkpoint | Outcome::Closed | Outcome::Rotated | Outcome::StateSaved) {
                *out.entry(r.outcome).or_default() += 1;
            }
        }
        out.retain(|_, n| *n > 0);
        out
    }
}

/// The end-of-run summary: steps, wall time, how the model scores, and (guarded) the releases,
/// the guard's cost, the decisions by outcome with the first escalations, relaxations and
/// blocks, and where the report and the audit log are.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Training steps run.
    pub steps: usize,
    /// Wall time of the training loop.
    pub seconds: f64,
    /// How the trained model scores, e.g. `test accuracy 0.978`.
    pub score: String,
    /// What the guard did; None for an unguarded run.
    pub guard: Option<GuardSummary>,
    /// The report written for the run.
    pub report: PathBuf,
}

fn fmt_value(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "done: {} steps in {:.1} s, {}", self.steps, self.seconds, self.score)?;
        let Some(g) = &self.guard else {
            writeln!(f, "guard: off (unguarded run: every step applied, no audit log)")?;
            return writeln!(f, "report: {}", self.report.display());
        };
        let c = g.counts;
        writeln!(f, "releases: {} released, {} held for the aggregation floor, {} blocked", c.released, c.held, c.blocked)?;
        if let Some(h) = &g.health {
            writeln!(
                f,
                "guard: estimates took {:.1}% of wall time (budget {:.0}%, {} over budget to stay fresh), the guard in all {:.1}%; {} estimate and {} report job(s) dropped, {} worker failure(s)",
                h.estimate_share * 100.0,
                h.budget_share * 100.0,
                h.over_budget_estimates,
                h.spent_share * 100.0,
                h.estimates_dropped,
                h.reports_dropped,
                h.worker_failures
            )?;
        }
        let by_outcome = g.decisions_by_outcome();
        writeln!(f, "decisions: {}", by_outcome.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", "))?;
        for r in g.records.iter().filter(|r| matches!(r.outcome, Outcome::Escalated | Outcome::Relaxed | Outcome::Blocked)).take(8) {
            writeln!(
                f,
                "  step {:>4} {:<6} {:<10} {} ({} {} vs {})",
                r.step,
                r.layer,
                r.outcome,
                r.action,
                r.metric.as_deref().unwrap_or("-"),
                fmt_value(r.value),
                fmt_value(r.threshold)
            )?;
        }
        if let Some(r) = g.records.iter().rev().find(|r| r.reason.as_deref().is_some_and(|w| w.starts_with(CALIBRATION_REASON))) {
            writeln!(f, "  last calibration: step {} {}: {}", r.step, r.layer, r.reason.as_deref().unwrap_or(""))?;
        }
        if let Some(ledger) = &g.ledger {
            write!(f, "{}", ledger.summary())?;
        }
        let chain = match (&g.chain.broken, &g.chain.head) {
            (Some(b), _) => format!("chain BROKEN at {b}"),
            (None, Some(head)) => format!("chain of {} records verified, head {head}", g.chain.records),
            (None, None) => "empty".into(),
        };
        writeln!(f, "report: {}\naudit log: {} ({} records this run; {chain})", self.report.display(), g.audit_log.display(), g.records.len())
    }
}
