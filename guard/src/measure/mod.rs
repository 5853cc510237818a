//! What measures: the stateless estimators of METRICS.md and what they read. Nothing here
//! holds state between calls or decides anything; the engine (`decide`) calls it.
//!
//! # The guard observes, it does not disturb
//! The estimators run the model themselves (M1's probes, the per-sample passes of M2 and M3,
//! M4's attack), in whatever mode the loss closure runs it. A batch norm in training mode
//! updates its running statistics on each of those passes, so every estimator's entry point
//! (the methods of [`Inspection`]) snapshots the model's buffers ([`LayerMap::buffers`]: a
//! VarStore's untrainable variables, a TorchScript module's buffers) and copies them back, bit
//! for bit, after its passes, also when it fails. A guarded run ends with the parameters and
//! buffers of the same run unguarded; a model without buffers pays nothing.
//!
//! # Batch norm
//! - M1 is the exact quantity of METRICS.md: J is the Jacobian of the batch-mean gradient the
//!   training step releases, computed through the same loss on the whole batch, so in training
//!   mode it includes the coupling of the samples through the batch statistics. Sub-batch
//!   probes (`probe_samples`) would measure another function there: a batch norm in training
//!   mode keeps the whole batch, declared ([`LayerMap::with_coupled_samples`]) or detected on
//!   the first sub-batch (`sub_batch.rs`), and reports `probe_samples = n`.
//! - M6's per-sample terms are exact too: sample i's term of the batch loss, differentiated
//!   through the whole batch's graph (`isolation.rs`), the batch statistics held as in the
//!   release (batches of one serve only where they add up to the batch gradient).
//! - Per-sample gradients (M2, M3) are the gradients of the loss of a batch holding that one
//!   sample alone: in training mode a batch norm normalises the sample by its own statistics
//!   (over its spatial positions), not the batch's, so they are not the sample's share of the
//!   batch gradient. In eval mode both use the running statistics.
//! - A model that cannot run on one sample has no per-sample gradients: M2 and M3 are absent
//!   with the reason ([`GuardError::NoPerSampleGradients`](crate::GuardError::NoPerSampleGradients))
//!   and training goes on. That is a loss that fails or panics on one sample (a scripted PyTorch
//!   `BatchNorm1d` in training mode raises "Expected more than 1 value per channel"), or a batch
//!   norm with one value per channel that raises nothing (tch's `nn::batch_norm1d`: its output
//!   becomes its bias, whatever the input, and its running variance non-finite, which is how
//!   the guard tells). Gradients of micro-batches of two samples would run, but batch norm then
//!   maps each pair to +-1 per channel: a different model, not the one being released.
pub mod attacks;
mod batch;
mod device;
mod ext;
mod fisher;
mod gram;
mod graph;
mod inspection;
mod inversion;
mod isolation;
mod latent_table;
mod layers;
mod logistic;
mod loss;
mod per_sample;
mod projected;
mod projection;
mod rng;
mod sensitivity;
mod stats;
mod sub_batch;
mod subspace;
mod tensors;
mod transform;
mod usable;
mod usable_splits;

pub use batch::{Batch, OwnedBatch};
pub use device::parse_device;
pub use fisher::{calibrated_noise_std, reconstruction_bound_bits, reconstruction_bound_se, release_dfil, unbiased_mse_floor, LayerFisher};
pub use graph::StepGraph;
pub use inspection::Inspection;
pub use inversion::{Inversion, InversionPlan, InversionSettings, ReleaseTransform};
pub use isolation::{layer_units, IsolatingUnit, Isolation, IsolationSettings, UnitEnergies, UnitEnergyTable};
pub(crate) use latent_table::LatentTable;
pub use layers::{group_by_layer, layer_name, Layer, LayerInfo, LayerMap, Param};
pub use loss::{EmbeddingSplit, LossFn, SplitLoss};
pub use per_sample::GradientMatrix;
pub use projected::ProjectedLayer;
pub use projection::project;
pub use sensitivity::{mean_and_standard_error, per_dimension_variance, JvpSamples, LayerJvps, SensitivitySettings};
pub(crate) use stats::{current_grads, gradient_stats};
pub use subspace::{orthonormal_basis, principal_angles, projection_distance, SubspaceSamples, SubspaceSettings};
pub use tensors::to_f64_vec;
pub use transform::{transform, ReleaseSensitivity, Transformed};
pub use usable::{attribute_information, usable_information, usable_information_layers, usable_information_of_features, UsableInformation, UsableSettings};
