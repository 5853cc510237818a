//! M4, usable original information (METRICS.md, M4): a gradient-inversion attack restricted to
//! one layer. A dummy input starts from a seeded Gaussian and is optimised with Adam so that
//! its layer-l gradient matches the released one in cosine distance, the labels known. With
//! x_hat the reconstruction and x_bar the mean input,
//!
//! ```text
//! usable_original_bits_per_dim = max(0, 0.5 * log2( E||x - x_bar||^2 / E||x - x_hat||^2 ))
//! ```
//!
//! and the PSNR of x_hat beside it. Slow (hundreds of double-backward passes per layer and
//! release): it belongs in the offline audit and in the validation study, not in the guard.
use crate::error::{GuardError, Result, TorchContext};
use super::inspection::Inspection;
use super::layers::LayerMap;
use super::loss::{parameter_grads, scalar_loss, LossFn};
use crate::report::Metric;
use crate::measure::tensors::{gaussian_probes, rng_for, to_f64_vec};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How the attack runs. Lengths are in units of sigma, the RMS deviation of the audited inputs
/// from their mean (so the settings do not depend on the data's scale).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InversionSettings {
    /// Adam steps on the dummy input.
    pub iterations: usize,
    /// Adam's step size at the start, in units of sigma; it decays to 0 on a cosine schedule.
    pub learning_rate: f64,
    /// Start the dummy at the mean input x_bar (the baseline the metric compares against), or
    /// at 0.
    pub start_from_mean: bool,
    /// Standard deviation of the seeded Gaussian added to the start, in units of sigma.
    pub init_scale: f64,
}

impl Default for InversionSettings {
    fn default() -> Self {
        Self { iterations: 300, learning_rate: 0.1, start_from_mean: true, init_scale: 0.1 }
    }
}

impl InversionSettings {
    /// Rejects 0 iterations, a non-positive or non-finite learning rate, or a negative init scale.
    pub fn validate(&self) -> Result<()> {
        if self.iterations == 0 {
            return Err(GuardError::Config { setting: "inversion.iterations", why: "must be at least 1".into() });
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(GuardError::Config { setting: "inversion.learning_rate", why: format!("must be finite and > 0, got {}", self.learning_rate) });
        }
        if !(self.init_scale.is_finite() && self.init_scale >= 0.0) {
            return Err(GuardError::Config { setting: "inversion.init_scale", why: format!("must be finite and >= 0, got {}", self.init_scale) });
        }
        Ok(())
    }
}

/// Which releases the audit attacks: `releases` consecutive batches of `batch_size` samples
/// from the start of the audited inputs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct InversionPlan {
    /// Samples per attacked release.
    pub batch_size: usize,
    /// Releases attacked.
    pub releases: usize,
}

impl Default for InversionPlan {
    fn default() -> Self {
        Self { batch_size: 1, releases: 8 }
    }
}

/// M4 for one layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Inversion {
    /// max(0, 0.5 log2(E||x - x_bar||^2 / E||x - x_hat||^2)).
    pub usable_original_bits_per_dim: f64,
    /// 10 log10(range^2 / mse), range = max - min of the audited inputs.
    pub psnr: f64,
    /// E||x - x_hat||^2 / D.
    pub mse: f64,
    /// E||x - x_bar||^2 / D: the error of answering the mean input.
    pub baseline_mse: f64,
    /// Mean over releases of the cosine distance the attack ended at (best iterate).
    pub final_cosine_distance: f64,
    /// Samples reconstructed (releases x batch size).
    pub samples: usize,
    /// Releases attacked.
    pub releases: usize,
    /// Samples per release.
    pub batch_size: usize,
    /// Adam iterations per attack (the setting).
    pub iterations: usize,
    /// Adam learning rate (the setting).
    pub learning_rate: f64,
    /// Seed of the attack's random start.
    pub seed: u64,
    /// P_l: scalars in the layer.
    pub params: usize,
}

/// Transformation of a layer's released gradient (flat vector) before the attacker sees it:
/// `(layer, gradient, release index)`, None = withheld.
pub type ReleaseTransform<'a> = dyn Fn(usize, &Tensor, usize) -> Result<Option<Tensor>> + 'a;

