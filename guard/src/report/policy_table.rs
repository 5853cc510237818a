//! The per-layer table a guarded run prints at each estimate: the metrics, the thresholds of the
//! policy that cover each layer, and the protection in force ([`Report::policy_table`]).
use super::{LeakageMetric, Report};
use std::fmt::Write;

/// A threshold of the policy in force: the layer, the rule's metric and its `act_above`.
pub type Threshold = (String, LeakageMetric, f64);

impl Report {
    /// Per layer: S_l, S_rms, R_l, the separation, |G_l|, the M5 bound and M6's exposed
    /// fraction, the thresholds that apply to the layer (`Guard::thresholds`) and the
    /// protection level and actions in force, then the release's M5 in words. `Guard::table` fills in the thresholds.
    pub fn policy_table(&self, thresholds: &[Threshold]) -> String {
        let mut out = format!("step {} (estimate):\n", self.step);
        let _ = writeln!(out, "  {:<6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<52} {}", "layer", "S_l", "S_rms", "R_l", "separ", "|G_l|", "M5 bits", "exposed", "thresholds", "protection");
        let manifest = self.release.as_ref();
        for (i, l) in self.layers.iter().enumerate() {
            let s = l.sensitivity.measured();
            let limits: Vec<String> = thresholds.iter().filter(|t| t.0 == l.name).map(|t| format!("{} > {}", t.1.name(), t.2)).collect();
            let actions = manifest.and_then(|m| m.layers.get(i)).map(|m| {
                if m.actions.is_empty() {
                    "none".to_string()
                } else {
                    m.actions.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" -> ")
                }
            });
            let _ = writeln!(
                out,
                "  {:<6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<52} level {} {}",
                l.name,
                fixed(s.map(|s| s.sensitivity)),
                fixed(s.map(|s| s.sensitivity_rms)),
                fixed(s.and_then(|s| s.relative_sensitivity)),
                fixed(l.subspace.measured().map(|m| m.subspace_separation)),
                fixed(l.gradient.measured().map(|g| g.norm)),
                // M5: +Inf for a layer released without noise (no bound).
                l.reconstruction_bound.measured().map_or("-".to_string(), |b| b.reconstruction_bound_bits.map_or("+Inf".into(), |v| format!("{v:.4}"))),
                // M6: the share of the batch the layer's release exposes alone.
                fixed(l.sample_isolation.measured().map(|m| m.exposed_fraction)),
                if limits.is_empty() { "-".into() } else { limits.join(", ") },
                l.protection_level,
                actions.unwrap_or_default()
            );
        }
        let _ = writeln!(out, "  {}", self.bound_line());
        out
    }
}

/// Four decimals, as the columns are wide; `-` for an absent value.
fn fixed(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}
