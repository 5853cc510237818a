//! M4 as an attack suite (METRICS.md, M4, "Usable original information"): the attacks that
//! are run on a release of the batch size the user trains with, each scored the same way, and
//! the strongest per layer named.
//!
//! - [`analytic`]: for a Linear layer on the (flattened) model input with a bias, every unit
//!   u with dG/db_u != 0 gives x_hat = (dG/dW)_u / (dG/db_u), exact when one sample alone
//!   moves the unit (Phong et al. 2018, trap weights: Boenisch et al. 2021).
//! - [`analytic_differences`]: the same on the difference of two units whose weight rows point
//!   the same way, consecutive by threshold along the shared direction (what binned "imprint"
//!   layers leak: Fowl et al. 2022).
//! - [`recover_labels`]: the labels present in the batch from the sign pattern of the last
//!   layer's bias gradient under a softmax cross-entropy (Zhao et al. 2020, iDLG; counts after
//!   Wainakh et al. 2022), with an estimate of each label's count.
//! - the optimisation attack: the existing layer-restricted inversion
//!   ([`Inspection::original_information`](crate::Inspection::original_information)) on one
//!   release of the whole batch; it returns the batch's mean error only, so its
//!   `samples_recovered` is a guaranteed minimum (see [`AttackOutcome::samples_recovered_exact`]).
//!
//! [`Inspection::attack_suite`](crate::Inspection::attack_suite) runs them all on the batch's
//! release and names the strongest per layer; [`score`] scores any set of candidate
//! reconstructions against the batch's true inputs.
//!
//! # Scoring, and what the numbers are
//! Every number is per released batch of n samples (n is in the outcome). Each true sample is
//! matched to the candidate closest to it (an *oracle* matching: the attacker does not know
//! which candidate belongs to which sample, or which candidates are garbage, so every figure is
//! an upper bound on what that attack gives an attacker who must choose): with x_hat_i its
//! match, x_bar the mean input (the batch's, or a reference mean) and D the values per sample,
//!
//! ```text
//! PSNR_i             = 10 log10(peak^2 / (||x_i - x_hat_i||^2 / D))
//! samples_recovered  = |{i : PSNR_i >= 30 dB}|,  recovered_fraction = samples_recovered / n
//! bits_per_dim       = max(0, 0.5 log2( E||x - x_bar||^2 / E||x - x_hat||^2 ))
//! ```
//!
//! A metric that does not apply (no eligible layer, no unit with a bias gradient, a gradient
//! that is never released) is [`Metric::Absent`](crate::Metric::Absent) with the reason, never 0.
//!
//! ```
//! use gradguard_guard::{Batch, Inspection, LayerMap, measure::attacks::{AttackKind, AttackSettings}};
//! use tch::{nn, nn::Module, Device, Kind, Tensor};
//!
//! let mut vs = nn::VarStore::new(Device::Cpu);
//! let fc = nn::linear(vs.root() / "fc", 6, 3, Default::default());
//! let loss = |x: &Tensor, y: &Tensor| fc.forward(x).f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0);
//! // One sample: each unit's weight gradient is its bias gradient times the input.
//! let (x, y) = (Tensor::rand([1, 6], (Kind::Double, Device::Cpu)), Tensor::from_slice(&[2i64]));
//! vs.double();
//! let layers = LayerMap::from_var_store(&vs)?;
//! let settings = AttackSettings { optimisation: None, peak: Some(1.0), ..Default::default() };
//! let suite = Inspection::new(&layers, &loss, Batch::new(&x, &y)).attack_suite(&settings)?;
//! let fc = &suite.layers[0];
//! assert_eq!(fc.strongest, Some(AttackKind::Analytic));
//! assert_eq!(fc.analytic.measured().unwrap().samples_recovered, 1);
//! assert_eq!(suite.labels.measured().unwrap().recovered, [2]);
//! # Ok::<(), gradguard_guard::GuardError>(())
//! ```
use crate::error::{GuardError, Result, TorchContext};
use crate::measure::tensors::to_f64_vec;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

mod analytic;
mod labels;
mod optimisation;
mod suite;

pub use analytic::{analytic, analytic_differences, LinearRelease, Reconstructions};
pub use labels::{recover_labels, LabelRecovery, LabelTruth};
pub use suite::{AttackSettings, AttackSuite, LayerAttacks};

/// The PSNR at or above which a sample counts as recovered (METRICS.md, M4).
pub const RECOVERY_PSNR_DB: f64 = 30.0;

/// Which attack an outcome belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// x_hat = (dG/dW)_u / (dG/db_u) for every unit u of a Linear layer on the model input.
    Analytic,
    /// The same on differences of two units whose weight rows point the same way.
    AnalyticDifferences,
    /// The layer-restricted gradient-matching inversion (Adam on a dummy batch).
    Optimisation,
}

impl AttackKind {
    /// The attack's name in reports: `analytic`, `analytic_differences` or `optimisation`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Analytic => "analytic",
            Self::AnalyticDifferences => "analytic_differences",
            Self::Optimisation => "optimisation",
        }
    }
}

