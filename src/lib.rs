//! gradguard guards tch training runs against private-data leakage through gradients: it
//! measures, per layer and while training runs, how much each layer's released gradient leaks
//! (METRICS.md: M1 sensitivity, M2 subspace distance), and reports it.
//!
//! This facade re-exports the workspace crates:
//! - [`guard`]: layer map, estimators, reports, the [`Guard`] engine;
//! - [`hooks`]: the training-loop integration ([`GuardedOptimizer`]);
//! - [`defenses`]: per-layer gradient transformations;
//! - [`exporter`]: Prometheus export;
//!
//! plus the shipped digits data ([`data`]) and example models ([`models`]).
pub mod data;
pub mod models;

pub use gradguard_defenses as defenses;
pub use gradguard_exporter as exporter;
pub use gradguard_guard as guard;
pub use gradguard_hooks as hooks;

pub use gradguard_guard::{Batch, BlockReason, Guard, GuardError, LossFn, Policy, Release, Report, Settings};
pub use gradguard_hooks::GuardedOptimizer;
