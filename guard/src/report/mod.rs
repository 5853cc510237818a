//! Reports as serde types. Every number carries what it was computed on (step, n, K or m,
//! seed, P_l); a metric that could not be computed is `absent` with its reason, never 0.
use serde::{Deserialize, Serialize};

mod bound;
mod isolation;
mod manifest;
mod policy_table;
mod vocabulary;
pub use bound::{Ledger, LedgerLayer, PriorSource, ReconstructionBound, BOUND_CAVEAT, NO_NOISE_NO_BOUND};
pub use isolation::{SampleIsolation, TermSource, Vetting, VettingAttack, VettingCheck};
pub use manifest::{LayerManifest, Manifest, ReleaseOutcome, RuleCheck};
pub use policy_table::Threshold;
pub use vocabulary::{ReleaseKind, ReportedMetric};

/// The metric a rule acts on, by its METRICS.md name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakageMetric {
    /// M1 S_l(B): RMS over the batch of the Frobenius norm of the layer gradient's input Jacobian.
    Sensitivity,
    /// M1 S_l^rms = S_l / sqrt(P_l): per-parameter scale, comparable across layers.
    SensitivityRms,
    /// M1 R_l = S_l / ||G_l||_2: scale-free in the loss and learning rate.
    RelativeSensitivity,
    /// M2 d_between - d_within: the baseline-corrected subspace score.
    SubspaceSeparation,
    /// M3 usable (V-)information about the attribute, in bits.
    UsableInformationBits,
    /// M5 the van Trees bound of a noised release, bits per input dimension (+Inf without
    /// noise).
    ReconstructionBoundBits,
    /// M6 the share of the batch that the layer's release exposes alone (samples that
    /// dominate at least one unit's gradient), in [0, 1].
    ExposedFraction,
    /// M6 the share of the layer's squared gradient norm carried by units that isolate one
    /// sample, in [0, 1].
    IsolatedShare,
}

impl LeakageMetric {
    /// The metric's METRICS.md name, as written in policies and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sensitivity => "sensitivity",
            Self::SensitivityRms => "sensitivity_rms",
            Self::RelativeSensitivity => "relative_sensitivity",
            Self::SubspaceSeparation => "subspace_separation",
            Self::UsableInformationBits => "usable_information_bits",
            Self::ReconstructionBoundBits => "reconstruction_bound_bits",
            Self::ExposedFraction => "exposed_fraction",
            Self::IsolatedShare => "isolated_share",
        }
    }
}

/// A metric that was either measured or is absent for a stated reason.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Metric<T> {
    /// The value that was computed.
    Measured(T),
    /// Not computed; never reported as 0.
    Absent {
        /// Why the metric could not be computed.
        reason: String,
    },
}

impl<T> Metric<T> {
    /// An absent metric with the given reason.
    pub fn absent(reason: impl Into<String>) -> Self {
        Metric::Absent { reason: reason.into() }
    }

    /// The value, or None when absent.
    pub fn measured(&self) -> Option<&T> {
        match self {
            Metric::Measured(v) => Some(v),
            Metric::Absent { .. } => None,
        }
    }

    /// The reason the metric is absent, or None when measured.
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

/// What M1's Jacobian is taken with respect to (METRICS.md, M1).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Representation {
    /// The model's inputs themselves (continuous inputs).
    #[default]
    Input,
    /// The embedding vectors of discrete inputs (token ids, categorical codes): the output of
    /// the model's declared `embed` stage, an L x E block per sample for L tokens.
    Embedding,
}

impl Representation {
    /// The name reports use: `input` or `embedding`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Embedding => "embedding",
        }
    }
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
    /// Training step the estimate was computed at.
    pub step: u64,
    /// Samples in the released batch.
    pub n: usize,
    /// Probes K; None in exact mode.
    pub probes: Option<usize>,
    /// Whether exact mode (basis enumeration) was used instead of probes.
    pub exact: bool,
    /// How the JVP was formed (the setting; unused in exact mode).
    pub method: JvpMethod,
    /// Seed the probes were drawn from (same seed, same numbers).
    pub seed: u64,
    /// P_l: scalars in the layer.
    pub params: usize,
    /// What x_i is: the inputs, or the embeddings of discrete inputs.
    #[serde(default)]
    pub representation: Representation,
    /// m: samples each probe ran on (METRICS.md, M1, sub-batch probes), n for the full batch,
    /// exact mode and a model whose samples interact. None only in a report written before
    /// sub-batch probes existed (every such report probed the full batch).
    #[serde(default)]
    pub probe_samples: Option<usize>,
    /// Whether the layer's gradient moves with the inputs along a path the model's autograd
    /// record does not hold (a `.detach()`, `torch.no_grad`, a once-differentiable function):
    /// the double backward, which differentiates the record, would measure too little there (0
    /// for a head on a no_grad backbone), so M1 was measured by central differences (`method`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub graph_cut: bool,
}

