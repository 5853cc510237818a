//! M1, sensitivity of the released gradient to the private inputs (METRICS.md, M1).
//!
//! The estimator forms one Jacobian-vector product of the whole released gradient per probe,
//! which serves every layer at once: S_l^2 ~= (1/(nK)) sum_k ||(J v_k)_l||^2. Per-layer sums
//! stay on the device and are read back once per estimate.
//!
//! Where the samples do not interact, a probe may run on a random sub-batch of m samples
//! instead ([`SensitivitySettings::probe_samples`], `sub_batch.rs`).
//!
//! x is the inputs, or for discrete inputs the embeddings of a declared split (METRICS.md, M1,
//! discrete inputs): there the loss is evaluated at `embed(tokens) + delta` and every
//! derivative is taken with respect to delta at 0 ([`Point`]).
use super::graph::{used_layers, GradientGraph, Point, StepGraph};
use super::inspection::Inspection;
use super::layers::LayerMap;
use super::loss::{parameter_grads, LossFn};
use super::rng::RngSnapshot;
use super::sub_batch::{gradients_with_input, samples_per_probe, SubBatches};
use super::tensors::{gaussian_probes, rng_for, sum_sq, to_f64_vec};
use crate::error::{GuardError, Result, TorchContext};
use crate::report::{JvpMethod, Metric, Representation, Sensitivity};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How M1 is estimated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SensitivitySettings {
    /// Probes K (at least 2, for a standard error).
    pub probes: usize,
    /// How each probe's JVP is formed.
    pub method: JvpMethod,
    /// Enumerate basis vectors instead of probing (small models and tests).
    pub exact: bool,
    /// m, the samples each probe runs on (METRICS.md, M1, sub-batch probes). None (the
    /// default) or m >= n: every probe runs on the whole batch. Some(m) with m < n: each probe
    /// runs on a fresh random sub-batch of m samples, at about m/n of a full-batch probe's
    /// cost, unless the model's samples interact (batch norm in training mode), which keeps
    /// the full batch (`measure/sub_batch.rs`). The m used is reported with every number
    /// (`probe_samples`). Ignored in exact mode. At least 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_samples: Option<usize>,
}

impl Default for SensitivitySettings {
    fn default() -> Self {
        Self { probes: 8, method: JvpMethod::DoubleBackward, exact: false, probe_samples: None }
    }
}

impl SensitivitySettings {
    /// Rejects settings that cannot give a standard error (fewer than 2 probes outside exact mode).
    pub fn validate(&self) -> Result<()> {
        if !self.exact && self.probes < 2 {
            return Err(GuardError::Config {
                setting: "sensitivity.probes",
                why: format!("needs at least 2 probes for a standard error, got {}", self.probes),
            });
        }
        if self.probe_samples == Some(0) {
            return Err(GuardError::Config { setting: "sensitivity.probe_samples", why: "a probe needs at least 1 sample, got 0".into() });
        }
        Ok(())
    }

    /// These settings with central differences, which re-run the forward: what M1 falls back to
    /// where the autograd record does not connect a layer's gradient to the inputs (exact mode
    /// differentiates the same record, so probes replace it).
    pub fn by_differences(&self) -> Self {
        Self { method: JvpMethod::CentralDifference, exact: false, ..self.clone() }
    }
}

/// The stream of the seeded generator the probes v are drawn from ([`rng_for`]'s purpose).
pub(super) const PROBE_STREAM: u64 = 1;

/// Squared Frobenius norms of the Jacobian blocks: `sq[k][l]` for probe (or basis block) k,
/// scaled so that `sq[k][l] / n` estimates S_l^2 whatever the samples per probe.
pub(super) struct JacobianSquares {
    pub(super) per_probe: Vec<Vec<f64>>,
    pub(super) grad_norms: Vec<f64>,
    pub(super) used: Vec<bool>,
    /// m: samples per probe (n for the full batch and exact mode).
    pub(super) probe_samples: usize,
    /// Per layer: cut off from the inputs' autograd record ([`cut_layers`]).
    pub(super) cut: Vec<bool>,
}

