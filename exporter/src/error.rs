//! The exporter's typed errors.
use std::net::SocketAddr;

/// Which bounded label an update named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabelKind {
    /// `layer`: a layer name the exporter was built with.
    Layer,
    /// `metric`: one of the leakage metrics the exporter was built with.
    Metric,
    /// `action`: one of the defence actions the exporter was built with.
    Action,
}

impl LabelKind {
    /// Every kind; each has its `gradguard_exporter_rejected_updates_total{label}` series from the start.
    pub const ALL: [LabelKind; 3] = [LabelKind::Layer, LabelKind::Metric, LabelKind::Action];

    /// The label name as exported (`layer`, `metric`, `action`).
    pub fn as_str(self) -> &'static str {
        match self {
            LabelKind::Layer => "layer",
            LabelKind::Metric => "metric",
            LabelKind::Action => "action",
        }
    }
}

impl std::fmt::Display for LabelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every failure of this crate: starting the server, or an update or configuration the
/// exporter refuses (it never creates a series for an unknown label value).
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// The metrics address is taken by another process (or another server of this one).
    #[error("cannot serve metrics on {addr}: address already in use (another exporter or program is listening there; pick another port)")]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The address given does not name a socket address (`host:port`).
    #[error("metrics address {addr:?}: {why}")]
    Address {
        /// The address as given.
        addr: String,
        /// What was wrong with it.
        why: String,
    },
    /// Binding failed for another reason (permission, address not local, ...).
    #[error("cannot bind the metrics server to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The server's runtime or thread could not be started.
    #[error("cannot start the metrics server: {context}: {source}")]
    Start {
        /// The step that failed, e.g. `"spawning the server thread"`.
        context: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// An update named a label value that the exporter was not constructed with. Nothing was
    /// created; the rejection is counted in `gradguard_exporter_rejected_updates_total{label}`.
    #[error("unknown {label} {value:?}: the exporter only exports the {label}s it was constructed with ({known})")]
    UnknownLabel {
        /// Which label the value was for.
        label: LabelKind,
        /// The refused value as given.
        value: String,
        /// The values the exporter accepts for that label, comma-separated.
        known: String,
    },
    /// A report named layers the exporter was not constructed with; its known layers were
    /// still exported. Counted in `gradguard_exporter_rejected_updates_total{label="layer"}`.
    #[error("report names layers the exporter was not constructed with: {names:?}")]
    UnknownLayers {
        /// The unknown layer names, in report order.
        names: Vec<String>,
    },
    /// Bad constructor arguments or label values (empty, duplicate, too long, ...).
    #[error("invalid exporter configuration: {0}")]
    Config(String),
    /// The prometheus crate refused a metric definition or failed to encode.
    #[error("prometheus: {0}")]
    Prometheus(#[from] prometheus::Error),
}
