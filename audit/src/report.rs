//! The audit's report: one row per layer with every metric under its METRICS.md name, the
//! settings and timings, as JSON, a text table and an SVG.
use crate::error::Result;
use gradguard_models::files::write_file;
use crate::estimate::attacks::{AttackPlan, LabelSummary, LayerAttackSummary};
use crate::estimate::bound::ReleaseBound;
use gradguard_models::LossKind;
use gradguard_guard::measure::{Inversion, InversionPlan, InversionSettings};
use gradguard_guard::{Metric, report::{ReconstructionBound, Representation, SampleIsolation, Sensitivity, Subspace}};
use gradguard_guard::measure::SensitivitySettings;
use gradguard_guard::measure::SubspaceSettings;
use gradguard_guard::measure::{UsableInformation, UsableSettings};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One layer of the report: every metric under its METRICS.md name, None when absent (with
/// the reason under `absent`), and the full metric records under `details`.
#[derive(Serialize, Debug, Clone)]
pub struct LayerRow {
    /// Layer name.
    pub name: String,
    /// Parameter scalars P_l.
    pub params: usize,
    /// M1: S_l.
    pub sensitivity: Option<f64>,
    /// M1: standard error of S_l (absent in exact mode).
    pub sensitivity_se: Option<f64>,
    /// M1: S_l / sqrt(P_l).
    pub sensitivity_rms: Option<f64>,
    /// M1: R_l = S_l / ||released gradient||.
    pub relative_sensitivity: Option<f64>,
    /// What M1 was measured on: `input`, or `embedding` for token ids (None when absent).
    pub sensitivity_representation: Option<Representation>,
    /// M2: mean projection distance between the attribute groups' subspaces.
    pub subspace_distance: Option<f64>,
    /// M2: between-group minus within-group distance.
    pub subspace_separation: Option<f64>,
    /// M3: usable information about the attribute, in bits.
    pub usable_information_bits: Option<f64>,
    /// M3: standard error of the bits over the seeded splits.
    pub usable_information_se: Option<f64>,
    /// M3: the L2 penalty cross-validation chose (on most splits).
    pub usable_l2: Option<f64>,
    /// M3: the temperature dividing the attacker's logits, cross-validated with the penalty
    /// (the middle of those chosen on the splits).
    pub usable_temperature: Option<f64>,
    /// M3: the attacker's held-out accuracy.
    pub attack_accuracy: Option<f64>,
    /// M3: the majority-class accuracy it is compared with.
    pub majority_accuracy: Option<f64>,
    /// M4: usable original information, bits per input dimension.
    pub usable_original_bits_per_dim: Option<f64>,
    /// M4: PSNR of the reconstructions, dB.
    pub psnr: Option<f64>,
    /// M4 attack suite: samples the strongest attack gives back at PSNR >= 30 dB, over the
    /// attacked releases of the audit's batch size.
    pub samples_recovered: Option<usize>,
    /// M4 attack suite: samples_recovered / samples attacked.
    pub recovered_fraction: Option<f64>,
    /// M6: the share of the batch this layer's release exposes alone (its samples each
    /// dominate a unit), on the M1 batch, tau 0.99.
    pub exposed_fraction: Option<f64>,
    /// M6: the share of the layer's squared gradient norm in units that isolate a sample.
    pub isolated_share: Option<f64>,
    /// M4: the strongest attack on this layer (most samples recovered, then most bits per
    /// dimension), the optimisation attack (`--invert`) included.
    pub strongest_attack: Option<&'static str>,
    /// M5: bound on what a Gaussian-prior attacker recovers, bits per input dimension (null
    /// without noise: no bound).
    pub reconstruction_bound_bits: Option<f64>,
    /// M5: its standard error.
    pub reconstruction_bound_se: Option<f64>,
    /// M5: dFIL_l, the Fisher information per input dimension.
    pub dfil: Option<f64>,
    /// M5: 1 / dFIL_l, the smallest per-dimension MSE of an unbiased attacker.
    pub unbiased_mse_floor: Option<f64>,
    /// Why each absent metric is absent, by name.
    pub absent: BTreeMap<String, String>,
    /// The estimators' full records.
    pub details: LayerDetails,
}

/// The estimators' records of one layer.
#[derive(Serialize, Debug, Clone)]
pub struct LayerDetails {
    /// M1 sensitivity.
    pub m1: Metric<Sensitivity>,
    /// M2 subspace distance.
    pub m2: Metric<Subspace>,
    /// M3 usable latent information.
    pub m3: Metric<UsableInformation>,
    /// M4 usable original information (inversion attack).
    pub m4: Metric<Inversion>,
    /// M5 reconstruction bound of the (defended) release.
    pub m5: Metric<ReconstructionBound>,
    /// M4 attack suite (analytic attacks) at the audit's batch size.
    pub attacks: Metric<LayerAttackSummary>,
    /// M6 sample isolation on the M1 batch.
    pub m6: Metric<SampleIsolation>,
}

impl LayerRow {
    /// The row of layer `name` (P_l = `params`) from its metric records.
    pub fn new(name: String, params: usize, details: LayerDetails) -> Self {
        let mut absent = BTreeMap::new();
        let mut take = |metric: &str, value: Option<f64>, reason: Option<&str>| -> Option<f64> {
            if value.is_none() {
                absent.insert(metric.to_string(), reason.unwrap_or("not computed").to_string());
            }
            value
        };
        let s = details.m1.measured();
        let r1 = details.m1.absent_reason();
        let m2 = details.m2.measured();
        let r2 = details.m2.absent_reason();
        let m3 = details.m3.measured();
        let r3 = details.m3.absent_reason();
        let m4 = details.m4.measured();
        let r4 = details.m4.absent_reason();
        let m5 = details.m5.measured();
        let r5 = details.m5.absent_reason();
        let m6 = details.m6.measured();
        let r6 = details.m6.absent_reason();
        let suite = details.attacks.measured();
        let r_suite = details.attacks.absent_reason();
        let relative_reason = if s.is_some() { Some("the layer's released gradient is exactly 0") } else { r1 };
        Self {
            sensitivity: take("sensitivity", s.map(|s| s.sensitivity), r1),
            sensitivity_se: take(
                "sensitivity_se",
                s.filter(|s| !s.exact && s.sensitivity_se.is_finite()).map(|s| s.sensitivity_se),
                match s {
                    Some(s) if s.exact => Some("exact mode: no standard error"),
                    Some(_) => Some("defended release: measured through the defence's Jacobian, no standard error"),
                    None => r1,
                },
            ),
            sensitivity_rms: take("sensitivity_rms", s.map(|s| s.sensitivity_rms), r1),
            relative_sensitivity: take("relative_sensitivity", s.and_then(|s| s.relative_sensitivity), relative_reason),
            sensitivity_representation: s.map(|s| s.representation),
            subspace_distance: take("subspace_distance", m2.map(|m| m.subspace_distance), r2),
            subspace_separation: take("subspace_separation", m2.map(|m| m.subspace_separation), r2),
            usable_information_bits: take("usable_information_bits", m3.map(|m| m.usable_information_bits), r3),
            usable_information_se: take("usable_information_se", m3.map(|m| m.usable_information_se), r3),
            usable_l2: take("usable_l2", m3.map(|m| m.l2), r3),
            usable_temperature: take("usable_temperature", m3.map(|m| m.temperature), r3),
            attack_accuracy: take("attack_accuracy", m3.map(|m| m.attack_accuracy), r3),
            majority_accuracy: take("majority_accuracy", m3.map(|m| m.majority_accuracy), r3),
            usable_original_bits_per_dim: take("usable_original_bits_per_dim", m4.map(|m| m.usable_original_bits_per_dim), r4),
            psnr: take("psnr", m4.map(|m| m.psnr), r4),
            samples_recovered: suite.map(|a| a.samples_recovered).or_else(|| {
                take("samples_recovered", None, r_suite);
                None
            }),
            recovered_fraction: take("recovered_fraction", suite.map(|a| a.recovered_fraction), r_suite),
            exposed_fraction: take("exposed_fraction", m6.map(|m| m.exposed_fraction), r6),
            isolated_share: take("isolated_share", m6.map(|m| m.isolated_share), r6),
            strongest_attack: strongest_attack(suite, m4.map(|m| m.usable_original_bits_per_dim)),
            reconstruction_bound_bits: take("reconstruction_bound_bits", m5.and_then(|m| m.reconstruction_bound_bits), r5),
            reconstruction_bound_se: take("reconstruction_bound_se", m5.and_then(|m| m.reconstruction_bound_se), r5),
            dfil: take("dfil", m5.and_then(|m| m.dfil), r5),
            unbiased_mse_floor: take("unbiased_mse_floor", m5.and_then(|m| m.unbiased_mse_floor), r5),
            name,
            params,
            absent,
            details,
        }
    }

    /// The plotted metrics, in order: (METRICS.md name, value).
    pub fn plotted(&self) -> Vec<(&'static str, Option<f64>)> {
        vec![
            ("sensitivity", self.sensitivity),
            ("sensitivity_rms", self.sensitivity_rms),
            ("relative_sensitivity", self.relative_sensitivity),
            ("subspace_distance", self.subspace_distance),
            ("subspace_separation", self.subspace_separation),
            ("usable_information_bits", self.usable_information_bits),
            ("attack_accuracy", self.attack_accuracy),
            ("usable_original_bits_per_dim", self.usable_original_bits_per_dim),
            ("psnr", self.psnr),
            ("reconstruction_bound_bits", self.reconstruction_bound_bits),
            ("exposed_fraction", self.exposed_fraction),
        ]
    }
}

/// The strongest attack on a layer: the suite's (most samples recovered, then bits), unless the
/// optimisation attack read more bits per dimension while the suite recovered no sample.
fn strongest_attack(suite: Option<&LayerAttackSummary>, optimisation_bits: Option<f64>) -> Option<&'static str> {
    match (suite, optimisation_bits) {
        (Some(s), Some(bits)) if s.samples_recovered == 0 && bits > s.bits_per_dim => Some("optimisation"),
        (Some(s), _) => Some(s.strongest),
        (None, Some(_)) => Some("optimisation"),
        (None, None) => None,
    }
}

