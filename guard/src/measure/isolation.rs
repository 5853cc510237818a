//! M6, sample isolation (METRICS.md, M6): the units of a layer whose gradient comes from one
//! sample alone, and the share of the batch they expose.
//!
//! # Units
//! Unit u of layer l is index u of the leading dimension of every parameter of the layer: a
//! row of a linear weight with its bias entry, an output channel of a convolution with its
//! bias entry. The same rule gives the other layers their units:
//! - an embedding's rows: one unit per token id (a token that one sample alone uses gives that
//!   sample's tokens back: which rows moved);
//! - a layer norm's or batch norm's weight and bias: one unit per feature or channel;
//! - a recurrent layer's weights and biases (tch's `weight_ih_l0`, `weight_hh_l0`, `bias_*`): one
//!   unit per gate row.
//!
//! A layer whose parameters do not share a leading size (a transposed convolution with a bias:
//! its weight leads with the input channels), or that holds a 0-d parameter, has no units: its
//! M6 is absent with that reason. A transposed convolution without a bias is grouped by its
//! input channels, which the rule cannot tell from output channels.
//!
//! # Per-sample terms
//! g_{u,i} is unit u's part of the gradient of sample i's own term l_i of the batch loss
//! L = (1/n) sum_i l_i, so that G_u = (1/n) sum_i g_{u,i} exactly. The guard's loss is a closure
//! that returns the scalar L; the terms come by one of two routes ([`TermSource`]):
//! - **Batches of one** (tried first: n passes of one sample, about the cost of two passes of
//!   the batch): the gradient of the loss on sample i alone, which is l_i's gradient when the
//!   samples do not interact. Checked against the batch's own gradient: (1/n) sum_i g_i must
//!   equal it (relative error at most 1e-8 in f64, 1e-4 in f32, 1e-2 below, against the larger
//!   of ||G_l|| and the per-sample gradients' RMS norm). A model that couples its samples (batch
//!   norm in training mode normalises a lone sample by its own statistics), whose forward pass
//!   is not repeatable (dropout draws another mask) or that cannot run on one sample fails the
//!   check and goes to the batch graph; its per-sample gradients are never used.
//! - **Batch graph** (exact whatever the model does across samples; n backward passes of the
//!   whole batch, so n times the cost of one step's backward): one forward pass of the whole
//!   batch. The loss's last operation T -> L must reduce one row per sample: a mean or sum
//!   (`losses.mean()` of a per-sample vector, `MeanBackward0`), or a fused loss whose value is
//!   the mean of per-row values (`nll_loss`, which `cross_entropy` ends with; `mse_loss`,
//!   `binary_cross_entropy(_with_logits)`, `smooth_l1_loss`, `huber_loss`, the margin losses),
//!   with T's leading size n. Then dl_i/dT is n times row i of dL/dT (zero elsewhere), and one
//!   backward pass from T per sample through the batch's graph (`libtorch_ext.cpp`) gives
//!   g_i = dl_i/dW. Everything before T may couple the samples: a batch norm's statistics are
//!   those of the batch, as in the release. (With class weights, `nll_loss` divides by the
//!   summed weights: sample i's term is then its weighted share, times n.)
//!
//! A coupled model whose loss does not end in such an operation (`loss * c`, a loss plus a
//! regulariser, label smoothing) has M6 absent with both reasons, never computed from the wrong
//! terms; ending the loss with the mean of its per-sample vector makes it splittable.
//!
//! The per-sample gradients stay on the model's device, reduced there to four numbers per unit
//! (the sum and the largest of ||g_{u,i}||^2, its sample, ||G_u||^2), which are all that comes
//! to the host.
//!
//! # The numbers
//! share_{u,i} = ||g_{u,i}||^2 / sum_j ||g_{u,j}||^2 over the units with a non-zero gradient;
//! unit u isolates its dominant sample when max_i share_{u,i} >= tau (tau in (0.5, 1], so the
//! dominant sample is unique; the first of equal maxima otherwise). `exposed_fraction` is the
//! share of the batch that dominates some isolating unit, `isolated_share` the isolating units'
//! part of ||G_l||^2. A batch of one exposes its sample (exposed_fraction 1): every active unit
//! is all its. A layer the loss does not reach, whose per-sample gradients are all zero, or
//! whose released gradient is zero has M6 absent with the reason.
use super::ext::{loss_head, loss_head_backward, loss_head_grad};
use super::inspection::Inspection;
use super::layers::{Layer, LayerMap};
use super::loss::scalar_loss;
use super::subspace::{first_per_sample_pass, one_sample_grads};
use super::tensors::to_f64_vec;
use crate::error::{GuardError, Result, TorchContext};
use crate::report::{Metric, SampleIsolation, TermSource};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How M6 is measured (`[settings.isolation]` of a policy).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IsolationSettings {
    /// tau: a unit isolates its dominant sample when that sample holds at least this share of
    /// the unit's per-sample squared gradient norms. In (0.5, 1]; default 0.99.
    pub tau: f64,
}

