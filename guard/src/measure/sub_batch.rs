//! M1's sub-batch probes (METRICS.md, M1, "Sub-batch probes"): probe k runs on a fresh random
//! sub-batch S_k of m of the batch's n samples, drawn without replacement from the seeded
//! generator, with its Gaussian probe v_k over S_k only; J_S is the Jacobian of G_l(S), the
//! mean gradient over S. A probe then costs about m/n of a full-batch probe.
//!
//! Why the scaling: where the samples do not interact, G(S) = (1/m) sum_{i in S} g_i with g_i
//! sample i's own gradient, so J_S v = (n/m) sum_{i in S} J_{l,i} v_i, whose squared norm has
//! mean (n/m)^2 sum_{i in S} ||J_{l,i}||_F^2 over v and (n/m) sum_i ||J_{l,i}||_F^2 over S.
//! Each sub-batch JVP is therefore handed on scaled by sqrt(m/n): its squared norm over n,
//! (m/n^2) ||(J_S v)_l||^2, estimates S_l^2 without bias, as a full-batch probe's does, and so
//! does the squared norm of any linear map of it (the defences' linearisations, with which the
//! closed loop and M5 re-measure the release from the kept JVPs). The K per-probe values give
//! the standard error, which then covers the choice of samples too. G_l and ||G_l|| (R_l's
//! denominator) stay the whole batch's, computed once.
//!
//! # Samples that interact
//! Where the forward couples the samples (batch norm in training mode), a sub-batch is another
//! function, and the full batch is the exact route: it is used whatever the setting, with
//! `probe_samples = n` reported, and the very probes a full-batch setting draws. The coupling is
//! - declared, by [`LayerMap::with_coupled_samples`] (a TorchScript model in training mode with
//!   batch-norm statistics declares it itself): no sub-batch is tried;
//! - detected, otherwise, on the first sub-batch of every estimate, before its probe counts:
//!   where the samples do not interact, sample i's input gradient is (1/n) dl_i/dx_i in the
//!   batch's loss and (1/m) dl_i/dx_i in the sub-batch's, so n dL(B)/dx_S must equal
//!   m dL(S)/dx, to a relative 1e-8 in f64, 1e-3 in f32 (TF32 convolutions on a GPU round to
//!   about 5e-4) and 3e-2 below. Batch norm in training mode fails it (the sub-batch's
//!   statistics are not the batch's), and so do a forward that is not repeatable (dropout in
//!   training mode draws another mask), a loss that is not the mean of per-sample terms (a
//!   sum) and a model that cannot run on m samples (a fixed batch size): all keep the full
//!   batch. A coupling that leaves every input gradient unchanged is not seen.
//!
//! [`LayerMap::with_coupled_samples`]: super::LayerMap::with_coupled_samples
use super::batch::Batch;
use super::graph::{leaf_inputs, GradientGraph, Point};
use super::inspection::Inspection;
use super::loss::scalar_loss;
use super::sensitivity::{gradient_difference, SensitivitySettings, PROBE_STREAM};
use super::tensors::{gaussian_probes, rng_for, to_f64_vec};
use crate::error::{Result, TorchContext};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// The stream of the seeded generator the sub-batches are drawn from ([`rng_for`]'s purpose).
const DRAW_STREAM: u64 = 6;

/// m, the samples each probe runs on: the setting's where it is below n, outside exact mode
/// and on a model not declared to couple its samples; else n (whether the samples interact is
/// then checked on the first sub-batch).
pub(super) fn samples_per_probe(ins: &Inspection, settings: &SensitivitySettings, n: usize) -> usize {
    match settings.probe_samples {
        Some(m) if m < n && !settings.exact && !ins.layers().couples_samples() => m,
        _ => n,
    }
}

/// dL/dW and dL/dx of the loss at `point` on `targets`, from one backward pass without a
/// graph; dL/dW undefined where the loss does not reach a parameter, dL/dx None where it does
/// not reach the inputs.
pub(super) fn gradients_with_input(point: &Point, targets: &Tensor, params: &[Tensor], step: u64, check_finite: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
    let x = leaf_inputs(&point.at)?;
    let loss = scalar_loss(&point.loss, &x, targets, step, check_finite)?;
    let mut inputs: Vec<&Tensor> = params.iter().collect();
    inputs.push(&x);
    let mut grads = Tensor::f_run_backward(&[&loss], &inputs, false, false).during("computing gradients with the inputs'")?;
    let input = grads.pop().filter(Tensor::defined);
    Ok((grads, input))
}

