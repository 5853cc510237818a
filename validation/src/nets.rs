//! The models and data of the malicious-server, aggregation and M6-rule sections, built and
//! trained here in tch (no Python): the digits MLP of `tests/fixtures/malicious_models.py`
//! (fc0 Linear(64, 256), ReLU, fc1 Linear(256, 10)), the digits CNN of `gradguard::models`, and
//! an MLP on a synthetic tabular data set (the model that is not digits); the digits and the
//! tabular data with a training split and an auxiliary split (the data a server holds to set
//! malicious parameters: never attacked).
use gradguard_audit::Result;
use gradguard_guard::measure::to_f64_vec;
use gradguard_guard::LayerMap;
use gradguard_models::data::Digits;
use gradguard_models::{DigitsCnn, Mlp, ModelError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, TchError, Tensor};

/// Widths of the digits MLP of the malicious-server section.
pub(super) const DIGITS_MLP: [i64; 3] = [64, 256, 10];
/// Widths of the tabular MLP: 32 features, 128 hidden units, 4 classes.
pub(super) const TABULAR_MLP: [i64; 3] = [32, 128, 4];
/// Samples, features, classes and latent factors of the synthetic tabular data.
const TABULAR_SAMPLES: usize = 2000;
const TABULAR_FEATURES: usize = 32;
const TABULAR_CLASSES: usize = 4;
const TABULAR_LATENT: usize = 8;

/// A data set: every sample, the training split and the auxiliary split (indices).
pub(super) struct Data {
    x: Tensor,
    y: Tensor,
    /// Training (and attacked) samples, in a seeded order.
    pub train: Vec<usize>,
    /// The server's auxiliary samples (for the malicious parameters' quantiles).
    pub aux: Vec<usize>,
}

impl Data {
    /// The shipped digits ([n, 1, 8, 8], pixels / 16), split 80/20 with `seed`: the 20 % is
    /// the auxiliary split.
    pub(super) fn digits(seed: u64) -> Result<Self> {
        let digits = Digits::embedded().map_err(ModelError::from)?;
        let all: Vec<usize> = (0..digits.len()).collect();
        let (x, y, _) = digits.batch(&all, Device::Cpu).map_err(ModelError::from)?;
        let (train, aux) = digits.split(0.2, seed);
        Ok(Self { x, y, train, aux })
    }

    /// Synthetic tabular data: 2000 samples of 32 features in (-1, 1) and 4 classes,
    /// x = tanh(mu_y + L z + 0.3 e) with class means mu_y ~ N(0, 0.6^2 I), a fixed mixing L
    /// (32 x 8, entries N(0, 1/8)) of latent factors z ~ N(0, I) and noise e ~ N(0, I): correlated,
    /// bounded features like a standardised table. The last 400 samples are the auxiliary split.
    pub(super) fn tabular(seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7ab1_e000);
        let (n, d, k) = (TABULAR_SAMPLES, TABULAR_FEATURES, TABULAR_LATENT);
        let means: Vec<f64> = normals(&mut rng, TABULAR_CLASSES * d).iter().map(|v| 0.6 * v).collect();
        let mix: Vec<f64> = normals(&mut rng, d * k).iter().map(|v| v / (k as f64).sqrt()).collect();
        let (mut x, mut y) = (Vec::with_capacity(n * d), Vec::with_capacity(n));
        for _ in 0..n {
            let c = rng.random_range(0..TABULAR_CLASSES);
            let z = normals(&mut rng, k);
            let e = normals(&mut rng, d);
            for j in 0..d {
                let latent: f64 = (0..k).map(|f| mix[j * k + f] * z[f]).sum();
                x.push((means[c * d + j] + latent + 0.3 * e[j]).tanh() as f32);
            }
            y.push(c as i64);
        }
        let x = Tensor::f_from_slice(&x)?.f_reshape([n as i64, d as i64])?;
        let y = Tensor::f_from_slice(&y)?;
        let aux_start = n - 400;
        Ok(Self { x, y, train: (0..aux_start).collect(), aux: (aux_start..n).collect() })
    }

    /// The samples at `idx`: (inputs, labels).
    pub(super) fn rows(&self, idx: &[usize]) -> Result<(Tensor, Tensor)> {
        let i: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
        let i = Tensor::f_from_slice(&i)?;
        Ok((self.x.f_index_select(0, &i)?, self.y.f_index_select(0, &i)?))
    }

    /// The first `count` training samples (fewer when the split is shorter).
    pub(super) fn first_train(&self, count: usize) -> Result<(Tensor, Tensor)> {
        self.rows(&self.train[..count.min(self.train.len())])
    }

    /// The auxiliary samples flattened to [m, D] in f64 on the host, row-major.
    pub(super) fn aux_matrix(&self) -> Result<(Vec<f64>, usize, usize)> {
        let (x, _) = self.rows(&self.aux)?;
        let m = self.aux.len();
        let values = to_f64_vec(&x.f_reshape([m as i64, -1])?)?;
        let d = values.len() / m.max(1);
        Ok((values, m, d))
    }

    /// The training split's batch of `batch` samples at `step` in the demo's order: the split
    /// read in turn, wrapping around.
    pub(super) fn demo_batch(&self, batch: usize, step: usize) -> Vec<usize> {
        (0..batch).map(|i| self.train[(step * batch + i) % self.train.len()]).collect()
    }
}