impl Default for IsolationSettings {
    fn default() -> Self {
        Self { tau: 0.99 }
    }
}

impl IsolationSettings {
    /// Rejects a tau outside (0.5, 1] (at 0.5 or below two samples could both dominate).
    pub fn validate(&self) -> Result<()> {
        if !(self.tau > 0.5 && self.tau <= 1.0) {
            return Err(GuardError::Config { setting: "isolation.tau", why: format!("must be in (0.5, 1], got {}", self.tau) });
        }
        Ok(())
    }
}

/// The last operations M6 splits by sample: each reduces its input's rows (one per sample)
/// to the scalar loss as a mean or sum of per-row values.
const ROW_REDUCTIONS: [&str; 14] = [
    "MeanBackward0",
    "MeanBackward1",
    "SumBackward0",
    "SumBackward1",
    "NllLossBackward0",
    "NllLoss2DBackward0",
    "MseLossBackward0",
    "SmoothL1LossBackward0",
    "HuberLossBackward0",
    "BinaryCrossEntropyBackward0",
    "BinaryCrossEntropyWithLogitsBackward0",
    "SoftMarginLossBackward0",
    "MultiMarginLossBackward0",
    "MultilabelMarginLossBackward0",
];

/// Per-unit figures of one layer's per-sample gradients, on the host: everything M6 needs.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitEnergies {
    /// Samples n.
    pub n: usize,
    /// sum_i ||g_{u,i}||^2, per unit.
    pub total: Vec<f64>,
    /// max_i ||g_{u,i}||^2, per unit.
    pub top: Vec<f64>,
    /// The sample (batch index) holding `top`: the first of equal maxima.
    pub top_sample: Vec<usize>,
    /// ||G_u||^2 with G_u = (1/n) sum_i g_{u,i} (the released gradient), per unit.
    pub released: Vec<f64>,
}

/// One unit that isolates a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IsolatingUnit {
    /// The unit's index (its output index in the layer).
    pub unit: usize,
    /// The sample it carries (batch index).
    pub sample: usize,
    /// That sample's share of the unit's per-sample squared norms.
    pub share: f64,
}

/// M6 of one layer with the units and samples behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Isolation {
    /// Share of the batch that dominates at least one isolating unit.
    pub exposed_fraction: f64,
    /// The isolating units' share of ||G_l||^2.
    pub isolated_share: f64,
    /// The exposed samples' batch indices, ascending.
    pub exposed_samples: Vec<usize>,
    /// The isolating units, ascending.
    pub isolating_units: Vec<IsolatingUnit>,
    /// Units with a non-zero gradient for some sample.
    pub active_units: usize,
    /// Units of the layer.
    pub units: usize,
    /// The largest dominant share over the active units.
    pub max_share: f64,
}

