//! M5 in reports (METRICS.md): the reconstruction bound of a noised release per layer and for
//! the whole release, and the run ledger that sums the Fisher information over releases.
use serde::{Deserialize, Serialize};

/// Why a release has no bound (METRICS.md, M5): shown where the number would be.
pub const NO_NOISE_NO_BOUND: &str = "deterministic release: no noise, no bound";

/// What the bound does not promise, said wherever it is shown.
pub const BOUND_CAVEAT: &str = "bounds attackers whose prior knowledge of the data is a Gaussian of its mean and per-dimension variance; an attacker with a stronger prior (the label and the class means, a model of the data) can recover more";

/// Where the prior variance v came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PriorSource {
    /// The per-dimension variance of the estimate's batch (the default).
    Batch,
    /// The policy's `prior_variance` setting (or the audit's `--prior-variance`).
    Setting,
    /// The per-dimension variance over all the audited inputs (the audit's default).
    Inputs,
}

/// M5 of one layer's release (or of the whole release): the van Trees bound in bits per input
/// dimension, the unbiased (Cramer-Rao) floor and dFIL beside it. Unbounded releases carry
/// `None` in every number and the reason.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReconstructionBound {
    /// 0.5 log2(1 + v dFIL): no attacker with a Gaussian prior recovers more bits per input
    /// dimension of the average sample. None: unbounded (`unbounded_reason`).
    pub reconstruction_bound_bits: Option<f64>,
    /// Its standard error (delta method over the probes); 0 with exact JVPs.
    pub reconstruction_bound_se: Option<f64>,
    /// dFIL = tr(I)/D for the average sample, summed over the layers it covers.
    pub dfil: Option<f64>,
    /// dFIL's standard error.
    pub dfil_se: Option<f64>,
    /// The per-dimension MSE no unbiased attacker can go below: 1 / dFIL (None: unbounded, or
    /// +Inf when the release carries no information).
    pub unbiased_mse_floor: Option<f64>,
    /// The noise std sigma_l of the layer's release (None for a whole release or no noise).
    pub noise_std: Option<f64>,
    /// Why there is no bound, when there is none.
    pub unbounded_reason: Option<String>,
    /// The prior variance v per dimension the bound uses.
    pub prior_variance: f64,
    /// Where v came from.
    pub prior: PriorSource,
    /// D: scalars per sample of the representation (inputs or embedding block).
    pub input_dims: usize,
    /// Step of the estimate the JVPs come from.
    pub step: u64,
    /// Samples of the estimate's batch.
    pub n: usize,
    /// Probes K the dFIL is averaged over.
    pub probes: usize,
}

impl ReconstructionBound {
    /// The bound as a number: +Inf when unbounded.
    pub fn bits_or_inf(&self) -> f64 {
        self.reconstruction_bound_bits.unwrap_or(f64::INFINITY)
    }
}

/// The run ledger (METRICS.md, M5, over a run): Fisher information summed per sample over the
/// releases that contained it, and the cumulative bound it implies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Ledger {
    /// Releases counted so far.
    pub releases: u64,
    /// How a sample's share was counted: `per_sample_ids` (the worst sample), `sampling_rate`
    /// (the average sample, n/N per release) or `every_release` (no ids and no declared data
    /// set size: each release counted in full for every sample, the worst case).
    pub accounting: String,
    /// The declared data set size N, if any.
    pub dataset_size: Option<u64>,
    /// Per layer, in model order: the cumulative dFIL (None: some release of it was unbounded).
    pub layer_dfil: Vec<LedgerLayer>,
    /// The whole run's cumulative dFIL over every released layer (None: unbounded).
    pub release_dfil: Option<f64>,
    /// The cumulative bound of the whole run, bits per input dimension (None: +Inf).
    pub release_bound_bits: Option<f64>,
    /// The policy's cap on the cumulative bound, bits per input dimension.
    pub cap_bits: Option<f64>,
    /// Releases blocked, or layers withheld, because they would have crossed the cap.
    pub capped: u64,
    /// The prior variance the bounds use.
    pub prior_variance: f64,
}

/// One layer's line of the ledger.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LedgerLayer {
    /// The layer's name.
    pub name: String,
    /// Cumulative dFIL of the layer's releases (None: unbounded).
    pub dfil: Option<f64>,
    /// The cumulative bound in bits per input dimension (None: +Inf).
    pub bound_bits: Option<f64>,
}

impl Ledger {
    /// The ledger in words, for the end of a run.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let bits = |b: Option<f64>| b.map_or("+Inf (a release without noise: no bound)".to_string(), |b| format!("{b:.4} bits/dim"));
        let mut out = String::new();
        let _ = writeln!(out, "reconstruction ledger over {} releases ({}; v = {:.4}):", self.releases, self.accounting_words(), self.prior_variance);
        for l in &self.layer_dfil {
            let _ = writeln!(out, "  {:<14} cumulative bound {}", l.name, bits(l.bound_bits));
        }
        let cap = self.cap_bits.map_or(String::new(), |c| format!(" (cap {c} bits/dim, {} capped)", self.capped));
        let _ = writeln!(out, "  {:<14} cumulative bound {}{cap}", "release", bits(self.release_bound_bits));
        let _ = writeln!(out, "  ({BOUND_CAVEAT})");
        out
    }

    fn accounting_words(&self) -> String {
        match (self.accounting.as_str(), self.dataset_size) {
            ("per_sample_ids", _) => "the worst sample, by sample id".into(),
            ("sampling_rate", Some(n)) => format!("the average sample of N = {n}, at sampling rate n/N"),
            _ => "every release counted for every sample: declare dataset_size for the sampling rate".into(),
        }
    }
}
