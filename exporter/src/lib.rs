//! Prometheus export of gradguard's per-layer leakage reports.
//!
//! - [`Exporter`]: every gradguard metric family in a [`prometheus::Registry`] of its own (never
//!   the default registry), with every bounded label combination created up front. The training
//!   loop feeds it ([`Exporter::observe_report`] and friends: atomic stores and a short lock);
//!   scrapes render it ([`Exporter::render`]).
//! - [`MetricsServer`]: `/metrics`, `/healthz`, `/report` on a thread and single-threaded tokio
//!   runtime of its own; stops when dropped.
//! - [`client`]: a tiny blocking HTTP GET for health checks, tests and benchmarks.
//!
//! ```ignore
//! let exporter = Arc::new(Exporter::for_layers(&guard.layers().names())?);
//! let _server = MetricsServer::start(DEFAULT_ADDR, exporter.clone())?;
//! // per step:
//! let report = opt.backward_step(&loss, batch, loss_fn)?;
//! exporter.observe_report(&report)?;
//! ```
//!
//! Metric and alert reference: `exporter/README.md`. Dashboards: `exporter/grafana/`;
//! Prometheus scrape config and alert rules: `exporter/prometheus/`.
pub mod client;
pub mod error;
pub mod metrics;
pub mod server;

pub use error::{ExporterError, LabelKind};
pub use metrics::{
    Exporter, ReleaseOutcome, DEFAULT_ACTIONS, ESTIMATE_DURATION_BUCKETS, LEAKAGE_METRICS, MAX_LABEL_VALUE_LEN, NO_POLICY,
};
pub use server::{router, MetricsServer, DEFAULT_ADDR, SHUTDOWN_GRACE};