impl UnitEnergies {
    /// M6 from these figures at `tau` (METRICS.md, M6): absent when no unit has a gradient,
    /// when the released gradient is zero, or when a figure is not finite.
    pub fn isolation(&self, tau: f64) -> Metric<Isolation> {
        let units = self.total.len();
        if self.top.len() != units || self.top_sample.len() != units || self.released.len() != units {
            return Metric::absent("unit figures of different lengths");
        }
        if self.total.iter().chain(&self.top).chain(&self.released).any(|v| !v.is_finite()) {
            return Metric::absent("a per-sample gradient is not finite");
        }
        let released: f64 = self.released.iter().sum();
        let mut exposed = vec![false; self.n];
        let (mut isolating_units, mut active_units, mut max_share, mut isolated) = (Vec::new(), 0, 0.0f64, 0.0);
        for u in 0..units {
            if self.total[u] <= 0.0 {
                continue; // a zero gradient: skipped
            }
            active_units += 1;
            let share = self.top[u] / self.total[u];
            max_share = max_share.max(share);
            if share >= tau {
                let sample = self.top_sample[u];
                if let Some(e) = exposed.get_mut(sample) {
                    *e = true;
                }
                isolating_units.push(IsolatingUnit { unit: u, sample, share });
                isolated += self.released[u];
            }
        }
        if active_units == 0 {
            return Metric::absent("every unit's gradient is zero for every sample: nothing to isolate");
        }
        if released <= 0.0 {
            return Metric::absent("the layer's released gradient is zero");
        }
        let exposed_samples: Vec<usize> = exposed.iter().enumerate().filter(|(_, e)| **e).map(|(i, _)| i).collect();
        Metric::Measured(Isolation {
            exposed_fraction: exposed_samples.len() as f64 / self.n.max(1) as f64,
            isolated_share: isolated / released,
            exposed_samples,
            isolating_units,
            active_units,
            units,
            max_share,
        })
    }
}

/// The per-unit figures of every layer of one batch, and how the per-sample terms were found.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitEnergyTable {
    /// Samples n.
    pub n: usize,
    /// The route to the per-sample terms (None: neither route gives them; every layer is
    /// absent with the reasons).
    pub terms: Option<TermSource>,
    /// Per layer, in model order: the figures, or why the layer has none.
    pub layers: Vec<Metric<UnitEnergies>>,
}

/// The units of a layer: the leading size every parameter shares, or why it has none.
pub fn layer_units(layer: &Layer) -> std::result::Result<usize, String> {
    let leading: Vec<Option<i64>> = layer.params.iter().map(|p| p.shape.first().copied()).collect();
    if let Some(k) = leading.iter().position(Option::is_none) {
        return Err(format!("no units: parameter {} is a scalar (no output index)", layer.params[k].name));
    }
    let sizes: Vec<i64> = leading.into_iter().flatten().collect();
    match sizes.first() {
        Some(&u) if sizes.iter().all(|&s| s == u) && u > 0 => Ok(u as usize),
        _ => Err(format!(
            "no units: the parameters' leading sizes {sizes:?} differ, so they share no output index (a transposed convolution's weight leads with its input channels)"
        )),
    }
}

/// The running per-unit figures of one layer on the model's device (f64).
struct Accumulator {
    units: i64,
    total: Tensor,
    top: Tensor,
    top_sample: Tensor,
    /// sum_i g_i per parameter (f64), for G in the batch-graph route.
    sum: Vec<Option<Tensor>>,
    used: bool,
}

impl Accumulator {
    fn new(units: usize, params: usize, device: tch::Device) -> Result<Self> {
        let zeros = || Tensor::f_zeros([units as i64], (Kind::Double, device)).during("allocating unit figures");
        Ok(Self {
            units: units as i64,
            total: zeros()?,
            top: zeros()?,
            top_sample: Tensor::f_zeros([units as i64], (Kind::Int64, device)).during("allocating unit figures")?,
            sum: (0..params).map(|_| None).collect(),
            used: false,
        })
    }

    /// Adds sample i's gradients of this layer's parameters (undefined: not reached).
    fn add(&mut self, i: usize, grads: &[Tensor]) -> Result<()> {
        let mut energy: Option<Tensor> = None;
        for (k, g) in grads.iter().enumerate() {
            if !g.defined() {
                continue;
            }
            self.used = true;
            let g = g.f_detach().and_then(|g| g.f_to_kind(Kind::Double)).during("reading a per-sample gradient")?;
            let e = unit_squares(&g, self.units)?;
            energy = Some(match energy {
                None => e,
                Some(acc) => acc.f_add(&e).during("summing unit norms")?,
            });
            self.sum[k] = Some(match self.sum[k].take() {
                None => g,
                Some(acc) => acc.f_add(&g).during("summing per-sample gradients")?,
            });
        }
        let Some(e) = energy else { return Ok(()) };
        self.total = self.total.f_add(&e).during("summing unit norms")?;
        let better = e.f_gt_tensor(&self.top).during("comparing unit norms")?;
        self.top = e.f_where_self(&better, &self.top).during("keeping the largest unit norm")?;
        let index = Tensor::f_full_like(&self.top_sample, i as i64).during("keeping the largest unit norm")?;
        self.top_sample = index.f_where_self(&better, &self.top_sample).during("keeping the largest unit norm")?;
        Ok(())
    }
}

