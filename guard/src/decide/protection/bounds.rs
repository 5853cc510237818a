//! M5 of a decided release (METRICS.md): each layer's bound from the kept JVPs through the
//! layer's chain, and the whole release's from dFIL summed over the released layers, probe by
//! probe. A chain without noise needs no JVPs: it has no bound.
use super::{Measurements, ReleaseProbe};
use crate::error::Result;
use crate::measure::{reconstruction_bound_bits, release_dfil, unbiased_mse_floor, LayerFisher};
use crate::report::{Metric, PriorSource, ReconstructionBound, NO_NOISE_NO_BOUND};
use gradguard_defenses::Defence;

/// M5 of one decided release.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// Per layer, in model order (absent: withheld, unused, or no JVPs to measure with).
    pub layers: Vec<Metric<ReconstructionBound>>,
    /// The whole release.
    pub release: Metric<ReconstructionBound>,
}

impl Bounds {
    /// Every figure absent for `reason`.
    pub fn absent(layers: usize, reason: &str) -> Self {
        Self { layers: (0..layers).map(|_| Metric::absent(reason)).collect(), release: Metric::absent(reason) }
    }

    /// Layer l is no longer released (the ledger's cap withheld it): its bound leaves the
    /// release's, which is summed again from the layers left (without a standard error: the
    /// per-probe sums are gone).
    pub fn withhold(&mut self, l: usize, reason: &str) {
        if let Some(m) = self.layers.get_mut(l) {
            *m = Metric::absent(reason);
        }
        let Metric::Measured(release) = &mut self.release else { return };
        if release.reconstruction_bound_bits.is_none() {
            // Unbounded before: some layer had no noise; it may have been this one.
            if self.layers.iter().any(|m| m.measured().is_some_and(|b| b.dfil.is_none())) {
                return;
            }
        }
        let dfil: f64 = self.layers.iter().filter_map(|m| m.measured().and_then(|b| b.dfil)).sum();
        let v = release.prior_variance;
        release.dfil = Some(dfil);
        release.dfil_se = None;
        release.reconstruction_bound_bits = Some(reconstruction_bound_bits(v, dfil));
        release.reconstruction_bound_se = None;
        release.unbiased_mse_floor = Some(unbiased_mse_floor(dfil)).filter(|f| f.is_finite());
        release.unbounded_reason = None;
    }

    /// Layer l's dFIL for the ledger: Some(Some(d)) bounded, Some(None) unbounded (or not
    /// measurable: the ledger then fails closed), None not released.
    pub fn ledger_dfil(&self, l: usize, released: bool) -> Option<Option<f64>> {
        if !released {
            return None;
        }
        Some(self.layers.get(l).and_then(|m| m.measured()).and_then(|b| b.dfil))
    }
}

/// Whether a chain adds noise (and so can have a bound).
pub(crate) fn adds_noise(chain: &[Defence]) -> bool {
    chain.iter().any(|d| matches!(d, Defence::Noise { clip_norm, multiplier } if clip_norm * multiplier > 0.0))
}

/// The prior variance v a decision uses, and where it came from.
pub(crate) fn prior(m: &Measurements, jvps: &dyn ReleaseProbe) -> (f64, PriorSource) {
    match m.prior_variance {
        Some(v) => (v, PriorSource::Setting),
        None => (jvps.batch_variance(), PriorSource::Batch),
    }
}

/// The bound of a dFIL estimate (None: unbounded) on `jvps`' batch.
pub(crate) fn bound(dfil: Option<(f64, f64)>, noise_std: Option<f64>, m: &Measurements, jvps: &dyn ReleaseProbe) -> ReconstructionBound {
    jvps.reconstruction_bound(dfil, noise_std, prior(m, jvps))
}

/// M5 of every layer's decided chain (None: not released) and of the release.
pub(crate) fn measure_bounds(chains: &[Option<Vec<Defence>>], m: &Measurements) -> Result<Bounds> {
    let mut layers = Vec::new();
    let mut fishers: Vec<LayerFisher> = Vec::new();
    let mut absent: Option<String> = None;
    let mut unbounded = false;
    for (l, chain) in chains.iter().enumerate() {
        let Some(chain) = chain else {
            layers.push(Metric::absent("not released (withheld)"));
            continue;
        };
        let jvps = match &m.jvps {
            Ok(jvps) => *jvps,
            Err(reason) if !adds_noise(chain) => {
                // No noise: no bound, whatever the JVPs would say.
                let _ = reason;
                unbounded = true;
                layers.push(Metric::absent(NO_NOISE_NO_BOUND));
                continue;
            }
            Err(reason) => {
                absent.get_or_insert_with(|| reason.clone());
                layers.push(Metric::absent(reason.clone()));
                continue;
            }
        };
        match jvps.release_fisher(l, chain, m.seeds[l])? {
            None => layers.push(Metric::absent("layer not used by the loss (nothing released)")),
            Some(fisher) => {
                let noise_std = match &fisher {
                    LayerFisher::Bounded { noise_std, .. } => Some(*noise_std),
                    LayerFisher::Unbounded => None,
                };
                layers.push(Metric::Measured(bound(fisher.dfil(), noise_std, m, jvps)));
                fishers.push(fisher);
            }
        }
    }
    let release = match (&m.jvps, absent) {
        (_, Some(reason)) => Metric::absent(format!("a layer's bound is absent: {reason}")),
        (Ok(jvps), None) => Metric::Measured(bound(if unbounded { None } else { release_dfil(&fishers) }, None, m, *jvps)),
        (Err(_), None) => Metric::absent(NO_NOISE_NO_BOUND),
    };
    Ok(Bounds { layers, release })
}
