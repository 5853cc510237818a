//! What the training commands (`demo`, `train`) print while they train: the guard's set-up
//! and the progress bar.
use gradguard::{Policy, Release};
use indicatif::{ProgressBar, ProgressStyle};
use std::net::SocketAddr;
use std::path::Path;

/// The guard's layers, policy, metrics address and audit log, one per line, then a blank line.
pub fn guard_header(layers: &[String], policy: &Policy, metrics: Option<SocketAddr>, audit_log: &Path) -> String {
    let mut out = format!("layers: {}\n", layers.join(", "));
    out += &format!("policy: {} (hash {}), {} rule(s)\n", policy.origin(), policy.short_hash(), policy.rules().len());
    if let Some(addr) = metrics {
        out += &format!("metrics: http://{addr}/metrics  (report: /report, health: /healthz)\n");
    }
    out + &format!("audit log: {}\n", audit_log.display())
}

/// A bar over `steps` training steps, with room for a message (the releases so far).
pub fn steps_bar(steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} steps {msg}").expect("a valid template"));
    bar
}

/// Prints a blocked release above the bar.
pub fn show_release(bar: &ProgressBar, step: usize, release: &Release) {
    if let Release::Blocked { reason, .. } = release {
        bar.suspend(|| println!("step {step}: release blocked: {reason}"));
    }
}
