//! The [`Exporter`]: gradguard's metric families in a registry of their own.
//!
//! Every series that a bounded label set allows is created at construction, so the first
//! scrape already shows all of them (counters at 0, leakage gauges at NaN until measured).
//! Updates only touch pre-resolved children (atomic stores); the mutex around the tracking
//! state is held only to copy a few values. Rendering happens on the scraping thread.
use crate::bounds::BoundSeries;
use crate::error::{ExporterError, LabelKind};
use gradguard_defenses::Defence;
use gradguard_guard::{Metric, Policy, ReleaseKind, Report, report::ReportedMetric};
use parking_lot::Mutex;
use prometheus::{Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The leakage metrics of a [`Report`] that the exporter knows how to read, in label form
/// (`gradguard_layer_leakage{metric=...}`, `gradguard_layer_threshold{metric=...}`).
pub const LEAKAGE_METRICS: [&str; 9] = ReportedMetric::NAMES;

/// Defence action names for exporters that are not told otherwise: the transformations of
/// `gradguard-defenses` plus withholding a layer's gradient.
pub const DEFAULT_ACTIONS: [&str; 5] = Defence::KINDS;

/// Buckets of `gradguard_estimate_duration_seconds` (1 ms .. 60 s).
pub const ESTIMATE_DURATION_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Policy label values before [`Exporter::set_policy_info`] is called.
pub const NO_POLICY: &str = "none";

/// Longest accepted label value (layer names, actions, policy hash and version).
pub const MAX_LABEL_VALUE_LEN: usize = 128;

/// Per-layer children, resolved once at construction.
struct LayerSeries {
    /// Indexed like `Exporter::metrics`.
    leakage: Vec<Gauge>,
    absent: Vec<IntGauge>,
    threshold: Vec<Gauge>,
    /// Indexed like `Exporter::actions`.
    actions: Vec<IntCounter>,
    grad_norm: Gauge,
    grad_max_abs: Gauge,
    grad_non_finite: Gauge,
    params: IntGauge,
    protection_level: IntGauge,
    withheld: IntGauge,
    age_seconds: Gauge,
    age_steps: Gauge,
}

/// Mutable bookkeeping (behind one short-held mutex).
struct Tracking {
    latest: Option<Arc<Report>>,
    /// Highest step counted in `gradguard_training_steps_total`.
    last_counted_step: Option<u64>,
    /// Step of the latest report (for ages in steps).
    latest_step: Option<u64>,
    /// Per layer: the step of its newest estimate and when the exporter first saw it.
    estimate_seen: Vec<Option<(u64, Instant)>>,
    policy: (String, String),
    /// The guard's cumulative dropped-estimate count already exported.
    dropped_seen: u64,
    /// The guard's cumulative count of rejected policy reloads already exported.
    reload_failures_seen: u64,
}

/// gradguard's Prometheus metrics for one model. `Send + Sync`; share it in an `Arc` between
/// the training loop and [`crate::MetricsServer`].
///
/// Label values are bounded: the layers, leakage metrics and actions given to [`Exporter::new`]
/// are the only values ever exported. An update naming anything else creates nothing, returns
/// [`ExporterError::UnknownLabel`] (or [`ExporterError::UnknownLayers`] from
/// [`Exporter::observe_report`], after exporting the known layers) and is counted in
/// `gradguard_exporter_rejected_updates_total{label}`.
pub struct Exporter {
    registry: Registry,
    created: Instant,
    layers: Vec<String>,
    layer_index: HashMap<String, usize>,
    metrics: Vec<ReportedMetric>,
    metric_names: Vec<&'static str>,
    metric_index: HashMap<&'static str, usize>,
    actions: Vec<String>,
    action_index: HashMap<String, usize>,
    series: Vec<LayerSeries>,
    releases: [IntCounter; 4],
    rejected: [IntCounter; 3],
    aggregation_floor: Gauge,
    estimate_duration: Histogram,
    estimates_dropped: IntCounter,
    policy_reload_failures: IntCounter,
    training_steps: IntCounter,
    report_step: Gauge,
    policy_info: IntGaugeVec,
    bounds: BoundSeries,
    tracking: Mutex<Tracking>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("layers", &self.layers)
            .field("metrics", &self.metric_names)
            .field("actions", &self.actions)
            .finish_non_exhaustive()
    }
}

