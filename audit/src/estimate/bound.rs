//! M5 in the audit (METRICS.md, M5): the reconstruction bound of each layer's defended release
//! and of the whole release, from the guard's own `JvpSamples::release_fisher` on the kept
//! probe JVPs. A release without noise has no bound: null with the METRICS.md reason.
use crate::error::{EstimateContext, Result};
use gradguard_defenses::Defence;
use gradguard_guard::{Metric, measure::{release_dfil, JvpSamples, LayerFisher}, report::{PriorSource, ReconstructionBound, BOUND_CAVEAT, NO_NOISE_NO_BOUND}};
use serde::Serialize;

/// M5's prior variance v, its kind, and where it came from in words.
pub struct Prior {
    /// The per-dimension variance.
    pub v: f64,
    /// Where it came from (a setting or measured).
    pub source: PriorSource,
    /// The same, in words for the report.
    pub described: String,
}

/// M5 of the whole release (every released layer's dFIL summed probe by probe).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ReleaseBound {
    /// Bits per input dimension; None when a released layer has no noise (see `absent`).
    pub release_reconstruction_bound_bits: Option<f64>,
    /// Its standard error.
    pub release_reconstruction_bound_se: Option<f64>,
    /// Summed dFIL.
    pub release_dfil: Option<f64>,
    /// Standard error of the summed dFIL.
    pub release_dfil_se: Option<f64>,
    /// 1 / summed dFIL.
    pub release_unbiased_mse_floor: Option<f64>,
    /// Why the release has no bound.
    pub absent: Option<String>,
    /// v, the prior's per-dimension variance.
    pub prior_variance: f64,
    /// Where v came from.
    pub prior_variance_source: String,
    /// What the bound does not promise.
    pub caveat: &'static str,
}

/// M5 of every layer released through `chain` (layer l seeded with `seed_of(l)`) and of the
/// release. `jv`: the kept probe JVPs of the released batch; None when nothing was probed
/// (an empty chain: every layer is released without noise).
pub fn release_bounds(jv: Option<&JvpSamples>, layers: usize, chain: &[Defence], seed_of: impl Fn(usize) -> u64, prior: Prior) -> Result<(Vec<Metric<ReconstructionBound>>, ReleaseBound)> {
    let Prior { v, source, described } = prior;
    let mut fishers = Vec::new();
    let mut rows = Vec::new();
    for l in 0..layers {
        let fisher = match jv {
            None => Some(LayerFisher::Unbounded),
            Some(jv) => jv.release_fisher(l, chain, seed_of(l)).metric("M5 (release Fisher information)")?,
        };
        rows.push(match &fisher {
            None => Metric::absent("not released (withheld, or the loss does not reach the layer): carries nothing"),
            Some(LayerFisher::Unbounded) => Metric::absent(NO_NOISE_NO_BOUND),
            Some(f @ LayerFisher::Bounded { noise_std, .. }) => match jv {
                Some(jv) => Metric::Measured(jv.reconstruction_bound(f.dfil(), Some(*noise_std), (v, source))),
                None => Metric::absent(NO_NOISE_NO_BOUND),
            },
        });
        fishers.extend(fisher);
    }
    let whole = release_dfil(&fishers).zip(jv).map(|(d, jv)| jv.reconstruction_bound(Some(d), None, (v, source)));
    let release = ReleaseBound {
        release_reconstruction_bound_bits: whole.as_ref().and_then(|b| b.reconstruction_bound_bits),
        release_reconstruction_bound_se: whole.as_ref().and_then(|b| b.reconstruction_bound_se),
        release_dfil: whole.as_ref().and_then(|b| b.dfil),
        release_dfil_se: whole.as_ref().and_then(|b| b.dfil_se),
        release_unbiased_mse_floor: whole.as_ref().and_then(|b| b.unbiased_mse_floor),
        absent: whole.is_none().then(|| format!("{NO_NOISE_NO_BOUND} (a layer is released without noise)")),
        prior_variance: v,
        prior_variance_source: described,
        caveat: BOUND_CAVEAT,
    };
    Ok((rows, release))
}

/// M5 of single-sample releases, averaged over samples: for each of the first `releases`
/// samples of the inspected batch (the samples M4 attacks with releases of one), the dFIL of
/// each layer's release through `chain(l, point)`, for every grid point. Returns
/// `[point][layer]`: the mean over the samples and its standard error over them (which holds
/// the probes' error too), or None for a layer released without noise (or not at all). The
/// probe JVPs are taken once per sample and reused for every point (the guard's
/// re-measurement path), so the grid costs no backward pass.
pub fn single_sample_dfil(t: &gradguard_guard::Inspection, releases: usize, probes: usize, points: usize, chain: &dyn Fn(usize, usize) -> Vec<Defence>) -> Result<Vec<Vec<Option<(f64, f64)>>>> {
    let layers = t.layers().len();
    let mut per: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); layers]; points];
    let mut unbounded = vec![vec![false; layers]; points];
    for r in 0..releases {
        let (x, y) = (t.batch().inputs().f_narrow(0, r as i64, 1)?, t.batch().targets().f_narrow(0, r as i64, 1)?);
        let jv = t.on(gradguard_guard::Batch::new(&x, &y)).seeded(t.seed(), r as u64).jvp_samples(&super::probe_settings(probes)).metric("M5 (probe JVPs of one sample)")?;
        for p in 0..points {
            for l in 0..layers {
                match jv.release_fisher(l, &chain(l, p), 0).metric("M5 (release Fisher information)")? {
                    Some(f @ LayerFisher::Bounded { .. }) => per[p][l].push(f.dfil().map_or(0.0, |d| d.0)),
                    _ => unbounded[p][l] = true,
                }
            }
        }
    }
    Ok(per
        .into_iter()
        .zip(unbounded)
        .map(|(layers, unbounded)| {
            layers
                .into_iter()
                .zip(unbounded)
                .map(|(v, u)| (!u && !v.is_empty()).then(|| gradguard_guard::measure::mean_and_standard_error(&v)))
                .collect()
        })
        .collect())
}

/// The per-dimension population variance of every sample of the inspected batch (M5's prior
/// scale, the same x_bar and expectation as M4's baseline over those samples).
pub fn batch_prior_variance(t: &gradguard_guard::Inspection) -> Result<f64> {
    let x = t.batch().inputs();
    let n = x.size().first().copied().unwrap_or(0) as usize;
    gradguard_guard::measure::per_dimension_variance(x, n).metric("M5 (prior variance)")
}
