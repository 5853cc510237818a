//! gradguard's offline audit: measure every leakage metric of METRICS.md per layer (M1
//! sensitivity, M2 subspace distance, M3 usable latent information, M4 usable original
//! information, M5's bound of a defended release) of a model on its data, and report it as
//! JSON, a table and SVG plots. The model and its data come from `gradguard_models`.
//!
//! ```no_run
//! use gradguard_audit::{run_audit, AuditOptions};
//! use gradguard_models::{AuditData, AuditModel, DataSpec};
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
//! [`estimate`] holds the audit's measurements one by one, for studies that sweep them
//! (the validation study, `gradguard_validation`). Every defended release it measures is
//! made by `gradguard_defenses::Defence::apply`, and its M1 is measured through the guard's
//! own transform path, as the closed loop measures it.
#![deny(missing_docs, unreachable_pub)]

pub mod estimate;

mod error;
mod plot;
mod report;
mod run;

pub use error::{AuditError, EstimateContext, Result};
pub use estimate::bound::ReleaseBound;
pub use plot::{bar_panels_svg, line_panels_svg, Panel};
pub use report::{AuditReport, AuditSettings, LayerDetails, LayerRow};
pub use run::{run_audit, AuditOptions, InversionOptions};