/// ||row u||^2 of a tensor whose leading size is `units`, as a [units] f64 tensor.
fn unit_squares(g: &Tensor, units: i64) -> Result<Tensor> {
    g.f_reshape([units, -1])
        .and_then(|r| r.f_square())
        .and_then(|s| s.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double))
        .during("unit norms of a gradient")
}

/// The loss split at its last operation: the node's name and dL/dT, or why it cannot be.
fn split_head(loss: &Tensor, n: usize) -> Result<std::result::Result<(String, Tensor), String>> {
    let head = loss_head(loss)?;
    if !ROW_REDUCTIONS.contains(&head.node.as_str()) {
        return Ok(Err(format!(
            "the loss's last operation is {}, not a mean or sum of per-sample values or a fused loss M6 splits by sample",
            head.node
        )));
    }
    if head.inputs != 1 {
        return Ok(Err(format!("the loss's last operation {} has {} differentiable inputs, not one", head.node, head.inputs)));
    }
    match head.shape.as_deref() {
        Some([rows, ..]) if *rows == n as i64 => {}
        shape => return Ok(Err(format!("the input of the loss's last operation {} has shape {shape:?}, not one row per sample ({n})", head.node))),
    }
    Ok(Ok((head.node, loss_head_grad(loss)?)))
}

/// Row i of `head_grad` times n, zero elsewhere: dl_i/dT.
fn sample_seed(head_grad: &Tensor, i: usize, n: usize) -> Result<Tensor> {
    let mut shape = vec![n as i64];
    shape.extend(std::iter::repeat(1).take(head_grad.dim().saturating_sub(1)));
    let mut mask = Tensor::f_zeros([n as i64], (head_grad.kind(), head_grad.device())).during("selecting a sample's term")?;
    let _ = mask.f_narrow(0, i as i64, 1).and_then(|mut m| m.f_fill_(n as f64)).during("selecting a sample's term")?;
    mask = mask.f_reshape(shape.as_slice()).during("selecting a sample's term")?;
    head_grad.f_mul(&mask).during("selecting a sample's term")
}

/// The relative error allowed between (1/n) sum_i g_i (batches of one) and the batch gradient.
fn additivity_tolerance(kind: Kind) -> f64 {
    match kind {
        Kind::Double => 1e-8,
        Kind::Float => 1e-4,
        _ => 1e-2,
    }
}

/// The per-unit figures of every layer: the per-sample terms from batches of one where the
/// samples do not interact (checked), else from the batch's graph split at the loss's last
/// operation; absent with both reasons where neither gives them.
pub(crate) fn unit_energies(ins: &Inspection) -> Result<UnitEnergyTable> {
    let n = ins.batch().validate()?;
    let layers = ins.layers();
    let (params, _) = layers.flat_params();
    let (inputs, targets) = (ins.batch().inputs(), ins.batch().targets());
    // The release: the batch's own gradient (plain backward, no graph kept).
    let loss = scalar_loss(ins.loss(), inputs, targets, ins.step(), true)?;
    if !loss.requires_grad() {
        return Ok(all_absent(n, None, layers.len(), "the loss does not depend on any parameter: no gradient to isolate".into()));
    }
    let batch_grads = Tensor::f_run_backward(&[&loss], &params, false, false).during("computing the batch gradient")?;
    drop(loss);
    let why_not_alone = match one_sample_route(ins, n, &batch_grads)? {
        Ok(table) => return Ok(table),
        Err(why) => why,
    };
    drop(batch_grads);
    let loss = scalar_loss(ins.loss(), inputs, targets, ins.step(), true)?;
    let (node, head_grad) = match split_head(&loss, n)? {
        Ok(split) => split,
        Err(why_no_split) => {
            let reason = format!("the per-sample terms are unknown: {why_not_alone}; and {why_no_split} (end the loss with the mean of its per-sample vector)");
            return Ok(all_absent(n, None, layers.len(), reason));
        }
    };
    let mut acc = accumulators(layers, params.first().map_or(tch::Device::Cpu, |p| p.device()))?;
    for i in 0..n {
        let grads = loss_head_backward(&loss, &sample_seed(&head_grad, i, n)?, &params)?;
        add_sample(&mut acc, layers, i, &grads)?;
    }
    let terms = TermSource::BatchGraph { node, why: why_not_alone };
    match finish(n, layers, acc, None)? {
        Ok(figures) => Ok(UnitEnergyTable { n, terms: Some(terms), layers: figures }),
        // Unreachable: without batch gradients there is no check to fail.
        Err(why) => Ok(all_absent(n, Some(terms), layers.len(), why)),
    }
}

