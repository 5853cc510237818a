//! Clip-then-add-Gaussian-noise. This is NOT differential privacy: there is no per-sample
//! clipping (the clip bounds the whole layer gradient, not each sample's contribution) and no
//! privacy accounting across steps. It blurs one released gradient; it proves nothing.
//!
//! The noise is drawn on the gradient's own device from a generator seeded with the caller's
//! seed alone, so it is independent of libtorch's default generators (which training code
//! reseeds and draws from at will) and never advances them:
//!
//! - a host (CPU) gradient: a ChaCha8 RNG (the full 64-bit seed is its key), Ziggurat
//!   normals in f64, 6.5 ns per sample (1M samples; ChaCha20 took 15.6 ns). libtorch's own
//!   CPU generator is not used: its Mersenne Twister keeps only the low 32 bits of a seed (a
//!   test pins this), and a key one can search (2^32 seeds) would let whoever knows the policy
//!   find the noise and subtract it. Nor is it much faster: on the shared 2-core machine,
//!   one thread, 3.3-6.2 ns per f32 sample and 22 ns per f64 (`benches/protection_cost.rs`
//!   prints both sources side by side). One thread: drawing 64K-entry chunks (one ChaCha
//!   stream each) on two threads was slower on the shared machine, whose other load and
//!   libtorch's spinning intra-op threads leave the second core busy;
//! - any other device (CUDA): libtorch's generator for that device (CUDA: Philox, counter-based,
//!   a 64-bit key), as a private clone reseeded with the seed ([`device_normal`]): one kernel
//!   on the device, nothing drawn on the host or copied over.
//!
//! What is guaranteed across devices: the same seed gives bit-identical noise on the same
//! device type with the same libtorch (and, on CUDA, the same GPU model: libtorch's launch
//! configuration, hence which Philox counter feeds which entry, depends on the number of
//! multiprocessors). Across device types the draws are different samples of the same
//! distribution: a CPU release and a CUDA release with one seed do not carry the same noise,
//! and an audit reproducing a release's noise from its key must run on the device it was
//! released from.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{Device, Kind, Tensor};

use crate::checks::numel;
use crate::clip::clip;
use crate::device_rng::device_normal;
use crate::error::Result;

/// Clips `grad` to `clip_norm`, then adds i.i.d. N(0, (multiplier * clip_norm)^2) noise;
/// returns the release and the clip's norm (see [`clip`]). Parameters are validated by the
/// caller; a std that overflows the dtype shows up as a non-finite output, which the caller
/// refuses. Nothing is read back from the device.
pub(crate) fn clip_and_noise(grad: &Tensor, kind: Kind, clip_norm: f64, multiplier: f64, seed: u64) -> Result<(Tensor, Tensor)> {
    let (clipped, norm) = clip(grad, clip_norm)?;
    let std = multiplier * clip_norm;
    if std == 0.0 {
        return Ok((clipped, norm));
    }
    let noise = draw_noise(grad, std, seed, NoiseSource::of(grad.device()))?.f_to_kind(kind)?;
    Ok((clipped.f_add(&noise)?, norm))
}

/// Which generator draws a noise defence's samples (see [`Defence::Noise`](crate::Defence)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseSource {
    /// ChaCha8 on the host, keyed by the whole 64-bit seed; copied to the gradient's device
    /// when that is not the host. What a CPU gradient gets.
    Host,
    /// libtorch's generator of the gradient's device (CUDA: Philox), a private clone seeded
    /// with the seed: drawn on the device. What any other gradient gets.
    Device,
}

impl NoiseSource {
    /// The source a noise defence uses for a gradient on `device`.
    pub fn of(device: Device) -> Self {
        if device == Device::Cpu {
            NoiseSource::Host
        } else {
            NoiseSource::Device
        }
    }
}

/// The N(0, std^2) samples a noise defence with this `std` and `seed` adds to a gradient shaped
/// like `like` when it draws from `source` (`NoiseSource::of(like.device())` is what it does):
/// on `like`'s device, in f64 for an f64 `like` and f32 otherwise. For audits that regenerate a
/// release's noise from its key, and for measuring the sources side by side; `std` must be
/// finite and >= 0 (a defence validates it before drawing).
pub fn draw_noise(like: &Tensor, std: f64, seed: u64, source: NoiseSource) -> Result<Tensor> {
    let kind = if like.f_kind()? == Kind::Double { Kind::Double } else { Kind::Float };
    match source {
        NoiseSource::Host => Ok(host_noise(numel(like), std, kind, seed)?.f_reshape(like.size())?.f_to_device(like.device())?),
        NoiseSource::Device => device_normal(like, std, kind, seed),
    }
}

/// `n` samples of N(0, std^2), generated in f64 (the same stream for every dtype) and stored
/// as f64 for f64 gradients, f32 otherwise (halves host memory for the common case).
fn host_noise(n: i64, std: f64, kind: Kind, seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sample = move || -> f64 {
        let z: f64 = StandardNormal.sample(&mut rng);
        std * z
    };
    let n = usize::try_from(n).unwrap_or(0);
    let t = if kind == Kind::Double {
        let v: Vec<f64> = (0..n).map(|_| sample()).collect();
        Tensor::f_from_slice(&v)?
    } else {
        let v: Vec<f32> = (0..n).map(|_| sample() as f32).collect();
        Tensor::f_from_slice(&v)?
    };
    Ok(t)
}

#[cfg(test)]
#[path = "noise_tests.rs"]
mod tests;