/// Estimates M1 for every layer on one batch; the inspection's seed and step pick the probes.
/// Integer inputs without a split give every layer's M1 absent with the reason.
fn estimate_sensitivity(ins: &Inspection, settings: &SensitivitySettings) -> Result<Vec<Metric<Sensitivity>>> {
    settings.validate()?;
    let n = ins.batch().validate()?;
    let point = match Point::of(ins, n) {
        Ok(point) => point,
        Err(e @ GuardError::DiscreteInputs { .. }) => return Ok((0..ins.layers().len()).map(|_| Metric::absent(e.to_string())).collect()),
        Err(e) => return Err(e),
    };
    let squares = if settings.exact { exact_squares(ins, &point, n)? } else { probe_squares(ins, &point, settings, n)? };
    if !squares.cut.contains(&true) {
        return Ok(summarise(ins, &squares, n, settings, point.representation));
    }
    let settings = settings.by_differences();
    let again = JacobianSquares { cut: squares.cut, ..probe_squares(ins, &point, &settings, n)? };
    Ok(summarise(ins, &again, n, &settings, point.representation))
}

/// Per layer: a parameter whose gradient is nonzero but which no JVP of the double backward
/// reached (`reached`, per parameter in `flat_params` order). Whether the record connects a
/// parameter to the inputs does not depend on the direction, so any JVP tells. Such a layer's
/// gradient still moves with the inputs (a head on a no_grad backbone gives its features
/// back), and the double backward would measure 0 there. Not found: a parameter reached along
/// one path from the inputs and cut on another (a once-differentiable function on one branch
/// only); its M1 lacks that path's part.
fn cut_layers(layers: &LayerMap, grads: &[Tensor], reached: &[bool]) -> Result<Vec<bool>> {
    let mut cut = vec![false; layers.len()];
    if grads.iter().zip(reached).all(|(g, r)| *r || !g.defined()) {
        return Ok(cut);
    }
    let norms = to_f64_vec(&layers.param_norms(grads)?)?;
    let (_, owner) = layers.flat_params();
    for (((g, r), &l), norm) in grads.iter().zip(reached).zip(&owner).zip(norms) {
        cut[l] |= g.defined() && !r && norm > 0.0;
    }
    Ok(cut)
}

/// M1 of one layer from its per-probe estimates of S_l^2 (kept JVPs).
fn summarise_layer(per: &[f64], norm: f64, params: usize, samples: &JvpSamples, graph_cut: bool) -> Metric<Sensitivity> {
    let (s2, se2) = mean_and_standard_error(per);
    if !s2.is_finite() {
        return Metric::absent("non-finite Jacobian estimate (the loss or its gradient overflowed)");
    }
    let s = s2.max(0.0).sqrt();
    Metric::Measured(Sensitivity {
        sensitivity: s,
        sensitivity_se: if s > 0.0 { se2 / (2.0 * s) } else { 0.0 },
        sensitivity_rms: s / (params as f64).sqrt(),
        relative_sensitivity: (norm > 0.0 && norm.is_finite()).then(|| s / norm),
        step: samples.step,
        n: samples.n,
        probes: Some(samples.probes),
        exact: false,
        method: samples.method,
        seed: samples.seed,
        params,
        representation: samples.representation,
        probe_samples: Some(samples.probe_samples),
        graph_cut,
    })
}

fn summarise(ins: &Inspection, sq: &JacobianSquares, n: usize, settings: &SensitivitySettings, representation: Representation) -> Vec<Metric<Sensitivity>> {
    let (seed, step) = (ins.seed(), ins.step());
    ins.layers()
        .layers()
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            if !sq.used[l] {
                return Metric::absent("layer not used by the loss (gradient undefined)");
            }
            let params = layer.numel();
            let per: Vec<f64> = sq.per_probe.iter().map(|row| row[l] / n as f64).collect();
            let (s2, se2) = if settings.exact {
                (per.iter().sum::<f64>(), 0.0)
            } else {
                mean_and_standard_error(&per)
            };
            if !s2.is_finite() {
                return Metric::absent("non-finite Jacobian estimate (the loss or its gradient overflowed)");
            }
            let s = s2.max(0.0).sqrt();
            // Delta method: se(S) = se(S^2) / (2 S).
            let se = if s > 0.0 { se2 / (2.0 * s) } else { 0.0 };
            let norm = sq.grad_norms[l];
            Metric::Measured(Sensitivity {
                sensitivity: s,
                sensitivity_se: se,
                sensitivity_rms: s / (params as f64).sqrt(),
                relative_sensitivity: (norm > 0.0 && norm.is_finite()).then(|| s / norm),
                step,
                n,
                probes: (!settings.exact).then_some(settings.probes),
                exact: settings.exact,
                method: settings.method,
                seed,
                params,
                representation,
                probe_samples: Some(sq.probe_samples),
                graph_cut: sq.cut[l],
            })
        })
        .collect()
}

