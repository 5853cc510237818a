//! Every metric of a release defended by a chain (`gradguard audit --defence`): each layer's
//! release goes through the same `Defence::apply` the guard uses, with seeds derived per layer
//! (and per sample for per-sample releases), and M1 goes through the guard's closed-loop
//! linearisation (`JvpSamples::release_sensitivity`).
use crate::error::{EstimateContext, Result};
use gradguard_defenses::{apply_all, derive_seed, Defence};
use gradguard_guard::{Inspection, LayerMap, Metric, measure::{GradientMatrix, JvpSamples, SubspaceSettings}, report::{Sensitivity, Subspace}};
use gradguard_guard::measure::to_f64_vec;
use std::borrow::Cow;
use tch::Tensor;

/// Why a metric of a withheld layer is absent.
pub const WITHHELD: &str = "the defence withholds the layer: nothing is released";

/// A defence chain applied to every layer, seeded from the audit's seed.
#[derive(Clone, Copy)]
pub struct Chain<'a> {
    /// The defences, applied in order.
    pub defences: &'a [Defence],
    /// The seed every release's seed derives from.
    pub seed: u64,
}

impl Chain<'_> {
    /// The seed of layer `l`'s release (M1, M5 and the batch release share it).
    pub fn layer_seed(&self, l: usize) -> u64 {
        derive_seed(self.seed ^ 0xa0d1_7de0, l)
    }

    /// The seed of release `r` of layer `l` among many (per-sample releases, attacked releases).
    pub fn release_seed(&self, l: usize, r: usize) -> u64 {
        derive_seed(self.seed ^ 0xa0d1_75e5, 1_000_003 * l + r)
    }

    /// Whether the chain withholds the layer (nothing is released).
    pub fn withholds(&self) -> bool {
        self.defences.iter().any(|d| matches!(d, Defence::Withhold))
    }

    /// `g` through the chain; None when withheld.
    pub fn apply(&self, g: &Tensor, seed: u64) -> gradguard_guard::Result<Option<Tensor>> {
        Ok(apply_all(self.defences, g, seed)?)
    }

    /// The chain written as the policy writes actions, steps joined by " > ".
    pub fn describe(defences: &[Defence]) -> String {
        defences.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" > ")
    }
}

/// M1 of each layer's defended release: the raw metric's record (representation, n, probes)
/// with S_l, S_l^rms and R_l of the release. The transformed probes give no standard error
/// here: `sensitivity_se` is NaN (null in JSON, absent in the row).
pub fn sensitivity(jv: &JvpSamples, layers: &LayerMap, chain: Chain) -> Result<Vec<Metric<Sensitivity>>> {
    let raw = jv.sensitivity(layers).metric("M1 (sensitivity)")?;
    raw.into_iter()
        .enumerate()
        .map(|(l, m)| {
            let Metric::Measured(mut s) = m else { return Ok(m) };
            Ok(match jv.release_sensitivity(l, chain.defences, chain.layer_seed(l)).metric("M1 of a release")? {
                None => Metric::absent(WITHHELD),
                Some(r) => {
                    s.sensitivity = r.sensitivity;
                    s.sensitivity_se = f64::NAN;
                    s.sensitivity_rms = r.sensitivity_rms;
                    s.relative_sensitivity = (r.release_norm > 0.0).then_some(r.relative_sensitivity);
                    Metric::Measured(s)
                }
            })
        })
        .collect()
}

/// M2 of every layer on per-sample gradients each released through the chain.
pub fn subspace(t: &Inspection, settings: &SubspaceSettings, chain: Chain) -> Result<Vec<Metric<Subspace>>> {
    let layers = t.layers().len();
    let samples = match t.subspace_samples(settings).metric("M2 (per-sample gradients)")? {
        Err(reason) => return Ok((0..layers).map(|_| Metric::absent(reason.clone())).collect()),
        Ok(s) => s,
    };
    if chain.withholds() {
        return Ok((0..layers).map(|_| Metric::absent(WITHHELD)).collect());
    }
    (0..layers)
        .map(|l| {
            let transform = |col: &Tensor, seed: u64| -> gradguard_guard::Result<Tensor> {
                // Not withheld (checked above), so the chain returns a tensor.
                Ok(chain.apply(col, derive_seed(chain.seed ^ seed, l))?.unwrap_or_else(|| col.shallow_clone()))
            };
            samples.layer_metric(l, Some(&transform)).metric("M2 (subspace distance)")
        })
        .collect()
}

/// Each row of `g` (a per-sample release of layer `l`) through the chain, row i seeded with
/// `seed_of(i)`; None when the chain withholds.
pub fn defend_rows<'g>(defences: &[Defence], g: &'g GradientMatrix, seed_of: impl Fn(usize) -> u64) -> Result<Option<Cow<'g, GradientMatrix>>> {
    if defences.is_empty() {
        return Ok(Some(Cow::Borrowed(g)));
    }
    let m = Tensor::f_from_slice(&g.data)?.f_reshape([g.rows as i64, g.cols as i64])?;
    let mut out = Vec::with_capacity(g.rows);
    for i in 0..g.rows {
        match apply_all(defences, &m.f_get(i as i64)?, seed_of(i))? {
            Some(v) => out.push(v),
            None => return Ok(None),
        }
    }
    Ok(Some(Cow::Owned(GradientMatrix::new(g.rows, g.cols, to_f64_vec(&Tensor::f_stack(&out, 0)?)?).metric("M3 (defended gradients)")?)))
}
