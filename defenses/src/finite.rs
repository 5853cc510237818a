//! Finiteness checks kept on the device and read once. Every defence refuses a non-finite
//! input and never returns a non-finite output; checking each with a host read would make a
//! release of L layers wait for the device 2L or more times. [`FiniteChecks`] keeps each
//! check's count of non-finite entries as a device tensor and reads them all in one transfer
//! per device ([`FiniteChecks::verify`]), which fails with the first failing check's typed
//! error, naming its defence (and the context the caller set, e.g. the layer).
use tch::{Device, Kind, Tensor};

use crate::checks::{non_finite_count, numel};
use crate::error::{DefenceError, Result};

/// One pending check: what it is about, and its count on the tensor's device.
struct Pending {
    what: String,
    /// An output check (`NonFiniteOutput`) rather than an input check (`NonFinite`).
    output: bool,
    numel: i64,
    count: Tensor,
}

/// The finiteness checks of one or more defence applications, not yet read (see the module
/// docs). Filled by [`crate::apply_all_deferred`]; nothing it checked may be released before
/// [`FiniteChecks::verify`] returns `Ok`. Dropping it unverified vouches for nothing.
#[derive(Default)]
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

    fn push(&mut self, t: &Tensor, what: String, output: bool) -> Result<()> {
        let what = match &self.context {
            Some(context) => format!("{context}: {what}"),
            None => what,
        };
        let count = non_finite_count(t)?;
        self.pending.push(Pending { what, output, numel: numel(t), count });
        Ok(())
    }

    /// Records that `t`, a defence's input, must be finite.
    pub(crate) fn input(&mut self, t: &Tensor, what: String) -> Result<()> {
        self.push(t, what, false)
    }

    /// Records that `t`, a defence's output, must be finite.
    pub(crate) fn output(&mut self, t: &Tensor, what: String) -> Result<()> {
        self.push(t, what, true)
    }

    /// Reads every count (one transfer per device the checked tensors live on) and fails with
    /// the first check, in the order recorded, that found a NaN or infinite entry:
    /// [`DefenceError::NonFinite`] for an input, [`DefenceError::NonFiniteOutput`] for an
    /// output.
    pub fn verify(self) -> Result<()> {
        let mut counts = vec![0i64; self.pending.len()];
        let mut devices: Vec<Device> = Vec::new();
        for p in &self.pending {
            let d = p.count.device();
            if !devices.contains(&d) {
                devices.push(d);
            }
        }
        for device in devices {
            let at: Vec<usize> = (0..self.pending.len()).filter(|&i| self.pending[i].count.device() == device).collect();
            let stacked = Tensor::f_stack(&at.iter().map(|&i| self.pending[i].count.shallow_clone()).collect::<Vec<_>>(), 0)?
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Int64)?;
            let read = Vec::<i64>::try_from(&stacked)?;
            for (&i, c) in at.iter().zip(read) {
                counts[i] = c;
            }
        }
        let Some(i) = counts.iter().position(|&c| c > 0) else { return Ok(()) };
        let p = &self.pending[i];
        let (what, count, numel) = (p.what.clone(), counts[i], p.numel);
        Err(if p.output { DefenceError::NonFiniteOutput { what, count, numel } } else { DefenceError::NonFinite { what, count, numel } })
    }
}
