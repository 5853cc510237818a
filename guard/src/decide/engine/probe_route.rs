//! M1's route when the policy leaves `probe_samples` unset: sub-batch probes (METRICS.md, M1,
//! "Sub-batch probes") where they buy the same standard error for less time on this model,
//! else the full batch. Which is cheaper depends on the model (a probe's cost falls with m only
//! where activations dominate it, and the samples' own spread of sensitivity enters a
//! sub-batch's variance), so the guard measures it on the model rather than guess:
//!
//! 1. the first estimate probes the full batch with the policy's K, the reference: its time and,
//!    per layer, the relative variance of its per-probe values, (se / S_l)^2 K;
//! 2. the next estimate probes sub-batches of m = n / 4 with the same K (a model whose samples
//!    interact is detected there and keeps the full batch: `probe_samples = n` comes back);
//! 3. K' = ceil(K x the mean over layers of the relative variances' ratio), so that K' sub-batch
//!    probes give the standard error K full-batch probes gave; the sub-batch route is kept when
//!    its time at K' is below 0.9 of the full batch's at K.
//!
//! Each ratio of two K-probe variances is itself noisy (its mean is (K-1)/(K-3) for equal
//! variances: 1.4 at K = 8); the mean over layers keeps that bias, which errs towards more
//! probes. Settled once per batch size; a batch of another size starts again.
use crate::measure::SensitivitySettings;
use crate::report::{Metric, Sensitivity};

/// Samples per sub-batch probe: a quarter of the batch.
const SUB_BATCH_DIVISOR: usize = 4;
/// The smallest batch for which sub-batches are tried (m = 2).
const SMALLEST_BATCH: usize = 8;
/// The sub-batch route is kept only when its time at K' is below this share of the full batch's.
const REQUIRED_SAVING: f64 = 0.9;
/// K' is at most this many times K.
const MAX_PROBE_FACTOR: usize = 4;

/// Where the calibration stands.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ProbeRoute {
    /// No estimate yet at this batch size, or the policy chose m itself.
    Uncalibrated,
    /// The full batch's reference is in; the sub-batch trial is next.
    Trial { n: usize, reference: Calibration },
    /// Decided for batches of `n`: sub-batches of `m` with `probes` probes, or the full batch.
    Settled { n: usize, sub_batch: Option<(usize, usize)> },
}

/// One estimate's M1 time and per-layer relative variance of its per-probe values.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Calibration {
    seconds: f64,
    relative_variance: Vec<Option<f64>>,
}

impl ProbeRoute {
    /// The settings this estimate's M1 runs with on a batch of `n`.
    pub(super) fn settings(&self, policy: SensitivitySettings, n: usize) -> SensitivitySettings {
        if policy.probe_samples.is_some() || policy.exact || n < SMALLEST_BATCH {
            return policy;
        }
        match self {
            ProbeRoute::Trial { n: at, .. } if *at == n => SensitivitySettings { probe_samples: Some(n / SUB_BATCH_DIVISOR), ..policy },
            ProbeRoute::Settled { n: at, sub_batch: Some((m, probes)) } if *at == n => SensitivitySettings { probe_samples: Some(*m), probes: *probes, ..policy },
            _ => policy,
        }
    }

    /// Takes in an estimate's M1 (run with [`ProbeRoute::settings`]) and its time.
    pub(super) fn observe(&mut self, policy: &SensitivitySettings, n: usize, measured: &[Metric<Sensitivity>], seconds: f64) {
        if policy.probe_samples.is_some() || policy.exact || n < SMALLEST_BATCH {
            return;
        }
        let calibration = Calibration { seconds, relative_variance: measured.iter().map(relative_variance).collect() };
        *self = match std::mem::replace(self, ProbeRoute::Uncalibrated) {
            ProbeRoute::Trial { n: at, reference } if at == n => {
                // The samples interact: the trial probed the full batch.
                let full = measured.iter().filter_map(Metric::measured).any(|s| s.probe_samples == Some(n));
                let sub_batch = if full { None } else { settle(&reference, &calibration, policy.probes, n) };
                ProbeRoute::Settled { n, sub_batch }
            }
            settled @ ProbeRoute::Settled { n: at, .. } if at == n => settled,
            _ => ProbeRoute::Trial { n, reference: calibration },
        };
    }
}

/// The sub-batch route (m, K') where it gives the reference's standard error faster.
fn settle(reference: &Calibration, trial: &Calibration, probes: usize, n: usize) -> Option<(usize, usize)> {
    let ratios: Vec<f64> = reference
        .relative_variance
        .iter()
        .zip(&trial.relative_variance)
        .filter_map(|(r, t)| Some(t.as_ref()? / r.as_ref()?))
        .filter(|r| r.is_finite())
        .collect();
    if ratios.is_empty() {
        return None;
    }
    let ratio = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let needed = (probes as f64 * ratio).ceil().max(2.0) as usize;
    if needed > probes * MAX_PROBE_FACTOR {
        return None;
    }
    let time = trial.seconds * needed as f64 / probes as f64;
    (time < REQUIRED_SAVING * reference.seconds).then_some((n / SUB_BATCH_DIVISOR, needed))
}

/// (se / S_l)^2 K, the relative variance of one probe's value (S_l^2's per-probe estimates have
/// relative variance 4 (se / S_l)^2 K by the delta method; the factor cancels in the ratio).
fn relative_variance(m: &Metric<Sensitivity>) -> Option<f64> {
    let s = m.measured()?;
    let k = s.probes? as f64;
    (s.sensitivity > 0.0 && s.sensitivity_se > 0.0).then(|| (s.sensitivity_se / s.sensitivity).powi(2) * k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calibration(seconds: f64, relative_variance: &[f64]) -> Calibration {
        Calibration { seconds, relative_variance: relative_variance.iter().map(|&v| Some(v)).collect() }
    }

    #[test]
    fn the_sub_batch_route_is_kept_where_it_gives_the_same_error_faster() {
        // Twice the variance at a quarter of the time: K' = 16 at half the time.
        assert_eq!(settle(&calibration(1.0, &[0.1, 0.2]), &calibration(0.25, &[0.2, 0.4]), 8, 32), Some((8, 16)));
        // Four times the variance at 0.3 of the time: 32 probes cost 1.2: the full batch.
        assert_eq!(settle(&calibration(1.0, &[0.1]), &calibration(0.3, &[0.4]), 8, 32), None);
        // Same time (weight-bound products): the full batch.
        assert_eq!(settle(&calibration(1.0, &[0.1]), &calibration(0.95, &[0.1]), 8, 32), None);
    }
}
