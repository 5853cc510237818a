//! M5 (METRICS.md): the Fisher information a noised release carries about a sample's input,
//! and the reconstruction bound in bits per input dimension it implies (van Trees with a
//! Gaussian prior of the data's variance; Cramer-Rao for unbiased attackers).
//!
//! Estimated from M1's kept probe JVPs, so it costs no backward pass: for a layer released as
//! T(G) + N(0, sigma^2 I), dFIL_l = S_l(T)^2 / (sigma^2 D), with S_l(T) the sensitivity of the
//! deterministic part T of the chain (the steps before the noise, and the noise step's own clip).
//! Steps after the noise only process the noised value: by the data-processing inequality for
//! Fisher information they cannot add any, so the bound of the noised value bounds the release.
//!
//! What the bound does not cover: an attacker whose prior knowledge of the data is stronger than
//! a Gaussian of the data's mean and variance can recover more; the linearised chain is exact
//! for clip and sparsify masks but treats quantisation as the identity.
use super::sensitivity::{mean_and_standard_error, JvpSamples};
use super::tensors::{sum_sq, to_f64_vec};
use super::transform::transform;
use crate::error::{Result, TorchContext};
use crate::report::{PriorSource, ReconstructionBound, NO_NOISE_NO_BOUND};
use gradguard_defenses::Defence;
use tch::Tensor;

/// The Fisher information one layer's release carries, per probe, so that layers released
/// together add probe by probe (they share the probes) and the standard error stays honest.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerFisher {
    /// The layer is released without noise: +Inf, no bound.
    Unbounded,
    /// The layer is released with noise of std `noise_std` after its deterministic steps.
    Bounded {
        /// The noise std sigma_l the chain adds.
        noise_std: f64,
        /// Per-probe estimates of dFIL_l = S_l^2 / (sigma_l^2 D).
        per_probe: Vec<f64>,
    },
}

impl LayerFisher {
    /// dFIL and its standard error; None when unbounded.
    pub fn dfil(&self) -> Option<(f64, f64)> {
        match self {
            Self::Unbounded => None,
            Self::Bounded { per_probe, .. } => Some(mean_and_standard_error(per_probe)),
        }
    }
}

/// dFIL summed over layers released together (probe by probe): None when any released layer is
/// unbounded; `Some((0, 0))` for a release with no layer (nothing released carries nothing).
pub fn release_dfil<'a>(layers: impl IntoIterator<Item = &'a LayerFisher>) -> Option<(f64, f64)> {
    let mut sum: Vec<f64> = Vec::new();
    for layer in layers {
        let LayerFisher::Bounded { per_probe, .. } = layer else { return None };
        if sum.is_empty() {
            sum = vec![0.0; per_probe.len()];
        }
        for (s, v) in sum.iter_mut().zip(per_probe) {
            *s += v;
        }
    }
    if sum.is_empty() {
        return Some((0.0, 0.0));
    }
    Some(mean_and_standard_error(&sum))
}

/// The reconstruction bound in bits per input dimension: 0.5 log2(1 + v dFIL).
pub fn reconstruction_bound_bits(prior_variance: f64, dfil: f64) -> f64 {
    0.5 * (prior_variance * dfil).ln_1p() / std::f64::consts::LN_2
}

/// The bound's standard error from dFIL's, by the delta method.
pub fn reconstruction_bound_se(prior_variance: f64, dfil: f64, dfil_se: f64) -> f64 {
    0.5 * prior_variance * dfil_se / ((1.0 + prior_variance * dfil) * std::f64::consts::LN_2)
}

/// The smallest per-dimension MSE an unbiased attacker can reach (Cramer-Rao): 1 / dFIL
/// (+Inf when the release carries no information).
pub fn unbiased_mse_floor(dfil: f64) -> f64 {
    1.0 / dfil
}

/// The noise std that brings a layer of sensitivity `sensitivity` (after the clip) to `target`
/// bits per dimension: sigma^2 = v S^2 / (D (2^{2b} - 1)). None for a target that is not a
/// positive finite number of bits, inputs without dimensions, or a sigma that is not finite
/// (a target so small that 2^{2b} - 1 rounds to 0, say).
pub fn calibrated_noise_std(prior_variance: f64, sensitivity: f64, dims: usize, target_bits: f64) -> Option<f64> {
    if !(target_bits > 0.0 && target_bits.is_finite()) || dims == 0 || !(prior_variance >= 0.0) {
        return None;
    }
    let variance = prior_variance * sensitivity * sensitivity;
    if variance == 0.0 {
        return Some(0.0);
    }
    let denom = dims as f64 * (2f64.powf(2.0 * target_bits) - 1.0);
    Some((variance / denom).sqrt()).filter(|sigma| sigma.is_finite())
}

/// Where the chain first adds noise, the std it adds, and the deterministic chain before it
/// (ending with that noise step's clip). None: the chain adds no noise.
fn split_at_noise(chain: &[Defence]) -> Option<(Vec<Defence>, f64)> {
    let i = chain.iter().position(|d| matches!(d, Defence::Noise { multiplier, clip_norm } if multiplier * clip_norm > 0.0))?;
    let Defence::Noise { clip_norm, multiplier } = chain[i] else { return None };
    let mut before = chain[..i].to_vec();
    // Seeds are derived from the step's index; the clip takes the noise step's place and draws none.
    before.push(Defence::Clip { max_norm: clip_norm });
    Some((before, multiplier * clip_norm))
}

