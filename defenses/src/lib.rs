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
//! caller's tensors, and never returns a non-finite tensor.

mod accumulate;
mod checks;
mod clip;
mod defence;
mod error;
mod noise;
mod quantize;
mod sparsify;

pub use accumulate::GradientAccumulator;
pub use defence::{apply_all, derive_seed, Defence};
pub use error::{DefenceError, Result};
