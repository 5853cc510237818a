//! Per-layer gradient defences for gradguard.
//!
//! A guard sits between `backward` and the optimizer step (tch has no hooks) and, for each
//! layer whose gradient would leak private data, applies the defences its policy names before
//! the gradient is released (to a server, a log, another party):
//!
//! - [`Defence`]: withhold, clip, noise (clip + seeded Gaussian noise; NOT differential
//!   privacy), top-k sparsify, symmetric uniform quantise; [`apply_all`] chains them.
//! - [`GradientAccumulator`]: holds micro-batch gradients until a release averages over
//!   enough samples.
//!
//! Every function returns [`DefenceError`] instead of panicking on bad input, never edits the
//! caller's tensors, and never returns a non-finite tensor. The defences compute on the
//! gradient's device (noise included) and read nothing back but their finiteness checks, once
//! per chain; [`apply_all_deferred`] and [`FiniteChecks`] let a release of many layers read
//! once in all.
//!
//! A chain as a policy would name it: clip, add seeded noise, keep the top 10 % of entries.
//!
//! ```rust
//! use gradguard_defenses::{apply_all, Defence};
//! use tch::{Device, Kind, Tensor};
//!
//! let grad = Tensor::arange(128, (Kind::Float, Device::Cpu)).reshape([8, 16]);
//! let chain = [
//!     Defence::Clip { max_norm: 1.0 },
//!     Defence::Noise { clip_norm: 1.0, multiplier: 0.1 },
//!     Defence::Sparsify { keep_fraction: 0.1 },
//! ];
//! let released = apply_all(&chain, &grad, 42)?.expect("nothing in the chain withholds");
//! assert_eq!(released.size(), grad.size());
//! // ceil(0.1 * 128) = 13 entries survive the sparsification; the input is untouched.
//! assert_eq!(released.count_nonzero(None::<i64>).int64_value(&[]), 13);
//! assert_eq!(grad.int64_value(&[7, 15]), 127);
//! // The same seed gives the same release; a `Withhold` releases nothing.
//! assert!(released.equal(&apply_all(&chain, &grad, 42)?.unwrap()));
//! assert!(apply_all(&[Defence::Withhold], &grad, 42)?.is_none());
//! # Ok::<(), gradguard_defenses::DefenceError>(())
//! ```

#![deny(missing_docs, unreachable_pub)]

mod accumulate;
mod checks;
mod clip;
mod defence;
mod device_rng;
mod error;
mod finite;
mod noise;
mod parse;
mod quantize;
mod sparsify;

pub use accumulate::GradientAccumulator;
pub use defence::{apply_all, apply_all_deferred, derive_seed, Defence};
pub use finite::FiniteChecks;
pub use noise::{draw_noise, NoiseSource};
pub use error::{DefenceError, Result};