/// The first sub-batch's pass, or None where the model cannot run on m samples (a fixed batch
/// size; a batch norm in training mode on one sample): it returns an error or panics (tch's `nn`
/// modules panic on a libtorch error; the message still reaches stderr through the panic hook).
/// Such a model counts as interacting: the full batch serves, and reports its own error if it
/// has one. Later sub-batches, of the same size, are not expected to fail where the first ran.
fn runs_on_sub_batch<T>(pass: impl FnOnce() -> Result<T>) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(pass)).ok().and_then(Result::ok)
}

/// One sub-batch: the indices of its samples in the batch, and their inputs and targets.
pub(super) struct SubBatch {
    index: Tensor,
    inputs: Tensor,
    targets: Tensor,
}

impl SubBatch {
    /// The look at this sub-batch: the same model, loss, seed and step (no step graph).
    fn look<'s>(&'s self, ins: Inspection<'s>) -> Inspection<'s> {
        ins.on(Batch::new(&self.inputs, &self.targets))
    }

    /// The sub-batch's gradient graph (its loss is not read back: a non-finite one shows in
    /// the estimate, which is then absent).
    fn graph(&self, ins: &Inspection, m: usize) -> Result<GradientGraph> {
        let look = self.look(*ins);
        let point = Point::of(&look, m)?;
        Ok(GradientGraph::build_unchecked(&look, &point)?.0)
    }
}

/// The seeded draws of one estimate's sub-batch probes: which samples, and each probe's v.
/// The same seed and step draw the same sub-batches and probes.
pub(super) struct SubBatches {
    n: usize,
    m: usize,
    draws: ChaCha8Rng,
    probes: ChaCha8Rng,
}

impl SubBatches {
    /// Sub-batches of `m` of the `n` samples of `ins`'s batch, from its seed and step.
    pub(super) fn new(ins: &Inspection, n: usize, m: usize) -> Self {
        Self { n, m, draws: rng_for(ins.seed(), ins.step(), DRAW_STREAM), probes: rng_for(ins.seed(), ins.step(), PROBE_STREAM) }
    }

    /// The next sub-batch: m distinct samples, in the batch's order.
    fn draw(&mut self, ins: &Inspection) -> Result<SubBatch> {
        let mut picked: Vec<i64> = rand::seq::index::sample(&mut self.draws, self.n, self.m).into_iter().map(|i| i as i64).collect();
        picked.sort_unstable();
        let batch = ins.batch();
        let select = |t: &Tensor| {
            Tensor::f_from_slice(&picked)
                .and_then(|index| index.f_to_device(t.device()))
                .and_then(|index| Ok((t.f_index_select(0, &index)?, index)))
                .during("selecting a sub-batch")
        };
        let (inputs, index) = select(batch.inputs())?;
        let (targets, _) = select(batch.targets())?;
        Ok(SubBatch { index, inputs, targets })
    }

    /// A Gaussian probe shaped like `like` (one sub-batch's point).
    fn probe(&mut self, like: &Tensor) -> Result<Tensor> {
        gaussian_probes(like, 1, &mut self.probes)?.f_get(0).during("selecting a probe")
    }

    /// A sub-batch JVP scaled by sqrt(m/n), so that its squared norm over n estimates S_l^2.
    fn scaled(&self, jvp: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let scale = (self.m as f64 / self.n as f64).sqrt();
        jvp.into_iter().map(|t| if t.defined() { t.f_mul_scalar(scale).during("scaling a sub-batch JVP") } else { Ok(t) }).collect()
    }

