//! Every call into the guard's estimators, in one place: the audit and the validation study
//! measure through these functions only (and `defended` and `bound`, their halves for a
//! defended release and for M5), so that a change of the estimators' API is a change here.
pub mod attacks;
pub mod bound;
pub mod defended;

use gradguard_guard::measure::IsolationSettings;
use crate::error::{AuditError, EstimateContext, Result};
use bound::{release_bounds, Prior, ReleaseBound};
use defended::Chain;
use crate::report::{LayerDetails, LayerRow};
use gradguard_defenses::Defence;
use gradguard_guard::measure::{attribute_information, project, usable_information, UsableInformation, UsableSettings};
use gradguard_guard::measure::{orthonormal_basis, projection_distance, SubspaceSettings};
use gradguard_guard::{Batch, GuardError, Inspection, Metric, measure::{per_dimension_variance, GradientMatrix, JvpSamples, SensitivitySettings}, report::{PriorSource, JvpMethod, Representation, Sensitivity, Subspace}};
use gradguard_guard::measure::{Inversion, InversionPlan, InversionSettings, ReleaseTransform};
use std::collections::BTreeMap;
use std::time::Instant;
use tch::Tensor;

/// The settings of a measurement of every metric.
pub struct MetricSettings {
    /// M1's probes and seed.
    pub sensitivity: SensitivitySettings,
    /// M1 uses the first `m1_batch` samples.
    pub m1_batch: usize,
    /// M2's settings.
    pub subspace: SubspaceSettings,
    /// M3's settings.
    pub usable: UsableSettings,
    /// M4's optimisation attack runs only when given.
    pub inversion: Option<(InversionPlan, InversionSettings)>,
    /// M4's attack suite (analytic attacks, label recovery) at the user's batch size; None:
    /// not run.
    pub attacks: Option<attacks::AttackPlan>,
    /// The chain every layer's release goes through (empty: the raw release).
    pub defence: Vec<Defence>,
    /// M5's prior variance v; None: measured on all inputs (the embeddings of the M1 batch for
    /// token inputs).
    pub prior_variance: Option<f64>,
    /// Seed of the defences' noise.
    pub seed: u64,
}

/// The result of [`measure_layers`].
pub struct Measured {
    /// One row per layer.
    pub rows: Vec<LayerRow>,
    /// Seconds per metric.
    pub seconds: BTreeMap<&'static str, f64>,
    /// M5 of the whole release.
    pub release: ReleaseBound,
    /// M4's label recovery over the attacked releases.
    pub labels: Metric<attacks::LabelSummary>,
}

/// Probe M1 with K probes by double backward.
pub fn probe_settings(probes: usize) -> SensitivitySettings {
    SensitivitySettings { probes, method: JvpMethod::DoubleBackward, exact: false, probe_samples: None }
}

/// Why the attack suite is absent under `--defence`.
const RAW_ONLY: &str = "the analytic attacks read the raw release: with --defence, M4 of the defended release is --invert's optimisation attack and its bound is M5";

/// The first `n` samples of the inspected batch.
fn first(t: &Inspection, n: usize) -> Result<(Tensor, Tensor)> {
    let b = t.batch();
    Ok((b.inputs().f_narrow(0, 0, n as i64)?, b.targets().f_narrow(0, 0, n as i64)?))
}

