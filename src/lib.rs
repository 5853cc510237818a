//! gradguard guards tch training runs against private-data leakage through gradients: it
//! measures, per layer and while training runs, how much each layer's released gradient leaks
//! (METRICS.md: M1 sensitivity, M2 subspace distance), and reports it.
//!
//! This facade re-exports the workspace crates:
//! - [`guard`]: layer map, estimators, reports, the [`Guard`] engine;
//! - [`hooks`]: the training-loop integration ([`GuardedOptimizer`]);
//! - [`defenses`]: per-layer gradient transformations;
//! - [`exporter`]: Prometheus export;
//! - [`audit`]: the offline audit (model sources, .npy data, M1-M4 reports, plots, the
//!   validation study);
//!
//! plus the shipped digits data ([`data`]) and example models ([`models`]).
pub use gradguard_audit as audit;
pub use gradguard_audit::{data, models};

pub use gradguard_defenses as defenses;
pub use gradguard_exporter as exporter;
pub use gradguard_guard as guard;
pub use gradguard_hooks as hooks;

pub use gradguard_guard::{Batch, Guard, GuardConfig, GuardError, LossFn, Report};
pub use gradguard_hooks::GuardedOptimizer;
