//! The words every reader of a release uses: what happened to it ([`ReleaseKind`]: the
//! exporter's `outcome` label, the run's counts), and the per-layer numbers a report carries
//! ([`ReportedMetric`]: the exporter's `metric` label). Sinks read these names from here rather
//! than keeping tables of their own.
use super::{LayerReport, LeakageMetric, Manifest, ReleaseOutcome};
use serde::{Deserialize, Serialize};

/// What happened to one release, as every sink names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseKind {
    /// Released as computed: no defence changed it.
    Released,
    /// Released after at least one defence transformed or withheld a layer.
    Protected,
    /// Held back to reach the aggregation floor: nothing left yet.
    Held,
    /// Refused: nothing left.
    Blocked,
}

impl ReleaseKind {
    /// Every kind, in the order sinks list them.
    pub const ALL: [ReleaseKind; 4] = [ReleaseKind::Released, ReleaseKind::Protected, ReleaseKind::Held, ReleaseKind::Blocked];

    /// The kind of a release with this outcome, `acted` when a defence transformed or withheld
    /// at least one of its layers: the one rule, which [`Manifest::kind`] applies.
    pub fn of(outcome: &ReleaseOutcome, acted: bool) -> Self {
        match outcome {
            ReleaseOutcome::Held { .. } => ReleaseKind::Held,
            ReleaseOutcome::Blocked { .. } => ReleaseKind::Blocked,
            ReleaseOutcome::Released if acted => ReleaseKind::Protected,
            ReleaseOutcome::Released => ReleaseKind::Released,
        }
    }

    /// The kind's name (`released`, `protected`, `held`, `blocked`).
    pub const fn name(self) -> &'static str {
        match self {
            ReleaseKind::Released => "released",
            ReleaseKind::Protected => "protected",
            ReleaseKind::Held => "held",
            ReleaseKind::Blocked => "blocked",
        }
    }
}

impl std::fmt::Display for ReleaseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Manifest {
    /// What happened to this release: released or protected (by the layers' actions), held
    /// or blocked (by its outcome).
    pub fn kind(&self) -> ReleaseKind {
        ReleaseKind::of(&self.outcome, self.layers.iter().any(|l| !l.actions.is_empty()))
    }
}

/// A per-layer number of a [`crate::Report`], by the name sinks label it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedMetric {
    /// M1 S_l.
    Sensitivity,
    /// M1 the standard error of S_l over the probes.
    SensitivitySe,
    /// M1 S_l^rms.
    SensitivityRms,
    /// M1 R_l.
    RelativeSensitivity,
    /// M2 d_between.
    SubspaceDistance,
    /// M2 d_between - d_within.
    SubspaceSeparation,
    /// M5 bits per input dimension (+Inf without noise).
    ReconstructionBoundBits,
    /// M6 the share of the batch the layer's release exposes alone.
    ExposedFraction,
    /// M6 the share of the layer's squared gradient norm in units that isolate one sample.
    IsolatedShare,
}

impl ReportedMetric {
    /// Every number a layer's report carries.
    pub const ALL: [ReportedMetric; 9] = [
        ReportedMetric::Sensitivity,
        ReportedMetric::SensitivitySe,
        ReportedMetric::SensitivityRms,
        ReportedMetric::RelativeSensitivity,
        ReportedMetric::SubspaceDistance,
        ReportedMetric::SubspaceSeparation,
        ReportedMetric::ReconstructionBoundBits,
        ReportedMetric::ExposedFraction,
        ReportedMetric::IsolatedShare,
    ];

    /// Their names, in the order of [`ReportedMetric::ALL`].
    pub const NAMES: [&'static str; 9] = [
        ReportedMetric::ALL[0].name(),
        ReportedMetric::ALL[1].name(),
        ReportedMetric::ALL[2].name(),
        ReportedMetric::ALL[3].name(),
        ReportedMetric::ALL[4].name(),
        ReportedMetric::ALL[5].name(),
        ReportedMetric::ALL[6].name(),
        ReportedMetric::ALL[7].name(),
        ReportedMetric::ALL[8].name(),
    ];

    /// The metric's name; a policy metric's is [`LeakageMetric::name`].
    pub const fn name(self) -> &'static str {
        match self {
            ReportedMetric::Sensitivity => "sensitivity",
            ReportedMetric::SensitivitySe => "sensitivity_se",
            ReportedMetric::SensitivityRms => "sensitivity_rms",
            ReportedMetric::RelativeSensitivity => "relative_sensitivity",
            ReportedMetric::SubspaceDistance => "subspace_distance",
            ReportedMetric::SubspaceSeparation => "subspace_separation",
            ReportedMetric::ReconstructionBoundBits => "reconstruction_bound_bits",
            ReportedMetric::ExposedFraction => "exposed_fraction",
            ReportedMetric::IsolatedShare => "isolated_share",
        }
    }

    /// The metric named `name`, if a report carries one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The reported number a policy metric is read from (None: not in the online report).
    pub fn of(metric: LeakageMetric) -> Option<Self> {
        Self::from_name(metric.name())
    }
}

impl LayerReport {
    /// The layer's value of `metric` at this report (None: absent).
    pub fn value(&self, metric: ReportedMetric) -> Option<f64> {
        let sens = self.sensitivity.measured();
        let sub = self.subspace.measured();
        match metric {
            ReportedMetric::Sensitivity => sens.map(|s| s.sensitivity),
            ReportedMetric::SensitivitySe => sens.map(|s| s.sensitivity_se),
            ReportedMetric::SensitivityRms => sens.map(|s| s.sensitivity_rms),
            ReportedMetric::RelativeSensitivity => sens.and_then(|s| s.relative_sensitivity),
            ReportedMetric::SubspaceDistance => sub.map(|s| s.subspace_distance),
            ReportedMetric::SubspaceSeparation => sub.map(|s| s.subspace_separation),
            ReportedMetric::ReconstructionBoundBits => self.reconstruction_bound.measured().map(|b| b.bits_or_inf()),
            ReportedMetric::ExposedFraction => self.sample_isolation.measured().map(|s| s.exposed_fraction),
            ReportedMetric::IsolatedShare => self.sample_isolation.measured().map(|s| s.isolated_share),
        }
    }
}
