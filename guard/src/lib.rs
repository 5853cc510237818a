//! gradguard's core: the layer map, the leakage estimators of METRICS.md (M1 sensitivity, M2
//! subspace distance), per-layer gradient statistics, and the [`Guard`] that schedules them
//! inside a training loop. Reports are serde types.
//!
//! ```text
//! let mut guard = Guard::new(&vs, GuardConfig::default())?;
//! // ... opt.zero_grad(); loss.backward();
//! let report = guard.after_backward(&Batch::new(&x, &y), &|x: &Tensor, y: &Tensor| {
//!     net.forward(x).f_cross_entropy_for_logits(y)
//! })?;
//! // ... opt.step();
//! println!("{}", report.table());
//! ```
pub mod audit;
pub mod batch;
pub mod device;
pub mod engine;
pub mod error;
pub mod inversion;
pub mod latent_table;
pub mod layers;
pub mod loss;
pub mod per_sample;
pub mod policy;
pub mod release;
pub mod report;
pub mod schedule;
pub mod sensitivity;
pub mod stats;
pub mod subspace;
pub mod tensors;
pub mod transform;
pub mod usable;
pub mod worker;

pub use audit::{AuditError, AuditLog, DecisionRecord, Durability, LogContents, Outcome};
pub use batch::Batch;
pub use device::parse_device;
pub use engine::{Guard, GuardConfig};
pub use error::{GuardError, Result};
pub use layers::{LayerInfo, LayerMap};
pub use loss::LossFn;
pub use report::{GradientStats, GuardHealth, JvpMethod, LayerReport, Metric, Report, Sensitivity, Subspace};
pub use sensitivity::SensitivitySettings;
pub use subspace::SubspaceSettings;
pub use policy::{LadderStep, LeakageMetric, OnViolation, Policy, PolicyError, Rule};
pub use inversion::{estimate_original_information, Inversion, InversionPlan, InversionSettings};
pub use per_sample::{per_sample_gradients, GradientMatrix};
pub use usable::{estimate_usable_information, usable_information, usable_information_layers, UsableInformation, UsableSettings};
