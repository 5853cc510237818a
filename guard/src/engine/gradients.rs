//! The gradients themselves: micro-batches held for the aggregation floor, the defences
//! applied to each layer, and what is left in `.grad()`.
use super::*;

/// Micro-batches held back until the release covers the aggregation floor.
pub(super) struct Held {
    pub(super) grads: GradientAccumulator,
    pub(super) inputs: Vec<Tensor>,
    pub(super) targets: Vec<Tensor>,
    pub(super) attributes: Vec<Tensor>,
}

/// What a decision does to one layer's tensors.
pub(super) enum LayerRelease {
    Unchanged,
    Replaced(Vec<Tensor>),
    Withheld,
}

impl Guard {
    /// Applies each layer's chain to its joined gradient.
    pub(super) fn protect(&self, grads: &[Vec<Tensor>], decision: &Decision, step: u64) -> Result<Vec<LayerRelease>> {
        if let ReleaseOutcome::Blocked { .. } = decision.outcome {
            return Ok((0..self.layers.len()).map(|_| LayerRelease::Withheld).collect());
        }
        let seeds = self.release_seeds(step);
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
        });
        let flat: Vec<Option<Tensor>> = grads.iter().flatten().map(|g| g.defined().then(|| g.shallow_clone())).collect();
        held.grads.add(&flat, n)?;
        let copy = |t: &Tensor| {
            t.f_empty_like()
                .and_then(|mut out| out.f_copy_(t).map(|_| out))
                .during("holding a micro-batch")
        };
        held.inputs.push(copy(batch.inputs)?);
        held.targets.push(copy(batch.targets)?);
        if let Some(a) = batch.attribute {
            held.attributes.push(copy(a)?);
        }
        Ok(held)
    }

    /// Leaves in `.grad()` what is released: transformed layers replaced, withheld ones zeroed
    /// (unless they train locally), and, for a release of held micro-batches, their mean.
    pub(super) fn write_grads(&self, protected: &[LayerRelease], released: &[Vec<Tensor>], held: bool) -> Result<()> {
        let local = self.protection.policy().settings.withheld_layers_train_locally;
        tch::no_grad(|| -> Result<()> {
            for ((layer, decision), mean) in self.layers.layers().iter().zip(protected).zip(released) {
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

    pub(super) fn find_param(&self, name: &str) -> Option<(usize, usize)> {
        self.layers
            .layers()
            .iter()
            .enumerate()
            .find_map(|(l, layer)| layer.params.iter().position(|p| p.name == name).map(|p| (l, p)))
    }

    pub(super) fn param_names(&self) -> Vec<String> {
        self.layers.layers().iter().flat_map(|l| l.params.iter().map(|p| p.name.clone())).collect()
    }
}
