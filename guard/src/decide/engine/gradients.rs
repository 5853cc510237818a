//! The gradients themselves: micro-batches held for the aggregation floor, the defences
//! applied to each layer, and what is left in `.grad()`.
use super::{Guard, Written};
use crate::error::{GuardError, Result, TorchContext};
use crate::decide::protection::Decision;
use crate::measure::{Batch, LayerMap};
use crate::report::ReleaseOutcome;
use gradguard_defenses::{apply_all, derive_seed, DefenceError, GradientAccumulator};
use tch::Tensor;

/// Micro-batches held back until the release covers the aggregation floor.
pub(super) struct Held {
    pub(super) grads: GradientAccumulator,
    inputs: Vec<Tensor>,
    targets: Vec<Tensor>,
    attributes: Vec<Tensor>,
    sample_ids: Vec<Tensor>,
}

/// The held micro-batches joined into one batch.
pub(super) struct Joined {
    inputs: Tensor,
    targets: Tensor,
    attribute: Option<Tensor>,
    sample_ids: Option<Tensor>,
}

impl Joined {
    pub(super) fn batch(&self) -> Batch<'_> {
        let batch = Batch::new(&self.inputs, &self.targets);
        let batch = match &self.attribute {
            Some(a) => batch.with_attribute(a),
            None => batch,
        };
        match &self.sample_ids {
            Some(ids) => batch.with_sample_ids(ids),
            None => batch,
        }
    }
}

impl Held {
    pub(super) fn joined(&self) -> Result<Joined> {
        Ok(Joined {
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

/// What a decision does to one layer's tensors.
pub(super) enum LayerRelease {
    Unchanged,
    Replaced(Vec<Tensor>),
    Withheld,
}

impl Guard {
    /// The seed of each layer's defences at this release: derived once, used by the
    /// measurement on the release and by the release itself.
    pub(super) fn release_seeds(&self, step: u64) -> Vec<u64> {
        // The secret key keeps the noise unpredictable to whoever knows the policy (a
        // federated server does): the policy's seed and the step alone would let it subtract
        // the noise.
        let seed = self.policy().settings().seed ^ self.noise_key;
        (0..self.layers.len()).map(|l| derive_seed(seed ^ step.rotate_left(20), l)).collect()
    }

    /// Applies each layer's chain to its joined gradient.
    pub(super) fn protect(&self, grads: &[Vec<Tensor>], decision: &Decision, seeds: &[u64]) -> Result<Vec<LayerRelease>> {
        if let ReleaseOutcome::Blocked { .. } = decision.outcome {
            return Ok((0..self.layers.len()).map(|_| LayerRelease::Withheld).collect());
        }
        let mut out = Vec::new();
        for (l, chain) in decision.chains.iter().enumerate() {
            match chain {
                None => out.push(LayerRelease::Withheld),
                // Finiteness was checked on the whole release before any decision.
                Some(chain) if chain.is_empty() => out.push(LayerRelease::Unchanged),
                Some(chain) => match self.layers.join(l, &grads[l])? {
                    None => out.push(LayerRelease::Unchanged),
                    Some(joined) => match apply_all(chain, &joined, seeds[l])? {
                        None => out.push(LayerRelease::Withheld),
                        Some(released) => out.push(LayerRelease::Replaced(self.layers.split(l, &released)?)),
                    },
                },
            }
        }
        Ok(out)
    }

    pub(super) fn hold(&mut self, batch: &Batch, n: usize, grads: &[Vec<Tensor>]) -> Result<&Held> {
        let params = self.layers.flat_params().0.len();
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

    /// Leaves in `.grad()` what is released: transformed layers replaced, withheld ones zeroed
    /// (unless they train locally), and, for a release of held micro-batches, their mean.
    pub(super) fn write_grads(&self, written: &Written) -> Result<()> {
        let local = self.policy().settings().withheld_layers_train_locally;
        let held = written.held;
        tch::no_grad(|| -> Result<()> {
            for ((layer, decision), mean) in self.layers.layers().iter().zip(&written.protected).zip(&written.released) {
                for (i, p) in layer.params.iter().enumerate() {
                    let mut g = p.tensor.grad();
                    if !g.defined() {
                        continue;
                    }
                    match decision {
                        LayerRelease::Replaced(ts) => g.f_copy_(&ts[i]).during("writing the protected gradient")?,
                        LayerRelease::Unchanged if held && mean[i].defined() => g.f_copy_(&mean[i]).during("writing the held mean")?,
                        LayerRelease::Unchanged => {}
                        LayerRelease::Withheld if local && held && mean[i].defined() => g.f_copy_(&mean[i]).during("writing the held mean")?,
                        LayerRelease::Withheld if local => {}
                        LayerRelease::Withheld => {
                            let _ = g.f_zero_().during("zeroing a withheld gradient")?;
                        }
                    }
                }
            }
            Ok(())
        })
    }

    pub(super) fn clear_grads(&self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for layer in self.layers.layers() {
                for p in &layer.params {
                    let mut g = p.tensor.grad();
                    if g.defined() {
                        let _ = g.f_zero_().during("clearing gradients")?;
                    }
                }
            }
            Ok(())
        })
    }

    /// The explicit update sorted into the layer map (undefined where a parameter is absent),
    /// each tensor checked against the model's shape.
    pub(super) fn update_per_layer(&self, update: &[(String, Tensor)]) -> Result<Vec<Vec<Tensor>>> {
        let mut per_layer: Vec<Vec<Tensor>> = self.layers.layers().iter().map(|l| l.params.iter().map(|_| Tensor::new()).collect()).collect();
        for (name, t) in update {
            let (l, p) = self.find_param(name).ok_or_else(|| GuardError::UnknownParameter { name: name.clone(), known: self.param_names() })?;
            let expected = &self.layers.layers()[l].params[p].shape;
            let got = if t.defined() { t.size() } else { vec![] };
            if got != *expected {
                return Err(GuardError::ParameterShape { name: name.clone(), expected: expected.clone(), got });
            }
            per_layer[l][p] = t.shallow_clone();
        }
        Ok(per_layer)
    }

    /// The named tensors of the released layers (withheld layers absent).
    pub(super) fn released_tensors(&self, protected: Vec<LayerRelease>, given: &[Vec<Tensor>]) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        for ((layer, decision), given) in self.layers.layers().iter().zip(protected).zip(given) {
            let released: Vec<Tensor> = match decision {
                LayerRelease::Withheld => continue,
                LayerRelease::Unchanged => given.iter().map(|t| t.shallow_clone()).collect(),
                LayerRelease::Replaced(ts) => ts,
            };
            for (p, t) in layer.params.iter().zip(released) {
                if t.defined() {
                    tensors.push((p.name.clone(), t));
                }
            }
        }
        tensors
    }

    fn find_param(&self, name: &str) -> Option<(usize, usize)> {
        self.layers.layers().iter().enumerate().find_map(|(l, layer)| layer.params.iter().position(|p| p.name == name).map(|p| (l, p)))
    }

    fn param_names(&self) -> Vec<String> {
        self.layers.layers().iter().flat_map(|l| l.params.iter().map(|p| p.name.clone())).collect()
    }
}
