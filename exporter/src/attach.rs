//! One call from a guard to a served `/metrics`: the exporter built for the guard's layers,
//! its policy and thresholds set, the server started, and the guard's reports fed to it.
use crate::{Exporter, ExporterError, MetricsServer};
use gradguard_guard::Guard;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// Serves `guard`'s metrics on `addr` (`/metrics`, `/healthz`, `/report`) until the returned
/// server is dropped: `"127.0.0.1:9464"`, `("localhost", 9464)` or a `SocketAddr` (port 0 picks
/// a free port; [`MetricsServer::local_addr`] says which). The exporter is one of the guard's
/// report sinks: reports reach it on the guard's fan-out worker, so a slow scrape never slows
/// a training step. A guarded optimizer's guard is `opt.guard_mut()`.
///
/// ```no_run
/// # fn demo(guard: &mut gradguard_guard::Guard) -> Result<(), gradguard_exporter::ExporterError> {
/// let server = gradguard_exporter::attach(guard, gradguard_exporter::DEFAULT_ADDR)?;
/// println!("metrics on http://{}/metrics", server.local_addr());
/// # Ok(()) }
/// ```
pub fn attach(guard: &mut Guard, addr: impl ToSocketAddrs + std::fmt::Debug) -> Result<MetricsServer, ExporterError> {
    let bad = |why: String| ExporterError::Address { addr: format!("{addr:?}"), why };
    let addr: SocketAddr = addr.to_socket_addrs().map_err(|e| bad(e.to_string()))?.next().ok_or_else(|| bad("resolves to no address".into()))?;
    let exporter = Arc::new(Exporter::for_layers(&guard.layers().names())?);
    let policy = guard.policy();
    exporter.set_policy_info(policy.short_hash(), &policy.version().to_string())?;
    for (layer, metric, threshold) in guard.protection().thresholds() {
        exporter.set_threshold(&layer, metric.name(), threshold)?;
    }
    let server = MetricsServer::start(addr, exporter.clone())?;
    guard.add_report_sink(Arc::new(move |report| {
        // A report the exporter refuses is counted by the exporter itself.
        let _ = exporter.observe_report(report);
    }));
    Ok(server)
}