/// The layer-l gradient of the loss at `x` (flat, joined over the layer's parameters; zeros
/// for parameters the loss does not reach), built with `create_graph` when `graph`.
fn layer_gradient(layers: &LayerMap, l: usize, loss_fn: &dyn LossFn, x: &Tensor, y: &Tensor, graph: bool) -> Result<Option<Tensor>> {
    let params: Vec<Tensor> = layers.layers()[l].params.iter().map(|p| p.tensor.shallow_clone()).collect();
    let grads = if graph {
        let loss = scalar_loss(loss_fn, x, y, 0, false)?;
        Tensor::f_run_backward(&[&loss], &params, true, true).during("differentiating the dummy's loss")?
    } else {
        parameter_grads(loss_fn, x, y, &params, 0, true)?
    };
    if grads.iter().all(|g| !g.defined()) {
        return Ok(None);
    }
    let parts = grads
        .iter()
        .zip(&params)
        .map(|(g, p)| if g.defined() { g.f_reshape([-1]) } else { p.f_zeros_like().and_then(|z| z.f_reshape([-1])) })
        .collect::<std::result::Result<Vec<_>, _>>()
        .during("flattening a layer gradient")?;
    Tensor::f_cat(&parts, 0).map(Some).during("joining a layer gradient")
}

/// The seeded start of the attack on release `release`: `centre` (x_bar per sample, or
/// zeros) plus `init_scale * sigma` times a standard Gaussian, shaped like `shape` (the
/// release's input batch).
fn seeded_start(attack: &Attack, like: &Tensor, centre: Option<&Tensor>, release: u64) -> Result<Tensor> {
    let (kind, device) = (like.kind(), like.device());
    let like = Tensor::f_zeros(like.size(), (kind, device)).during("allocating the dummy input")?;
    let noise = gaussian_probes(&like, 1, &mut rng_for(attack.seed, release, 5))?
        .f_get(0)
        .and_then(|s| s.f_mul_scalar(attack.settings.init_scale * attack.sigma))
        .during("drawing the dummy's start")?;
    match centre {
        None => Ok(noise),
        Some(c) => noise.f_add(&c.f_to_kind(kind).and_then(|c| c.f_to_device(device)).during("placing the start")?).during("placing the start"),
    }
}

/// The attack on one release: from `start`, Adam on the dummy input (step size
/// `learning_rate * sigma`, cosine decay) minimising the cosine distance between the dummy's
/// layer-l gradient and `released` (the flat layer-l gradient the attacker saw), with the
/// labels `targets` known. Returns the best iterate (lowest cosine distance) and its distance.
fn invert_release(attack: &Attack, l: usize, released: &Tensor, targets: &Tensor, start: &Tensor) -> Result<(Tensor, f64)> {
    let (layers, loss_fn, sigma, settings) = (attack.layers, attack.loss_fn, attack.sigma, attack.settings);
    if l >= layers.len() {
        return Err(GuardError::Config { setting: "inversion layer", why: format!("layer index {l}, the model has {}", layers.len()) });
    }
    let device = layers.layers()[l].params[0].tensor.device();
    let target = released.f_detach().and_then(|t| t.f_reshape([-1])).and_then(|t| t.f_to_device(device)).during("preparing the released gradient")?;
    let target_norm = to_f64_vec(&target.f_norm().during("norm of the released gradient")?)?[0];
    if !(target_norm > 0.0 && target_norm.is_finite()) {
        return Err(GuardError::Config { setting: "inversion target", why: "the released gradient is zero or non-finite".into() });
    }
    let step_size = settings.learning_rate * if sigma > 0.0 && sigma.is_finite() { sigma } else { 1.0 };
    let mut x = start.f_detach().and_then(|x| x.f_set_requires_grad(true)).during("preparing the dummy input")?;
    let mut m = x.f_zeros_like().during("allocating Adam state")?;
    let mut v = x.f_zeros_like().during("allocating Adam state")?;
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut best = (f64::INFINITY, x.f_detach().during("copying the dummy")?);
    let target_kind = target.f_to_kind(Kind::Double).during("converting the released gradient")?;
    for t in 1..=settings.iterations {
        let Some(g) = layer_gradient(layers, l, loss_fn, &x, targets, true)? else {
            // The loss does not reach this layer from the dummy: nothing to match.
            break;
        };
        let g = g.f_to_kind(Kind::Double).during("converting the dummy's gradient")?;
        let cos = g
            .f_mul(&target_kind)
            .and_then(|p| p.f_sum(Kind::Double))
            .and_then(|p| p.f_div(&g.f_norm()?.f_mul_scalar(target_norm)?.f_add_scalar(1e-30)?))
            .during("forming the cosine similarity")?;
        let dist = cos.f_neg().and_then(|c| c.f_add_scalar(1.0)).during("forming the cosine distance")?;
        let value = to_f64_vec(&dist)?[0];
        if !value.is_finite() {
            break;
        }
        if value < best.0 {
            best = (value, x.f_detach().during("copying the dummy")?);
        }
        let grad = Tensor::f_run_backward(&[&dist], &[&x], false, false).during("differentiating the cosine distance")?.remove(0);
        if !grad.defined() {
            break; // the layer's gradient does not move with the input
        }
        x = tch::no_grad(|| -> std::result::Result<Tensor, tch::TchError> {
            m = m.f_mul_scalar(b1)?.f_add(&grad.f_mul_scalar(1.0 - b1)?)?;
            v = v.f_mul_scalar(b2)?.f_add(&grad.f_square()?.f_mul_scalar(1.0 - b2)?)?;
            let mhat = m.f_div_scalar(1.0 - b1.powi(t as i32))?;
            let vhat = v.f_div_scalar(1.0 - b2.powi(t as i32))?;
            let lr = step_size * 0.5 * (1.0 + (std::f64::consts::PI * (t - 1) as f64 / settings.iterations as f64).cos());
            let update = mhat.f_div(&vhat.f_sqrt()?.f_add_scalar(eps)?)?.f_mul_scalar(lr)?;
            x.f_detach()?.f_sub(&update)?.f_set_requires_grad(true)
        })
        .during("taking an Adam step on the dummy input")?;
    }
    // Score the last iterate too.
    if let Some(g) = layer_gradient(layers, l, loss_fn, &x.f_detach().during("detaching")?, targets, false)? {
        let g = g.f_to_kind(Kind::Double).during("converting")?;
        let gn = to_f64_vec(&g.f_norm().during("norm")?)?[0];
        let dot = to_f64_vec(&g.f_mul(&target_kind).and_then(|p| p.f_sum(Kind::Double)).during("dot")?)?[0];
        let value = 1.0 - dot / (gn * target_norm + 1e-30);
        if value.is_finite() && value < best.0 {
            best = (value, x.f_detach().during("copying the dummy")?);
        }
    }
    Ok((best.1, best.0))
}

