//! Sample-count aggregation: one micro-batch gradient can leak a single example almost
//! verbatim, so a guard may release only gradients that average over at least N samples.
//! `GradientAccumulator` holds the running sample-weighted sum until that floor is reached.

use tch::{Kind, Tensor};

use crate::checks::{check_finite_input, check_finite_output, check_tensor, deep_copy};
use crate::error::{DefenceError, Result};

/// The running sum of one layer, with what its adds must agree on.
#[derive(Debug)]
struct LayerSum {
    /// Sum over adds of `samples * grad`, kept in f32 for f16/bf16 gradients (so summing many
    /// micro-batches does not lose precision) and in the gradient's dtype otherwise.
    sum: Tensor,
    /// Shape, dtype and device of the first add; later adds must match.
    shape: Vec<i64>,
    kind: Kind,
}

/// Accumulates per-layer micro-batch (or local-step) gradients until the release covers at
/// least a given number of samples. Stored sums are deep copies, so later in-place edits of
/// the source tensors (optimizer steps, `zero_grad`) cannot change them.
#[derive(Debug)]
pub struct GradientAccumulator {
    layers: Vec<Option<LayerSum>>,
    samples: usize,
}

fn accumulation_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        other => other,
    }
}

impl GradientAccumulator {
    /// An empty accumulator for a model with `layer_count` layers.
    pub fn new(layer_count: usize) -> Self {
        Self {
            layers: (0..layer_count).map(|_| None).collect(),
            samples: 0,
        }
    }

    /// Number of layers this accumulator expects per `add`.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Adds one micro-batch: `grads[l]` is layer `l`'s gradient, already the MEAN over the
    /// micro-batch's `samples` samples (`None`: the layer got no gradient, i.e. contributes
    /// zero). The whole add is checked before anything is stored, so an error leaves the
    /// accumulator unchanged.
    ///
    /// Errors: wrong list length, `samples == 0`, an undefined/sparse/non-floating or
    /// non-finite gradient, or a shape/dtype/device differing from earlier adds of the layer.
    pub fn add(&mut self, grads: &[Option<Tensor>], samples: usize) -> Result<()> {
        if grads.len() != self.layers.len() {
            return Err(DefenceError::LayerCount {
                expected: self.layers.len(),
                got: grads.len(),
            });
        }
        if samples == 0 {
            return Err(DefenceError::ZeroSamples);
        }
        let mut kinds = Vec::with_capacity(grads.len());
        for (layer, (grad, held)) in grads.iter().zip(&self.layers).enumerate() {
            let Some(grad) = grad else {
                kinds.push(None);
                continue;
            };
            let what = || format!("accumulator layer {layer}");
            let kind = check_tensor(grad, &what)?;
            if let Some(held) = held {
                let shape = grad.size();
                if shape != held.shape {
                    return Err(DefenceError::ShapeMismatch {
                        layer,
                        expected: held.shape.clone(),
                        got: shape,
                    });
                }
                if kind != held.kind {
                    return Err(DefenceError::TensorMismatch {
                        layer,
                        property: "dtype",
                        expected: format!("{:?}", held.kind),
                        got: format!("{kind:?}"),
                    });
                }
                if grad.device() != held.sum.device() {
                    return Err(DefenceError::TensorMismatch {
                        layer,
                        property: "device",
                        expected: format!("{:?}", held.sum.device()),
                        got: format!("{:?}", grad.device()),
                    });
                }
            }
            check_finite_input(grad, &what)?;
            kinds.push(Some(kind));
        }
        // Compute every new sum before storing any, so a libtorch failure part-way (e.g. out
        // of memory) also leaves the accumulator unchanged.
        let weight = samples as f64;
        let mut new_sums = Vec::with_capacity(grads.len());
        for ((grad, held), kind) in grads.iter().zip(&self.layers).zip(&kinds) {
            let (Some(grad), Some(kind)) = (grad, kind) else {
                new_sums.push(None);
                continue;
            };
            let mut weighted = deep_copy(grad)?.f_to_kind(accumulation_kind(*kind))?;
            let _ = weighted.f_mul_scalar_(weight)?;
            let sum = match held {
                Some(held) => held.sum.f_add(&weighted)?,
                None => weighted,
            };
            new_sums.push(Some(LayerSum {
                sum,
                shape: grad.size(),
                kind: *kind,
            }));
        }
        for (slot, new) in self.layers.iter_mut().zip(new_sums) {
            if new.is_some() {
                *slot = new;
            }
        }
        self.samples += samples;
        Ok(())
    }

    /// Total samples added since creation or the last `reset`.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Whether the accumulated gradients cover at least `floor` samples (and at least one, so
    /// an empty accumulator is never ready).
    pub fn is_ready(&self, floor: usize) -> bool {
        self.samples >= floor.max(1)
    }

    /// The sample-weighted mean per layer: `sum_b(n_b * g_b) / sum_b(n_b)`, which equals the
    /// gradient of the mean loss over the union of all added samples. A layer absent (`None`)
    /// from some adds counts as zero there; a layer absent from every add stays `None`. The
    /// tensors are new (dtype of the adds) and the accumulator is left as is.
    pub fn mean(&self) -> Result<Vec<Option<Tensor>>> {
        if self.samples == 0 {
            return Err(DefenceError::NothingAccumulated);
        }
        let total = self.samples as f64;
        self.layers
            .iter()
            .enumerate()
            .map(|(layer, held)| {
                let Some(held) = held else { return Ok(None) };
                let mean = held.sum.f_div_scalar(total)?.f_to_kind(held.kind)?;
                let what = || format!("accumulator mean of layer {layer}");
                Ok(Some(check_finite_output(mean, &what)?))
            })
            .collect()
    }

    /// Forgets every add (after a release), keeping the layer count.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|slot| *slot = None);
        self.samples = 0;
    }
}
