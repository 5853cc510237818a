//! M4 as an attack suite at the user's batch size: the guard's suite
//! (`Inspection::attack_suite`) on consecutive released batches of the audit's `--batch-size`,
//! summed per layer and attack, the strongest named.
use crate::error::{EstimateContext, Result};
use gradguard_guard::measure::attacks::{AttackKind, AttackSettings, AttackSuite};
use gradguard_guard::measure::InversionSettings;
use gradguard_guard::{Batch, Inspection, Metric};
use serde::Serialize;
use std::collections::BTreeMap;

/// How the audit runs the suite.
#[derive(Clone, Debug, Serialize)]
pub struct AttackPlan {
    /// Samples per attacked release: the batch size the user trains with.
    pub batch_size: usize,
    /// Consecutive releases attacked, from the start of the data (fewer when the data runs out).
    pub releases: usize,
    /// The optimisation attack's settings (None: not run, it is slow; the analytic attacks and
    /// label recovery always run).
    pub optimisation: Option<InversionSettings>,
}

/// One attack's result on one layer, summed over the attacked releases.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AttackTotal {
    /// Samples some reconstruction gives back at PSNR >= 30 dB, over all releases.
    pub samples_recovered: usize,
    /// Whether that count is exact (the optimisation attack's is a lower bound).
    pub exact: bool,
    /// Mean over the releases of the bits per dimension (oracle matching: an upper bound on
    /// that attack).
    pub bits_per_dim: f64,
    /// Mean over the releases of the PSNR of the matched reconstructions, dB.
    pub psnr: f64,
}

/// The suite's result on one layer.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerAttackSummary {
    /// Samples per release (n).
    pub n: usize,
    /// Releases attacked.
    pub releases: usize,
    /// The attack that recovered the most samples (then the most bits).
    pub strongest: &'static str,
    /// Its samples recovered, over all releases.
    pub samples_recovered: usize,
    /// samples_recovered / (n * releases).
    pub recovered_fraction: f64,
    /// Its bits per dimension (mean over releases; oracle matching, an upper bound).
    pub bits_per_dim: f64,
    /// Every attack that ran, by name.
    pub attacks: BTreeMap<&'static str, AttackTotal>,
    /// Why each attack that did not run on this layer is absent (the first release's reason).
    pub absent: BTreeMap<&'static str, String>,
}

/// Labels recovered from the last layer's bias gradient, over the attacked releases.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LabelSummary {
    /// Releases whose recovered label set was exactly the set present.
    pub exact_sets: usize,
    /// Releases where recovery ran.
    pub releases: usize,
    /// Mean over releases of sum |estimated count - true count| / n.
    pub count_error: f64,
}

/// The suite over the audit's releases: per layer, and the labels.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteSummary {
    /// One entry per layer, in the model's order.
    pub layers: Vec<Metric<LayerAttackSummary>>,
    /// Label recovery (absent with the reason when it does not apply).
    pub labels: Metric<LabelSummary>,
}

/// Runs the suite on `plan.releases` consecutive batches of `plan.batch_size` samples of the
/// inspected data (at least one, shorter when the data are fewer).
pub fn attack_suite(t: &Inspection, plan: &AttackPlan) -> Result<SuiteSummary> {
    let x = t.batch().inputs();
    let y = t.batch().targets();
    let total = x.size().first().copied().unwrap_or(0).max(0) as usize;
    let n = plan.batch_size.clamp(1, total.max(1));
    let releases = plan.releases.max(1).min((total / n).max(1));
    let settings = AttackSettings { optimisation: plan.optimisation.clone(), ..Default::default() };
    let mut suites = Vec::with_capacity(releases);
    for r in 0..releases {
        let (xb, yb) = (x.f_narrow(0, (r * n) as i64, n as i64)?, y.f_narrow(0, (r * n) as i64, n as i64)?);
        let release = t.on(Batch::new(&xb, &yb)).seeded(t.seed() ^ r as u64, r as u64);
        suites.push(release.attack_suite(&settings).metric("M4 (attack suite)")?);
    }
    let layers = (0..t.layers().len()).map(|l| layer_summary(&suites, l)).collect();
    Ok(SuiteSummary { layers, labels: label_summary(&suites) })
}

fn layer_summary(suites: &[AttackSuite], l: usize) -> Metric<LayerAttackSummary> {
    let kinds = [AttackKind::Analytic, AttackKind::AnalyticDifferences, AttackKind::Optimisation];
    let (mut attacks, mut absent) = (BTreeMap::new(), BTreeMap::new());
    for kind in kinds {
        let outcomes: Vec<_> = suites.iter().filter_map(|s| s.layers[l].outcome(kind).measured()).collect();
        if outcomes.is_empty() {
            let reason = suites.first().and_then(|s| s.layers[l].outcome(kind).absent_reason()).unwrap_or("not run");
            absent.insert(kind.name(), reason.to_string());
            continue;
        }
        let count = outcomes.len() as f64;
        attacks.insert(
            kind.name(),
            AttackTotal {
                samples_recovered: outcomes.iter().map(|o| o.samples_recovered).sum(),
                exact: outcomes.iter().all(|o| o.samples_recovered_exact),
                bits_per_dim: outcomes.iter().map(|o| o.bits_per_dim).sum::<f64>() / count,
                psnr: outcomes.iter().map(|o| o.psnr).sum::<f64>() / count,
            },
        );
    }
    let Some((name, best)) = attacks.iter().max_by(|a, b| (a.1.samples_recovered, a.1.bits_per_dim).partial_cmp(&(b.1.samples_recovered, b.1.bits_per_dim)).unwrap_or(std::cmp::Ordering::Equal)) else {
        let reasons: Vec<String> = absent.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        return Metric::absent(format!("no attack applies: {}", reasons.join("; ")));
    };
    let n = suites.first().map_or(0, |s| s.n);
    let samples = (n * suites.len()).max(1);
    Metric::Measured(LayerAttackSummary {
        n,
        releases: suites.len(),
        strongest: name,
        samples_recovered: best.samples_recovered,
        recovered_fraction: best.samples_recovered as f64 / samples as f64,
        bits_per_dim: best.bits_per_dim,
        attacks: attacks.clone(),
        absent,
    })
}

fn label_summary(suites: &[AttackSuite]) -> Metric<LabelSummary> {
    let measured: Vec<_> = suites.iter().filter_map(|s| s.labels.measured()).collect();
    if measured.is_empty() {
        return Metric::absent(suites.first().and_then(|s| s.labels.absent_reason()).unwrap_or("no release attacked").to_string());
    }
    let truths: Vec<_> = measured.iter().filter_map(|m| m.truth.as_ref()).collect();
    if truths.is_empty() {
        return Metric::absent("the true labels are not integers: nothing to compare with");
    }
    Metric::Measured(LabelSummary {
        exact_sets: truths.iter().filter(|t| t.set_exact).count(),
        releases: truths.len(),
        count_error: measured.iter().zip(&truths).map(|(m, t)| t.count_error as f64 / m.n.max(1) as f64).sum::<f64>() / truths.len() as f64,
    })
}
