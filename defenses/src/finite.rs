//! Finiteness checks kept on the device and read once. Every defence refuses a non-finite
//! input and never returns a non-finite output; checking each with a host read would make a
//! release of L layers wait for the device 2L or more times. [`FiniteChecks`] keeps, per
//! check, one scalar on the tensor's device that is non-finite whenever an entry is (its sum,
//! or a norm the defence computed anyway: a NaN or an infinity propagates into both), and
//! reads them all in one transfer per device ([`FiniteChecks::verify`]). A sum or norm can
//! also overflow on finite entries, so a non-finite scalar is confirmed by counting the
//! entries (one more read, on that rare path only) before it fails, with the first failing
//! check's typed error naming its defence (and the context the caller set, e.g. the layer).
use tch::{Device, Kind, Tensor};

use crate::checks::{count_non_finite, numel};
use crate::error::{DefenceError, Result};

/// One pending check: what it is about, the tensor, and its scalar on the tensor's device.
#[derive(Debug)]
struct Pending {
    what: String,
    /// An output check (`NonFiniteOutput`) rather than an input check (`NonFinite`).
    output: bool,
    tensor: Tensor,
    /// Finite when every entry of `tensor` is (f64, 0-dim).
    scalar: Tensor,
}

/// The finiteness checks of one or more defence applications, not yet read (see the module
/// docs). Filled by [`crate::apply_all_deferred`]; nothing it checked may be released before
/// [`FiniteChecks::verify`] returns `Ok`. Dropping it unverified vouches for nothing. It holds
/// (shallow) the tensors it checks, counted again on a failing check's path: do not edit them
/// in place before `verify`.
#[derive(Debug, Default)]
pub struct FiniteChecks {
    context: Option<String>,
    pending: Vec<Pending>,
}

impl FiniteChecks {
    /// No checks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the checks recorded from now on in their errors: `"{context}: {defence}"`
    /// (e.g. `layer conv1: noise(clip_norm=1, multiplier=0.5)`).
    pub fn set_context(&mut self, context: impl Into<String>) {
        self.context = Some(context.into());
    }

    /// Number of checks recorded.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether no check was recorded.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Records that `t` must be finite, with `scalar` (None: `t`'s sum is taken) a 0-dim
    /// tensor on `t`'s device that is NaN or infinite when an entry of `t` is.
    pub(crate) fn push(&mut self, t: &Tensor, scalar: Option<Tensor>, what: String, output: bool) -> Result<()> {
        let what = match &self.context {
            Some(context) => format!("{context}: {what}"),
            None => what,
        };
        let scalar = match scalar {
            Some(s) => s,
            // One pass, accumulated in f32 at least (an f16 sum of many entries overflows).
            None => match t.f_kind()? {
                Kind::Double => t.f_sum(Kind::Double)?,
                _ => t.f_sum(Kind::Float)?,
            },
        };
        let scalar = scalar.f_to_kind(Kind::Double)?;
        self.pending.push(Pending { what, output, tensor: t.shallow_clone(), scalar });
        Ok(())
    }

    /// Reads every check's scalar (one transfer per device the checked tensors live on) and
    /// fails with the first check, in the order recorded, whose tensor holds a NaN or infinite
    /// entry: [`DefenceError::NonFinite`] for an input, [`DefenceError::NonFiniteOutput`] for
    /// an output.
    pub fn verify(self) -> Result<()> {
        let mut scalars = vec![0.0f64; self.pending.len()];
        let mut devices: Vec<Device> = Vec::new();
        for p in &self.pending {
            let d = p.scalar.device();
            if !devices.contains(&d) {
                devices.push(d);
            }
        }
        for device in devices {
            let at: Vec<usize> = (0..self.pending.len()).filter(|&i| self.pending[i].scalar.device() == device).collect();
            let stacked = Tensor::f_stack(&at.iter().map(|&i| self.pending[i].scalar.shallow_clone()).collect::<Vec<_>>(), 0)?.f_to_device(Device::Cpu)?;
            for (&i, v) in at.iter().zip(Vec::<f64>::try_from(&stacked)?) {
                scalars[i] = v;
            }
        }
        for (p, v) in self.pending.iter().zip(scalars) {
            if v.is_finite() {
                continue;
            }
            // The scalar overflowed or an entry is not finite: count to tell which.
            let count = count_non_finite(&p.tensor)?;
            if count > 0 {
                let (what, numel) = (p.what.clone(), numel(&p.tensor));
                return Err(if p.output { DefenceError::NonFiniteOutput { what, count, numel } } else { DefenceError::NonFinite { what, count, numel } });
            }
        }
        Ok(())
    }
}
