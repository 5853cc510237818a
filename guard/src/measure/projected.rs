//! M3's features on the model's device: z_i = R_l g_l(i) for every sample i and layer l.
//!
//! Each sample's per-layer gradient comes from `subspace::sample_gradient` (one backward pass
//! of a batch of that sample alone, the pass M2 uses) and stays on the model's device; a
//! release transform (the audit's defence chain) is applied to it there, then it is
//! multiplied by R_l (`projection.rs`, the same values as the host matrix), built once per
//! layer on the device. The n x r features accumulate on the device and are read once per
//! layer at the end: memory beyond the model is R_l of every layer reached (r x P values in
//! R_l's kind) and one sample's gradient (P), never n x P.
use super::inspection::Inspection;
use super::inversion::ReleaseTransform;
use super::per_sample::used_layers;
use super::projection::{device_projection, projection_kind};
use super::subspace::sample_gradient;
use super::tensors::to_f64_vec;
use crate::error::{GuardError, Result, TorchContext};
use tch::{Kind, Tensor};

/// M3's projected features of one layer.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectedLayer {
    /// The loss does not reach the layer (its gradient is undefined for every sample).
    Unused,
    /// The release transform withheld the layer's release of a sample.
    Withheld {
        /// The first sample whose release was withheld.
        sample: usize,
    },
    /// The projected gradients of every sample.
    Features {
        /// `rows[i]` = R_l g_l(i): n rows of r features (unstandardised).
        rows: Vec<Vec<f64>>,
        /// P_l, the layer's parameter scalars.
        params: usize,
    },
}

/// A layer being projected: R_l, the features so far, and per sample the count of non-finite
/// gradient entries and the first one's index (checked on the device, read at the end).
struct Projecting {
    r_mat: Tensor,
    features: Tensor,
    non_finite: Tensor,
}

enum State {
    Unused,
    /// Reached by the loss; R_l is built on the first sample's device.
    Pending,
    Withheld(usize),
    Projecting(Projecting),
}

/// The projected per-sample releases of every layer (`r` rows of R_l, seeded by the
/// inspection's seed). [`GuardError::NoPerSampleGradients`] when the loss cannot run on one
/// sample; [`GuardError::NonFiniteGradient`] naming the layer, sample and entry when a
/// per-sample gradient is not finite.
pub(crate) fn projected_gradients(ins: &Inspection, r: usize, transform: Option<&ReleaseTransform>) -> Result<Vec<ProjectedLayer>> {
    let n = ins.batch().validate()?;
    let layers = ins.layers();
    let (inputs, targets) = (ins.batch().inputs(), ins.batch().targets());
    let mut states: Vec<State> = used_layers(ins)?.into_iter().map(|u| if u { State::Pending } else { State::Unused }).collect();
    for i in 0..n {
        let per_layer = sample_gradient(layers, ins.loss(), inputs, targets, i)?;
        for (l, g) in per_layer.iter().enumerate() {
            if matches!(states[l], State::Pending) {
                states[l] = State::Projecting(start(g, n, r, ins.seed(), l)?);
            }
            let State::Projecting(p) = &mut states[l] else { continue };
            record_non_finite(&p.non_finite, i, g)?;
            let released = match transform {
                None => g.shallow_clone(),
                Some(t) => match t(l, g, i) {
                    Ok(Some(released)) => released,
                    Ok(None) => {
                        states[l] = State::Withheld(i);
                        continue;
                    }
                    // A transform that rejects a non-finite gradient: name the sample and layer.
                    Err(e) => return Err(first_non_finite(ins, l, &p.non_finite, i + 1)?.unwrap_or(e)),
                },
            };
            let z = released
                .f_reshape([-1])
                .and_then(|v| v.f_to_kind(p.r_mat.kind()))
                .and_then(|v| p.r_mat.f_mv(&v))
                .during("projecting a per-sample gradient")?;
            p.features.f_get(i as i64).and_then(|mut row| row.f_copy_(&z)).during("keeping a projected gradient")?;
        }
    }
    states
        .into_iter()
        .enumerate()
        .map(|(l, s)| match s {
            State::Unused | State::Pending => Ok(ProjectedLayer::Unused),
            State::Withheld(sample) => Ok(ProjectedLayer::Withheld { sample }),
            State::Projecting(p) => finish(ins, l, p, n, r),
        })
        .collect()
}

