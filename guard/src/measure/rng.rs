//! libtorch's random stream, kept where the guard found it. The guard's own passes run the
//! user's model (the probes' forward, the per-sample passes), and a dropout layer there draws
//! from the default generator of its device, the one the training step draws from next. A
//! [`RngSnapshot`] taken before the passes and put back after them leaves that stream as if
//! the guard had not run, so a rule-less guarded run with dropout ends bit-identical to the
//! unguarded one.
use super::ext::{rng_state, set_rng_state};
use crate::error::Result;
use std::ffi::c_int;
use tch::{Device, Tensor};

/// The states of the default generators a model's passes can draw from: the host's always
/// (host tensors, and ops that draw on the host), and the model's CUDA device's.
pub(crate) struct RngSnapshot {
    saved: Vec<(c_int, Tensor)>,
}

impl RngSnapshot {
    /// Copies the states of the host generator and, for a CUDA model, its device's.
    pub(crate) fn take(device: Device) -> Result<Self> {
        let mut devices = vec![-1];
        if let Device::Cuda(index) = device {
            devices.push(c_int::try_from(index).unwrap_or(c_int::MAX));
        }
        let saved = devices.into_iter().map(|d| Ok((d, rng_state(d)?))).collect::<Result<_>>()?;
        Ok(Self { saved })
    }

    /// Puts every saved state back.
    pub(crate) fn restore(&self) -> Result<()> {
        self.saved.iter().try_for_each(|(d, state)| set_rng_state(*d, state))
    }
}
