//! M5's series (METRICS.md): the reconstruction bound of the whole latest release (each
//! layer's is `gradguard_layer_leakage{metric="reconstruction_bound_bits"}`), and the run
//! ledger's cumulative bound against its cap, all in bits per input dimension (the names say
//! `bound`, not `bits`: Prometheus' naming lint reserves `bits` for data sizes). A release
//! without noise has no bound: its gauge holds +Inf; a bound not measured holds NaN.
use crate::error::ExporterError;
use gradguard_guard::{Metric, Report, report::BOUND_CAVEAT};
use prometheus::{Gauge, GaugeVec, Opts, Registry};

/// The M5 gauges of one exporter, resolved once per layer.
pub(crate) struct BoundSeries {
    release_bound: Gauge,
    ledger_layer: Vec<Gauge>,
    ledger_release: Gauge,
    ledger_cap: Gauge,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<Gauge, ExporterError> {
    let g = Gauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(g.clone()))?;
    g.set(f64::NAN);
    Ok(g)
}

fn per_layer(registry: &Registry, layers: &[String], name: &str, help: &str) -> Result<Vec<Gauge>, ExporterError> {
    let v = GaugeVec::new(Opts::new(name, help), &["layer"])?;
    registry.register(Box::new(v.clone()))?;
    Ok(layers
        .iter()
        .map(|l| {
            let g = v.with_label_values(&[l.as_str()]);
            g.set(f64::NAN);
            g
        })
        .collect())
}

impl BoundSeries {
    pub(crate) fn register(registry: &Registry, layers: &[String]) -> Result<Self, ExporterError> {
        Ok(Self {
            release_bound: gauge(
                registry,
                "gradguard_release_reconstruction_bound",
                &format!("M5 of the whole latest release (dFIL summed over the released layers), bits per input dimension (+Inf: a layer released without noise). The bound {BOUND_CAVEAT}."),
            )?,
            ledger_layer: per_layer(
                registry,
                layers,
                "gradguard_ledger_reconstruction_bound",
                &format!("The run ledger: the layer's cumulative bound over the run's releases (Fisher information adds), bits per input dimension (+Inf: a release without noise). The bound {BOUND_CAVEAT}."),
            )?,
            ledger_release: gauge(
                registry,
                "gradguard_ledger_release_reconstruction_bound",
                &format!("The run ledger: the whole release's cumulative bound over the run, bits per input dimension (+Inf: a release without noise on a layer). The bound {BOUND_CAVEAT}."),
            )?,
            ledger_cap: gauge(registry, "gradguard_ledger_cap", "The policy's cap on the run ledger's cumulative bound (ledger_cap_bits), bits per input dimension; NaN when none.")?,
        })
    }

    /// The bounds of one report (layers matched by position in `index`).
    pub(crate) fn observe(&self, report: &Report, index: impl Fn(&str) -> Option<usize>) {
        let bits = |m: &Metric<gradguard_guard::report::ReconstructionBound>| match m {
            Metric::Measured(b) => b.bits_or_inf(),
            Metric::Absent { .. } => f64::NAN,
        };
        self.release_bound.set(bits(&report.release_reconstruction_bound));
        let Some(ledger) = &report.ledger else { return };
        for line in &ledger.layer_dfil {
            if let Some(l) = index(&line.name) {
                self.ledger_layer[l].set(line.bound_bits.unwrap_or(f64::INFINITY));
            }
        }
        self.ledger_release.set(ledger.release_bound_bits.unwrap_or(f64::INFINITY));
        self.ledger_cap.set(ledger.cap_bits.unwrap_or(f64::NAN));
    }
}