/// M1 to M4 of every layer: M1 on the first `m1_batch` samples, M2 and M3 against `attribute`
/// (absent without one), M4 when `settings.inversion` is given (absent otherwise).
pub fn measure_layers(t: &Inspection, attribute: Option<&[i64]>, settings: &MetricSettings) -> Result<Measured> {
    let mut seconds = BTreeMap::new();
    let chain = Chain { defences: &settings.defence, seed: settings.seed };
    let defended = !settings.defence.is_empty();
    let clock = Instant::now();
    let (xb, yb) = first(t, settings.m1_batch)?;
    let (m1, jv) = if defended {
        if settings.sensitivity.exact {
            return Err(AuditError::Usage("--exact cannot be combined with --defence: a defended release is measured through K probe JVPs".into()));
        }
        let jv = t.on(Batch::new(&xb, &yb)).jvp_samples(&settings.sensitivity).metric("M1 (probe JVPs)")?;
        (defended::sensitivity(&jv, t.layers(), chain)?, Some(jv))
    } else {
        (t.on(Batch::new(&xb, &yb)).sensitivity(&settings.sensitivity).metric("M1 (sensitivity)")?, None)
    };
    seconds.insert("m1", clock.elapsed().as_secs_f64());
    let prior = prior_variance(t, jv.as_ref(), settings.prior_variance)?;
    let (m5, release) = release_bounds(jv.as_ref(), t.layers().len(), &settings.defence, |l| chain.layer_seed(l), prior)?;

    let absent_all = |reason: &str| -> Vec<String> { (0..t.layers().len()).map(|_| reason.to_string()).collect() };
    let (m2, m3): (Vec<Metric<Subspace>>, Vec<Metric<UsableInformation>>) = match attribute {
        None => {
            let r = absent_all("no attribute labels given (--attribute)");
            (r.iter().map(Metric::absent).collect(), r.iter().map(Metric::absent).collect())
        }
        Some(attribute) => {
            let clock = Instant::now();
            let labels = Tensor::from_slice(attribute);
            let with_attribute = t.on(t.batch().with_attribute(&labels));
            let m2 = if defended { defended::subspace(&with_attribute, &settings.subspace, chain)? } else { with_attribute.subspace(&settings.subspace).metric("M2 (subspace distance)")? };
            seconds.insert("m2", clock.elapsed().as_secs_f64());
            let clock = Instant::now();
            let m3 = if chain.withholds() {
                absent_all(defended::WITHHELD).iter().map(Metric::absent).collect()
            } else {
                // Per-sample gradients, the chain and R_l stay on the model's device: the host
                // sees n x r features per layer, never the n x P_l gradients.
                let transform = |l: usize, g: &Tensor, i: usize| chain.apply(g, chain.release_seed(l, i));
                let m3 = if defended { with_attribute.released_usable_information(&settings.usable, &transform) } else { with_attribute.usable_information(&settings.usable) };
                m3.metric("M3 (usable information)")?
            };
            seconds.insert("m3", clock.elapsed().as_secs_f64());
            (m2, m3)
        }
    };
    let m4: Vec<Metric<Inversion>> = match &settings.inversion {
        None => absent_all("not computed: pass --invert (the attack is slow)").iter().map(Metric::absent).collect(),
        Some((plan, inversion)) => {
            let clock = Instant::now();
            let transform = |l: usize, g: &Tensor, r: usize| chain.apply(g, chain.release_seed(l, r));
            let m4 = inversion_attack(t, plan, inversion, defended.then_some(&transform as &ReleaseTransform))?;
            seconds.insert("m4", clock.elapsed().as_secs_f64());
            m4
        }
    };
    // M6 on the M1 batch (the release's batch size): what aggregation fails to hide.
    let clock = Instant::now();
    let m6 = if chain.withholds() {
        absent_all(defended::WITHHELD).iter().map(Metric::absent).collect()
    } else {
        t.on(Batch::new(&xb, &yb)).sample_isolation(&IsolationSettings::default()).metric("M6 (sample isolation)")?
    };
    seconds.insert("m6", clock.elapsed().as_secs_f64());
    let (suite, labels) = match &settings.attacks {
        None => (absent_all("not run (--no-attacks)").iter().map(Metric::absent).collect(), Metric::absent("not run (--no-attacks)")),
        // The suite attacks the raw release; a defended release's attack is --invert's M4.
        Some(_) if defended => (absent_all(RAW_ONLY).iter().map(Metric::absent).collect(), Metric::absent(RAW_ONLY)),
        Some(plan) => {
            let clock = Instant::now();
            let suite = attacks::attack_suite(t, plan)?;
            seconds.insert("m4_attacks", clock.elapsed().as_secs_f64());
            (suite.layers, suite.labels)
        }
    };
    let rows = t
        .layers()
        .layers()
        .iter()
        .zip(m1.into_iter().zip(m2).zip(m3).zip(m4).zip(m5).zip(suite).zip(m6))
        .map(|(layer, ((((((m1, m2), m3), m4), m5), attacks), m6))| LayerRow::new(layer.name.clone(), layer.numel(), LayerDetails { m1, m2, m3, m4, m5, attacks, m6 }))
        .collect();
    Ok(Measured { rows, seconds, release, labels })
}

/// M5's prior variance and where it came from: the setting, or the per-dimension variance over
/// every inspected input (for token ids, which have no variance of their own, the embeddings
/// of the probed batch).
fn prior_variance(t: &Inspection, jv: Option<&JvpSamples>, given: Option<f64>) -> Result<Prior> {
    let prior = |v, source, described: String| Ok(Prior { v, source, described });
    if let Some(v) = given {
        if !(v.is_finite() && v > 0.0) {
            return Err(AuditError::Usage(format!("--prior-variance must be a finite number > 0, got {v}")));
        }
        return prior(v, PriorSource::Setting, "given (--prior-variance)".into());
    }
    if let Some(jv) = jv.filter(|jv| jv.representation == Representation::Embedding) {
        return prior(jv.batch_variance, PriorSource::Batch, format!("per-dimension variance of the embeddings of the {} probed samples (token inputs)", jv.n));
    }
    let x = t.batch().inputs();
    let n = x.size().first().copied().unwrap_or(0) as usize;
    if !x.is_floating_point() {
        return prior(f64::NAN, PriorSource::Inputs, "not measured: token inputs have no variance of their own, and no release was probed (no --defence)".into());
    }
    let v = per_dimension_variance(x, n).metric("M5 (prior variance)")?;
    prior(v, PriorSource::Inputs, format!("per-dimension variance of all {n} inputs"))
}

/// M1 of every layer on the target's whole batch (`step` picks the probe stream).
pub fn sensitivity(t: &Inspection, settings: &SensitivitySettings, step: u64) -> Result<Vec<Metric<Sensitivity>>> {
    t.seeded(t.seed(), step).sensitivity(settings).metric("M1 (sensitivity)")
}

