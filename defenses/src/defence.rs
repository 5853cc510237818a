//! The `Defence` enum: one per-layer gradient transformation as written in a policy file,
//! with its validation, its name and its application to a tensor.

use std::fmt;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::checks::{check_tensor, deep_copy, numel};
use crate::clip::clip;
use crate::error::{DefenceError, Result};
use crate::finite::FiniteChecks;
use crate::noise::clip_and_noise;
use crate::quantize::quantize;
use crate::sparsify::sparsify;

/// One transformation of one layer's released gradient.
///
/// Serialised with an `action` tag so a TOML policy reads naturally, e.g.
/// `{ action = "clip", max_norm = 1.0 }`; unknown fields are rejected so a typo cannot
/// silently disable a parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Defence {
    /// The layer is not released at all (`apply` returns `None`).
    Withhold,
    /// Scale the gradient so its L2 norm is at most `max_norm`; unchanged if already below.
    Clip {
        /// Finite, > 0.
        max_norm: f64,
    },
    /// Clip to `clip_norm`, then add i.i.d. Gaussian noise with std `multiplier * clip_norm`,
    /// drawn on the gradient's device from a generator seeded by `apply`'s seed alone
    /// (bit-identical for the same seed on the same device type, independent of libtorch's
    /// default generators, which it never advances): ChaCha8 on the host, libtorch's own
    /// generator (Philox on CUDA) elsewhere.
    ///
    /// This is NOT differential privacy: the clip bounds the whole (batch-mean) layer
    /// gradient, not each sample's contribution, and nothing accounts for the privacy loss
    /// over steps. It makes one release noisier; it gives no formal guarantee.
    Noise {
        /// Finite, > 0.
        clip_norm: f64,
        /// Finite, >= 0 (0 means clip only); `multiplier * clip_norm` must be finite.
        multiplier: f64,
    },
    /// Keep the `ceil(keep_fraction * numel)` (at least 1) largest-magnitude entries and zero
    /// the rest.
    Sparsify {
        /// In (0, 1].
        keep_fraction: f64,
    },
    /// Symmetric uniform quantisation to `L = 2^bits` levels
    /// `-m + i * 2m / (L - 1)`, `i = 0..L-1`, with `m = max|g|`; each entry goes to the nearest
    /// level (ties to the even index). With `bits = 1` the levels are `{-m, +m}`. Zero is not
    /// a level (except for an all-zero gradient, which stays zero).
    Quantize {
        /// In 1..=16.
        bits: u32,
    },
}

fn invalid(
    defence: &'static str,
    parameter: &'static str,
    value: impl fmt::Display,
    expected: &'static str,
) -> DefenceError {
    DefenceError::InvalidParameter {
        defence,
        parameter,
        value: value.to_string(),
        expected,
    }
}

fn check_positive(defence: &'static str, parameter: &'static str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(invalid(defence, parameter, v, "a finite number > 0"))
    }
}

impl Defence {
    /// Checks every parameter against its documented range. `apply` calls this first, so a
    /// bad policy fails loudly instead of releasing a half-defended gradient.
    pub fn validate(&self) -> Result<()> {
        let name = self.name();
        match *self {
            Defence::Withhold => Ok(()),
            Defence::Clip { max_norm } => check_positive(name, "max_norm", max_norm),
            Defence::Noise {
                clip_norm,
                multiplier,
            } => {
                check_positive(name, "clip_norm", clip_norm)?;
                if !(multiplier.is_finite() && multiplier >= 0.0) {
                    return Err(invalid(
                        name,
                        "multiplier",
                        multiplier,
                        "a finite number >= 0",
                    ));
                }
                if !(multiplier * clip_norm).is_finite() {
                    return Err(invalid(
                        name,
                        "multiplier",
                        multiplier,
                        "a value whose product with clip_norm (the noise std) is finite",
                    ));
                }
                Ok(())
            }
            Defence::Sparsify { keep_fraction } => {
                if keep_fraction.is_finite() && keep_fraction > 0.0 && keep_fraction <= 1.0 {
                    Ok(())
                } else {
                    Err(invalid(
                        name,
                        "keep_fraction",
                        keep_fraction,
                        "a number in (0, 1]",
                    ))
                }
            }
            Defence::Quantize { bits } => {
                if (1..=16).contains(&bits) {
                    Ok(())
                } else {
                    Err(invalid(name, "bits", bits, "an integer in 1..=16"))
                }
            }
        }
    }

    /// Every action's name ([`Defence::name`]), as metric labels list them.
    pub const KINDS: [&'static str; 5] = ["clip", "noise", "quantize", "sparsify", "withhold"];

    /// The action name as written in a policy (`"withhold"`, `"clip"`, `"noise"`,
    /// `"sparsify"`, `"quantize"`).
    pub fn name(&self) -> &'static str {
        match self {
            Defence::Withhold => "withhold",
            Defence::Clip { .. } => "clip",
            Defence::Noise { .. } => "noise",
            Defence::Sparsify { .. } => "sparsify",
            Defence::Quantize { .. } => "quantize",
        }
    }