/// Mean of the values and the standard error of that mean (sample standard deviation / sqrt K).
pub fn mean_and_standard_error(values: &[f64]) -> (f64, f64) {
    let k = values.len() as f64;
    let mean = values.iter().sum::<f64>() / k;
    if values.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (k - 1.0);
    (mean, (var / k).sqrt())
}

/// Reads per-probe rows of per-parameter norms back at once, as per-layer sums of squares.
fn read_rows(layers: &LayerMap, rows: Vec<Tensor>) -> Result<Vec<Vec<f64>>> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let per_row = rows[0].numel();
    let all = to_f64_vec(&Tensor::f_stack(&rows, 0).during("stacking probe results")?)?;
    Ok(all.chunks(per_row).map(|c| layers.layer_square_sums(c)).collect())
}

/// What a probe pass leaves besides the JVPs: which layers the loss reaches, ||G_l||, and the
/// released gradient per parameter (detached), all of the whole batch; and the samples per probe.
struct ProbeContext {
    used: Vec<bool>,
    /// Per parameter: whether any probe's JVP was defined.
    reached: Vec<bool>,
    grad_norms: Vec<f64>,
    grads: Vec<Tensor>,
    probe_samples: usize,
}

impl ProbeContext {
    /// The whole batch's part of `graph` (whose gradients are detached); the rest of the graph
    /// is freed.
    fn of_graph(graph: GradientGraph, probe_samples: usize) -> Self {
        Self { used: graph.used, reached: Vec::new(), grad_norms: graph.grad_norms, grads: graph.grads, probe_samples }
    }

    /// The context of the whole batch's gradients `grads` (detached, in `flat_params` order).
    fn of_grads(layers: &LayerMap, grads: Vec<Tensor>, probe_samples: usize) -> Result<Self> {
        let (_, owner) = layers.flat_params();
        let used = used_layers(&grads, &owner, layers.len());
        let grad_norms = layers.layer_square_sums(&to_f64_vec(&layers.param_norms(&grads)?)?).into_iter().map(f64::sqrt).collect();
        Ok(Self { used, reached: Vec::new(), grad_norms, grads, probe_samples })
    }

    /// Per layer: cut off from the inputs' autograd record ([`cut_layers`]).
    fn cut(&self, layers: &LayerMap) -> Result<Vec<bool>> {
        cut_layers(layers, &self.grads, &self.reached)
    }
}

/// Gradients without their graph (undefined ones kept).
fn detached(grads: &[Tensor]) -> Result<Vec<Tensor>> {
    grads.iter().map(|g| if g.defined() { g.f_detach() } else { Ok(Tensor::new()) }).collect::<std::result::Result<Vec<_>, _>>().during("detaching gradients")
}

/// Runs K probes and hands each probe's JVP, one tensor per parameter in `flat_params` order
/// (undefined where the parameter's gradient does not move with the inputs), to `sink`. A
/// sub-batch probe's JVP comes scaled by sqrt(m/n), so that every probe's squared norm over n
/// estimates S_l^2 (`sub_batch.rs`).
fn probe_jvps(ins: &Inspection, point: &Point, settings: &SensitivitySettings, n: usize, sink: &mut dyn FnMut(Vec<Tensor>) -> Result<()>) -> Result<ProbeContext> {
    let samples = (n, samples_per_probe(ins, settings, n));
    let mut reached = vec![false; ins.layers().flat_params().0.len()];
    let mut tracked = |jv: Vec<Tensor>| {
        for (r, t) in reached.iter_mut().zip(&jv) {
            *r |= t.defined();
        }
        sink(jv)
    };
    let mut ctx = match settings.method {
        JvpMethod::DoubleBackward => double_backward_jvps(ins, point, settings.probes, samples, &mut tracked)?,
        JvpMethod::CentralDifference => central_difference_jvps(ins, point, settings.probes, samples, &mut tracked)?,
    };
    ctx.reached = reached;
    Ok(ctx)
}