/// The report of one audit (the JSON of `gradguard audit --json`).
#[derive(Serialize, Debug, Clone)]
pub struct AuditReport {
    /// The model's label.
    pub model: String,
    /// How the data were described.
    pub data: String,
    /// Samples audited.
    pub samples: usize,
    /// Samples in the released batch of M1.
    pub batch_size: usize,
    /// Probes K of M1 (None in exact mode).
    pub probes: Option<usize>,
    /// Seed of every random choice.
    pub seed: u64,
    /// Whether M1 was exact.
    pub exact: bool,
    /// The loss.
    pub loss: LossKind,
    /// The device, as given.
    pub device: String,
    /// Adam steps taken before the audit (built-in models).
    pub train_steps: usize,
    /// The chain every layer's release went through (the policy's action syntax, steps joined
    /// by " > "); None: the raw release.
    pub defence: Option<String>,
    /// M5 of the whole release, the prior variance and the bound's caveat.
    pub release: ReleaseBound,
    /// M4: the labels recovered from the last layer's bias gradient, over the attacked releases.
    pub labels_recovered: Metric<LabelSummary>,
    /// The estimators' settings.
    pub settings: AuditSettings,
    /// Seconds per phase (`training`, `m1` ... `m4`).
    pub seconds: BTreeMap<&'static str, f64>,
    /// One row per layer, in model order.
    pub layers: Vec<LayerRow>,
}

