//! Reports as serde types. Every number carries what it was computed on (step, n, K or m,
//! seed, P_l); a metric that could not be computed is `absent` with its reason, never 0.
use serde::{Deserialize, Serialize};

/// A metric that was either measured or is absent for a stated reason.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Metric<T> {
    Measured(T),
    Absent { reason: String },
}

impl<T> Metric<T> {
    pub fn absent(reason: impl Into<String>) -> Self {
        Metric::Absent { reason: reason.into() }
    }

    pub fn measured(&self) -> Option<&T> {
        match self {
            Metric::Measured(v) => Some(v),
            Metric::Absent { .. } => None,
        }
    }

    pub fn absent_reason(&self) -> Option<&str> {
        match self {
            Metric::Measured(_) => None,
            Metric::Absent { reason } => Some(reason),
        }
    }
}

/// How the JVP of the released gradient was formed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum JvpMethod {
    /// Double-backward trick: one extra backward pass per probe through a retained graph.
    #[default]
    DoubleBackward,
    /// (G(X + e v) - G(X - e v)) / 2e: two forward/backward passes per probe.
    CentralDifference,
}

/// M1 for one layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sensitivity {
    /// S_l(B): RMS over the batch of ||dG_l/dx_i||_F.
    pub sensitivity: f64,
    /// Standard error of S_l (delta method over the K per-probe estimates); 0 in exact mode.
    pub sensitivity_se: f64,
    /// S_l / sqrt(P_l).
    pub sensitivity_rms: f64,
    /// S_l / ||G_l||_2; absent (None) when the layer's gradient is exactly 0.
    pub relative_sensitivity: Option<f64>,
    pub step: u64,
    /// Samples in the released batch.
    pub n: usize,
    /// Probes K; None in exact mode.
    pub probes: Option<usize>,
    pub exact: bool,
    pub method: JvpMethod,
    pub seed: u64,
    pub params: usize,
}

/// M2 for one layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Subspace {
    /// d_between, the paper's subspace distance, in [0, 1].
    pub subspace_distance: f64,
    /// d_between - d_within: the baseline-corrected score thresholds act on.
    pub subspace_separation: f64,
    pub within_distance: f64,
    pub step: u64,
    /// Gradients per attribute value actually used.
    pub m: usize,
    /// Subspace rank r requested (fewer where the numerical rank is lower).
    pub rank: usize,
    pub groups: usize,
    pub centred: bool,
    pub seed: u64,
    pub params: usize,
}

/// Statistics of the layer's released gradient at this step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GradientStats {
    pub norm: f64,
    pub max_abs: f64,
    pub non_finite: u64,
    pub step: u64,
    pub params: usize,
}

/// Everything known about one layer at one step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    pub name: String,
    pub params: usize,
    pub gradient: Metric<GradientStats>,
    pub sensitivity: Metric<Sensitivity>,
    pub subspace: Metric<Subspace>,
    /// Ladder rungs in force on this layer (0: unprotected), the highest over its rules.
    pub protection_level: usize,
}

/// The guard's own state: its cost against its budget and the worker's health.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct GuardHealth {
    /// Steps since the estimate the metrics come from (None before the first).
    pub estimate_age_steps: Option<u64>,
    /// The budget: the share of wall time the guard may take.
    pub budget_share: f64,
    /// The estimates' share of wall time so far.
    pub estimate_share: f64,
    /// The guard's whole share of wall time so far (estimates and per-step work), which the
    /// budget bounds except for estimates renewed to keep the age bound.
    pub spent_share: f64,
    /// Estimates run over budget to keep the policy's age bound.
    pub over_budget_estimates: u64,
    /// M2 jobs dropped because the estimator's worker was behind.
    pub estimates_dropped: u64,
    /// Reports the sinks' worker dropped because a sink was behind.
    pub reports_dropped: u64,
    pub worker_failures: u64,
    pub worker_error: Option<String>,
}

/// The guard's report for one training step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub step: u64,
    pub batch_size: usize,
    pub seed: u64,
    /// Whether M1/M2 were estimated at this step (otherwise the metrics are the latest
    /// estimates, each carrying the step it was computed at).
    pub estimated: bool,
    /// Wall time of the estimate, when one ran at this step.
    pub estimate_seconds: Option<f64>,
    pub layers: Vec<LayerReport>,
    /// What was released and why (None for an audit estimate).
    pub release: Option<crate::release::Manifest>,
    pub health: GuardHealth,
}

impl Report {
    /// Whether the optimizer may step on (or the loop may share) the gradient now: false
    /// while micro-batches are held back for the aggregation floor, or when blocked.
    pub fn step_allowed(&self) -> bool {
        self.release.as_ref().is_none_or(|m| matches!(m.outcome, crate::release::ReleaseOutcome::Released))
    }

    /// Layers whose released gradient has non-finite entries.
    pub fn non_finite_layers(&self) -> Vec<String> {
        self.layers
            .iter()
            .filter(|l| l.gradient.measured().is_some_and(|g| g.non_finite > 0))
            .map(|l| l.name.clone())
            .collect()
    }

    pub fn layer(&self, name: &str) -> Option<&LayerReport> {
        self.layers.iter().find(|l| l.name == name)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports contain only serialisable values")
    }

    /// A fixed-width per-layer table for terminals and logs.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "step {} (n={}{})",
            self.step,
            self.batch_size,
            if self.estimated { ", estimated now" } else { "" }
        );
        let _ = writeln!(
            out,
            "{:<14} {:>8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10}",
            "layer", "P_l", "S_l", "±se", "S_rms", "R_l", "d_betw", "separ", "|G_l|"
        );
        for l in &self.layers {
            let s = l.sensitivity.measured();
            let m = l.subspace.measured();
            let g = l.gradient.measured();
            let _ = writeln!(
                out,
                "{:<14} {:>8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10}",
                truncate(&l.name, 14),
                l.params,
                fmt(s.map(|s| s.sensitivity)),
                fmt(s.map(|s| s.sensitivity_se)),
                fmt(s.map(|s| s.sensitivity_rms)),
                fmt(s.and_then(|s| s.relative_sensitivity)),
                fmt(m.map(|m| m.subspace_distance)),
                fmt(m.map(|m| m.subspace_separation)),
                fmt(g.map(|g| g.norm)),
            );
        }
        out
    }
}

fn fmt(v: Option<f64>) -> String {
    match v {
        Some(v) if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-3) => format!("{v:.3e}"),
        Some(v) => format!("{v:.4}"),
        None => "-".into(),
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('~')).collect()
    }
}