/// M2 for one layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Subspace {
    /// d_between, the paper's subspace distance, in [0, 1].
    pub subspace_distance: f64,
    /// d_between - d_within: the baseline-corrected score thresholds act on.
    pub subspace_separation: f64,
    /// d_within: distance between the two halves of the same group, the baseline.
    pub within_distance: f64,
    /// Training step the estimate was computed at.
    pub step: u64,
    /// Gradients per attribute value actually used.
    pub m: usize,
    /// Subspace rank r requested (fewer where the numerical rank is lower).
    pub rank: usize,
    /// Attribute values (groups) compared; pairs of values are averaged.
    pub groups: usize,
    /// Whether the gradients were centred on their overall mean first.
    pub centred: bool,
    /// Seed of the random split into halves.
    pub seed: u64,
    /// P_l: scalars in the layer.
    pub params: usize,
}

/// Statistics of the layer's released gradient at this step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GradientStats {
    /// ||G_l||_2 over all the layer's parameters.
    pub norm: f64,
    /// Largest |entry| of G_l (NaN if any entry is NaN).
    pub max_abs: f64,
    /// Count of non-finite entries of G_l.
    pub non_finite: u64,
    /// Training step the statistics belong to.
    pub step: u64,
    /// P_l: scalars in the layer.
    pub params: usize,
}

/// Everything known about one layer at one step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    /// Layer name (parameter path without its last component).
    pub name: String,
    /// P_l: scalars in the layer.
    pub params: usize,
    /// Statistics of the released gradient at this step.
    pub gradient: Metric<GradientStats>,
    /// M1, the latest estimate.
    pub sensitivity: Metric<Sensitivity>,
    /// M2, the latest estimate.
    pub subspace: Metric<Subspace>,
    /// Ladder rungs in force on this layer (0: unprotected), the highest over its rules.
    pub protection_level: usize,
    /// M5 of the layer's release as decided at the latest estimate (null bits when the layer
    /// is released without noise; absent when it is not released or no estimate kept JVPs).
    #[serde(default = "not_estimated")]
    pub reconstruction_bound: Metric<ReconstructionBound>,
    /// M6, the latest measurement (at an estimate, or a vetting of parameters set from
    /// outside).
    #[serde(default = "not_estimated")]
    pub sample_isolation: Metric<SampleIsolation>,
}

fn not_estimated<T>() -> Metric<T> {
    Metric::absent("not estimated yet")
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
    /// Jobs that errored or panicked, summed over the guard's workers.
    pub worker_failures: u64,
    /// The last worker failure, if any (the guard then fails closed).
    pub worker_error: Option<String>,
    /// Policy reloads rejected so far (the policy in force stayed).
    #[serde(default)]
    pub policy_reload_failures: u64,
    /// Which layers the model's autograd record leaves cut off from the inputs, as the first
    /// estimate's M1 found them (None before it, or where M1 is absent or set to central
    /// differences from the start).
    #[serde(default)]
    pub autograd_check: Option<AutogradCheck>,
}

/// What the first estimate's M1 found: whether the model's autograd record connects every layer's
/// gradient to the inputs (M1's double backward differentiates the record and sees nothing
/// else; [`Sensitivity::graph_cut`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AutogradCheck {
    /// The step of that estimate.
    pub step: u64,
    /// Layers whose gradient moves with the inputs along a path autograd did not record (a
    /// `.detach()`, `torch.no_grad`, a once-differentiable function): where any is, every M1
    /// from that estimate on is measured by central differences, which re-run the forward.
    pub cut_layers: Vec<String>,
}

