//! gradguard's offline audit as a library: resolve a model (built-in or TorchScript), load
//! and check its data (.npy or the shipped digits), measure every leakage metric of
//! METRICS.md per layer (M1 sensitivity, M2 subspace distance, M3 usable latent information,
//! M4 usable original information), and report it as JSON, a table and SVG plots.
//!
//! ```no_run
//! use gradguard_audit::{run_audit, AuditData, AuditModel, AuditOptions, DataSpec};
//! use tch::Device;
//!
//! // `cnn`, `mlp`, or the path of a torch.jit.save'd module (then give DataSpec's .npy paths).
//! let model = AuditModel::load("cnn", 0, Device::Cpu)?;
//! let data = AuditData::load(&DataSpec::default(), &model, Device::Cpu)?; // shipped digits
//! let report = run_audit(&model, &data, &AuditOptions { batch_size: 16, ..Default::default() })?;
//! print!("{}", report.table());
//! report.write_json("audit/report.json".as_ref())?;
//! report.write_plot("audit/report.svg".as_ref())?;
//! # Ok::<(), gradguard_audit::AuditError>(())
//! ```
//!
//! [`train`] trains a TorchScript model on such data with the guard on (or off, for the
//! baseline), the loop of `gradguard train`.
//!
//! [`run_validation`] runs the validation study of docs/VALIDATION.md. Every defended
//! release the study measures is made by `gradguard_defenses::Defence::apply`, and its M1 is
//! measured through the guard's own transform path, as the closed loop measures it.
#![deny(missing_docs, unreachable_pub)]

pub mod data;
pub mod models;

mod error;
mod estimate;
mod inputs;
mod npy;
mod plot;
mod report;
mod run;
pub mod run_page;
mod source;
mod train;
mod validation;

pub use error::{AuditError, Result};
pub use estimate::bound::ReleaseBound;
pub use inputs::{AuditData, DataSpec};
pub use plot::{bar_panels_svg, line_panels_svg, Panel};
pub use report::{AuditReport, AuditSettings, LayerDetails, LayerRow};
pub use run::{run_audit, AuditOptions, InversionOptions};
pub use source::{AuditLoss, AuditModel, LossKind, ModelSource};
pub use train::{train, Evaluation, GuardOptions, OptimizerKind, PolicyInfo, StepProgress, TrainOptions, TrainOutcome, TrainReport};
pub use validation::{run_validation, ValidationOptions, ValidationSummary};