/// What one attack recovered from one released batch, scored against its true inputs. Every
/// figure is per batch of `n` samples, with each sample matched to its best candidate by an
/// oracle (`oracle_matching`): an upper bound on that attack.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttackOutcome {
    /// The attack.
    pub attack: AttackKind,
    /// Samples in the released batch.
    pub n: usize,
    /// Values per sample (D).
    pub dims: usize,
    /// Candidate reconstructions the attack produced (finite ones; the optimisation attack
    /// produces one per sample).
    pub candidates: usize,
    /// Samples of the batch some candidate gives back at PSNR >= 30 dB ([`RECOVERY_PSNR_DB`]).
    pub samples_recovered: usize,
    /// Whether `samples_recovered` is a count (true) or a guaranteed minimum (false: the
    /// optimisation attack reports the batch's mean error only; at most n MSE / MSE_30 of the
    /// samples can be worse than 30 dB, with MSE_30 the error of 30 dB).
    pub samples_recovered_exact: bool,
    /// samples_recovered / n.
    pub recovered_fraction: f64,
    /// max(0, 0.5 log2(E||x - x_bar||^2 / E||x - x_hat||^2)) over the batch (+Inf when every
    /// match is exact; 0 when the baseline is 0, as for one sample measured against its own mean).
    pub bits_per_dim: f64,
    /// 10 log10(peak^2 / mse): the PSNR of the batch's mean matched error.
    pub psnr: f64,
    /// Mean over the samples of each one's PSNR (None where per-sample errors are not known:
    /// the optimisation attack). +Inf when a match is exact.
    pub mean_sample_psnr: Option<f64>,
    /// Each sample's PSNR against its match, in batch order (empty for the optimisation attack).
    pub sample_psnr: Vec<f64>,
    /// The index of each sample's matched candidate, in batch order (empty for the
    /// optimisation attack, which matches one to one within labels, greedily).
    pub matches: Vec<usize>,
    /// E||x - x_hat||^2 / D.
    pub mse: f64,
    /// E||x - x_bar||^2 / D: the error of answering the mean input.
    pub baseline_mse: f64,
    /// The data's range the PSNR is taken against.
    pub peak: f64,
    /// Always true: samples are matched to their candidates with the true inputs known.
    pub oracle_matching: bool,
}

/// 0.5 log2(baseline / mse), at least 0; +Inf for an exact reconstruction of a spread batch,
/// 0 when the baseline itself is 0.
pub(crate) fn bits_per_dim(baseline_mse: f64, mse: f64) -> f64 {
    if baseline_mse <= 0.0 {
        0.0
    } else if mse <= 0.0 {
        f64::INFINITY
    } else {
        (0.5 * (baseline_mse / mse).log2()).max(0.0)
    }
}

/// 10 log10(peak^2 / mse) (+Inf for mse 0).
pub(crate) fn psnr(peak: f64, mse: f64) -> f64 {
    10.0 * (peak * peak / mse).log10()
}

/// The largest per-value MSE that still counts as recovered: peak^2 10^(-3).
pub(crate) fn recovery_mse(peak: f64) -> f64 {
    peak * peak * 10f64.powf(-RECOVERY_PSNR_DB / 10.0)
}

/// Checks a peak (finite and > 0).
pub(crate) fn check_peak(peak: f64) -> Result<()> {
    if peak.is_finite() && peak > 0.0 {
        Ok(())
    } else {
        Err(GuardError::Config { setting: "attacks.peak", why: format!("the data's range must be finite and > 0, got {peak}") })
    }
}

/// The true inputs as an n x D host matrix (Double), checked: at least one sample, D > 0,
/// finite values.
pub(crate) fn truth_matrix(truth: &Tensor) -> Result<(Tensor, usize, usize)> {
    if !truth.defined() || truth.dim() == 0 || truth.size()[0] == 0 {
        return Err(GuardError::EmptyBatch);
    }
    let n = truth.size()[0];
    let d = truth.numel() as i64 / n;
    if d == 0 {
        return Err(GuardError::Config { setting: "attacks inputs", why: format!("samples of shape {:?} hold no values", &truth.size()[1..]) });
    }
    let x = truth
        .f_detach()
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_to_kind(Kind::Double))
        .and_then(|t| t.f_reshape([n, d]))
        .during("flattening the true inputs")?;
    let finite = x.f_isfinite().and_then(|f| f.f_all()).and_then(|f| f.f_int64_value(&[])).during("checking the true inputs")?;
    if finite == 0 {
        return Err(GuardError::Config { setting: "attacks inputs", why: "the true inputs hold a non-finite value".into() });
    }
    Ok((x, n as usize, d as usize))
}