/// The accumulators of every layer with units (None: the layer has none).
fn accumulators(layers: &LayerMap, device: tch::Device) -> Result<Vec<Option<Accumulator>>> {
    layers
        .layers()
        .iter()
        .map(|layer| match layer_units(layer) {
            Ok(u) => Accumulator::new(u, layer.params.len(), device).map(Some),
            Err(_) => Ok(None),
        })
        .collect()
}

/// The per-sample terms as the gradients of batches of one: the table when they add up to the
/// batch gradient, else why they are not the terms (the model cannot run on one sample, or its
/// samples interact, or its forward pass is not repeatable).
fn one_sample_route(ins: &Inspection, n: usize, batch_grads: &[Tensor]) -> Result<std::result::Result<UnitEnergyTable, String>> {
    let layers = ins.layers();
    let (inputs, targets) = (ins.batch().inputs(), ins.batch().targets());
    let device = batch_grads.iter().find(|g| g.defined()).map_or(tch::Device::Cpu, |g| g.device());
    let mut acc = accumulators(layers, device)?;
    for i in 0..n {
        let grads = if i == 0 {
            first_per_sample_pass(layers, || one_sample_grads(layers, ins.loss(), inputs, targets, 0))
        } else {
            one_sample_grads(layers, ins.loss(), inputs, targets, i)
        };
        match grads {
            Ok(grads) => add_sample(&mut acc, layers, i, &grads)?,
            Err(GuardError::NoPerSampleGradients { why }) => return Ok(Err(format!("batches of one are not the terms: the model cannot run on one sample ({why})"))),
            Err(e) => return Err(e),
        }
    }
    Ok(finish(n, layers, acc, Some(batch_grads))?.map(|figures| UnitEnergyTable { n, terms: Some(TermSource::OneSampleBatches), layers: figures }))
}

fn all_absent(n: usize, terms: Option<TermSource>, count: usize, reason: String) -> UnitEnergyTable {
    UnitEnergyTable { n, terms, layers: (0..count).map(|_| Metric::absent(reason.clone())).collect() }
}

/// Hands sample i's per-parameter gradients (flat order) to their layers' accumulators.
fn add_sample(acc: &mut [Option<Accumulator>], layers: &LayerMap, i: usize, grads: &[Tensor]) -> Result<()> {
    let mut start = 0;
    for (l, layer) in layers.layers().iter().enumerate() {
        let count = layer.params.len();
        if let Some(a) = acc[l].as_mut() {
            a.add(i, &grads[start..start + count])?;
        }
        start += count;
    }
    Ok(())
}

/// ||G_u||^2 per unit of a layer from its per-parameter released gradients (f64, undefined:
/// zero), as a [units] tensor.
fn released_squares(grads: &[Option<Tensor>], units: i64, device: tch::Device) -> Result<Tensor> {
    let mut out = Tensor::f_zeros([units], (Kind::Double, device)).during("allocating unit figures")?;
    for g in grads.iter().flatten() {
        out = out.f_add(&unit_squares(g, units)?).during("summing unit norms")?;
    }
    Ok(out)
}

