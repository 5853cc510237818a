//! The optimisation attack of the suite: the existing layer-restricted inversion
//! ([`Inspection::original_information`](crate::Inspection::original_information), cosine
//! gradient matching with Adam from a seeded start, labels known) on one release of the whole
//! batch, its result put in the suite's terms. That attack returns the batch's mean error (its
//! samples matched one to one within labels, greedily, closest first), not its
//! reconstructions: the per-sample PSNRs are unknown and `samples_recovered` is the count
//! guaranteed by the mean (Markov's inequality: fewer than n MSE / MSE_30 samples can have an
//! error above MSE_30, the error of 30 dB), a lower bound on the oracle's count.
use super::{bits_per_dim, psnr, recovery_mse, AttackKind, AttackOutcome};
use crate::measure::Inversion;

/// The suite's outcome of the inversion of one release of `n` samples of `dims` values, scored
/// against `peak`, with `baseline_mse` the error of the suite's x_bar.
pub(super) fn outcome(inversion: &Inversion, n: usize, dims: usize, peak: f64, baseline_mse: f64) -> AttackOutcome {
    let mse = inversion.mse;
    let missed = if mse > 0.0 { ((n as f64 * mse / recovery_mse(peak)).floor() as usize).min(n) } else { 0 };
    let samples_recovered = n - missed;
    AttackOutcome {
        attack: AttackKind::Optimisation,
        n,
        dims,
        candidates: inversion.samples,
        samples_recovered,
        samples_recovered_exact: false,
        recovered_fraction: samples_recovered as f64 / n as f64,
        bits_per_dim: bits_per_dim(baseline_mse, mse),
        psnr: psnr(peak, mse),
        mean_sample_psnr: None,
        sample_psnr: Vec::new(),
        matches: Vec::new(),
        mse,
        baseline_mse,
        peak,
        oracle_matching: true,
    }
}
