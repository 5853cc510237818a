//! gradguard's core: what measures leakage and what decides a release.
//!
//! - **measure** (stateless): the layer map, the batch, the loss, and the estimators of
//!   METRICS.md as methods of an [`Inspection`] (M1 sensitivity, M2 subspace distance, M3
//!   usable information, M4 inversion), plus M1 of a defended release from kept JVPs.
//! - **report** (types both sides import): [`Report`], [`Manifest`], [`Metric`].
//! - **decide** (the engine with its state): [`Policy`], [`Protection`] levels, the budget
//!   scheduler, workers, the [`AuditLog`], and the [`Guard`] whose release is a typed
//!   [`Release`].
//!
//! Measuring a model on one batch, with no policy and no state:
//!
//! ```
//! use gradguard_guard::{Batch, Inspection, LayerMap, SensitivitySettings};
//! use tch::{nn, nn::Module, Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = nn::linear(vs.root() / "fc", 4, 3, Default::default());
//! let (x, y) = (Tensor::randn([8, 4], (Kind::Float, Device::Cpu)), Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]));
//! let loss = |x: &Tensor, y: &Tensor| net.forward(x).f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0);
//! let layers = LayerMap::from_var_store(&vs)?;
//! let m1 = Inspection::new(&layers, &loss, Batch::new(&x, &y)).sensitivity(&SensitivitySettings::default())?;
//! assert!(m1[0].measured().is_some_and(|s| s.sensitivity > 0.0));
//! # Ok::<(), gradguard_guard::GuardError>(())
//! ```
//!
//! Guarding a training loop goes through `gradguard_hooks::GuardedOptimizer`, which builds a
//! [`Guard`] with a policy, a stored loss, an audit log and an exporter.
#![warn(missing_docs)]

mod decide;
mod error;
mod measure;
mod report;

pub use decide::*;
pub use error::{torch_message, AuditError, GuardError, PolicyError, Result, POLICY_VERSION};
pub use measure::*;
pub use report::*;