/// The double-backward route: the whole batch's graph gives G, ||G_l|| and every probe's JVP.
/// On sub-batches each probe's own sub-batch graph gives its JVP, and the whole batch gives only
/// G and dL/dx (for the coupling check): from the training step's graph when there is one, else
/// from one backward pass without a graph, cheaper than the graph full-batch probes
/// differentiate (which a detected coupling then builds as well).
fn double_backward_jvps(ins: &Inspection, point: &Point, probes: usize, (n, m): (usize, usize), sink: &mut dyn FnMut(Vec<Tensor>) -> Result<()>) -> Result<ProbeContext> {
    let step_graph = ins.step_graph().and_then(StepGraph::take);
    if m < n {
        let (grads, input_grad) = match &step_graph {
            Some(graph) => (detached(&graph.grads)?, graph.input_grad().map(Tensor::f_detach).transpose().during("detaching dL/dx")?),
            None => gradients_with_input(point, ins.batch().targets(), &ins.layers().flat_params().0, ins.step(), true)?,
        };
        let mut subs = SubBatches::new(ins, n, m);
        if let Some(first) = subs.first_graph(ins, input_grad.as_ref())? {
            // The whole batch's graph goes before the sub-batches' are built.
            drop(step_graph);
            let ctx = ProbeContext::of_grads(ins.layers(), grads, m)?;
            subs.double_backward(ins, first, probes, sink)?;
            return Ok(ctx);
        }
    }
    let mut graph = match step_graph {
        Some(graph) => graph,
        None => GradientGraph::build(ins, point)?,
    };
    // G's own graph is needed only by exact mode: detached here, it is freed.
    graph.grads = detached(&graph.grads)?;
    let v = gaussian_probes(&graph.x, probes, &mut rng_for(ins.seed(), ins.step(), PROBE_STREAM))?;
    for k in 0..probes as i64 {
        sink(graph.jvp(&v.f_get(k).during("selecting a probe")?)?)?;
    }
    Ok(ProbeContext::of_graph(graph, n))
}

/// The central-difference route: (G(X + e v) - G(X - e v)) / 2e per probe, on the whole batch
/// or on each probe's sub-batch; G itself once, on the whole batch.
fn central_difference_jvps(ins: &Inspection, point: &Point, probes: usize, (n, m): (usize, usize), sink: &mut dyn FnMut(Vec<Tensor>) -> Result<()>) -> Result<ProbeContext> {
    let (layers, step, targets) = (ins.layers(), ins.step(), ins.batch().targets());
    let params = layers.flat_params().0;
    // Sub-batches are checked against the whole batch's dL/dx: the same backward gives it.
    let (grads, input_grad) = if m < n {
        gradients_with_input(point, targets, &params, step, true)?
    } else {
        (parameter_grads(&point.loss, &point.at, targets, &params, step, true)?, None)
    };
    let eps = difference_step(point)?;
    if m < n {
        let mut subs = SubBatches::new(ins, n, m);
        if let Some(first) = subs.first_batch(ins, input_grad.as_ref(), &params)? {
            subs.central_difference(ins, first, eps, probes, &params, sink)?;
            return ProbeContext::of_grads(layers, grads, m);
        }
    }
    let v = gaussian_probes(&point.at, probes, &mut rng_for(ins.seed(), step, PROBE_STREAM))?;
    for k in 0..probes as i64 {
        let dv = v.f_get(k).and_then(|vk| vk.f_mul_scalar(eps)).during("scaling a probe")?;
        sink(gradient_difference(&point.loss, &point.at, &dv, targets, &params, step, eps)?)?;
    }
    ProbeContext::of_grads(layers, grads, n)
}

/// e = 1e-3 rms(X) in f32 (1e-6 in f64), X the whole batch's values (METRICS.md, M1).
fn difference_step(point: &Point) -> Result<f64> {
    let rms = to_f64_vec(&point.values.f_square().and_then(|s| s.f_mean(Kind::Double)).during("rms of inputs")?)?[0].sqrt();
    let rel = if point.at.kind() == Kind::Double { 1e-6 } else { 1e-3 };
    Ok(rel * if rms > 0.0 { rms } else { 1.0 })
}