fn check_label_value(kind: &str, value: &str) -> Result<(), ExporterError> {
    if value.is_empty() {
        return Err(ExporterError::Config(format!("empty {kind} name")));
    }
    if value.len() > MAX_LABEL_VALUE_LEN {
        return Err(ExporterError::Config(format!("{kind} {value:?} is longer than {MAX_LABEL_VALUE_LEN} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(ExporterError::Config(format!("{kind} {value:?} contains control characters")));
    }
    Ok(())
}

fn index<K: std::hash::Hash + Eq + Clone>(kind: &str, values: &[K], show: impl Fn(&K) -> String) -> Result<HashMap<K, usize>, ExporterError> {
    let mut map = HashMap::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        if map.insert(v.clone(), i).is_some() {
            return Err(ExporterError::Config(format!("duplicate {kind} {:?}", show(v))));
        }
    }
    Ok(map)
}

impl Exporter {
    /// An exporter for a model with these layers (as the guard names them, e.g.
    /// `guard.layers().names()`), exporting these leakage metrics (a subset of
    /// [`LEAKAGE_METRICS`]) and counting these defence actions. Creates every series.
    pub fn new<L: AsRef<str>, M: AsRef<str>, A: AsRef<str>>(layers: &[L], metrics: &[M], actions: &[A]) -> Result<Self, ExporterError> {
        let layers: Vec<String> = layers.iter().map(|l| l.as_ref().to_string()).collect();
        if layers.is_empty() {
            return Err(ExporterError::Config("no layers given".into()));
        }
        for l in &layers {
            check_label_value("layer", l)?;
        }
        let metrics: Vec<ReportedMetric> = metrics
            .iter()
            .map(|m| {
                ReportedMetric::from_name(m.as_ref()).ok_or_else(|| {
                    ExporterError::Config(format!("unknown leakage metric {:?}; known: {}", m.as_ref(), LEAKAGE_METRICS.join(", ")))
                })
            })
            .collect::<Result<_, _>>()?;
        let metric_names: Vec<&'static str> = metrics.iter().map(|m| m.name()).collect();
        let actions: Vec<String> = actions.iter().map(|a| a.as_ref().to_string()).collect();
        for a in &actions {
            check_label_value("action", a)?;
        }
        let layer_index = index("layer", &layers, |s| s.clone())?;
        let metric_index = index("metric", &metric_names, |s| s.to_string())?;
        let action_index = index("action", &actions, |s| s.clone())?;

        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c);
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec, ExporterError> {
            let v = GaugeVec::new(Opts::new(name, help), labels)?;
            reg(Box::new(v.clone()))?;
            Ok(v)
        };
        let int_gauge_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, ExporterError> {
            let v = IntGaugeVec::new(Opts::new(name, help), labels)?;
            reg(Box::new(v.clone()))?;
            Ok(v)
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, ExporterError> {
            let v = IntCounterVec::new(Opts::new(name, help), labels)?;
            reg(Box::new(v.clone()))?;
            Ok(v)
        };

        let leakage = gauge_vec(
            "gradguard_layer_leakage",
            "Latest per-layer leakage estimate (METRICS.md M1, M2, M5, M6), by metric: sensitivity (S_l), sensitivity_se (its standard error), sensitivity_rms (S_l/sqrt(P_l)), relative_sensitivity (S_l/||G_l||), subspace_distance (d_between), subspace_separation (d_between - d_within), reconstruction_bound_bits (M5: van Trees bound of the layer's latest release in bits per input dimension against attackers with a Gaussian prior; +Inf when released without noise), exposed_fraction (M6: share of the batch whose samples each dominate one of the layer's units, exposed by the release alone), isolated_share (M6: share of ||G_l||^2 in units that isolate one sample). NaN while absent.",
            &["layer", "metric"],
        )?;
        let absent = int_gauge_vec(
            "gradguard_layer_leakage_absent",
            "1 while the leakage metric could not be computed for the layer (its gauge is NaN), 0 once measured.",
            &["layer", "metric"],
        )?;
        let threshold = gauge_vec(
            "gradguard_layer_threshold",
            "Threshold of the policy that applies to the layer's leakage metric (same scale as gradguard_layer_leakage). NaN when no threshold is configured.",
            &["layer", "metric"],
        )?;
        let grad_norm = gauge_vec("gradguard_layer_gradient_norm", "L2 norm ||G_l||_2 of the layer's latest released gradient (NaN before the first).", &["layer"])?;
        let grad_max_abs = gauge_vec("gradguard_layer_gradient_max_abs", "max |G_l| of the layer's latest released gradient (NaN before the first).", &["layer"])?;
        let grad_non_finite =
            gauge_vec("gradguard_layer_gradient_non_finite", "Number of non-finite entries in the layer's latest gradient (a non-finite gradient is never released).", &["layer"])?;
        let params = int_gauge_vec("gradguard_layer_parameters", "Number of trainable scalars P_l in the layer.", &["layer"])?;
        let protection_level = int_gauge_vec(
            "gradguard_layer_protection_level",
            "Protection applied to the layer: 0 = unprotected, k = k-th rung of the policy's escalation ladder.",
            &["layer"],
        )?;
        let withheld = int_gauge_vec("gradguard_layer_withheld", "1 while the layer's gradient is withheld (blocked from release), else 0.", &["layer"])?;
        let age_seconds = gauge_vec(
            "gradguard_estimate_age_seconds",
            "Seconds since the exporter first saw the layer's newest leakage estimate (since exporter start while there is none).",
            &["layer"],
        )?;
        let age_steps = gauge_vec(
            "gradguard_estimate_age_steps",
            "Training steps between the latest report and the step the layer's newest leakage estimate was computed at (steps observed so far while there is none).",
            &["layer"],
        )?;
        let actions_total = counter_vec("gradguard_defence_actions_total", "Defence actions applied to a layer's gradient, by action.", &["layer", "action"])?;
        let releases = counter_vec("gradguard_releases_total", "Gradient releases by outcome: released (as computed), protected (after defence actions), held (for the aggregation floor, nothing released yet), blocked (not released).", &["outcome"])?;
        let rejected = counter_vec(
            "gradguard_exporter_rejected_updates_total",
            "Updates the exporter refused because they named a layer, metric or action it was not constructed with.",
            &["label"],
        )?;
        let aggregation_floor = Gauge::with_opts(Opts::new(
            "gradguard_aggregation_floor_samples",
            "Minimum number of samples aggregated into one release that the policy requires (0 = no floor configured).",
        ))?;
        reg(Box::new(aggregation_floor.clone()))?;
        let estimate_duration = Histogram::with_opts(
            HistogramOpts::new("gradguard_estimate_duration_seconds", "Wall time of one leakage estimate (M1 and M2 for all layers) on the training thread.")
                .buckets(ESTIMATE_DURATION_BUCKETS.to_vec()),
        )?;
        reg(Box::new(estimate_duration.clone()))?;
        let estimates_dropped =
            IntCounter::with_opts(Opts::new("gradguard_estimates_dropped_total", "Leakage estimates that were due but skipped or discarded (budget, queue full, error)."))?;
        reg(Box::new(estimates_dropped.clone()))?;
        let policy_reload_failures = IntCounter::with_opts(Opts::new(
            "gradguard_policy_reload_failures_total",
            "Policy reloads (SIGHUP or the library call) the guard rejected; the policy in force stayed.",
        ))?;
        reg(Box::new(policy_reload_failures.clone()))?;
        let training_steps = IntCounter::with_opts(Opts::new("gradguard_training_steps_total", "Training steps inspected by the guard (latest report step + 1)."))?;
        reg(Box::new(training_steps.clone()))?;
        let report_step = Gauge::with_opts(Opts::new("gradguard_report_step", "Step number of the latest report (NaN before the first)."))?;
        reg(Box::new(report_step.clone()))?;
        let policy_info = int_gauge_vec("gradguard_policy_info", "The policy in force: hash and version as labels, value 1 (\"none\" before one is set).", &["hash", "version"])?;
        let build_info = int_gauge_vec("gradguard_build_info", "gradguard build: version as a label, value 1.", &["version"])?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        policy_info.with_label_values(&[NO_POLICY, NO_POLICY]).set(1);
        report_step.set(f64::NAN);

        let series = layers
            .iter()
            .map(|layer| {
                let l = layer.as_str();
                let s = LayerSeries {
                    leakage: metric_names.iter().map(|m| leakage.with_label_values(&[l, m])).collect(),
                    absent: metric_names.iter().map(|m| absent.with_label_values(&[l, m])).collect(),
                    threshold: metric_names.iter().map(|m| threshold.with_label_values(&[l, m])).collect(),
                    actions: actions.iter().map(|a| actions_total.with_label_values(&[l, a.as_str()])).collect(),
                    grad_norm: grad_norm.with_label_values(&[l]),
                    grad_max_abs: grad_max_abs.with_label_values(&[l]),
                    grad_non_finite: grad_non_finite.with_label_values(&[l]),
                    params: params.with_label_values(&[l]),
                    protection_level: protection_level.with_label_values(&[l]),
                    withheld: withheld.with_label_values(&[l]),
                    age_seconds: age_seconds.with_label_values(&[l]),
                    age_steps: age_steps.with_label_values(&[l]),
                };
                for g in s.leakage.iter().chain(&s.threshold) {
                    g.set(f64::NAN);
                }
                for g in &s.absent {
                    g.set(1);
                }
                for g in [&s.grad_norm, &s.grad_max_abs, &s.grad_non_finite] {
                    g.set(f64::NAN);
                }
                s.age_seconds.set(0.0);
                s.age_steps.set(0.0);
                s
            })
            .collect();
        let bounds = BoundSeries::register(&registry, &layers)?;
        let releases = ReleaseKind::ALL.map(|k| releases.with_label_values(&[k.name()]));
        let rejected = LabelKind::ALL.map(|k| rejected.with_label_values(&[k.as_str()]));

        Ok(Self {
            registry,
            created: Instant::now(),
            tracking: Mutex::new(Tracking {
                latest: None,
                last_counted_step: None,
                latest_step: None,
                estimate_seen: vec![None; layers.len()],
                dropped_seen: 0,
                reload_failures_seen: 0,
                policy: (NO_POLICY.into(), NO_POLICY.into()),
            }),
            layers,
            layer_index,
            metrics,
            metric_names,
            metric_index,
            actions,
            action_index,
            series,
            releases,
            rejected,
            aggregation_floor,
            estimate_duration,
            estimates_dropped,
            policy_reload_failures,
            training_steps,
            report_step,
            policy_info,
            bounds,
        })
    }

    /// All of [`LEAKAGE_METRICS`] and [`DEFAULT_ACTIONS`] for these layers.
    pub fn for_layers<L: AsRef<str>>(layers: &[L]) -> Result<Self, ExporterError> {
        Self::new(layers, &LEAKAGE_METRICS, &DEFAULT_ACTIONS)
    }

    /// The layer label values, in construction order: the only layers ever exported.
    pub fn layers(&self) -> &[String] {
        &self.layers
    }

    /// The leakage metrics exported (a subset of [`LEAKAGE_METRICS`]), in construction order.
    pub fn metrics(&self) -> &[&'static str] {
        &self.metric_names
    }

    /// The defence action label values counted, in construction order.
    pub fn actions(&self) -> &[String] {
        &self.actions
    }

    /// The exporter's own registry (never the prometheus crate's default one).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn reject(&self, label: LabelKind, value: &str) -> ExporterError {
        self.rejected[label as usize].inc();
        let known = match label {
            LabelKind::Layer => self.layers.join(", "),
            LabelKind::Metric => self.metric_names.join(", "),
            LabelKind::Action => self.actions.join(", "),
        };
        ExporterError::UnknownLabel { label, value: value.to_string(), known }
    }

    fn layer(&self, layer: &str) -> Result<usize, ExporterError> {
        self.layer_index.get(layer).copied().ok_or_else(|| self.reject(LabelKind::Layer, layer))
    }

    fn metric(&self, metric: &str) -> Result<usize, ExporterError> {
        self.metric_index.get(metric).copied().ok_or_else(|| self.reject(LabelKind::Metric, metric))
    }

    /// Exports one step's report: per-layer leakage gauges from the measured metrics, gradient
    /// statistics, the step counter and the estimates' ages, and keeps the report for
    /// [`Exporter::snapshot_json`].
    ///
    /// - An absent metric (or a `relative_sensitivity` of None) sets its gauge to NaN and
    ///   `gradguard_layer_leakage_absent` to 1: the series stays, with no number in it.
    /// - `gradguard_training_steps_total` advances to `report.step + 1` (never backwards; a
    ///   report of an already counted step adds nothing, skipped steps are counted).
    /// - A layer's estimate age restarts when one of its estimates carries a newer step than
    ///   before (the time is when this exporter first saw it).
    /// - Layers the exporter was not constructed with are skipped, counted and returned as
    ///   [`ExporterError::UnknownLayers`]; everything else is still exported.
    pub fn observe_report(&self, report: &Report) -> Result<(), ExporterError> {
        let now = Instant::now();
        let mut unknown = Vec::new();
        let mut newest: Vec<(usize, u64)> = Vec::with_capacity(report.layers.len());
        for lr in &report.layers {
            let Some(&l) = self.layer_index.get(&lr.name) else {
                unknown.push(lr.name.clone());
                continue;
            };
            let s = &self.series[l];
            s.params.set(i64::try_from(lr.params).unwrap_or(i64::MAX));
            let sens = lr.sensitivity.measured();
            let sub = lr.subspace.measured();
            let iso = lr.sample_isolation.measured();
            for (i, &m) in self.metrics.iter().enumerate() {
                let v = lr.value(m);
                s.leakage[i].set(v.unwrap_or(f64::NAN));
                s.absent[i].set(i64::from(v.is_none()));
            }
            if let Metric::Measured(g) = &lr.gradient {
                s.grad_norm.set(g.norm);
                s.grad_max_abs.set(g.max_abs);
                s.grad_non_finite.set(g.non_finite as f64);
            }
            if let Some(step) = sens.map(|s| s.step).into_iter().chain(sub.map(|s| s.step)).chain(iso.map(|s| s.step)).max() {
                newest.push((l, step));
            }
        }
        let training_step = report.layers.iter().any(|l| l.gradient.measured().is_some());
        let latest = Arc::new(report.clone());
        let add_steps = {
            let mut t = self.tracking.lock();
            for (l, step) in newest {
                match t.estimate_seen[l] {
                    Some((seen, _)) if seen >= step => {}
                    _ => t.estimate_seen[l] = Some((step, now)),
                }
            }
            t.latest_step = Some(t.latest_step.map_or(report.step, |s| s.max(report.step)));
            t.latest = Some(latest);
            let add = if training_step {
                match t.last_counted_step {
                    None => report.step + 1,
                    Some(c) => report.step.saturating_sub(c),
                }
            } else {
                0
            };
            if add > 0 {
                t.last_counted_step = Some(report.step);
            }
            add
        };
        self.training_steps.inc_by(add_steps);
        self.report_step.set(report.step as f64);
        self.bounds.observe(report, |name| self.layer_index.get(name).copied());
        self.observe_decisions(report);
        if unknown.is_empty() {
            Ok(())
        } else {
            self.rejected[LabelKind::Layer as usize].inc_by(unknown.len() as u64);
            Err(ExporterError::UnknownLayers { names: unknown })
        }
    }

    /// The decision half of a report: protection level and withheld state per layer, the
    /// defences applied at this release, the release's outcome, the aggregation floor, the
    /// estimate's duration and the estimates the guard dropped (from its cumulative count).
    fn observe_decisions(&self, report: &Report) {
        for lr in &report.layers {
            if let Some(&l) = self.layer_index.get(&lr.name) {
                self.series[l].protection_level.set(i64::try_from(lr.protection_level).unwrap_or(i64::MAX));
            }
        }
        if let Some(seconds) = report.estimate_seconds {
            self.estimate_duration.observe(seconds);
        }
        let dropped = report.health.estimates_dropped;
        let delta = {
            let mut t = self.tracking.lock();
            let d = dropped.saturating_sub(t.dropped_seen);
            t.dropped_seen = t.dropped_seen.max(dropped);
            d
        };
        self.estimates_dropped.inc_by(delta);
        let failures = report.health.policy_reload_failures;
        let delta = {
            let mut t = self.tracking.lock();
            let d = failures.saturating_sub(t.reload_failures_seen);
            t.reload_failures_seen = t.reload_failures_seen.max(failures);
            d
        };
        self.policy_reload_failures.inc_by(delta);
        let Some(manifest) = &report.release else { return };
        // A reloaded policy: its hash replaces the one exported (short form, as attach sets it),
        // once a policy was set at all.
        let following = self.tracking.lock().policy.0 != NO_POLICY;
        if following {
            let _ = self.set_policy_info(Policy::short(&manifest.policy_hash), &manifest.policy_version.to_string());
        }
        for ml in &manifest.layers {
            for c in &ml.checks {
                if let (Some(&l), Some(&m)) = (self.layer_index.get(&ml.name), self.metric_index.get(c.metric.name())) {
                    self.series[l].threshold[m].set(c.act_above);
                }
            }
        }
        self.aggregation_floor.set(manifest.aggregation_floor as f64);
        for ml in &manifest.layers {
            let Some(&l) = self.layer_index.get(&ml.name) else { continue };
            let released = matches!(manifest.outcome, gradguard_guard::report::ReleaseOutcome::Released);
            self.series[l].withheld.set(i64::from(released && !ml.released));
            if !released {
                continue;
            }
            for action in &ml.actions {
                // The label is the action's kind (`clip`), never its parameters.
                if let Some(&a) = self.action_index.get(action.name()) {
                    self.series[l].actions[a].inc();
                }
            }
        }
        self.record_release(manifest.kind());
    }

    /// The threshold that applies to `layer`'s `metric` (NaN clears it).
    pub fn set_threshold(&self, layer: &str, metric: &str, value: f64) -> Result<(), ExporterError> {
        let l = self.layer(layer)?;
        let m = self.metric(metric)?;
        self.series[l].threshold[m].set(value);
        Ok(())
    }

    /// Escalation rung of `layer`'s protection: 0 = unprotected, k = k-th rung.
    pub fn set_protection_level(&self, layer: &str, level: u32) -> Result<(), ExporterError> {
        let l = self.layer(layer)?;
        self.series[l].protection_level.set(i64::from(level));
        Ok(())
    }

    /// Whether `layer`'s gradient is currently withheld (blocked from release).
    pub fn set_withheld(&self, layer: &str, withheld: bool) -> Result<(), ExporterError> {
        let l = self.layer(layer)?;
        self.series[l].withheld.set(i64::from(withheld));
        Ok(())
    }

    /// Counts one application of `action` to `layer`'s gradient.
    pub fn record_action(&self, layer: &str, action: &str) -> Result<(), ExporterError> {
        let l = self.layer(layer)?;
        let a = self.action_index.get(action).copied().ok_or_else(|| self.reject(LabelKind::Action, action))?;
        self.series[l].actions[a].inc();
        Ok(())
    }

    /// Counts one release by what happened to it.
    pub fn record_release(&self, kind: ReleaseKind) {
        self.releases[kind as usize].inc();
    }

    /// The policy's minimum number of samples per release (0 = none).
    pub fn set_aggregation_floor(&self, samples: u64) {
        self.aggregation_floor.set(samples as f64);
    }

    /// Wall time of one leakage estimate.
    pub fn observe_estimate_duration(&self, duration: Duration) {
        self.estimate_duration.observe(duration.as_secs_f64());
    }

    /// Counts estimates that were due but not made or thrown away.
    pub fn record_dropped_estimates(&self, n: u64) {
        self.estimates_dropped.inc_by(n);
    }

    /// Replaces the one `gradguard_policy_info{hash,version}` series. Values are checked
    /// (non-empty, at most [`MAX_LABEL_VALUE_LEN`] bytes, no control characters).
    pub fn set_policy_info(&self, hash: &str, version: &str) -> Result<(), ExporterError> {
        check_label_value("policy hash", hash)?;
        check_label_value("policy version", version)?;
        let mut t = self.tracking.lock();
        if t.policy.0 != hash || t.policy.1 != version {
            let _ = self.policy_info.remove_label_values(&[t.policy.0.as_str(), t.policy.1.as_str()]);
            self.policy_info.with_label_values(&[hash, version]).set(1);
            t.policy = (hash.to_string(), version.to_string());
        }
        Ok(())
    }

    /// Refreshes the estimate ages (they depend on the clock) from the tracking state.
    fn refresh_ages(&self) {
        let now = Instant::now();
        let (latest_step, seen, counted) = {
            let t = self.tracking.lock();
            (t.latest_step, t.estimate_seen.clone(), t.last_counted_step)
        };
        for (s, seen) in self.series.iter().zip(seen) {
            let (secs, steps) = match seen {
                Some((step, at)) => (now.duration_since(at).as_secs_f64(), latest_step.map_or(0, |l| l.saturating_sub(step))),
                None => (now.duration_since(self.created).as_secs_f64(), counted.map_or(0, |c| c + 1)),
            };
            s.age_seconds.set(secs);
            s.age_steps.set(steps as f64);
        }
    }

    /// All metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        self.refresh_ages();
        let families = self.registry.gather();
        let mut out = String::with_capacity(16 * 1024);
        // Encoding into a String only fails on a malformed family, which the constructor rules out.
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            out.push_str(&format!("# gradguard exporter: encoding failed: {e}\n"));
        }
        out
    }

    /// `Content-Type` of [`Exporter::render`]'s output.
    pub fn content_type(&self) -> &'static str {
        "text/plain; version=0.0.4; charset=utf-8"
    }

    /// The latest report (statistics only: no gradient or input values) as JSON, with the
    /// step count, policy, estimate ages and the thresholds set:
    /// `{"version","policy":{"hash","version"},"training_steps_total","estimate_age_seconds":{layer:s},"thresholds":{layer:{metric:t}},"report":Report|null}`.
    pub fn snapshot_json(&self) -> String {
        let now = Instant::now();
        let (latest, policy, seen) = {
            let t = self.tracking.lock();
            (t.latest.clone(), t.policy.clone(), t.estimate_seen.clone())
        };
        let ages: serde_json::Map<String, serde_json::Value> = self
            .layers
            .iter()
            .zip(seen)
            .map(|(l, s)| {
                let at = s.map_or(self.created, |(_, at)| at);
                (l.clone(), serde_json::json!(now.duration_since(at).as_secs_f64()))
            })
            .collect();
        // The thresholds in force per layer (those set: a rule covers the layer's metric), for
        // the live page, which sees a release's checks only at the steps that estimate.
        let thresholds: serde_json::Map<String, serde_json::Value> = self
            .layers
            .iter()
            .zip(&self.series)
            .map(|(l, s)| {
                let set: serde_json::Map<String, serde_json::Value> =
                    self.metric_names.iter().zip(&s.threshold).filter(|(_, g)| g.get().is_finite()).map(|(m, g)| (m.to_string(), serde_json::json!(g.get()))).collect();
                (l.clone(), serde_json::Value::Object(set))
            })
            .collect();
        let value = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "policy": { "hash": policy.0, "version": policy.1 },
            "training_steps_total": self.training_steps.get(),
            "estimate_age_seconds": ages,
            "thresholds": thresholds,
            "report": latest.as_deref(),
        });
        serde_json::to_string_pretty(&value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exporter_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Exporter>();
    }
}
