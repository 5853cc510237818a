//! Small tensor helpers shared by the estimators: host reads and seeded probes.
use crate::error::{Result, TorchContext};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{Device, Kind, Tensor};

/// Copies any tensor to the host as f64 values (one synchronising read).
pub fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    let flat = t
        .f_detach()
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_to_kind(Kind::Double))
        .and_then(|t| t.f_reshape([-1]))
        .during("reading a tensor back to the host")?;
    let n = flat.numel();
    let mut out = vec![0f64; n];
    flat.f_copy_data(&mut out, n).during("reading a tensor back to the host")?;
    Ok(out)
}

/// A reproducible RNG for one estimate: the seed is the user's, the stream the step's, so
/// each step draws fresh probes and the same (seed, step) draws the same ones.
pub(crate) fn rng_for(seed: u64, step: u64, purpose: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step.wrapping_mul(16).wrapping_add(purpose));
    rng
}

/// `count` standard normal tensors shaped like `like`, drawn on the host from a seeded RNG
/// (independent of libtorch's global generator) and moved to `like`'s device in one copy.
pub(crate) fn gaussian_probes(like: &Tensor, count: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let per = like.numel();
    let values: Vec<f64> = (0..per * count).map(|_| StandardNormal.sample(rng)).collect();
    let mut shape = vec![count as i64];
    shape.extend(like.size());
    Tensor::f_from_slice(&values)
        .and_then(|t| t.f_reshape(shape.as_slice()))
        .and_then(|t| t.f_to_kind(like.kind()))
        .and_then(|t| t.f_to_device(like.device()))
        .during("drawing probe vectors")
}

/// Sum of squares of a tensor as a 0-d tensor on its device (no host read).
pub(crate) fn sum_sq(t: &Tensor) -> Result<Tensor> {
    t.f_square()
        .and_then(|s| s.f_sum(Kind::Double))
        .during("summing squares")
}