/// (G(x + dv) - G(x - dv)) / 2 eps per parameter, G the loss's gradient on `targets`
/// (undefined where either side is). Both sides start from the same state of the random
/// stream, which is put back after them: a model with dropout is differenced under one set of
/// masks, not two.
pub(super) fn gradient_difference(loss: &dyn LossFn, x: &Tensor, dv: &Tensor, targets: &Tensor, params: &[Tensor], step: u64, eps: f64) -> Result<Vec<Tensor>> {
    let random = RngSnapshot::take(x.device())?;
    let plus = parameter_grads(loss, &x.f_add(dv).during("perturbing inputs")?, targets, params, step, false)?;
    random.restore()?;
    let minus = parameter_grads(loss, &x.f_sub(dv).during("perturbing inputs")?, targets, params, step, false)?;
    random.restore()?;
    plus.iter()
        .zip(&minus)
        .map(|(p, m)| {
            if p.defined() && m.defined() {
                p.f_sub(m).and_then(|d| d.f_div_scalar(2.0 * eps)).during("differencing gradients")
            } else {
                Ok(Tensor::new())
            }
        })
        .collect()
}

/// The probe estimator: per-layer squared JVP norms, summed on the device, read once.
fn probe_squares(ins: &Inspection, point: &Point, settings: &SensitivitySettings, n: usize) -> Result<JacobianSquares> {
    let layers = ins.layers();
    let mut rows = Vec::with_capacity(settings.probes);
    let ctx = probe_jvps(ins, point, settings, n, &mut |jv| {
        rows.push(layers.param_norms(&jv)?);
        Ok(())
    })?;
    let cut = ctx.cut(layers)?;
    Ok(JacobianSquares { per_probe: read_rows(layers, rows)?, grad_norms: ctx.grad_norms, used: ctx.used, probe_samples: ctx.probe_samples, cut })
}

/// One layer's released gradient and its K probe JVPs, each flattened over the layer's
/// parameters: what the closed loop needs to measure M1 on a transformed release.
pub struct LayerJvps {
    /// The layer's released gradient G_l, flattened, in the model's dtype.
    pub grad: Tensor,
    /// J_l v_k for each probe k, flattened, in the model's dtype (sums of squares over them
    /// are taken in f64): K x P_l numbers kept on the model's device.
    pub jvps: Vec<Tensor>,
}

/// JVPs kept per layer (None for a layer the loss does not reach), for batch size `n`.
pub struct JvpSamples {
    /// Samples in the batch.
    pub n: usize,
    /// Probes K.
    pub probes: usize,
    /// m: samples each probe ran on (n for the full batch). Sub-batch JVPs are kept scaled by
    /// sqrt(m/n), so that ||J v_k||^2 / n estimates S_l^2 for every m.
    pub probe_samples: usize,
    /// How the JVPs were formed.
    pub method: JvpMethod,
    /// Per layer: cut off from the inputs' autograd record, so measured by central differences
    /// (`Sensitivity::graph_cut`).
    pub graph_cut: Vec<bool>,
    /// One entry per layer, None where the loss does not reach the layer.
    pub layers: Vec<Option<LayerJvps>>,
    /// The seed and step that picked the probes.
    pub seed: u64,
    /// See `seed`.
    pub step: u64,
    /// What the JVPs were taken with respect to: the inputs or the embeddings.
    pub representation: Representation,
    /// D: scalars per sample in that representation.
    pub input_dims: usize,
    /// E||x - x_bar||^2 / D over the batch (population variance per dimension, METRICS.md M5's
    /// prior scale measured on the batch).
    pub batch_variance: f64,
}