    /// Whether the samples interact, judged on `sub`: n dL(B)/dx on its samples (`whole`, the
    /// batch's) against m dL(S)/dx (`part`, the sub-batch's). One host read.
    fn interact(&self, whole: Option<&Tensor>, part: Option<&Tensor>, sub: &SubBatch) -> Result<bool> {
        let (whole, part) = match (whole, part) {
            (Some(whole), Some(part)) => (whole, part),
            // No gradient reaches the inputs on either: every JVP is zero, on any batch.
            (None, None) => return Ok(false),
            _ => return Ok(true),
        };
        let tolerance = match part.kind() {
            Kind::Double => 1e-8,
            Kind::Float => 1e-3,
            _ => 3e-2,
        };
        let scaled = |t: &Tensor, by: usize| t.f_detach().and_then(|t| t.f_to_kind(Kind::Double)).and_then(|t| t.f_mul_scalar(by as f64));
        let gaps = sub
            .index
            .f_to_device(whole.device())
            .and_then(|index| scaled(&whole.f_index_select(0, &index)?, self.n))
            .and_then(|whole| {
                let part = scaled(part, self.m)?;
                Tensor::f_stack(&[whole.f_sub(&part)?.f_norm()?, whole.f_norm()?, part.f_norm()?], 0)
            })
            .during("comparing a sub-batch's input gradient with the batch's")?;
        let values = to_f64_vec(&gaps)?;
        let [gap, a, b] = values[..] else { return Ok(true) };
        // A NaN anywhere counts as interacting: the full batch then reports it.
        Ok(!(gap <= tolerance * a.max(b)))
    }

    /// Double backward: the first sub-batch's gradient graph where the samples do not interact
    /// (`whole`: the batch's dL/dx), else None.
    pub(super) fn first_graph(&mut self, ins: &Inspection, whole: Option<&Tensor>) -> Result<Option<GradientGraph>> {
        let sub = self.draw(ins)?;
        let Some(graph) = runs_on_sub_batch(|| sub.graph(ins, self.m)) else { return Ok(None) };
        Ok((!self.interact(whole, graph.input_grad(), &sub)?).then_some(graph))
    }

    /// Double backward: K probes, the first on `first`, each on its sub-batch's own graph
    /// (one at a time in memory), one JVP each.
    pub(super) fn double_backward(&mut self, ins: &Inspection, first: GradientGraph, probes: usize, sink: &mut dyn FnMut(Vec<Tensor>) -> Result<()>) -> Result<()> {
        let mut next = Some(first);
        for _ in 0..probes {
            let graph = match next.take() {
                Some(graph) => graph,
                None => self.draw(ins)?.graph(ins, self.m)?,
            };
            let v = self.probe(&graph.x)?;
            sink(self.scaled(graph.jvp(&v)?)?)?;
        }
        Ok(())
    }

    /// Central differences: the first sub-batch where the samples do not interact (checked by
    /// one backward pass on it against `whole`, the batch's dL/dx), else None.
    pub(super) fn first_batch(&mut self, ins: &Inspection, whole: Option<&Tensor>, params: &[Tensor]) -> Result<Option<SubBatch>> {
        let sub = self.draw(ins)?;
        let look = sub.look(*ins);
        let part = runs_on_sub_batch(|| Point::of(&look, self.m).and_then(|point| gradients_with_input(&point, &sub.targets, params, ins.step(), false)));
        let Some((_, part)) = part else { return Ok(None) };
        Ok((!self.interact(whole, part.as_ref(), &sub)?).then_some(sub))
    }

    /// Central differences: K probes, the first on `first`, each
    /// (G_S(X_S + e v) - G_S(X_S - e v)) / 2e on its sub-batch, e the whole batch's step.
    pub(super) fn central_difference(&mut self, ins: &Inspection, first: SubBatch, eps: f64, probes: usize, params: &[Tensor], sink: &mut dyn FnMut(Vec<Tensor>) -> Result<()>) -> Result<()> {
        let mut next = Some(first);
        for _ in 0..probes {
            let sub = match next.take() {
                Some(sub) => sub,
                None => self.draw(ins)?,
            };
            let look = sub.look(*ins);
            let point = Point::of(&look, self.m)?;
            let dv = self.probe(&point.at)?.f_mul_scalar(eps).during("scaling a probe")?;
            sink(self.scaled(gradient_difference(&point.loss, &point.at, &dv, &sub.targets, params, ins.step(), eps)?)?)?;
        }
        Ok(())
    }
}