/// R_l and the zeroed features and checks of layer `l`, on the device of its gradient `g`.
fn start(g: &Tensor, n: usize, r: usize, seed: u64, l: usize) -> Result<Projecting> {
    let (kind, device) = (projection_kind(g.kind()), g.device());
    let r_mat = device_projection(r, g.numel(), seed, l, kind, device)?;
    let features = Tensor::f_zeros([n as i64, r as i64], (kind, device)).during("allocating M3's features")?;
    let non_finite = Tensor::f_zeros([n as i64, 2], (Kind::Int64, device)).during("allocating M3's checks")?;
    Ok(Projecting { r_mat, features, non_finite })
}

/// Row `i` of `checks`: the count of non-finite entries of `g` and the index of the first
/// (0 when there is none), computed on the device without a host read.
fn record_non_finite(checks: &Tensor, i: usize, g: &Tensor) -> Result<()> {
    let during = "checking a per-sample gradient for non-finite values";
    let bad = g.f_isfinite().and_then(|f| f.f_logical_not()).during(during)?;
    let count = bad.f_sum(Kind::Int64).during(during)?;
    let first = bad.f_to_kind(Kind::Uint8).and_then(|b| b.f_argmax(0, false)).during(during)?;
    let row = Tensor::f_stack(&[count, first], 0).during(during)?;
    checks.f_get(i as i64).and_then(|mut dst| dst.f_copy_(&row)).during(during)
}

/// The error naming the first of the first `upto` samples whose gradient of layer `l` is not
/// finite, if any (one host read).
fn first_non_finite(ins: &Inspection, l: usize, checks: &Tensor, upto: usize) -> Result<Option<GuardError>> {
    let values = to_f64_vec(&checks.f_narrow(0, 0, upto as i64).during("reading M3's checks")?)?;
    Ok(values.chunks(2).position(|c| c[0] > 0.0).map(|i| GuardError::NonFiniteGradient {
        step: ins.step(),
        layers: vec![format!("{} (sample {i}, entry {}, {} non-finite)", ins.layers().layers()[l].name, values[2 * i + 1], values[2 * i])],
    }))
}

/// The features of layer `l`, read once, after its checks: a non-finite gradient, or a
/// non-finite feature (a release transform's output, an overflow), is an error naming the
/// layer and the sample.
fn finish(ins: &Inspection, l: usize, p: Projecting, n: usize, r: usize) -> Result<ProjectedLayer> {
    if let Some(e) = first_non_finite(ins, l, &p.non_finite, n)? {
        return Err(e);
    }
    let values = to_f64_vec(&p.features)?;
    let name = &ins.layers().layers()[l].name;
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        return Err(GuardError::Config {
            setting: "usable information gradients",
            why: format!("layer {name}: non-finite projected feature of sample {}, feature {}", bad / r.max(1), bad % r.max(1)),
        });
    }
    let rows = values.chunks(r.max(1)).map(<[f64]>::to_vec).collect();
    Ok(ProjectedLayer::Features { rows, params: p.r_mat.size()[1] as usize })
}

impl Inspection<'_> {
    /// M3's features of every layer on the model's device: each sample's gradient of layer l,
    /// through `transform(l, gradient, sample)` when given (None withholds the layer), times
    /// R_l (`r` rows, the inspection's seed). Only the n x r features reach the host. The
    /// model's buffers are put back afterwards.
    pub fn projected_gradients(&self, r: usize, transform: Option<&ReleaseTransform>) -> Result<Vec<ProjectedLayer>> {
        self.observing(|| projected_gradients(self, r, transform))
    }
}