/// M4 of every layer, each release passed through `transform` (a defence) before the attack.
pub fn inversion_attack(t: &Inspection, plan: &InversionPlan, settings: &InversionSettings, transform: Option<&ReleaseTransform>) -> Result<Vec<Metric<Inversion>>> {
    t.original_information(plan, settings, transform).metric("M4 (inversion)")
}

/// The probe JVPs of the first `n` samples, kept (K = `probes`), to measure M1 on any
/// release of that batch with [`release_sensitivity`].
pub fn release_probes(t: &Inspection, n: usize, probes: usize) -> Result<JvpSamples> {
    let (xb, yb) = first(t, n)?;
    t.on(Batch::new(&xb, &yb)).jvp_samples(&probe_settings(probes)).metric("M1 (probe JVPs)")
}

/// M1 of one released layer.
#[derive(Clone, Copy, Debug)]
pub struct ReleaseSensitivity {
    /// S_l.
    pub s: f64,
    /// S_l / sqrt(P_l).
    pub s_rms: f64,
    /// None when the release is exactly 0.
    pub r: Option<f64>,
}

/// M1 of layer `l`'s release through `chain` (seeded with `seed`), measured by the guard's own
/// closed-loop code ([`JvpSamples::release_sensitivity`]: the chain applied to the gradient and
/// linearised on the kept JVPs). None: the layer is not reached by the loss, or the chain
/// withholds it.
pub fn release_sensitivity(jv: &JvpSamples, l: usize, chain: &[Defence], seed: u64) -> Result<Option<ReleaseSensitivity>> {
    let measured = jv.release_sensitivity(l, chain, seed).metric("M1 of a release")?;
    Ok(measured.map(|m| ReleaseSensitivity {
        s: m.sensitivity,
        s_rms: m.sensitivity_rms,
        r: (m.release_norm > 0.0).then_some(m.relative_sensitivity),
    }))
}

/// The n x P_l host matrix of every layer's per-sample gradients, for the validation study's
/// host-side sweeps on its small models (None: the loss does not reach the layer; every layer
/// None when the model cannot run on one sample). The audit's M3 never builds it.
pub fn per_sample_matrices(t: &Inspection) -> Result<Vec<Option<GradientMatrix>>> {
    match t.per_sample_gradients() {
        Err(GuardError::NoPerSampleGradients { .. }) => Ok(vec![None; t.layers().len()]),
        grads => grads.metric("per-sample gradients"),
    }
}

/// M3 on arbitrary features (one row per release).
pub fn usable_on_features(features: &[Vec<f64>], labels: &[i64], seed: u64) -> Result<Option<UsableInformation>> {
    Ok(attribute_information(features, labels, &UsableSettings::default(), seed).metric("M3 (usable information)")?.measured().cloned())
}

/// M3 on a matrix of releases of layer `l` (projected with the layer's projection stream).
pub fn usable_on_matrix(g: &GradientMatrix, labels: &[i64], seed: u64, l: usize) -> Result<Option<UsableInformation>> {
    Ok(usable_information(g, labels, &UsableSettings::default(), seed, l).metric("M3 (usable information)")?.measured().cloned())
}

/// M3's random projection of layer `l`'s rows (linear: a release of a batch mean projects to
/// the mean of the projected samples).
pub fn projected(g: &GradientMatrix, seed: u64, l: usize) -> Result<Vec<Vec<f64>>> {
    project(g, UsableSettings::default().projection_dim, seed, l).metric("M3 (projection)")
}

/// M2 on release columns: `groups[g]` are the columns of attribute value g (random order);
/// each group's first and second halves give the subspaces of rank `rank`. (d_between,
/// separation), None when a subspace is degenerate or there is a single group.
pub fn subspace_of_columns(groups: &[Vec<Vec<f64>>], rank: usize) -> Result<Option<(f64, f64)>> {
    let basis = |part: &[Vec<f64>]| -> Result<Option<Tensor>> {
        let p = part[0].len() as i64;
        let m = Tensor::f_from_slice(&part.concat())?.f_reshape([part.len() as i64, p])?.f_transpose(0, 1)?;
        orthonormal_basis(&m, rank, f32::EPSILON as f64).metric("M2 (subspace basis)")
    };
    let mut bases = Vec::new();
    for cols in groups {
        let half = cols.len() / 2;
        match (basis(&cols[..half])?, basis(&cols[half..2 * half])?) {
            (Some(a), Some(b)) => bases.push((a, b)),
            _ => return Ok(None),
        }
    }
    let distance = |a: &Tensor, b: &Tensor| projection_distance(a, b).metric("M2 (subspace distance)");
    let (mut between, mut within, mut pairs) = (0.0, 0.0, 0.0);
    for g in 0..bases.len() {
        for h in g + 1..bases.len() {
            let ((a1, a2), (b1, b2)) = (&bases[g], &bases[h]);
            between += (distance(a1, b1)? + distance(a2, b2)?) / 2.0;
            within += (distance(a1, a2)? + distance(b1, b2)?) / 2.0;
            pairs += 1.0;
        }
    }
    Ok((pairs > 0.0).then(|| (between / pairs, (between - within) / pairs)))
}