impl JvpSamples {
    /// The bound of a dFIL estimate and its standard error (None: unbounded) on these JVPs'
    /// batch, under prior variance `prior.0`: the one place a [`ReconstructionBound`] is made.
    pub fn reconstruction_bound(&self, dfil: Option<(f64, f64)>, noise_std: Option<f64>, prior: (f64, PriorSource)) -> ReconstructionBound {
        let (v, source) = prior;
        let base = ReconstructionBound {
            reconstruction_bound_bits: None,
            reconstruction_bound_se: None,
            dfil: None,
            dfil_se: None,
            unbiased_mse_floor: None,
            noise_std,
            unbounded_reason: Some(NO_NOISE_NO_BOUND.into()),
            prior_variance: v,
            prior: source,
            input_dims: self.input_dims,
            step: self.step,
            n: self.n,
            probes: self.probes,
        };
        let Some((d, se)) = dfil else { return base };
        let se = if se.is_finite() { se } else { 0.0 };
        ReconstructionBound {
            reconstruction_bound_bits: Some(reconstruction_bound_bits(v, d)),
            reconstruction_bound_se: Some(reconstruction_bound_se(v, d, se)),
            dfil: Some(d),
            dfil_se: Some(se),
            // +Inf (no information) is not JSON: leave it null there, the bound says 0 bits.
            unbiased_mse_floor: Some(unbiased_mse_floor(d)).filter(|f| f.is_finite()),
            unbounded_reason: None,
            ..base
        }
    }

    /// M5 of layer `l`'s release after `chain` (seeded as the release is), from the kept JVPs.
    /// None when the chain withholds the layer or the loss does not reach it.
    pub fn release_fisher(&self, l: usize, chain: &[Defence], seed: u64) -> Result<Option<LayerFisher>> {
        let Some(layer) = self.layers.get(l).and_then(Option::as_ref) else { return Ok(None) };
        if chain.iter().any(|d| matches!(d, Defence::Withhold)) {
            return Ok(None);
        }
        let Some((before, noise_std)) = split_at_noise(chain) else {
            return Ok(Some(LayerFisher::Unbounded));
        };
        let Some(t) = transform(&before, &layer.grad, &layer.jvps, seed)? else { return Ok(None) };
        let squares = t.tangents.iter().map(sum_sq).collect::<Result<Vec<_>>>()?;
        let values = to_f64_vec(&Tensor::f_stack(&squares, 0).during("stacking tangent norms")?)?;
        let scale = 1.0 / (self.n as f64 * noise_std * noise_std * self.input_dims.max(1) as f64);
        Ok(Some(LayerFisher::Bounded { noise_std, per_probe: values.iter().map(|v| v * scale).collect() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_zero_without_information_and_grows_with_it() {
        assert_eq!(reconstruction_bound_bits(1.0, 0.0), 0.0);
        // v dFIL = 3: 0.5 log2(4) = 1 bit.
        assert!((reconstruction_bound_bits(1.5, 2.0) - 1.0).abs() < 1e-12);
        assert!(reconstruction_bound_bits(1.0, 10.0) > reconstruction_bound_bits(1.0, 1.0));
    }

    #[test]
    fn calibrated_noise_meets_the_target_exactly() {
        let (v, s, d, b) = (0.7, 3.2, 64, 0.05);
        let sigma = calibrated_noise_std(v, s, d, b).unwrap();
        let dfil = s * s / (sigma * sigma * d as f64);
        assert!((reconstruction_bound_bits(v, dfil) - b).abs() < 1e-12);
        assert_eq!(calibrated_noise_std(v, s, d, 0.0), None);
        assert_eq!(calibrated_noise_std(v, s, 0, b), None);
        // 2^{2b} - 1 is 0 in f64 below b ~ 1e-16: no finite sigma.
        assert_eq!(calibrated_noise_std(v, s, d, 1e-20), None);
        assert_eq!(calibrated_noise_std(v, 0.0, d, 1e-20), Some(0.0));
    }

    #[test]
    fn layers_add_probe_by_probe_and_an_unbounded_layer_unbounds_the_release() {
        let a = LayerFisher::Bounded { noise_std: 1.0, per_probe: vec![1.0, 3.0] };
        let b = LayerFisher::Bounded { noise_std: 2.0, per_probe: vec![2.0, 0.0] };
        // Sums 3 and 3: the errors of the two layers cancel, the shared probes show it.
        assert_eq!(release_dfil([&a, &b]), Some((3.0, 0.0)));
        assert_eq!(release_dfil([&a, &LayerFisher::Unbounded]), None);
        assert_eq!(release_dfil([]), Some((0.0, 0.0)));
    }

    #[test]
    fn only_the_steps_before_the_first_noise_count() {
        let chain = [
            Defence::Sparsify { keep_fraction: 0.5 },
            Defence::Noise { clip_norm: 2.0, multiplier: 0.5 },
            Defence::Clip { max_norm: 0.1 },
        ];
        let (before, std) = split_at_noise(&chain).unwrap();
        assert_eq!(before, vec![Defence::Sparsify { keep_fraction: 0.5 }, Defence::Clip { max_norm: 2.0 }]);
        assert_eq!(std, 1.0);
        assert!(split_at_noise(&[Defence::Noise { clip_norm: 1.0, multiplier: 0.0 }]).is_none());
    }
}