    /// Applies the defence to one layer's gradient and returns a NEW tensor (the input is
    /// never modified and the output shares no storage with it and carries no autograd
    /// history); `None` means the layer is withheld. The output has the input's shape, dtype
    /// and device. `seed` only matters for `Noise`.
    ///
    /// Errors: invalid parameters, an undefined/sparse/non-floating tensor, a gradient with
    /// NaN or infinite entries (`DefenceError::NonFinite`), or an output that would be
    /// non-finite (`DefenceError::NonFiniteOutput`, e.g. noise overflowing f16).
    ///
    /// `Withhold` validates nothing about the tensor and never reads it (no host
    /// synchronisation): withholding is also the safe response to a broken gradient.
    /// Every other defence computes on the device and reads back once: its input's and
    /// output's finiteness, together ([`FiniteChecks`]; [`apply_all_deferred`] leaves even that
    /// read to the caller, for a whole release).
    pub fn apply(&self, grad: &Tensor, seed: u64) -> Result<Option<Tensor>> {
        self.validate()?;
        if *self == Defence::Withhold {
            return Ok(None);
        }
        let mut checks = FiniteChecks::new();
        let out = self.apply_unchecked(grad, seed, true, &mut checks)?;
        checks.verify()?;
        Ok(out)
    }

    /// [`Defence::apply`] without validation and without reading anything back: the input's
    /// finiteness (when `check_input`) and the output's are recorded in `checks`. An empty
    /// gradient has nothing to check.
    fn apply_unchecked(&self, grad: &Tensor, seed: u64, check_input: bool, checks: &mut FiniteChecks) -> Result<Option<Tensor>> {
        if *self == Defence::Withhold {
            return Ok(None);
        }
        let what = || self.to_string();
        let kind = check_tensor(grad, &what)?;
        let grad = grad.f_detach()?;
        if numel(&grad) == 0 {
            return Ok(Some(deep_copy(&grad)?));
        }
        // Each defence's output, and a scalar that is not finite when an input entry is not (a
        // norm or a max the defence computes anyway; None: the input's sum is taken). Only
        // noise can make a finite input's output non-finite (its std may overflow the dtype):
        // clip scales by at most 1, sparsify selects entries, and quantize's levels lie in
        // [-m, m] with m = max|g| an entry of the input's dtype, so their outputs are finite
        // whenever their input is, and are not checked again.
        let (out, input_scalar, check_output) = match *self {
            Defence::Withhold => return Ok(None),
            Defence::Clip { max_norm } => {
                let (out, norm) = clip(&grad, max_norm)?;
                (out, Some(norm), false)
            }
            Defence::Noise {
                clip_norm,
                multiplier,
            } => {
                let (out, norm) = clip_and_noise(&grad, kind, clip_norm, multiplier, seed)?;
                (out, Some(norm), true)
            }
            Defence::Sparsify { keep_fraction } => (sparsify(&grad, keep_fraction)?, None, false),
            Defence::Quantize { bits } => {
                let (out, m) = quantize(&grad, kind, bits)?;
                (out, Some(m), false)
            }
        };
        if check_input {
            checks.push(&grad, input_scalar, what(), false)?;
        }
        if check_output {
            checks.push(&out, None, what(), true)?;
        }
        Ok(Some(out))
    }
}

impl fmt::Display for Defence {
    /// Policy-like rendering for logs and reports, e.g. `clip(max_norm=1)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Defence::Withhold => write!(f, "withhold"),
            Defence::Clip { max_norm } => write!(f, "clip(max_norm={max_norm})"),
            Defence::Noise {
                clip_norm,
                multiplier,
            } => {
                write!(f, "noise(clip_norm={clip_norm}, multiplier={multiplier})")
            }
            Defence::Sparsify { keep_fraction } => {
                write!(f, "sparsify(keep_fraction={keep_fraction})")
            }
            Defence::Quantize { bits } => write!(f, "quantize(bits={bits})"),
        }
    }
}

/// The seed `apply_all` passes to the defence at `position`: a SplitMix64 mix of the base
/// seed and the position, so two noise defences in one chain draw independent streams and
/// the same (seed, position) always gives the same stream.
pub fn derive_seed(seed: u64, position: usize) -> u64 {
    let mut z = seed.wrapping_add(
        (position as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Applies `defences` in order, the defence at position `i` with `derive_seed(seed, i)`.
/// Every defence is validated first, so a bad parameter is reported even when an earlier
/// `Withhold` would end the chain. `Withhold` then short-circuits to `None`. An empty chain
/// returns a deep copy of `grad` after the same tensor checks as `apply`. The chain computes
/// on the device and reads back once (the finiteness of its input and of every output).
pub fn apply_all(defences: &[Defence], grad: &Tensor, seed: u64) -> Result<Option<Tensor>> {
    let mut checks = FiniteChecks::new();
    let out = apply_all_deferred(defences, grad, seed, &mut checks)?;
    checks.verify()?;
    Ok(out)
}

/// [`apply_all`] without any host read: the finiteness of the chain's input and of each
/// defence's output is recorded in `checks`, so that a release of many layers reads once
/// ([`FiniteChecks::verify`]). The returned tensor must not be released before `verify`
/// returns `Ok`. A non-finite input fails there with [`DefenceError::NonFinite`] naming the
/// chain's first defence, as `apply_all` would.
pub fn apply_all_deferred(defences: &[Defence], grad: &Tensor, seed: u64, checks: &mut FiniteChecks) -> Result<Option<Tensor>> {
    for d in defences {
        d.validate()?;
    }
    if defences.is_empty() {
        let what = || "an empty defence chain".to_string();
        check_tensor(grad, &what)?;
        let copy = deep_copy(grad)?;
        checks.push(&copy, None, what(), false)?;
        return Ok(Some(copy));
    }
    let mut current: Option<Tensor> = None;
    for (i, d) in defences.iter().enumerate() {
        let input = current.as_ref().unwrap_or(grad);
        // The chain's input is checked once; every later input is an output checked already.
        match d.apply_unchecked(input, derive_seed(seed, i), i == 0, checks)? {
            Some(out) => current = Some(out),
            None => return Ok(None),
        }
    }
    Ok(current)
}
