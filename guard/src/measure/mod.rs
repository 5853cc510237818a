//! What measures: the stateless estimators of METRICS.md and what they read. Nothing here
//! holds state between calls or decides anything; the engine (`decide`) calls it.
mod batch;
mod device;
mod inspection;
mod inversion;
mod latent_table;
mod layers;
mod loss;
mod per_sample;
mod sensitivity;
mod stats;
mod subspace;
mod tensors;
mod transform;
mod usable;

pub use batch::Batch;
pub use device::parse_device;
pub use inspection::Inspection;
pub use inversion::{Inversion, InversionPlan, InversionSettings, ReleaseTransform};
pub(crate) use latent_table::LatentTable;
pub use layers::{layer_name, Layer, LayerInfo, LayerMap, Param};
pub use loss::{EmbeddingSplit, LossFn, SplitLoss};
pub use per_sample::GradientMatrix;
pub use sensitivity::{mean_and_standard_error, JvpSamples, LayerJvps, SensitivitySettings};
pub(crate) use stats::{current_grads, gradient_stats};
pub use subspace::{orthonormal_basis, principal_angles, projection_distance, SubspaceSamples, SubspaceSettings};
pub use tensors::to_f64_vec;
pub use transform::{transform, ReleaseSensitivity, Transformed};
pub use usable::{attribute_information, project, usable_information, usable_information_layers, UsableInformation, UsableSettings};
