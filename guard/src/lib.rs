//! gradguard's core: what measures leakage and what decides a release.
//!
//! The root holds what a loop that guards its releases needs; the rest lives in three
//! namespaces:
//! - [`measure`] (stateless): the layer map, the batch, the loss, and the estimators of
//!   METRICS.md as methods of an [`Inspection`] (M1 sensitivity, M2 subspace distance, M3
//!   usable information, M4 inversion), plus M1 of a defended release from kept JVPs.
//! - [`report`] (the types every reader imports): [`Report`], [`Manifest`], [`Metric`], the
//!   vocabulary of a release ([`ReleaseKind`]).
//! - [`decide`] (the engine with its state): [`Policy`], protection levels, the budget
//!   scheduler, workers, the [`AuditLog`], and the [`Guard`] whose release is a typed
//!   [`Release`].
//!
//! Guarding one step of a model under an inline policy (a tch loop wraps its optimizer with
//! `gradguard_tch::GuardedOptimizer`, which does this at every step):
//!
//! ```
//! use gradguard_guard::{Batch, Guard, LayerMap, Policy, Release};
//! use tch::{nn, nn::Module, Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = nn::linear(vs.root() / "fc", 4, 3, Default::default());
//! let loss = |x: &Tensor, y: &Tensor| net.forward(x).f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0);
//! let policy = Policy::from_toml_str(r#"
//!     version = 2
//!     [settings]
//!     estimate_every = 1
//!     [[rule]]
//!     name = "bound"
//!     metric = "reconstruction_bound_bits"
//!     layers = ["fc"]
//!     act_above = 0.1
//!     relax_below = 0.05
//!     ladder = [{ action = "noise", clip_norm = 1.0, target = "threshold" }]
//! "#, "inline")?;
//! let mut guard = Guard::new(LayerMap::from_var_store(&vs)?, policy)?;
//! let (x, y) = (Tensor::randn([8, 4], (Kind::Float, Device::Cpu)), Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]));
//! // The stored loss forward and backward once; `.grad()` then holds what may be applied.
//! match guard.train_step(&Batch::new(&x, &y), &loss)? {
//!     Release::Released { report, .. } => assert_eq!(report.release.as_ref().map(|m| m.layers[0].actions[0].name()), Some("noise")),
//!     other => panic!("{other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Measuring a model on one batch, with no policy and no state:
//!
//! ```
//! use gradguard_guard::{Batch, Inspection, LayerMap, measure::SensitivitySettings};
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
#![deny(missing_docs, unreachable_pub)]

pub mod decide;
pub mod error;
pub mod measure;
pub mod report;

pub use decide::{AuditLog, BlockReason, Guard, GuardState, Policy, Release, Settings};
pub use error::{GuardError, PolicyError, Result};
pub use measure::{Batch, EmbeddingSplit, Inspection, LayerMap, LossFn, SplitLoss};
pub use report::{Manifest, Metric, ReleaseKind, Report};
