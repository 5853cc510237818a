//! The manifest of a release: what was done to each layer and why. Both sides import it: the
//! engine writes it, the exporter, the audit and a federated server read it.
use super::LeakageMetric;
use gradguard_defenses::Defence;
use serde::{Deserialize, Serialize};

/// What happened to one release.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReleaseOutcome {
    /// The release may leave.
    Released,
    /// Nothing released yet: held back to accumulate samples up to the aggregation floor.
    /// (Written `pending` before; read under either name.)
    #[serde(alias = "pending")]
    Held {
        /// Why the release waits (samples held against the floor).
        reason: String,
    },
    /// Nothing released: the guard could not vouch for the release.
    Blocked {
        /// What blocked it, in words.
        reason: String,
    },
}

/// One rule's check of one layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RuleCheck {
    /// The rule's name in the policy.
    pub rule: String,
    /// The metric the rule acts on.
    pub metric: LeakageMetric,
    /// Ladder rungs in force.
    pub level: usize,
    /// The metric on the unprotected gradient (None: not re-measured at this release).
    pub raw: Option<f64>,
    /// The metric on the release (None: withheld, or not re-measured).
    pub released: Option<f64>,
    /// The rule's threshold: the release must be at or below it.
    pub act_above: f64,
    /// The rule's relax threshold on the raw gradient.
    pub relax_below: f64,
}

/// What was done to one layer. Two entries are equal when they say the same thing: the seed,
/// which never leaves the releasing process, is not compared.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerManifest {
    /// The layer's name in the layer map.
    pub name: String,
    /// Whether the layer's gradient is part of the release.
    pub released: bool,
    /// The defences applied in order (`[withhold]` for a withheld layer, empty for a layer
    /// released as computed or a blocked release). Written as text, `clip(max_norm=1)`.
    #[serde(with = "actions_as_text")]
    pub actions: Vec<Defence>,
    /// Each covering rule's check at this release.
    pub checks: Vec<RuleCheck>,
    /// M5 of the layer's release, bits per input dimension (null: no bound, or not released).
    #[serde(default)]
    pub reconstruction_bound_bits: Option<f64>,
    /// The noise std sigma_l the release carries (a calibrated rung's choice shows here).
    #[serde(default)]
    pub noise_std: Option<f64>,
    /// The seed the layer's chain was applied with: `apply_all(actions, gradient, seed)` (the
    /// layer's parameters flattened and joined in the layer map's order) reproduces the released
    /// tensors bit for bit on the device type the release was made on (noise is drawn there:
    /// ChaCha8 on the host, libtorch's generator elsewhere; see `gradguard_defenses::NoiseSource`).
    /// Set for every released layer of a released manifest, None otherwise.
    /// It is derived from the policy's `seed`, the step and the guard's secret noise key
    /// (`Guard::new` draws it from the operating system), and it is never serialised: whoever
    /// knew it could regenerate the layer's noise and subtract it, so it stays in the process
    /// that released (a federated server receives the manifest without it).
    #[serde(skip)]
    pub seed: Option<u64>,
}

impl PartialEq for LayerManifest {
    fn eq(&self, other: &Self) -> bool {
        // Every field but the seed (destructured, so that a new field is not forgotten here).
        let Self { name, released, actions, checks, reconstruction_bound_bits, noise_std, seed: _ } = self;
        *name == other.name
            && *released == other.released
            && *actions == other.actions
            && *checks == other.checks
            && *reconstruction_bound_bits == other.reconstruction_bound_bits
            && *noise_std == other.noise_std
    }
}

impl LayerManifest {
    /// A layer's entry without an M5 figure or a seed.
    pub fn new(name: String, released: bool, actions: Vec<Defence>, checks: Vec<RuleCheck>) -> Self {
        Self { name, released, actions, checks, reconstruction_bound_bits: None, noise_std: None, seed: None }
    }
}

/// The manifest of a release: what was done to each layer and why. Carries no gradient value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// The training step (guard call) of the release.
    pub step: u64,
    /// sha256 (hex) of the policy text in force.
    pub policy_hash: String,
    /// The policy's format version.
    pub policy_version: u32,
    /// Samples the release covers.
    pub samples: usize,
    /// Samples a release had to cover.
    pub aggregation_floor: usize,
    /// Step of the estimate the decisions rest on.
    pub estimate_step: Option<u64>,
    /// Released, held or blocked ([`Manifest::kind`] tells released from protected).
    pub outcome: ReleaseOutcome,
    /// One entry per layer, in the layer map's order.
    pub layers: Vec<LayerManifest>,
    /// M5 of the whole release, bits per input dimension (null: no bound; `bound_note` says why).
    #[serde(default)]
    pub release_reconstruction_bound_bits: Option<f64>,
    /// The bound's reason when null, else what it does not cover.
    #[serde(default)]
    pub bound_note: Option<String>,
}

/// Defences travel as their text (what a policy writes), so that a manifest read by a Python
/// server or a person needs no knowledge of the Rust types; they are typed again on reading.
mod actions_as_text {
    use gradguard_defenses::Defence;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(actions: &[Defence], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(actions.iter().map(|a| a.to_string()))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Defence>, D::Error> {
        Vec::<String>::deserialize(d)?.iter().map(|t| t.parse().map_err(D::Error::custom)).collect()
    }
}