/// `count` standard normal draws (Box-Muller) from `rng`.
pub(super) fn normals(rng: &mut ChaCha8Rng, count: usize) -> Vec<f64> {
    (0..count)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random::<f64>();
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect()
}

/// The `q` quantile of `values` (linear interpolation between order statistics, as numpy's and
/// torch's default); `sorted` must be ascending (NaN when empty).
pub(super) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (pos - lo as f64) * (sorted[hi] - sorted[lo])
}

enum Arch {
    Mlp(Mlp, Vec<i64>),
    Cnn(Box<DigitsCnn>),
}

/// A model with its parameters and layer map.
pub(super) struct Net {
    /// How the sections name it.
    pub name: &'static str,
    vs: nn::VarStore,
    arch: Arch,
    layers: LayerMap,
}

impl Net {
    /// A ReLU MLP of `widths` (layers fc0, fc1, ...), tch's default initialisation seeded with `seed`.
    pub(super) fn mlp(name: &'static str, widths: &[i64], seed: u64) -> Result<Self> {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let mlp = Mlp::new(&vs.root(), widths);
        let layers = LayerMap::from_var_store(&vs)?;
        Ok(Self { name, vs, arch: Arch::Mlp(mlp, widths.to_vec()), layers })
    }

    /// The digits CNN (conv1, conv2, fc1, fc2), seeded with `seed`.
    pub(super) fn cnn(name: &'static str, seed: u64) -> Result<Self> {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let cnn = DigitsCnn::new(&vs.root());
        let layers = LayerMap::from_var_store(&vs)?;
        Ok(Self { name, vs, arch: Arch::Cnn(Box::new(cnn)), layers })
    }

