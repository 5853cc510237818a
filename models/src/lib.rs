//! What gradguard trains and audits: the shipped digits data and example models, a model
//! resolved from a name or a TorchScript file ([`AuditModel`]), and its inputs loaded from
//! `.npy` files and checked against it ([`AuditData`]).
//!
//! ```
//! use gradguard_models::{AuditData, AuditModel, DataSpec};
//! use tch::Device;
//!
//! // `cnn`, `mlp`, or the path of a torch.jit.save'd module (then give DataSpec's .npy paths).
//! let model = AuditModel::load("cnn", 0, Device::Cpu)?;
//! let data = AuditData::load(&DataSpec::default(), &model, Device::Cpu)?; // shipped digits
//! assert_eq!(data.n, 1797);
//! # Ok::<(), gradguard_models::ModelError>(())
//! ```
#![deny(missing_docs, unreachable_pub)]

pub mod data;
pub mod files;

mod error;
mod inputs;
mod models;
mod npy;
mod source;

pub use error::{ModelError, Result};
pub use inputs::{AuditData, DataSpec};
pub use models::{DigitsCnn, Mlp, MLP_WIDTHS};
pub use source::{seeded_batch, AuditLoss, AuditModel, LossKind, ModelSource, Trainer};
