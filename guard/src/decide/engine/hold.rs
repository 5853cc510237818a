//! The hold stage: micro-batches held back until a release covers the aggregation floor.
use crate::error::{Result, TorchContext};
use crate::measure::{Batch, LayerMap, OwnedBatch};
use gradguard_defenses::{DefenceError, GradientAccumulator};
use tch::Tensor;

/// The hold stage's state: the micro-batches held so far, none while a batch alone reaches
/// the floor.
#[derive(Default)]
pub(super) struct Hold {
    held: Option<Held>,
}

impl Hold {
    /// Whether this batch of `n` samples is held: while micro-batches are held already, or
    /// when it alone is below the floor (micro-batches are held only while they are needed).
    pub(super) fn needed(&self, n: usize, floor: usize) -> bool {
        self.held.is_some() || n < floor
    }

    /// Whether micro-batches are held.
    pub(super) fn is_holding(&self) -> bool {
        self.held.is_some()
    }

    /// The held micro-batches, if any.
    pub(super) fn held(&self) -> Option<&Held> {
        self.held.as_ref()
    }

    /// Drops the held micro-batches (they were released, or a block ends them: held on, they
    /// would fail every release).
    pub(super) fn drop_held(&mut self) {
        self.held = None;
    }

    /// Adds a micro-batch (its inputs copied, its gradients summed) and returns what is held.
    pub(super) fn add(&mut self, layers: &LayerMap, batch: &Batch, n: usize, grads: &[Vec<Tensor>]) -> Result<&Held> {
        let params = layers.flat_params().0.len();
        let held = self.held.get_or_insert_with(|| Held {
            grads: GradientAccumulator::new(params),
            inputs: vec![],
            targets: vec![],
            attributes: vec![],
            sample_ids: vec![],
        });
        let flat: Vec<Option<Tensor>> = grads.iter().flatten().map(|g| g.defined().then(|| g.shallow_clone())).collect();
        held.grads.add(&flat, n)?;
        let copy = |t: &Tensor| t.f_empty_like().and_then(|mut out| out.f_copy_(t).map(|_| out)).during("holding a micro-batch");
        held.inputs.push(copy(batch.inputs())?);
        held.targets.push(copy(batch.targets())?);
        if let Some(a) = batch.attribute() {
            held.attributes.push(copy(a)?);
        }
        if let Some(ids) = batch.sample_ids() {
            held.sample_ids.push(copy(ids)?);
        }
        Ok(held)
    }
}

/// Micro-batches held back until the release covers the aggregation floor.
pub(super) struct Held {
    pub(super) grads: GradientAccumulator,
    inputs: Vec<Tensor>,
    targets: Vec<Tensor>,
    attributes: Vec<Tensor>,
    sample_ids: Vec<Tensor>,
}


impl Held {
    pub(super) fn joined(&self) -> Result<OwnedBatch> {
        Ok(OwnedBatch {
            inputs: Tensor::f_cat(&self.inputs, 0).during("joining held inputs")?,
            targets: Tensor::f_cat(&self.targets, 0).during("joining held targets")?,
            attribute: if self.attributes.len() == self.inputs.len() {
                Some(Tensor::f_cat(&self.attributes, 0).during("joining held attributes")?)
            } else {
                None
            },
            // Ids only when every micro-batch carried them: a partial list would name the
            // wrong samples.
            sample_ids: if self.sample_ids.len() == self.inputs.len() {
                Some(Tensor::f_cat(&self.sample_ids, 0).during("joining held sample ids")?)
            } else {
                None
            },
        })
    }

    /// The sample-weighted mean of the held gradients, per layer and parameter (undefined
    /// where no micro-batch reached a parameter); None when it is not finite (finite gradients
    /// near the dtype's largest value overflow the held sum).
    pub(super) fn mean_per_layer(&self, layers: &LayerMap) -> Result<Option<Vec<Vec<Tensor>>>> {
        let mut it = match self.grads.mean() {
            Ok(means) => means.into_iter(),
            Err(DefenceError::NonFiniteOutput { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(layers.layers().iter().map(|layer| layer.params.iter().map(|_| it.next().flatten().unwrap_or_else(Tensor::new)).collect()).collect()))
    }
}
