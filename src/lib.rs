//! gradguard guards tch training runs against private-data leakage through gradients: it
//! measures, per layer and while training runs, how much each layer's released gradient leaks
//! (METRICS.md: M1 sensitivity, M2 subspace distance), acts on a declared policy per layer, and
//! blocks a release it cannot make compliant.
//!
//! Wrapping a loop (here the shipped digits CNN on the shipped data):
//!
//! ```
//! use gradguard::{data::Digits, models::DigitsCnn, Batch, GuardedOptimizer, Release};
//! use tch::{nn, nn::OptimizerConfig, Device, Tensor};
//!
//! let digits = Digits::embedded()?;
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = DigitsCnn::new(&vs.root());
//! let mut opt = GuardedOptimizer::builder(&vs, nn::Adam::default().build(&vs, 1e-3)?)
//!     .loss(|x: &Tensor, y: &Tensor| net.f_loss(x, y))
//!     .build()?;
//! let (x, y, heavy_stroke) = digits.batch(&(0..32).collect::<Vec<_>>(), Device::Cpu)?;
//! let release = opt.train_step(&Batch::new(&x, &y).with_attribute(&heavy_stroke))?; // the loss runs once
//! assert!(matches!(release, Release::Released { .. })); // no policy: measured and released
//! println!("{}", release.report().table());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! This facade re-exports the workspace crates, each with one job:
//! - [`guard`]: what measures (`Inspection` and the estimators), the reports, and what decides
//!   (the policy and the [`Guard`] engine with its typed [`Release`]);
//! - [`wrap`]: gradguard for tch, the guarded optimizer ([`GuardedOptimizer`]) and TorchScript
//!   models;
//! - [`defenses`]: per-layer gradient transformations;
//! - [`exporter`]: Prometheus export, a report sink the caller attaches;
//! - [`models`]: the shipped digits data ([`data`]) and example models, models resolved from a
//!   name or a TorchScript file, checked .npy inputs;
//! - [`audit`]: the offline audit (M1-M5 reports, plots);
//! - [`validation`]: the validation study;
//! - [`run`]: the run loop around the guarded step, `gradguard train`, the run page.
#![deny(missing_docs, unreachable_pub)]

pub use gradguard_audit as audit;
pub use gradguard_defenses as defenses;
pub use gradguard_exporter as exporter;
pub use gradguard_guard as guard;
pub use gradguard_models as models;
pub use gradguard_models::data;
pub use gradguard_run as run;
pub use gradguard_tch as wrap;
pub use gradguard_validation as validation;

pub use gradguard_guard::{Batch, BlockReason, Guard, GuardError, LossFn, Policy, Release, Report, Settings};
pub use gradguard_tch::GuardedOptimizer;