impl JvpSamples {
    /// M1 of every layer's raw release from the kept JVPs: the numbers the streaming
    /// estimator gives for the same probes.
    pub fn sensitivity(&self, layers: &LayerMap) -> Result<Vec<Metric<Sensitivity>>> {
        // Every layer's K probe norms and gradient norm, read back in one transfer.
        let mut squares = Vec::new();
        for kept in self.layers.iter().flatten() {
            for jv in &kept.jvps {
                squares.push(sum_sq(jv)?);
            }
            squares.push(sum_sq(&kept.grad)?);
        }
        let values = if squares.is_empty() { vec![] } else { to_f64_vec(&Tensor::f_stack(&squares, 0).during("stacking probe norms")?)? };
        let mut values = values.into_iter();
        let mut out = Vec::new();
        for ((layer, kept), &graph_cut) in layers.layers().iter().zip(&self.layers).zip(&self.graph_cut) {
            let Some(kept) = kept else {
                out.push(Metric::absent("layer not used by the loss (gradient undefined)"));
                continue;
            };
            let per: Vec<f64> = values.by_ref().take(kept.jvps.len()).map(|v| v / self.n as f64).collect();
            let norm = values.next().unwrap_or(0.0).sqrt();
            out.push(summarise_layer(&per, norm, layer.numel(), self, graph_cut));
        }
        Ok(out)
    }
}

/// Runs the probe estimator and keeps every layer's JVPs (memory K x P in the model's dtype, on
/// its device) instead of only their norms, so that the sensitivity of any linearised
/// transformation of the release can be measured afterwards without another backward pass. [`GuardError::DiscreteInputs`] for
/// integer inputs without an embedding split.
fn jvp_samples(ins: &Inspection, settings: &SensitivitySettings) -> Result<JvpSamples> {
    settings.validate()?;
    let n = ins.batch().validate()?;
    let point = Point::of(ins, n)?;
    let layers = ins.layers();
    let (params, owner) = layers.flat_params();
    let flat_layer = |per_param: &[Tensor]| -> Result<Vec<Tensor>> {
        let mut out: Vec<Vec<Tensor>> = (0..layers.len()).map(|_| Vec::new()).collect();
        for ((t, p), &l) in per_param.iter().zip(&params).zip(&owner) {
            let flat = if t.defined() { t.f_reshape([-1]) } else { p.f_zeros_like().and_then(|z| z.f_reshape([-1])) };
            out[l].push(flat.during("flattening a JVP")?);
        }
        out.iter().map(|parts| Tensor::f_cat(parts, 0).during("joining a layer's JVP")).collect()
    };
    let kept = |settings: &SensitivitySettings| -> Result<(ProbeContext, Vec<Vec<Tensor>>)> {
        let mut per_layer: Vec<Vec<Tensor>> = (0..layers.len()).map(|_| Vec::new()).collect();
        let ctx = probe_jvps(ins, &point, settings, n, &mut |jv| {
            for (l, t) in flat_layer(&jv)?.into_iter().enumerate() {
                per_layer[l].push(t);
            }
            Ok(())
        })?;
        Ok((ctx, per_layer))
    };
    let (mut ctx, mut per_layer) = kept(settings)?;
    let graph_cut = ctx.cut(layers)?;
    let settings = if graph_cut.contains(&true) { settings.by_differences() } else { settings.clone() };
    if graph_cut.contains(&true) {
        (ctx, per_layer) = kept(&settings)?;
    }
    let grads = flat_layer(&ctx.grads)?;
    Ok(JvpSamples {
        n,
        probes: settings.probes,
        probe_samples: ctx.probe_samples,
        method: settings.method,
        graph_cut,
        layers: grads
            .into_iter()
            .zip(per_layer)
            .zip(ctx.used)
            .map(|((grad, jvps), used)| used.then_some(LayerJvps { grad, jvps }))
            .collect(),
        seed: ins.seed(),
        step: ins.step(),
        representation: point.representation,
        input_dims: input_dims(&point.values, n)?,
        batch_variance: per_dimension_variance(&point.values, n)?,
    })
}

/// D: scalars per sample of an n-sample batch.
fn input_dims(values: &Tensor, n: usize) -> Result<usize> {
    let numel = values.numel();
    Ok(if n == 0 { 0 } else { numel / n })
}

