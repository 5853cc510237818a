//! One call from a guard to a served `/metrics`: the exporter built for the guard's layers,
//! its policy and thresholds set, the server started, and the guard's reports fed to it.
use crate::{Exporter, ExporterError, MetricsServer};
use gradguard_guard::Guard;
use std::net::SocketAddr;
use std::sync::Arc;

/// Serves `guard`'s metrics on `addr` (`/metrics`, `/healthz`, `/report`) until the returned
/// server is dropped. Reports reach the exporter on the guard's fan-out worker, so a slow
/// scrape never slows a training step.
///
/// ```no_run
/// # fn demo(guard: &mut gradguard_guard::Guard) -> Result<(), gradguard_exporter::ExporterError> {
/// let server = gradguard_exporter::attach(guard, gradguard_exporter::DEFAULT_ADDR)?;
/// println!("metrics on http://{}/metrics", server.local_addr());
/// # Ok(()) }
/// ```
pub fn attach(guard: &mut Guard, addr: SocketAddr) -> Result<MetricsServer, ExporterError> {
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