/// G per layer and the per-unit figures, read back in one host transfer. With `batch_grads`
/// (the batches-of-one route) the release is the batch's own gradient and the per-sample
/// gradients must add up to it: Err(why) when a layer shows they do not.
fn finish(n: usize, layers: &LayerMap, acc: Vec<Option<Accumulator>>, batch_grads: Option<&[Tensor]>) -> Result<std::result::Result<Vec<Metric<UnitEnergies>>, String>> {
    let mut out: Vec<Metric<UnitEnergies>> = Vec::with_capacity(layers.len());
    let mut pending: Vec<(usize, usize)> = Vec::new(); // (layer, units) read back below
    let mut parts: Vec<Tensor> = Vec::new();
    let mut start = 0;
    for (l, (layer, a)) in layers.layers().iter().zip(acc).enumerate() {
        let range = start..start + layer.params.len();
        start = range.end;
        let Some(a) = a else {
            out.push(Metric::absent(layer_units(layer).err().unwrap_or_default()));
            continue;
        };
        if !a.used {
            out.push(Metric::absent("the loss does not reach the layer: its gradient is undefined"));
            continue;
        }
        let mean: Vec<Option<Tensor>> = a
            .sum
            .iter()
            .map(|s| s.as_ref().map(|s| s.f_div_scalar(n as f64)).transpose())
            .collect::<std::result::Result<_, _>>()
            .during("averaging per-sample gradients")?;
        let released = match batch_grads {
            None => mean,
            Some(batch) => {
                let batch: Vec<Option<Tensor>> = batch[range]
                    .iter()
                    .map(|g| g.defined().then(|| g.f_detach().and_then(|g| g.f_to_kind(Kind::Double))).transpose())
                    .collect::<std::result::Result<_, _>>()
                    .during("reading the batch gradient")?;
                if let Some(why) = additivity_gap(&mean, &batch, &a.total, n, layer.params[0].tensor.kind(), &layer.name)? {
                    return Ok(Err(why));
                }
                batch
            }
        };
        let released = released_squares(&released, a.units, a.total.device())?;
        let top_sample = a.top_sample.f_to_kind(Kind::Double).during("reading unit figures")?;
        parts.extend([a.total, a.top, top_sample, released]);
        pending.push((l, a.units as usize));
        out.push(Metric::absent("pending"));
    }
    if !parts.is_empty() {
        let flat: Vec<Tensor> = parts.iter().map(|t| t.f_to_device(tch::Device::Cpu)).collect::<std::result::Result<_, _>>().during("reading unit figures")?;
        let values = to_f64_vec(&Tensor::f_cat(&flat, 0).during("reading unit figures")?)?;
        let mut offset = 0;
        for (l, u) in pending {
            let mut next = || {
                let v = values[offset..offset + u].to_vec();
                offset += u;
                v
            };
            let (total, top, top_sample, released) = (next(), next(), next(), next());
            let top_sample = top_sample.into_iter().map(|s| s as usize).collect();
            out[l] = Metric::Measured(UnitEnergies { n, total, top, top_sample, released });
        }
    }
    Ok(Ok(out))
}

/// Why batches of one are not the batch's terms, if the layer shows they are not: the gap
/// between their mean and the batch gradient, against the tolerance of the dtype relative to
/// the larger of ||G_l|| and the per-sample gradients' RMS norm.
fn additivity_gap(mean: &[Option<Tensor>], batch: &[Option<Tensor>], totals: &Tensor, n: usize, kind: Kind, layer: &str) -> Result<Option<String>> {
    let mut gap = Tensor::f_zeros([], (Kind::Double, totals.device())).during("comparing gradients")?;
    let mut scale = totals.f_sum(Kind::Double).and_then(|t| t.f_div_scalar(n as f64)).during("comparing gradients")?;
    for (m, b) in mean.iter().zip(batch) {
        let d = match (m, b) {
            (Some(m), Some(b)) => m.f_sub(b),
            (Some(m), None) => m.f_detach(),
            (None, Some(b)) => b.f_detach(),
            (None, None) => continue,
        }
        .during("comparing gradients")?;
        gap = gap.f_add(&d.f_square().and_then(|s| s.f_sum(Kind::Double)).during("comparing gradients")?).during("comparing gradients")?;
        if let Some(b) = b {
            scale = scale.f_add(&b.f_square().and_then(|s| s.f_sum(Kind::Double)).during("comparing gradients")?).during("comparing gradients")?;
        }
    }
    let v = to_f64_vec(&Tensor::f_stack(&[gap, scale], 0).during("comparing gradients")?)?;
    let (gap, scale) = (v[0].sqrt(), v[1].sqrt());
    let tolerance = additivity_tolerance(kind);
    if gap.is_finite() && gap <= tolerance * scale {
        return Ok(None);
    }
    Ok(Some(format!(
        "batches of one are not the terms: their gradients do not add up to the batch gradient (layer {layer}: relative gap {:.2e} > {tolerance:.0e}), so the model couples its samples (batch norm in training mode) or its forward pass is not repeatable (dropout)",
        gap / scale.max(f64::MIN_POSITIVE)
    )))
}