    /// Re-initialises every Linear as PyTorch's `nn.Linear` does (weight and bias uniform in
    /// +-1/sqrt(fan_in); tch's default weight bound is sqrt(6/fan_in)), from a seeded stream.
    pub(super) fn torch_init(self, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1417);
        let mut names: Vec<String> = self.vs.variables().into_keys().filter(|k| k.ends_with(".weight")).collect();
        names.sort();
        for weight in names {
            let w = self.param(&weight)?;
            let (out, fan_in) = (w.size()[0], w.size()[1..].iter().product::<i64>());
            let bound = 1.0 / (fan_in as f64).sqrt();
            let draw = |count: usize, rng: &mut ChaCha8Rng| -> Vec<f64> { (0..count).map(|_| bound * (2.0 * rng.random::<f64>() - 1.0)).collect() };
            self.set(&weight, &Tensor::f_from_slice(&draw(w.numel(), &mut rng))?)?;
            let bias = format!("{}.bias", weight.trim_end_matches(".weight"));
            if self.vs.variables().contains_key(&bias) {
                self.set(&bias, &Tensor::f_from_slice(&draw(out as usize, &mut rng))?)?;
            }
        }
        Ok(self)
    }

    /// A copy of this model's parameters under another name.
    pub(super) fn copy(&self, name: &'static str) -> Result<Self> {
        let mut net = match &self.arch {
            Arch::Mlp(_, widths) => Self::mlp(name, widths, 0)?,
            Arch::Cnn(_) => Self::cnn(name, 0)?,
        };
        net.vs.copy(&self.vs)?;
        Ok(net)
    }

    /// The mean cross-entropy of a batch.
    pub(super) fn loss(&self, x: &Tensor, y: &Tensor) -> std::result::Result<Tensor, TchError> {
        match &self.arch {
            Arch::Mlp(m, _) => m.f_loss(x, y),
            Arch::Cnn(c) => c.f_loss(x, y),
        }
    }

    /// The guard's layer map (shares the parameters: it sees every update).
    pub(super) fn layers(&self) -> &LayerMap {
        &self.layers
    }

    /// A parameter by its VarStore name (`fc0.weight`).
    pub(super) fn param(&self, name: &str) -> Result<Tensor> {
        self.vs.variables().remove(name).ok_or_else(|| gradguard_audit::AuditError::Usage(format!("{}: no parameter {name}", self.name)))
    }

    /// Overwrites a parameter (no gradient recorded).
    pub(super) fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let mut p = self.param(name)?;
        let value = value.f_to_kind(p.kind())?.f_reshape(p.size())?;
        tch::no_grad(|| p.f_copy_(&value))?;
        Ok(())
    }

    /// Trains with Adam (lr 1e-3) for `steps` steps of `batch` samples, the batch of step s being
    /// `batch_of(s)`; before the update of every step s with `observe_every` dividing s,
    /// `observe(s, x, y)` sees the step's batch at the parameters the step releases.
    pub(super) fn train(
        &self,
        data: &Data,
        steps: usize,
        batch_of: &dyn Fn(usize) -> Vec<usize>,
        observe_every: Option<usize>,
        observe: &mut dyn FnMut(usize, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let mut opt = nn::Adam::default().build(&self.vs, 1e-3)?;
        for s in 0..steps {
            let (x, y) = data.rows(&batch_of(s))?;
            if observe_every.is_some_and(|e| e > 0 && s % e == 0) {
                observe(s, &x, &y)?;
            }
            let loss = self.loss(&x, &y)?;
            opt.zero_grad();
            loss.f_backward()?;
            opt.step();
        }
        Ok(())
    }

    /// Accuracy on the samples at `idx`.
    pub(super) fn accuracy(&self, data: &Data, idx: &[usize]) -> Result<f64> {
        let correct = self.correct(data, idx)?;
        Ok(correct.iter().filter(|c| **c).count() as f64 / correct.len().max(1) as f64)
    }

    /// Whether the model classifies each sample at `idx` correctly.
    pub(super) fn correct(&self, data: &Data, idx: &[usize]) -> Result<Vec<bool>> {
        let (x, y) = data.rows(idx)?;
        let logits = tch::no_grad(|| match &self.arch {
            Arch::Mlp(m, _) => m.f_forward(&x),
            Arch::Cnn(c) => c.f_forward(&x),
        })?;
        let right = logits.f_argmax(-1, false)?.f_eq_tensor(&y)?.f_to_kind(Kind::Double)?;
        Ok(to_f64_vec(&right)?.into_iter().map(|v| v > 0.5).collect())
    }

    /// The labels of the samples at `idx`.
    pub(super) fn labels(data: &Data, idx: &[usize]) -> Result<Vec<i64>> {
        let (_, y) = data.rows(idx)?;
        Ok(to_f64_vec(&y)?.into_iter().map(|v| v as i64).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_as_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert!((quantile(&v, 0.5) - 2.5).abs() < 1e-12);
        assert!((quantile(&v, 1.0 / 3.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn the_tabular_data_is_seeded_bounded_and_learnable() {
        let (a, b) = (Data::tabular(3).unwrap(), Data::tabular(3).unwrap());
        let (xa, ya) = a.first_train(50).unwrap();
        let (xb, _) = b.first_train(50).unwrap();
        assert_eq!(to_f64_vec(&xa).unwrap(), to_f64_vec(&xb).unwrap());
        assert!(to_f64_vec(&xa).unwrap().iter().all(|v| v.abs() < 1.0));
        assert_eq!(xa.size(), [50, 32]);
        assert!(to_f64_vec(&ya).unwrap().iter().all(|&y| (0.0..4.0).contains(&y)));
        let net = Net::mlp("tabular", &TABULAR_MLP, 0).unwrap().torch_init(0).unwrap();
        net.train(&a, 200, &|s| a.demo_batch(64, s), None, &mut |_, _, _| Ok(())).unwrap();
        assert!(net.accuracy(&a, &a.aux).unwrap() > 0.8);
    }

    #[test]
    fn torch_init_bounds_the_parameters_by_one_over_root_fan_in() {
        let net = Net::mlp("m", &DIGITS_MLP, 0).unwrap().torch_init(0).unwrap();
        let max = |name: &str| to_f64_vec(&net.param(name).unwrap()).unwrap().iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(max("fc0.weight") <= 1.0 / 8.0 && max("fc0.weight") > 0.12);
        assert!(max("fc1.bias") <= 1.0 / 16.0);
    }
}
