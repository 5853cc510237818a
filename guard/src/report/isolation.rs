//! M6, sample isolation, as reports carry it ([`SampleIsolation`] per layer), and the vetting
//! of parameters set from outside ([`Vetting`], `Guard::vet_parameters`).
use super::{LeakageMetric, Metric};
use serde::{Deserialize, Serialize};

/// How the per-sample terms g_{u,i} of M6 were obtained (METRICS.md, M6: sample i's gradient
/// is the gradient of its own term of the batch loss, so that G = (1/n) sum_i g_i exactly).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "route", rename_all = "snake_case")]
pub enum TermSource {
    /// The gradient of a batch of one sample per pass: sample i's term when the samples do
    /// not interact, which is checked: the per-sample gradients add up to the batch gradient
    /// (n small passes: the cheap route).
    OneSampleBatches,
    /// One forward pass of the whole batch; the loss split at its last operation (`node`, the
    /// autograd node's name: `NllLossBackward0`, `MeanBackward0`, ...), whose input holds one
    /// row per sample; sample i's term is differentiated by one backward pass over the batch's
    /// graph. Exact also when the model couples its samples (batch norm in training mode): the
    /// batch statistics are held as in the batch. n backward passes of the whole batch.
    BatchGraph {
        /// The loss's last operation.
        node: String,
        /// Why batches of one were not the terms.
        why: String,
    },
}

/// M6 for one layer (METRICS.md, M6): what the batch mean fails to hide.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleIsolation {
    /// |{i : i dominates at least one isolating unit}| / n: the share of the batch this
    /// layer's release exposes alone. 1 for a batch of one, by definition.
    pub exposed_fraction: f64,
    /// Sum over the isolating units of ||G_u||^2 / ||G_l||^2: the share of the layer's released
    /// gradient that comes from units carrying one sample each.
    pub isolated_share: f64,
    /// Samples exposed: `exposed_fraction * n`.
    pub exposed_samples: usize,
    /// Units whose dominant sample holds a share of at least `tau`.
    pub isolating_units: usize,
    /// Units with a non-zero gradient for some sample (the others are skipped).
    pub active_units: usize,
    /// Units of the layer: the size of its parameters' leading (output) dimension.
    pub units: usize,
    /// The largest dominant share over the active units (how close the layer comes to `tau`).
    pub max_share: f64,
    /// Samples in the released batch.
    pub n: usize,
    /// The share at or above which a unit isolates its dominant sample (the setting).
    pub tau: f64,
    /// Training step the measurement was made at.
    pub step: u64,
    /// P_l: scalars in the layer.
    pub params: usize,
    /// How the per-sample terms were obtained.
    pub terms: TermSource,
}

/// One rule's check of one layer at a vetting ([`Vetting`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VettingCheck {
    /// The layer.
    pub layer: String,
    /// The rule's name in the policy.
    pub rule: String,
    /// The rule's metric (`exposed_fraction` or `isolated_share`).
    pub metric: LeakageMetric,
    /// The layer's value (None: M6 is absent on the layer, which fails the check).
    pub value: Option<f64>,
    /// The rule's threshold: the value must be at or below it.
    pub act_above: f64,
    /// Whether the layer passes the rule.
    pub passed: bool,
    /// Why the value is absent, when it is.
    pub reason: Option<String>,
}

/// M6 of parameters set from outside (a federated round's global model), measured on a batch
/// of the client's own data before anything is trained on them or released
/// (`Guard::vet_parameters`), and checked against the policy's M6 rules.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vetting {
    /// The guard's step at the vetting (no step is taken).
    pub step: u64,
    /// Samples in the vetting batch.
    pub n: usize,
    /// The setting tau.
    pub tau: f64,
    /// M6 per layer, in model order: (layer name, measurement or absence).
    pub layers: Vec<(String, Metric<SampleIsolation>)>,
    /// Batch indices of the samples some layer exposes (the union over layers, ascending).
    pub exposed_samples: Vec<usize>,
    /// Every M6 rule's check of every layer it covers (empty: the policy has no M6 rule).
    pub checks: Vec<VettingCheck>,
    /// Parameters holding non-finite values, with their count (refused before any
    /// measurement: nothing is measured on them).
    #[serde(default)]
    pub non_finite: Vec<(String, usize)>,
    /// M4's analytic attacks on each layer they apply to, scored on the vetting batch.
    #[serde(default)]
    pub attacks: Vec<VettingAttack>,
    /// The setting `vetting.max_recovered_fraction` the attacks were checked against (None:
    /// reported only).
    #[serde(default)]
    pub max_recovered_fraction: Option<f64>,
}

/// M4's strongest analytic attack on one layer of parameters being vetted: what a server that
/// sent them would recover from the release of the vetting batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VettingAttack {
    /// The layer.
    pub layer: String,
    /// The attack (`analytic` or `analytic_differences`).
    pub attack: String,
    /// Samples of the batch it gives back at PSNR >= 30 dB.
    pub samples_recovered: usize,
    /// samples_recovered / n.
    pub recovered_fraction: f64,
}

impl Vetting {
    /// Whether the parameters may be trained on: finite, every M6 rule passes on every layer
    /// it covers (true when there is none), and no analytic attack recovers more than
    /// `max_recovered_fraction` of the batch.
    pub fn accepted(&self) -> bool {
        self.refusal().is_none()
    }

    /// Why the parameters are refused, in words (None: accepted): the non-finite parameters,
    /// else the first failing M6 check, else the strongest attack above the limit.
    pub fn refusal(&self) -> Option<String> {
        if let Some((name, count)) = self.non_finite.first() {
            return Some(format!("refused: the global model's parameter {name} holds {count} non-finite value(s)"));
        }
        if let Some(c) = self.checks.iter().find(|c| !c.passed) {
            let exposed = self.layer(&c.layer).and_then(|m| m.measured()).map(|s| (s.exposed_fraction * self.n as f64).round() as usize);
            return Some(match (c.value, exposed) {
                (Some(v), Some(k)) => format!(
                    "refused: the global model isolates {k} of {} samples in {} ({} {v:.3} above {}, rule {})",
                    self.n,
                    c.layer,
                    c.metric.name(),
                    c.act_above,
                    c.rule
                ),
                _ => format!("refused: {} of {} is absent ({}), rule {} cannot vouch for it", c.metric.name(), c.layer, c.reason.as_deref().unwrap_or("not measured"), c.rule),
            });
        }
        let limit = self.max_recovered_fraction?;
        let worst = self.attacks.iter().filter(|a| a.recovered_fraction > limit).max_by_key(|a| a.samples_recovered)?;
        Some(format!(
            "refused: the {} attack recovers {} of {} samples from {}'s release (above max_recovered_fraction {limit})",
            worst.attack.replace('_', " "),
            worst.samples_recovered,
            self.n,
            worst.layer
        ))
    }

    /// The layer's M6, if the layer exists.
    pub fn layer(&self, name: &str) -> Option<&Metric<SampleIsolation>> {
        self.layers.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }

    /// The share of the batch that some layer exposes (the union of the layers' exposed
    /// samples over n).
    pub fn exposed_fraction(&self) -> f64 {
        self.exposed_samples.len() as f64 / self.n.max(1) as f64
    }
}