/// Scores candidate reconstructions of one released batch against its true inputs.
///
/// `truth` holds the n samples (samples along dimension 0, any per-sample shape), `candidates`
/// the attack's m reconstructions (m rows of the same number of values; non-finite rows are
/// dropped), `peak` the data's range, and `mean` the reference x_bar (D values; None: the
/// batch's mean). Each sample is matched to its closest candidate (oracle matching: several
/// samples may share a candidate). Errors on an empty batch, no (finite) candidates, a shape
/// mismatch, a non-finite input or a bad peak.
///
/// ```
/// use gradguard_guard::measure::attacks::{score, AttackKind};
/// use tch::Tensor;
/// let truth = Tensor::from_slice(&[0.0f64, 1.0]).reshape([2, 1]);
/// let candidates = Tensor::from_slice(&[1.0f64]).reshape([1, 1]);
/// let s = score(AttackKind::Analytic, &truth, &candidates, 1.0, None)?;
/// assert_eq!((s.samples_recovered, s.sample_psnr[0], s.sample_psnr[1]), (1, 0.0, f64::INFINITY));
/// # Ok::<(), gradguard_guard::GuardError>(())
/// ```
pub fn score(attack: AttackKind, truth: &Tensor, candidates: &Tensor, peak: f64, mean: Option<&[f64]>) -> Result<AttackOutcome> {
    check_peak(peak)?;
    let (x, n, d) = truth_matrix(truth)?;
    if !candidates.defined() || candidates.numel() == 0 {
        return Err(GuardError::Config { setting: "attack candidates", why: "no candidate reconstructions to score".into() });
    }
    if !candidates.numel().is_multiple_of(d) || (candidates.dim() >= 2 && candidates.numel() / candidates.size()[0] as usize != d) {
        return Err(GuardError::Config {
            setting: "attack candidates",
            why: format!("candidates of shape {:?} do not hold {d} values per row (the samples' count)", candidates.size()),
        });
    }
    let c = candidates
        .f_detach()
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_to_kind(Kind::Double))
        .and_then(|t| t.f_reshape([-1, d as i64]))
        .during("flattening the candidates")?;
    let keep = c.f_isfinite().and_then(|f| f.f_all_dim(1, false)).and_then(|f| f.f_nonzero()).and_then(|i| i.f_reshape([-1])).during("dropping non-finite candidates")?;
    let c = c.f_index_select(0, &keep).during("dropping non-finite candidates")?;
    let m = c.size()[0] as usize;
    if m == 0 {
        return Err(GuardError::Config { setting: "attack candidates", why: "every candidate holds a non-finite value".into() });
    }
    let x_bar = match mean {
        Some(mean) if mean.len() != d => {
            return Err(GuardError::Config { setting: "attacks.reference_mean", why: format!("{} values, the samples hold {d}", mean.len()) });
        }
        Some(mean) if mean.iter().any(|v| !v.is_finite()) => {
            return Err(GuardError::Config { setting: "attacks.reference_mean", why: "a non-finite value".into() });
        }
        Some(mean) => Tensor::f_from_slice(mean).and_then(|m| m.f_reshape([1, -1])).during("forming the reference mean")?,
        None => x.f_mean_dim(0, true, Kind::Double).during("forming the batch mean")?,
    };
    let (matches, errors, baseline) = (|| -> std::result::Result<(Tensor, Tensor, Tensor), tch::TchError> {
        // ||x_i - c_j||^2 to pick each sample's closest candidate; its error is recomputed exactly.
        let cross = x.f_matmul(&c.f_tr()?)?;
        let d2 = x.f_square()?.f_sum_dim_intlist(1, true, Kind::Double)?.f_add(&c.f_square()?.f_sum_dim_intlist(1, false, Kind::Double)?.f_unsqueeze(0)?)?.f_sub(&cross.f_mul_scalar(2.0)?)?;
        let best = d2.f_argmin(1, false)?;
        let errors = x.f_sub(&c.f_index_select(0, &best)?)?.f_square()?.f_sum_dim_intlist(1, false, Kind::Double)?;
        let baseline = x.f_sub(&x_bar)?.f_square()?.f_sum(Kind::Double)?;
        Ok((best, errors, baseline))
    })()
    .during("matching samples to candidates")?;
    let matches: Vec<usize> = to_f64_vec(&matches)?.into_iter().map(|j| j as usize).collect();
    let errors = to_f64_vec(&errors)?;
    let baseline_mse = to_f64_vec(&baseline)?[0] / (n * d) as f64;
    let mse = errors.iter().sum::<f64>() / (n * d) as f64;
    let sample_psnr: Vec<f64> = errors.iter().map(|e| psnr(peak, e / d as f64)).collect();
    let samples_recovered = sample_psnr.iter().filter(|p| **p >= RECOVERY_PSNR_DB).count();
    Ok(AttackOutcome {
        attack,
        n,
        dims: d,
        candidates: m,
        samples_recovered,
        samples_recovered_exact: true,
        recovered_fraction: samples_recovered as f64 / n as f64,
        bits_per_dim: bits_per_dim(baseline_mse, mse),
        psnr: psnr(peak, mse),
        mean_sample_psnr: Some(sample_psnr.iter().sum::<f64>() / n as f64),
        sample_psnr,
        matches,
        mse,
        baseline_mse,
        peak,
        oracle_matching: true,
    })
}
