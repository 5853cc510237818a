//! The apply stage: a decision's defences applied to each layer's gradient, with the noise
//! seeds keyed by the guard's secret, and what is left in `.grad()` or handed back.
use crate::decide::policy::Settings;
use crate::decide::protection::Decision;
use crate::error::{GuardError, Result, TorchContext};
use crate::measure::LayerMap;
use crate::report::ReleaseOutcome;
use gradguard_defenses::{apply_all_deferred, derive_seed, FiniteChecks};
use tch::Tensor;

/// The apply stage's state: the secret that enters every release's noise seed.
pub(super) struct Apply {
    /// Secret (see `Guard::set_noise_key`).
    pub(super) noise_key: u64,
}

/// What a decision does to one layer's tensors.
pub(super) enum LayerRelease {
    Unchanged,
    Replaced(Vec<Tensor>),
    Withheld,
}

/// What an in-place release writes into `.grad()`: each layer's release, over the gradients it
/// was computed from (the held mean when `held`).
pub(super) struct Written {
    pub(super) protected: Vec<LayerRelease>,
    pub(super) released: Vec<Vec<Tensor>>,
    pub(super) held: bool,
}

impl Apply {
    /// The seed of each layer's defences at this release: derived once, used by the
    /// measurement on the release and by the release itself.
    pub(super) fn seeds(&self, settings: &Settings, layers: usize, step: u64) -> Vec<u64> {
        // The secret key keeps the noise unpredictable to whoever knows the policy (a
        // federated server does): the policy's seed and the step alone would let it subtract
        // the noise.
        let seed = settings.seed ^ self.noise_key;
        (0..layers).map(|l| derive_seed(seed ^ step.rotate_left(20), l)).collect()
    }

    /// Applies each layer's chain to its joined gradient. Nothing is read back per layer or per
    /// defence: the chains' finiteness checks are read once, after the last layer, and a
    /// non-finite output fails the release with the error of the first one (naming its layer
    /// and defence), before anything is released.
    pub(super) fn protect(&self, layers: &LayerMap, grads: &[Vec<Tensor>], decision: &Decision, seeds: &[u64]) -> Result<Vec<LayerRelease>> {
        if let ReleaseOutcome::Blocked { .. } = decision.outcome {
            return Ok((0..layers.len()).map(|_| LayerRelease::Withheld).collect());
        }
        let mut out = Vec::new();
        let mut checks = FiniteChecks::new();
        let names = layers.names();
        for (l, chain) in decision.chains.iter().enumerate() {
            match chain {
                None => out.push(LayerRelease::Withheld),
                // Finiteness was checked on the whole release before any decision.
                Some(chain) if chain.is_empty() => out.push(LayerRelease::Unchanged),
                Some(chain) => match layers.join(l, &grads[l])? {
                    None => out.push(LayerRelease::Unchanged),
                    Some(joined) => {
                        checks.set_context(format!("layer {}", names[l]));
                        match apply_all_deferred(chain, &joined, seeds[l], &mut checks)? {
                            None => out.push(LayerRelease::Withheld),
                            Some(released) => out.push(LayerRelease::Replaced(layers.split(l, &released)?)),
                        }
                    }
                },
            }
        }
        checks.verify()?;
        Ok(out)
    }
}

/// Leaves in `.grad()` what is released: transformed layers replaced, withheld ones zeroed
/// (unless they train locally, `local`), and, for a release of held micro-batches, their mean.
pub(super) fn write_grads(layers: &LayerMap, written: &Written, local: bool) -> Result<()> {
    let held = written.held;
    tch::no_grad(|| -> Result<()> {
        for ((layer, decision), mean) in layers.layers().iter().zip(&written.protected).zip(&written.released) {
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

/// Zeroes every `.grad()`: nothing unchecked is left for the optimizer.
pub(super) fn clear_grads(layers: &LayerMap) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for layer in layers.layers() {
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
pub(super) fn update_per_layer(layers: &LayerMap, update: &[(String, Tensor)]) -> Result<Vec<Vec<Tensor>>> {
    let mut per_layer: Vec<Vec<Tensor>> = layers.layers().iter().map(|l| l.params.iter().map(|_| Tensor::new()).collect()).collect();
    for (name, t) in update {
        let (l, p) = find_param(layers, name).ok_or_else(|| GuardError::UnknownParameter { name: name.clone(), known: param_names(layers) })?;
        let expected = &layers.layers()[l].params[p].shape;
        let got = if t.defined() { t.size() } else { vec![] };
        if got != *expected {
            return Err(GuardError::ParameterShape { name: name.clone(), expected: expected.clone(), got });
        }
        per_layer[l][p] = t.shallow_clone();
    }
    Ok(per_layer)
}

/// The named tensors of the released layers (withheld layers absent).
pub(super) fn released_tensors(layers: &LayerMap, protected: Vec<LayerRelease>, given: &[Vec<Tensor>]) -> Vec<(String, Tensor)> {
    let mut tensors = Vec::new();
    for ((layer, decision), given) in layers.layers().iter().zip(protected).zip(given) {
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

fn find_param(layers: &LayerMap, name: &str) -> Option<(usize, usize)> {
    layers.layers().iter().enumerate().find_map(|(l, layer)| layer.params.iter().position(|p| p.name == name).map(|p| (l, p)))
}

fn param_names(layers: &LayerMap) -> Vec<String> {
    layers.layers().iter().flat_map(|l| l.params.iter().map(|p| p.name.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::policy::Policy;
    use gradguard_defenses::Defence;
    use tch::{Device, Kind};

    /// The noise of the seeds the guard derives: two layers of one release and one layer at
    /// two consecutive steps carry uncorrelated noise, and every (step, layer) its own seed.
    #[test]
    fn noise_of_two_layers_and_two_steps_is_uncorrelated() {
        let apply = Apply { noise_key: 0x0123_4567_89ab_cdef };
        let policy = Policy::permissive();
        let (now, next) = (apply.seeds(policy.settings(), 2, 41), apply.seeds(policy.settings(), 2, 42));
        let mut all = [now.clone(), next.clone()].concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4, "two (step, layer) pairs share a seed: {now:?} {next:?}");
        let n = 100_000;
        let noise = |seed| {
            let zero = Tensor::zeros([n], (Kind::Float, Device::Cpu));
            let out = Defence::Noise { clip_norm: 1.0, multiplier: 1.0 }.apply(&zero, seed).unwrap().unwrap();
            Vec::<f64>::try_from(&out.to_kind(Kind::Double)).unwrap()
        };
        let base = noise(now[0]);
        for (what, seed) in [("layer 1, same step", now[1]), ("layer 0, next step", next[0]), ("layer 1, next step", next[1])] {
            let other = noise(seed);
            let r = base.iter().zip(&other).map(|(a, b)| a * b).sum::<f64>() / n as f64;
            // Unit variance and zero mean: the mean product is the correlation, se 1/sqrt(n).
            assert!(r.abs() < 4.0 / (n as f64).sqrt(), "{what}: correlation {r}");
        }
    }
}
