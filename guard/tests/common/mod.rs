//! Small models and data shared by the guard's tests.
#![allow(dead_code)]
use gradguard_guard::{Guard, LayerMap, Policy, Settings};
use tch::{nn, Device, Kind, TchError, Tensor};

/// A guard without rules over every variable of `vs`, with these settings.
pub fn guard(vs: &nn::VarStore, settings: Settings) -> Guard {
    Guard::new(LayerMap::from_var_store(vs).unwrap(), Policy::permissive_with(settings).unwrap()).unwrap()
}

/// The settings these tests measure with: every estimate the schedule allows, whatever it
/// costs (the default budget is 5% of wall time, which makes estimates timing-dependent), and
/// M2 and M6 at every estimate (by default they run on cadences of their own).
pub fn unbudgeted() -> Settings {
    Settings { subspace_every_steps: 0, isolation_every_steps: 0, ..unbudgeted_with_cadences() }
}

/// [`unbudgeted`] with M2's and M6's default cadences.
pub fn unbudgeted_with_cadences() -> Settings {
    Settings { budget_share: 1.0, ..Default::default() }
}

/// i.i.d. standard normal inputs [n, d] from a fixed libtorch seed.
pub fn gaussian(n: i64, d: i64, seed: i64, kind: Kind) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([n, d], (kind, Device::Cpu))
}

/// A ReLU MLP with layers fc0, fc1, ... (no batch coupling).
pub struct Mlp {
    pub layers: Vec<nn::Linear>,
}

impl Mlp {
    pub fn new(p: &nn::Path, widths: &[i64]) -> Self {
        Self::with_biases(p, widths, |_| true)
    }

    /// The same MLP with a bias on layer i only where `bias(i)`.
    pub fn with_biases(p: &nn::Path, widths: &[i64], bias: impl Fn(usize) -> bool) -> Self {
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| nn::linear(p / format!("fc{i}"), w[0], w[1], nn::LinearConfig { bias: bias(i), ..Default::default() }))
            .collect();
        Self { layers }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let mut h = x.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = h.f_linear(&l.ws, l.bs.as_ref())?;
            if i + 1 < self.layers.len() {
                h = h.f_relu()?;
            }
        }
        Ok(h)
    }

    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        cross_entropy(&self.forward(x)?, y)
    }
}

/// Zeroes every trainable variable's gradient (where there is one), as `zero_grad` does.
pub fn zero_grads(vs: &nn::VarStore) {
    for p in vs.trainable_variables() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

pub fn cross_entropy(logits: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
    logits.f_log_softmax(-1, None)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100)
}

/// A planted latent attribute: n samples of 20 Gaussian features, attribute i % 2 shifting
/// coordinates 10..19 by `shift`, and a label that depends on coordinate 0 only (so the task
/// does not need the attribute). Returns (inputs, labels, attribute).
pub fn planted_attribute(n: i64, shift: f64, seed: i64) -> (Tensor, Tensor, Vec<i64>) {
    let attribute: Vec<i64> = (0..n).map(|i| i % 2).collect();
    let a = Tensor::from_slice(&attribute).to_kind(Kind::Float).unsqueeze(1);
    let offset = Tensor::cat(&[Tensor::zeros([1, 10], (Kind::Float, Device::Cpu)), Tensor::ones([1, 10], (Kind::Float, Device::Cpu)) * shift], 1);
    let x = gaussian(n, 20, seed, Kind::Float) + a * offset;
    let y = x.narrow(1, 0, 1).squeeze_dim(1).gt(0.0).to_kind(Kind::Int64);
    (x, y, attribute)
}

/// A field of /proc/self/status (VmRSS, VmHWM, ...) in bytes (given in kB).
pub fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The peak resident memory `work` adds to what is resident before it, in bytes: the peak is
/// reset to the current resident set first (Linux: "5" to /proc/self/clear_refs). The peak is
/// the process's: a test that measures it runs alone in its own test binary.
pub fn peak_increase<T>(work: impl FnOnce() -> T) -> (T, u64) {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM through /proc/self/clear_refs");
    let before = status_bytes("VmRSS:");
    let out = work();
    (out, status_bytes("VmHWM:").saturating_sub(before))
}