/// M6 of every layer with the exposed samples behind each, from the per-unit figures.
pub(crate) fn sample_isolation_detail(ins: &Inspection, settings: &IsolationSettings) -> Result<Vec<(Metric<SampleIsolation>, Vec<usize>)>> {
    settings.validate()?;
    let table = unit_energies(ins)?;
    let Some(terms) = table.terms else {
        return Ok(table.layers.into_iter().map(|m| (Metric::Absent { reason: m.absent_reason().unwrap_or("the per-sample terms are unknown").to_string() }, Vec::new())).collect());
    };
    Ok(ins
        .layers()
        .layers()
        .iter()
        .zip(table.layers)
        .map(|(layer, energies)| {
            let isolation = match energies {
                Metric::Measured(e) => e.isolation(settings.tau),
                Metric::Absent { reason } => Metric::Absent { reason },
            };
            match isolation {
                Metric::Measured(iso) => (
                    Metric::Measured(SampleIsolation {
                        exposed_fraction: iso.exposed_fraction,
                        isolated_share: iso.isolated_share,
                        exposed_samples: iso.exposed_samples.len(),
                        isolating_units: iso.isolating_units.len(),
                        active_units: iso.active_units,
                        units: iso.units,
                        max_share: iso.max_share,
                        n: table.n,
                        tau: settings.tau,
                        step: ins.step(),
                        params: layer.numel(),
                        terms: terms.clone(),
                    }),
                    iso.exposed_samples,
                ),
                Metric::Absent { reason } => (Metric::Absent { reason }, Vec::new()),
            }
        })
        .collect())
}

impl Inspection<'_> {
    /// M6, sample isolation, of every layer (METRICS.md, M6; see this module's notes for the
    /// units and the per-sample terms): one entry per layer, absent with the reason where the
    /// layer has no units, the loss does not reach it, or the per-sample terms are unknown.
    /// The model's buffers and random stream are left as they were.
    ///
    /// ```
    /// use gradguard_guard::{Batch, Inspection, LayerMap, measure::IsolationSettings};
    /// use tch::{nn, nn::Module, Device, Kind, Tensor};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let net = nn::linear(vs.root() / "fc", 4, 3, Default::default());
    /// let loss = |x: &Tensor, y: &Tensor| net.forward(x).f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0);
    /// let (x, y) = (Tensor::randn([1, 4], (Kind::Float, Device::Cpu)), Tensor::from_slice(&[2i64]));
    /// let layers = LayerMap::from_var_store(&vs)?;
    /// let m6 = Inspection::new(&layers, &loss, Batch::new(&x, &y)).sample_isolation(&IsolationSettings::default())?;
    /// // A release of one sample exposes it.
    /// assert_eq!(m6[0].measured().map(|m| m.exposed_fraction), Some(1.0));
    /// # Ok::<(), gradguard_guard::GuardError>(())
    /// ```
    pub fn sample_isolation(&self, settings: &IsolationSettings) -> Result<Vec<Metric<SampleIsolation>>> {
        Ok(self.observing(|| sample_isolation_detail(self, settings))?.into_iter().map(|(m, _)| m).collect())
    }

    /// The per-unit figures M6 is computed from ([`UnitEnergies::isolation`] turns a layer's
    /// into M6 at any tau), with the route to the per-sample terms.
    pub fn unit_energies(&self) -> Result<UnitEnergyTable> {
        self.observing(|| unit_energies(self))
    }

    /// [`Inspection::sample_isolation`] with the exposed samples of each layer (batch indices).
    pub(crate) fn sample_isolation_with_samples(&self, settings: &IsolationSettings) -> Result<Vec<(Metric<SampleIsolation>, Vec<usize>)>> {
        self.observing(|| sample_isolation_detail(self, settings))
    }
}
