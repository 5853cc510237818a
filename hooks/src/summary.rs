//! What a guarded run did, counted while it runs and summarised at its end: the summary
//! `gradguard demo` and `gradguard train` print.
use gradguard_guard::{AuditLog, DecisionRecord, GuardError, GuardHealth, Ledger, Outcome, Release, Report};
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
    /// Every decision of the audit log.
    pub records: Vec<DecisionRecord>,
    /// The run ledger at the last step (M5 summed over the run's releases).
    pub ledger: Option<Ledger>,
    /// The audit log.
    pub audit_log: PathBuf,
}

impl GuardSummary {
    /// Reads the run's audit log at `audit_log`.
    pub fn read(counts: ReleaseCounts, last: Option<&Report>, audit_log: &Path) -> Result<Self, GuardError> {
        let records = AuditLog::read_all(audit_log)?;
        Ok(Self { counts, health: last.map(|r| r.health.clone()), records, ledger: last.and_then(|r| r.ledger.clone()), audit_log: audit_log.to_path_buf() })
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
        let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
        for r in &g.records {
            *by_outcome.entry(r.outcome.to_string()).or_default() += 1;
        }
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
        if let Some(r) = g.records.iter().rev().find(|r| r.reason.as_deref().is_some_and(|w| w.starts_with("calibrated noise"))) {
            writeln!(f, "  last calibration: step {} {}: {}", r.step, r.layer, r.reason.as_deref().unwrap_or(""))?;
        }
        if let Some(ledger) = &g.ledger {
            write!(f, "{}", ledger.summary())?;
        }
        writeln!(f, "report: {}\naudit log: {} ({} decisions)", self.report.display(), g.audit_log.display(), g.records.len())
    }
}