/// The guard's report for one training step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// The training step this report is for.
    pub step: u64,
    /// Samples in the step's batch.
    pub batch_size: usize,
    /// The guard's seed setting.
    pub seed: u64,
    /// Whether M1/M2 were estimated at this step (otherwise the metrics are the latest
    /// estimates, each carrying the step it was computed at).
    pub estimated: bool,
    /// Wall time of the estimate, when one ran at this step.
    pub estimate_seconds: Option<f64>,
    /// One report per layer, in model order.
    pub layers: Vec<LayerReport>,
    /// What was released and why (None for an audit estimate).
    pub release: Option<Manifest>,
    /// The guard's own cost and worker health.
    pub health: GuardHealth,
    /// M5 of the whole release (dFIL summed over the released layers), as decided at the
    /// latest estimate.
    #[serde(default = "not_estimated")]
    pub release_reconstruction_bound: Metric<ReconstructionBound>,
    /// The same bound as one number: null when unbounded or absent (the reason is in
    /// `release_reconstruction_bound`).
    #[serde(default)]
    pub release_reconstruction_bound_bits: Option<f64>,
    /// The run ledger so far (None: not kept by this guard).
    #[serde(default)]
    pub ledger: Option<Ledger>,
    /// What every M5 figure of the report does not cover ([`BOUND_CAVEAT`]).
    #[serde(default)]
    pub bound_limit: Option<String>,
    /// The batch-mean training loss the step computed (the step driver's; None where the loop
    /// ran backward itself).
    #[serde(default)]
    pub loss: Option<f64>,
}

impl Report {
    /// Whether the optimizer may step on (or the loop may share) the gradient now: false
    /// while micro-batches are held back for the aggregation floor, or when blocked.
    pub fn step_allowed(&self) -> bool {
        self.release.as_ref().is_none_or(|m| matches!(m.outcome, ReleaseOutcome::Released))
    }

    /// The report of the layer called `name`.
    pub fn layer(&self, name: &str) -> Option<&LayerReport> {
        self.layers.iter().find(|l| l.name == name)
    }

    /// The report as pretty-printed JSON.
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
            "{:<14} {:>8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10} {:>9} {:>8}",
            "layer", "P_l", "S_l", "±se", "S_rms", "R_l", "d_betw", "separ", "|G_l|", "M5 bits", "dFIL", "exposed"
        );
        for l in &self.layers {
            let s = l.sensitivity.measured();
            let m = l.subspace.measured();
            let g = l.gradient.measured();
            let b = l.reconstruction_bound.measured();
            let _ = writeln!(
                out,
                "{:<14} {:>8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10} {:>9} {:>8}",
                truncate(&l.name, 14),
                l.params,
                fmt(s.map(|s| s.sensitivity)),
                fmt(s.map(|s| s.sensitivity_se)),
                fmt(s.map(|s| s.sensitivity_rms)),
                fmt(s.and_then(|s| s.relative_sensitivity)),
                fmt(m.map(|m| m.subspace_distance)),
                fmt(m.map(|m| m.subspace_separation)),
                fmt(g.map(|g| g.norm)),
                bound_cell(b),
                b.map_or("-".into(), |b| fmt(b.dfil)),
                // M6: the share of the batch the layer's release exposes alone.
                l.sample_isolation.measured().map_or("-".into(), |m| format!("{:.3}", m.exposed_fraction)),
            );
        }
        let _ = writeln!(out, "{}", self.bound_line());
        match (self.layers.iter().find_map(|l| l.sensitivity.measured()), self.layers.first().and_then(|l| l.sensitivity.absent_reason())) {
            (Some(s), _) if s.representation == Representation::Embedding => {
                let _ = writeln!(out, "M1 on the embedding representation (x_i: the sample's embedding block)");
            }
            (None, Some(reason)) => {
                let _ = writeln!(out, "M1 absent: {reason}");
            }
            _ => {}
        }
        out
    }
}

impl Report {
    /// The release's M5 in words, with what it does not cover.
    pub fn bound_line(&self) -> String {
        match &self.release_reconstruction_bound {
            Metric::Measured(b) => match b.reconstruction_bound_bits {
                Some(bits) => format!(
                    "M5 release bound {bits:.4} ±{:.1e} bits/dim (unbiased MSE/D >= {}; v = {:.4}); {BOUND_CAVEAT}",
                    b.reconstruction_bound_se.unwrap_or(f64::NAN),
                    b.unbiased_mse_floor.map_or("-".into(), |m| format!("{m:.3e}")),
                    b.prior_variance
                ),
                None => format!("M5 release bound +Inf: {}", b.unbounded_reason.as_deref().unwrap_or(NO_NOISE_NO_BOUND)),
            },
            Metric::Absent { reason } => format!("M5 release bound absent: {reason}"),
        }
    }
}

/// A layer's M5 cell: `+Inf` for a release without noise.
fn bound_cell(b: Option<&ReconstructionBound>) -> String {
    match b {
        None => "-".into(),
        Some(b) => b.reconstruction_bound_bits.map_or("+Inf".into(), |v| fmt(Some(v))),
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
