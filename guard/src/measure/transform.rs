//! A layer's defence chain applied to its released gradient *and* linearised on its probe
//! JVPs, so that M1 is measured on what is actually released: for a release T(G(x)) the
//! Jacobian is T'(G) J, and J v is already known for every probe.
//!
//! Linearisations: clip(c) at ||g|| > c is (c/||g||)(I - g g^T/||g||^2), identity below c;
//! noise is clip followed by input-independent noise, so its Jacobian is clip's (it lowers R_l
//! through ||release||, not S_l); top-k sparsification is the mask of kept entries; rounding in
//! quantisation has a zero derivative almost everywhere, which would claim a protection it does
//! not give, so it is treated as the identity (straight-through) and never lowers S_l.
use super::sensitivity::JvpSamples;
use super::tensors::{sum_sq, to_f64_vec};
use crate::error::{Result, TorchContext};
use gradguard_defenses::{derive_seed, Defence};
use tch::{Kind, Tensor};

/// M1 of one layer's release after a defence chain (METRICS.md, M1, on T(G)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReleaseSensitivity {
    /// S_l of the release.
    pub sensitivity: f64,
    /// S_l / sqrt(P_l).
    pub sensitivity_rms: f64,
    /// S_l / ||release||_2 (0 for an all-zero release).
    pub relative_sensitivity: f64,
    /// ||release||_2.
    pub release_norm: f64,
}

impl JvpSamples {
    /// M1 of layer `l`'s release after `chain` (seeded as the release is), from the kept JVPs
    /// and without another backward pass: the number a decision compares with a threshold.
    /// None when the chain withholds the layer or the loss does not reach it.
    pub fn release_sensitivity(&self, l: usize, chain: &[Defence], seed: u64) -> Result<Option<ReleaseSensitivity>> {
        let Some(layer) = self.layers.get(l).and_then(Option::as_ref) else { return Ok(None) };
        let Some(t) = transform(chain, &layer.grad, &layer.jvps, seed)? else { return Ok(None) };
        // One host read for all probes and the release's norm.
        let mut squares = t.tangents.iter().map(sum_sq).collect::<Result<Vec<_>>>()?;
        squares.push(sum_sq(&t.value)?);
        let mut values = to_f64_vec(&Tensor::f_stack(&squares, 0).during("stacking tangent norms")?)?;
        let norm = values.pop().unwrap_or(0.0).sqrt();
        let s = (values.iter().sum::<f64>() / (self.probes as f64 * self.n as f64)).sqrt();
        let params = layer.grad.numel().max(1) as f64;
        Ok(Some(ReleaseSensitivity {
            sensitivity: s,
            sensitivity_rms: s / params.sqrt(),
            relative_sensitivity: if norm > 0.0 { s / norm } else { 0.0 },
            release_norm: norm,
        }))
    }
}

/// The released value of a layer after a chain and the transformed probe tangents; None when
/// a step of the chain withholds the layer.
pub struct Transformed {
    /// The released value T(G), flattened.
    pub value: Tensor,
    /// T'(G) J v_k for each probe k.
    pub tangents: Vec<Tensor>,
}

/// Applies `chain` to the flattened layer gradient `grad` (seeds as `apply_all` derives them)
/// and its linearisation to each tangent.
pub fn transform(chain: &[Defence], grad: &Tensor, tangents: &[Tensor], seed: u64) -> Result<Option<Transformed>> {
    let mut value = grad.shallow_clone();
    let mut tangents: Vec<Tensor> = tangents.iter().map(|t| t.shallow_clone()).collect();
    for (i, defence) in chain.iter().enumerate() {
        let Some(next) = defence.apply(&value, derive_seed(seed, i))? else {
            return Ok(None);
        };
        tangents = match defence {
            Defence::Withhold => unreachable!("withhold returns None"),
            Defence::Clip { max_norm } | Defence::Noise { clip_norm: max_norm, .. } => clip_tangents(&value, *max_norm, tangents)?,
            Defence::Sparsify { .. } => {
                let mask = next.f_ne(0.0).and_then(|m| m.f_to_kind(tangents.first().map_or(Kind::Double, |t| t.kind()))).during("sparsity mask")?;
                tangents.iter().map(|t| t.f_mul(&mask).during("masking a tangent")).collect::<Result<_>>()?
            }
            Defence::Quantize { .. } => tangents,
        };
        value = next;
    }
    Ok(Some(Transformed { value, tangents }))
}

fn clip_tangents(g: &Tensor, max_norm: f64, tangents: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let g = g.f_to_kind(Kind::Double).during("clip linearisation")?;
    let norm = g.f_norm().and_then(|n| n.f_double_value(&[])).during("clip linearisation")?;
    if norm <= max_norm || norm == 0.0 {
        return Ok(tangents);
    }
    let unit = g.f_div_scalar(norm).during("clip linearisation")?;
    tangents
        .into_iter()
        .map(|t| {
            let t = t.f_to_kind(Kind::Double)?;
            let along = t.f_dot(&unit)?;
            t.f_sub(&unit.f_mul(&along)?)?.f_mul_scalar(max_norm / norm)
        })
        .collect::<std::result::Result<_, _>>()
        .during("clip linearisation")
}
