//! What the guard looks at when it measures: the model's layers, the loss that rebuilds the
//! batch's graph, the batch, and the seed and step that pick every random draw. Every
//! estimator of METRICS.md is a method of it, defined in the estimator's own file
//! (`sensitivity.rs`, `subspace.rs`, `per_sample.rs`, `usable.rs`, `inversion.rs`), which
//! imports this one; this file imports none of them.
//!
//! Each estimator's entry point runs its passes through [`Inspection::observing`], which puts
//! the model's buffers back as they were, and libtorch's random stream where it was: the guard
//! observes the model, it does not change it.
use super::batch::Batch;
use super::graph::StepGraph;
use super::layers::LayerMap;
use super::loss::{EmbeddingSplit, LossFn};
use super::rng::RngSnapshot;
use crate::error::Result;

/// One batch of one model, as the estimators see it. Cheap to copy: everything is borrowed.
///
/// For discrete inputs (token ids) M1 is measured on the embeddings: the split comes with the
/// loss ([`crate::SplitLoss`]) or is declared here with [`Inspection::with_embedding`].
///
/// ```no_run
/// # fn demo(layers: &gradguard_guard::LayerMap, loss: &dyn gradguard_guard::LossFn,
/// #         x: &tch::Tensor, y: &tch::Tensor, a: &tch::Tensor) -> gradguard_guard::Result<()> {
/// use gradguard_guard::{Batch, Inspection, measure::{SensitivitySettings, SubspaceSettings}};
/// let batch = Batch::new(x, y).with_attribute(a);
/// let look = Inspection::new(layers, loss, batch).seeded(7, 100);
/// let m1 = look.sensitivity(&SensitivitySettings::default())?; // one entry per layer
/// let m2 = look.subspace(&SubspaceSettings::default())?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy)]
pub struct Inspection<'a> {
    layers: &'a LayerMap,
    loss: &'a dyn LossFn,
    embedding: Option<&'a dyn EmbeddingSplit>,
    batch: Batch<'a>,
    seed: u64,
    step: u64,
    graph: Option<&'a StepGraph>,
}

impl<'a> Inspection<'a> {
    /// Looks at `batch` through `loss` (seed 0, step 0), with the loss's embedding split if it
    /// has one ([`LossFn::embedding`]).
    pub fn new(layers: &'a LayerMap, loss: &'a dyn LossFn, batch: Batch<'a>) -> Self {
        Self { layers, loss, embedding: loss.embedding(), batch, seed: 0, step: 0, graph: None }
    }

    /// The same look with M1 measured on the embeddings of `split` (METRICS.md, M1, discrete
    /// inputs); the loss stays what M2, M3 and M4 use. A pair of closures
    /// `&(embed, loss_from_embedded)` is a split.
    pub fn with_embedding(self, split: &'a dyn EmbeddingSplit) -> Self {
        Self { embedding: Some(split), ..self }
    }

    /// The same look with another seed and step: the probes, selections and projections they
    /// pick are reproducible from the pair.
    pub fn seeded(self, seed: u64, step: u64) -> Self {
        Self { seed, step, ..self }
    }

    /// The same model and loss on another batch.
    pub fn on(self, batch: Batch<'a>) -> Self {
        Self { batch, graph: None, ..self }
    }

    /// The same look, with M1 measured on the training step's own graph of this batch (built
    /// by the step driver) instead of a forward and backward of its own.
    pub fn with_graph(self, graph: &'a StepGraph) -> Self {
        Self { graph: Some(graph), ..self }
    }

    /// The step's graph, when the look was given one.
    pub(super) fn step_graph(&self) -> Option<&'a StepGraph> {
        self.graph
    }

    /// The model's layers.
    pub fn layers(&self) -> &'a LayerMap {
        self.layers
    }

    /// The loss that rebuilds the batch's graph.
    pub fn loss(&self) -> &'a dyn LossFn {
        self.loss
    }

    /// The embedding split M1 is measured through, if one is declared.
    pub fn embedding(&self) -> Option<&'a dyn EmbeddingSplit> {
        self.embedding
    }

    /// The batch looked at.
    pub fn batch(&self) -> Batch<'a> {
        self.batch
    }

    /// The seed of every random draw.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The step the look belongs to (it enters every seeded draw).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Runs an estimator's passes and then puts every buffer of the model back, bit for bit,
    /// as it was before them, and libtorch's random stream where it was, whether the passes
    /// succeed or fail: a batch norm in training mode updates its running statistics on every
    /// forward pass, and a dropout layer draws from the default generator, the guard's probes
    /// and per-sample passes included. A model without buffers pays nothing for them; the
    /// generator's state is a few kilobytes copied twice.
    pub(crate) fn observing<T>(&self, passes: impl FnOnce() -> Result<T>) -> Result<T> {
        let random = RngSnapshot::take(self.batch.inputs().device())?;
        let snapshot = self.layers.snapshot_buffers()?;
        let out = passes();
        snapshot.restore()?;
        random.restore()?;
        out
    }
}