/// E||x - x_bar||^2 / D over the n samples of `values` (divide by n: a population variance).
pub fn per_dimension_variance(values: &Tensor, n: usize) -> Result<f64> {
    let flat = values.f_reshape([n as i64, -1]).and_then(|v| v.f_to_kind(Kind::Double)).during("flattening the inputs")?;
    let centred = flat.f_mean_dim(0, true, Kind::Double).and_then(|m| flat.f_sub(&m)).during("centring the inputs")?;
    centred.f_square().and_then(|sq| sq.f_mean(Kind::Double)).and_then(|m| m.f_double_value(&[])).during("the inputs' variance")
}

/// Exact mode: enumerate the basis of the smaller side. Input basis: one JVP per input scalar
/// (n*D of them); parameter basis: one VJP per parameter scalar (P of them). Either way the
/// sum over the basis of the squared blocks is ||J_l||_F^2 = sum_i ||J_{l,i}||_F^2, returned as
/// a single row.
fn exact_squares(ins: &Inspection, point: &Point, n: usize) -> Result<JacobianSquares> {
    let layers = ins.layers();
    let l_count = layers.len();
    let graph = ins.graph_of(point)?;
    let x = &graph.x;
    let mut rows = Vec::new();
    // Per parameter: whether any basis JVP (or VJP) reached it through the record.
    let mut reached = vec![false; graph.grads.len()];
    if x.numel() <= layers.numel() {
        for j in 0..x.numel() as i64 {
            let e = x.f_zeros_like().and_then(|z| z.f_reshape([-1])).during("forming a basis vector")?;
            let _ = e.f_narrow(0, j, 1).and_then(|mut one| one.f_fill_(1.0)).during("forming a basis vector")?;
            let jvp = graph.jvp(&e.f_reshape(x.size()).during("forming a basis vector")?)?;
            for (r, t) in reached.iter_mut().zip(&jvp) {
                *r |= t.defined();
            }
            rows.push(layers.param_norms(&jvp)?);
        }
    } else {
        // One VJP per parameter scalar: its squared norm belongs to that parameter's layer.
        let mut owners = Vec::new();
        let mut squares = Vec::new();
        for ((g, &l), r) in graph.grads.iter().zip(&graph.owner).zip(reached.iter_mut()) {
            if !g.defined() || !g.requires_grad() {
                continue;
            }
            let flat = g.f_reshape([-1]).during("flattening a gradient")?;
            for q in 0..flat.numel() as i64 {
                let t = flat.f_get(q).during("selecting a parameter coordinate")?;
                let row = Tensor::f_run_backward(&[&t], &[x], true, false).during("computing a basis VJP")?.remove(0);
                if row.defined() {
                    *r = true;
                    squares.push(sum_sq(&row)?);
                    owners.push(l);
                }
            }
        }
        let mut total = vec![0.0; l_count];
        if !squares.is_empty() {
            let values = to_f64_vec(&Tensor::f_stack(&squares, 0).during("stacking basis results")?)?;
            for (v, l) in values.into_iter().zip(owners) {
                total[l] += v;
            }
        }
        let cut = cut_layers(layers, &graph.grads, &reached)?;
        return Ok(graph.squares(vec![total], n, cut));
    }
    let mut total = vec![0.0; l_count];
    for row in read_rows(layers, rows)? {
        for (acc, v) in total.iter_mut().zip(row) {
            *acc += v;
        }
    }
    let cut = cut_layers(layers, &graph.grads, &reached)?;
    Ok(graph.squares(vec![total], n, cut))
}

impl<'a> Inspection<'a> {
    /// The graph of the loss at `point`: the step's own ([`Inspection::with_graph`]) the first
    /// time it is asked for, else built here.
    fn graph_of(&self, point: &Point<'a>) -> Result<GradientGraph> {
        match self.step_graph().and_then(|g| g.take()) {
            Some(graph) => Ok(graph),
            None => GradientGraph::build(self, point),
        }
    }

    /// M1 of every layer.
    pub fn sensitivity(&self, settings: &SensitivitySettings) -> Result<Vec<Metric<Sensitivity>>> {
        self.observing(|| estimate_sensitivity(self, settings))
    }

    /// The probe JVPs of every layer, kept so that M1 of any defended release can be measured
    /// afterwards ([`JvpSamples::release_sensitivity`]) without another backward pass.
    pub fn jvp_samples(&self, settings: &SensitivitySettings) -> Result<JvpSamples> {
        self.observing(|| jvp_samples(self, settings))
    }
}