/// The estimators' settings of an audit.
#[derive(Serialize, Debug, Clone)]
pub struct AuditSettings {
    /// M1.
    pub sensitivity: SensitivitySettings,
    /// M2.
    pub subspace: SubspaceSettings,
    /// M3.
    pub usable: UsableSettings,
    /// M4, when it ran.
    pub inversion: Option<(InversionPlan, InversionSettings)>,
    /// M4's attack suite.
    pub attacks: Option<AttackPlan>,
}

impl AuditReport {
    /// The per-layer table `gradguard audit` prints, with the absent metrics' reasons.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = table(&self.layers);
        let r = &self.release;
        let m3: Vec<String> = self.layers.iter().filter_map(|l| l.details.m3.measured().map(|m| format!("{} {} T {}", l.name, m.l2, fmt(Some(m.temperature))))).collect();
        if let Some(m) = self.layers.iter().find_map(|l| l.details.m3.measured()) {
            let _ = writeln!(out, "M3: mean ± standard error over {} seeded splits; L2 penalty (cross-validated on each training split unless --l2) and logit temperature T (cross-validated with it): {}", m.splits, m3.join(", "));
        }
        if let Some(plan) = &self.settings.attacks {
            let strongest: Vec<String> = self.layers.iter().filter_map(|l| Some(format!("{} {}", l.name, l.strongest_attack?))).collect();
            let _ = writeln!(
                out,
                "M4 recovered: samples some reconstruction gives back at PSNR >= 30 dB, per layer, over {} release(s) of n = {} (the batch size trained with); oracle matching, an upper bound on each attack; strongest: {}",
                plan.releases,
                plan.batch_size,
                if strongest.is_empty() { "none applies".to_string() } else { strongest.join(", ") }
            );
        }
        let _ = writeln!(out, "M6 exp.: the share of the first {} samples a layer's release exposes alone (each dominates a unit's gradient at tau 0.99): what aggregation fails to hide", self.batch_size);
        let _ = match &self.labels_recovered {
            Metric::Measured(l) => writeln!(out, "M4 labels: the exact label set recovered in {} of {} releases (mean count error {:.2} per sample)", l.exact_sets, l.releases, l.count_error),
            Metric::Absent { reason } => writeln!(out, "M4 labels: absent: {reason}"),
        };
        let _ = writeln!(out, "defence: {}", self.defence.as_deref().unwrap_or("none (the raw release)"));
        let _ = match r.release_reconstruction_bound_bits {
            Some(b) => writeln!(
                out,
                "M5, whole release of the first {} samples: {} ± {} bits/dim for its average sample (dFIL {}, unbiased MSE/D >= {}), prior variance v = {} ({})",
                self.batch_size,
                fmt(Some(b)),
                fmt(r.release_reconstruction_bound_se),
                fmt(r.release_dfil),
                fmt(r.release_unbiased_mse_floor),
                fmt(Some(r.prior_variance)),
                r.prior_variance_source
            ),
            None => writeln!(out, "M5, whole release: no bound: {}", r.absent.as_deref().unwrap_or("-")),
        };
        let _ = writeln!(out, "M5 caveat: {}", r.caveat);
        out
    }

    /// Writes the report as pretty JSON, creating the parent folder.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        Ok(write_file(path, &serde_json::to_string_pretty(self)?, "writing the JSON report")?)
    }

    /// Draws the per-layer bars of every metric as an SVG, creating the parent folder.
    pub fn write_plot(&self, path: &Path) -> Result<()> {
        gradguard_models::files::create_parent(path)?;
        let title = format!("gradguard audit: {} (n = {} for M1, {} samples)", self.model, self.batch_size, self.samples);
        crate::plot::bar_panels_svg(path, &title, &self.layers)
    }
}

