//! M5 in the audit (METRICS.md, M5): the reconstruction bound of each layer's defended release
//! and of the whole release, from the guard's own `JvpSamples::release_fisher` on the kept
//! probe JVPs. A release without noise has no bound: null with the METRICS.md reason.
use crate::error::{EstimateContext, Result};
use gradguard_defenses::Defence;
use gradguard_guard::{reconstruction_bound_bits, reconstruction_bound_se, release_dfil, unbiased_mse_floor, JvpSamples, LayerFisher, Metric, NO_NOISE_NO_BOUND};
use serde::Serialize;

/// Shown wherever the bound is: what it does not promise.
pub const BOUND_CAVEAT: &str = "van Trees bound for an attacker whose prior knowledge is a Gaussian of the data's mean and per-dimension variance; an attacker with a stronger prior of the data (e.g. knowing the data lie on a low-dimensional manifold, or a trained generative model) can recover more";

/// M5 of one layer's release.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct LayerBound {
    /// sigma_l: the noise std the chain adds (after its clip).
    pub noise_std: f64,
    /// dFIL_l = S_l^2 / (sigma_l^2 D) of the clipped release, and its standard error.
    pub dfil: f64,
    /// Standard error of dFIL_l over the probes.
    pub dfil_se: f64,
    /// 0.5 log2(1 + v dFIL_l), bits per input dimension.
    pub reconstruction_bound_bits: f64,
    /// Its standard error (delta method).
    pub reconstruction_bound_se: f64,
    /// 1 / dFIL_l: the smallest per-dimension MSE an unbiased attacker can reach (Cramer-Rao).
    pub unbiased_mse_floor: f64,
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

/// The bound of a dFIL and its standard error under prior variance `v`.
fn bound(v: f64, noise_std: f64, (dfil, dfil_se): (f64, f64)) -> LayerBound {
    LayerBound {
        noise_std,
        dfil,
        dfil_se,
        reconstruction_bound_bits: reconstruction_bound_bits(v, dfil),
        reconstruction_bound_se: reconstruction_bound_se(v, dfil, dfil_se),
        unbiased_mse_floor: unbiased_mse_floor(dfil),
    }
}

/// M5 of every layer released through `chain` (layer l seeded with `seed_of(l)`) and of the
/// release. `jv`: the kept probe JVPs of the released batch; None when nothing was probed
/// (an empty chain: every layer is released without noise).
pub(crate) fn release_bounds(jv: Option<&JvpSamples>, layers: usize, chain: &[Defence], seed_of: impl Fn(usize) -> u64, prior: (f64, String)) -> Result<(Vec<Metric<LayerBound>>, ReleaseBound)> {
    let (v, source) = prior;
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
            Some(f @ LayerFisher::Bounded { noise_std, .. }) => Metric::Measured(bound(v, *noise_std, f.dfil().unwrap_or((0.0, 0.0)))),
        });
        fishers.extend(fisher);
    }
    let release = match release_dfil(&fishers) {
        None => ReleaseBound {
            release_reconstruction_bound_bits: None,
            release_reconstruction_bound_se: None,
            release_dfil: None,
            release_dfil_se: None,
            release_unbiased_mse_floor: None,
            absent: Some(format!("{NO_NOISE_NO_BOUND} (a layer is released without noise)")),
            prior_variance: v,
            prior_variance_source: source,
            caveat: BOUND_CAVEAT,
        },
        Some(d) => {
            let b = bound(v, f64::NAN, d);
            ReleaseBound {
                release_reconstruction_bound_bits: Some(b.reconstruction_bound_bits),
                release_reconstruction_bound_se: Some(b.reconstruction_bound_se),
                release_dfil: Some(b.dfil),
                release_dfil_se: Some(b.dfil_se),
                release_unbiased_mse_floor: Some(b.unbiased_mse_floor),
                absent: None,
                prior_variance: v,
                prior_variance_source: source,
                caveat: BOUND_CAVEAT,
            }
        }
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
pub(crate) fn single_sample_dfil(t: &gradguard_guard::Inspection, releases: usize, probes: usize, points: usize, chain: &dyn Fn(usize, usize) -> Vec<Defence>) -> Result<Vec<Vec<Option<(f64, f64)>>>> {
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
                .map(|(v, u)| (!u && !v.is_empty()).then(|| gradguard_guard::mean_and_standard_error(&v)))
                .collect()
        })
        .collect())
}

/// The per-dimension population variance of every sample of the inspected batch (M5's prior
/// scale, the same x_bar and expectation as M4's baseline over those samples).
pub(crate) fn batch_prior_variance(t: &gradguard_guard::Inspection) -> Result<f64> {
    let x = t.batch().inputs();
    let n = x.size().first().copied().unwrap_or(0) as usize;
    gradguard_guard::per_dimension_variance(x, n).metric("M5 (prior variance)")
}