/// The attacker of one estimate: the model it differentiates, its settings, the data's
/// per-dimension spread `sigma` (scales the start and the step size) and the seed of its starts.
struct Attack<'a> {
    layers: &'a LayerMap,
    loss_fn: &'a dyn LossFn,
    settings: &'a InversionSettings,
    sigma: f64,
    seed: u64,
}

/// Squared distances between each true sample and each reconstruction of one release, and the
/// assignment that pairs them: within each label, greedily the closest pair first (the batch's
/// order is unknown to the attacker; the labels are known).
fn matched_errors(x: &[f64], xhat: &[f64], labels: &[i64], d: usize) -> Vec<f64> {
    let n = labels.len();
    let dist = |i: usize, j: usize| -> f64 { x[i * d..(i + 1) * d].iter().zip(&xhat[j * d..(j + 1) * d]).map(|(a, b)| (a - b) * (a - b)).sum() };
    let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
    for i in 0..n {
        for j in 0..n {
            if labels[i] == labels[j] {
                pairs.push((dist(i, j), i, j));
            }
        }
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut used_i = vec![false; n];
    let mut used_j = vec![false; n];
    let mut errors = vec![0.0; n];
    for (e, i, j) in pairs {
        if !used_i[i] && !used_j[j] {
            used_i[i] = true;
            used_j[j] = true;
            errors[i] = e;
        }
    }
    errors
}

/// M4 of every layer on `plan.releases` releases of `plan.batch_size` consecutive samples from
/// the start of `inputs`. The mean input x_bar and the PSNR range are taken over all of
/// `inputs`. `transform` (a defence) is applied to each layer's released gradient before the
/// attack; a withheld layer is absent.
fn estimate_original_information(
    ins: &Inspection,
    plan: &InversionPlan,
    settings: &InversionSettings,
    transform: Option<&ReleaseTransform>,
) -> Result<Vec<Metric<Inversion>>> {
    settings.validate()?;
    let n = ins.batch().validate()?;
    let (layers, loss_fn, seed) = (ins.layers(), ins.loss(), ins.seed());
    let (inputs, targets) = (ins.batch().inputs(), ins.batch().targets());
    if plan.batch_size == 0 || plan.releases == 0 {
        return Err(GuardError::Config { setting: "inversion plan", why: "batch size and releases must be at least 1".into() });
    }
    if !inputs.f_is_floating_point().during("reading the inputs' dtype")? {
        let reason = format!("M4 reconstructs continuous inputs; these are {:?} (token ids or categorical codes)", inputs.kind());
        return Ok((0..layers.len()).map(|_| Metric::absent(reason.clone())).collect());
    }
    let needed = plan.batch_size * plan.releases;
    if needed > n {
        let reason = format!("insufficient samples: {needed} needed ({} releases of {}), {n} given", plan.releases, plan.batch_size);
        return Ok((0..layers.len()).map(|_| Metric::absent(reason.clone())).collect());
    }
    let all = to_f64_vec(inputs)?;
    let d = all.len() / n;
    if d == 0 {
        return Err(GuardError::Config { setting: "inversion inputs", why: format!("samples of shape {:?} hold no values", &inputs.size()[1..]) });
    }
    if let Some(bad) = all.iter().position(|v| !v.is_finite()) {
        return Err(GuardError::Config { setting: "inversion inputs", why: format!("non-finite input value in sample {}", bad / d) });
    }
    let mut mean = vec![0.0; d];
    for row in all.chunks(d) {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += v / n as f64);
    }
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = if hi > lo { hi - lo } else { 1.0 };
    let sigma = (all.chunks(d).map(|row| row.iter().zip(&mean).map(|(a, b)| (a - b) * (a - b)).sum::<f64>()).sum::<f64>() / (n * d) as f64).sqrt();
    let mut sample_shape = inputs.size();
    sample_shape[0] = 1;
    let mean_tensor = Tensor::f_from_slice(&mean).and_then(|m| m.f_reshape(sample_shape.as_slice())).during("forming the mean input")?;
    let labels = to_f64_vec(targets)?.into_iter().map(|v| v as i64).collect::<Vec<_>>();
    let labels_are_classes = matches!(targets.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8);

    struct Acc {
        err: f64,
        base: f64,
        cos: f64,
        count: usize,
        absent: Option<String>,
    }
    let mut acc: Vec<Acc> = (0..layers.len()).map(|_| Acc { err: 0.0, base: 0.0, cos: 0.0, count: 0, absent: None }).collect();
    for r in 0..plan.releases {
        let start = (r * plan.batch_size) as i64;
        let bs = plan.batch_size as i64;
        let x = inputs.f_narrow(0, start, bs).and_then(|x| x.f_detach()).during("selecting a release")?;
        let y = targets.f_narrow(0, start, bs).during("selecting a release")?;
        let x_host = &all[r * plan.batch_size * d..(r + 1) * plan.batch_size * d];
        let y_host: Vec<i64> = if labels_are_classes { labels[r * plan.batch_size..(r + 1) * plan.batch_size].to_vec() } else { vec![0; plan.batch_size] };
        for l in 0..layers.len() {
            if acc[l].absent.is_some() {
                continue;
            }
            let Some(g) = layer_gradient(layers, l, loss_fn, &x, &y, false)? else {
                acc[l].absent = Some("layer not used by the loss (gradient undefined)".into());
                continue;
            };
            let released = match transform {
                None => Some(g),
                Some(t) => t(l, &g, r)?,
            };
            let Some(released) = released else {
                acc[l].absent = Some("layer withheld: no released gradient to invert".into());
                continue;
            };
            let norm = to_f64_vec(&released.f_norm().during("norm of the release")?)?[0];
            if !(norm > 0.0) {
                acc[l].absent = Some("released gradient is zero: nothing to match".into());
                continue;
            }
            let centre = settings.start_from_mean.then_some(&mean_tensor);
            let attack = Attack { layers, loss_fn, settings, sigma, seed };
            let start = seeded_start(&attack, &x, centre, r as u64)?;
            let (xhat, cos) = invert_release(&attack, l, &released, &y, &start)?;
            let xhat = to_f64_vec(&xhat)?;
            let errors = matched_errors(x_host, &xhat, &y_host, d);
            acc[l].err += errors.iter().sum::<f64>();
            acc[l].base += x_host.chunks(d).map(|row| row.iter().zip(&mean).map(|(a, b)| (a - b) * (a - b)).sum::<f64>()).sum::<f64>();
            acc[l].cos += cos;
            acc[l].count += 1;
        }
    }
    Ok(layers
        .layers()
        .iter()
        .zip(acc)
        .map(|(layer, a)| {
            if let Some(reason) = a.absent {
                return Metric::absent(reason);
            }
            let samples = a.count * plan.batch_size;
            let mse = a.err / (samples * d) as f64;
            let baseline = a.base / (samples * d) as f64;
            let bits = if mse > 0.0 { (0.5 * (baseline / mse).log2()).max(0.0) } else { f64::INFINITY };
            Metric::Measured(Inversion {
                usable_original_bits_per_dim: bits,
                psnr: 10.0 * (range * range / mse).log10(),
                mse,
                baseline_mse: baseline,
                final_cosine_distance: (a.cos / a.count as f64).max(0.0),
                samples,
                releases: a.count,
                batch_size: plan.batch_size,
                iterations: settings.iterations,
                learning_rate: settings.learning_rate,
                seed,
                params: layer.numel(),
            })
        })
        .collect())
}

impl Inspection<'_> {
    /// M4 of every layer: the layer-restricted inversion attack on `plan.releases` releases of
    /// the batch, each released gradient passed through `transform` (a defence) first.
    pub fn original_information(
        &self,
        plan: &InversionPlan,
        settings: &InversionSettings,
        transform: Option<&ReleaseTransform>,
    ) -> Result<Vec<Metric<Inversion>>> {
        self.observing(|| estimate_original_information(self, plan, settings, transform))
    }
}