fn fmt(v: Option<f64>) -> String {
    match v {
        Some(v) if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-3) => format!("{v:.3e}"),
        Some(v) => format!("{v:.4}"),
        None => "-".into(),
    }
}

/// The suite's cell: `27/32 analytic` (samples recovered of samples attacked, by the strongest).
fn recovered(r: &LayerRow) -> String {
    match r.details.attacks.measured() {
        Some(a) => format!("{}/{} {}", a.samples_recovered, a.n * a.releases, short_attack(a.strongest)),
        None => "-".into(),
    }
}

fn short_attack(name: &str) -> &str {
    match name {
        "analytic" => "an.",
        "analytic_differences" => "an.diff",
        "optimisation" => "opt.",
        other => other,
    }
}

fn table(rows: &[LayerRow]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9} {:>8} {:>14} {:>9} {:>9} {:>8}",
        "layer", "P_l", "S_l", "±se", "S_rms", "R_l", "d_betw", "separ", "M3 bits", "±se", "acc", "M4 b/dim", "PSNR", "M4 recovered", "M5 b/dim", "±se", "M6 exp."
    );
    for r in rows {
        let name = if r.name.chars().count() > 16 { format!("{}~", r.name.chars().take(15).collect::<String>()) } else { r.name.clone() };
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9} {:>8} {:>14} {:>9} {:>9} {:>8}",
            name,
            r.params,
            fmt(r.sensitivity),
            fmt(r.sensitivity_se),
            fmt(r.sensitivity_rms),
            fmt(r.relative_sensitivity),
            fmt(r.subspace_distance),
            fmt(r.subspace_separation),
            fmt(r.usable_information_bits),
            fmt(r.usable_information_se),
            fmt(r.attack_accuracy),
            fmt(r.usable_original_bits_per_dim),
            fmt(r.psnr),
            recovered(r),
            if r.reconstruction_bound_bits.is_none() && r.absent.get("reconstruction_bound_bits").map(String::as_str) == Some(gradguard_guard::report::NO_NOISE_NO_BOUND) { "+inf".to_string() } else { fmt(r.reconstruction_bound_bits) },
            fmt(r.reconstruction_bound_se),
            fmt(r.exposed_fraction),
        );
    }
    let absent: Vec<String> = rows
        .first()
        .map(|r| {
            let mut reasons: BTreeMap<&String, Vec<&String>> = BTreeMap::new();
            for (metric, reason) in &r.absent {
                reasons.entry(reason).or_default().push(metric);
            }
            reasons.into_iter().map(|(reason, metrics)| format!("  {}: {reason}", metrics.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "))).collect()
        })
        .unwrap_or_default();
    if rows.iter().any(|r| r.sensitivity_representation == Some(Representation::Embedding)) {
        let _ = writeln!(out, "M1 on the embedding representation (x_i: the sample's embedding block)");
    }
    if !absent.is_empty() {
        let _ = writeln!(out, "absent (first layer):\n{}", absent.join("\n"));
    }
    out
}
