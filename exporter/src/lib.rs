//! Prometheus export of gradguard's per-layer leakage reports.
//!
//! - [`Exporter`]: every gradguard metric family in a [`prometheus::Registry`] of its own (never
//!   the default registry), with every bounded label combination created up front. The training
//!   loop feeds it ([`Exporter::observe_report`] and friends: atomic stores and a short lock);
//!   scrapes render it ([`Exporter::render`]).
//! - [`MetricsServer`]: `/metrics`, `/healthz`, `/report` on a thread and single-threaded tokio
//!   runtime of its own; stops when dropped.
//! - [`attach`]: one call from a `Guard` to a served `/metrics`.
//! - [`client`]: a tiny blocking HTTP GET for health checks, tests and benchmarks.
//!
//! Every series exists before the first report, so a dashboard shows the model's layers at
//! once; a value the exporter was not built for is refused rather than becoming a new series:
//!
//! ```rust
//! use gradguard_exporter::{Exporter, ExporterError};
//!
//! let exporter = Exporter::for_layers(&["fc1", "fc2"])?;
//! exporter.set_threshold("fc1", "sensitivity", 0.5)?;
//! let text = exporter.render(); // what a scrape of /metrics returns
//! assert!(text.contains(r#"gradguard_layer_threshold{layer="fc1",metric="sensitivity"} 0.5"#));
//! // Not measured yet: the leakage gauge is there, holding NaN.
//! assert!(text.contains(r#"gradguard_layer_leakage{layer="fc2",metric="sensitivity"} NaN"#));
//! let unknown = exporter.set_threshold("fc3", "sensitivity", 0.5);
//! assert!(matches!(unknown, Err(ExporterError::UnknownLabel { .. })));
//! # Ok::<(), ExporterError>(())
//! ```
//!
//! In a training loop, share the exporter with a server and feed it every step's report:
//!
//! ```no_run
//! use gradguard_exporter::{Exporter, ExporterError, MetricsServer, DEFAULT_ADDR};
//! use std::sync::Arc;
//!
//! fn serve<R>(layers: &[String], reports: R) -> Result<(), ExporterError>
//! where
//!     R: IntoIterator<Item = gradguard_guard::Report>,
//! {
//!     let exporter = Arc::new(Exporter::for_layers(layers)?);
//!     let _server = MetricsServer::start(DEFAULT_ADDR, exporter.clone())?; // stops when dropped
//!     for report in reports {
//!         exporter.observe_report(&report)?;
//!     }
//!     Ok(())
//! }
//! ```
//!
//! Metric and alert reference: `exporter/README.md`. Dashboards: `exporter/grafana/`;
//! Prometheus scrape config and alert rules: `exporter/prometheus/`.

#![deny(missing_docs, unreachable_pub)]

mod attach;
mod bounds;
pub mod client;
mod error;
mod metrics;
mod server;

pub use attach::attach;
pub use error::{ExporterError, LabelKind};
pub use metrics::{
    Exporter, DEFAULT_ACTIONS, ESTIMATE_DURATION_BUCKETS, LEAKAGE_METRICS, MAX_LABEL_VALUE_LEN, NO_POLICY,
};
pub use server::{router, MetricsServer, DEFAULT_ADDR, SHUTDOWN_GRACE};
