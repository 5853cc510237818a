//! A client's own `/metrics`: the gradguard exporter (`gradguard-exporter`) serving the reports
//! of the node's releases.
//!
//! Flower starts a fresh ClientApp process for every message, so a server living inside the
//! ClientApp would vanish after each round. The ClientApp therefore starts this server once per
//! node, as a process of its own (`serve_metrics`), and hands each round's report over through a
//! spool folder: one `*.report.json` file per release, written atomically (temporary name, then rename).
//! The server observes them in name order, deletes them, and stops when the process it watches
//! (the node's SuperExec) is gone, when a file named `stop` appears in the spool, or on
//! SIGINT/SIGTERM.
use crate::{FlError, FlResult, InternalError};
use gradguard_exporter::{Exporter, MetricsServer};
use gradguard_guard::Report;
use pyo3::prelude::*;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name; a zombie has exited.
        Ok(stat) => stat.rsplit_once(')').is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Observes every spooled report; returns how many.
fn drain(spool: &Path, exporter: &Exporter) -> usize {
    let Ok(entries) = std::fs::read_dir(spool) else { return 0 };
    let mut files: Vec<PathBuf> =
        // Only the reports spooled for it: the spool may hold other files (the audit log and the
        // guard state beside it, when the node keeps them there).
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().ends_with(".report.json")).collect();
    files.sort();
    let mut n = 0;
    for path in files {
        let parsed = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str::<Report>(&text).map_err(|e| e.to_string()));
        match parsed {
            Ok(report) => {
                if let Some(m) = &report.release {
                    let hash: String = m.policy_hash.chars().take(12).collect();
                    let _ = exporter.set_policy_info(&hash, &m.policy_version.to_string());
                    for layer in &m.layers {
                        for check in &layer.checks {
                            let _ = exporter.set_threshold(&layer.name, check.metric.name(), check.act_above);
                        }
                    }
                }
                if let Err(e) = exporter.observe_report(&report) {
                    eprintln!("gradguard_fl metrics: {}: {e}", path.display());
                }
                let _ = std::fs::remove_file(&path);
                n += 1;
            }
            Err(e) => {
                eprintln!("gradguard_fl metrics: ignoring {}: {e}", path.display());
                let _ = std::fs::rename(&path, path.with_extension("bad"));
            }
        }
    }
    n
}

/// Serves the gradguard exporter's `/metrics`, `/healthz`, `/report` and live page `/` on `host:port` (port 0:
/// any free port) for the reports spooled in `spool_dir`, until `watch_pid` exits, a `stop`
/// file appears in the spool, or a signal arrives. Writes the bound port to `ready_file` (when
/// given) once serving. Blocks; returns the number of reports observed.
#[pyfunction]
#[pyo3(signature = (port, spool_dir, watch_pid = None, host = "127.0.0.1".to_string(), poll_interval = 0.5, ready_file = None, model_path = None))]
pub fn serve_metrics(
    py: Python<'_>,
    port: u16,
    spool_dir: String,
    watch_pid: Option<u32>,
    host: String,
    poll_interval: f64,
    ready_file: Option<String>,
    model_path: Option<String>,
) -> PyResult<usize> {
    if !(poll_interval.is_finite() && poll_interval > 0.0 && poll_interval <= 60.0) {
        return Err(crate::ConfigError::new_err(format!("poll_interval must be in (0, 60] seconds, got {poll_interval}")));
    }
    let ip: IpAddr = host.parse().map_err(|e| crate::ConfigError::new_err(format!("host {host:?}: {e}")))?;
    let spool = PathBuf::from(&spool_dir);
    std::fs::create_dir_all(&spool).map_err(|e| crate::ConfigError::new_err(format!("spool {spool_dir}: {e}")))?;
    let layers = crate::guarded(py, "listing layers", move || {
        let spec = crate::model::ModelSpec::new(model_path, "cross-entropy")?;
        Ok(crate::model::LocalModel::new(&spec, crate::model::MODEL_SEED)?.layer_map()?.names())
    })?;
    let exporter = Arc::new(Exporter::for_layers(&layers).map_err(|e| InternalError::new_err(e.to_string()))?);
    let server = MetricsServer::start(SocketAddr::new(ip, port), exporter.clone())
        .map_err(|e| crate::ConfigError::new_err(format!("cannot serve metrics: {e}")))?;
    if let Some(path) = &ready_file {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, server.local_addr().port().to_string())
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| crate::ConfigError::new_err(format!("ready file {path}: {e}")))?;
    }
    let interval = Duration::from_secs_f64(poll_interval);
    let outcome: FlResult<Result<usize, PyErr>> = py.detach(|| {
        let mut observed = 0;
        loop {
            // A malformed spool file must not take the server down: a panic is reported and the
            // file set aside like any unreadable one.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drain(&spool, &exporter))) {
                Ok(n) => observed += n,
                Err(_) => return Err(FlError::Internal("the metrics server failed reading its spool (a caught panic)".into())),
            }
            if spool.join("stop").exists() || watch_pid.is_some_and(|pid| !alive(pid)) {
                return Ok(Ok(observed));
            }
            if let Err(e) = Python::attach(|py| py.check_signals()) {
                return Ok(Err(e));
            }
            std::thread::sleep(interval);
        }
    });
    server.shutdown();
    match outcome {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(signal)) => Err(signal),
        Err(FlError::Internal(m)) => Err(InternalError::new_err(m)),
        Err(other) => Err(other.into()),
    }
}
