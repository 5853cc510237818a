//! Aggregation revisited on honest models, and the false-positive rate of an M6 rule on honest
//! training.
//!
//! - For each honest model (the digits MLP, the digits CNN, the tabular MLP) and batch size n:
//!   the attack suite's strongest recovered fraction over several releases of n (the analytic
//!   attacks; absent with the suite's reason where no layer takes the model input through a
//!   Linear with a bias, as for the CNN's conv1) and M6 of every layer.
//! - For each honest model trained from its seeded initialisation for a demo-length run (Adam,
//!   batches of 64 in the demo's order), M6 of every layer on the release of every k-th step, and
//!   the share of those releases a rule "exposed_fraction > threshold on some layer" would block.
use super::nets::{Data, Net};
use gradguard_audit::estimate::attacks::{attack_suite, AttackPlan};
use gradguard_audit::{EstimateContext, Result};
use gradguard_guard::measure::IsolationSettings;
use gradguard_guard::{Batch, Inspection};
use tch::Tensor;

/// How the two parts run.
#[derive(Clone, Debug)]
pub(super) struct AggregationPlan {
    pub batch_sizes: Vec<usize>,
    /// Samples attacked per batch size (releases = samples / n, within the bounds below).
    pub samples: usize,
    pub min_releases: usize,
    pub max_releases: usize,
    pub tau: f64,
    /// The demo-length runs: steps, batch sizes (one run per size), and the steps between M6
    /// measurements.
    pub fpr_steps: usize,
    pub fpr_batches: Vec<usize>,
    pub fpr_every: usize,
}

/// The M6 rules read: a release is blocked when some layer's exposed_fraction is above the
/// threshold (0.5, the rule studied; 0.1, the rule of the federated refusal test's policy).
pub(super) const M6_RULES: [f64; 2] = [0.5, 0.1];

/// One model at one batch size.
#[derive(Clone, Debug)]
pub(super) struct AggPoint {
    pub n: usize,
    pub releases: usize,
    /// The strongest attack on the first layer (the one on the model input) and its recovered
    /// fraction; Err: why no attack applies to it.
    pub recovered: std::result::Result<(&'static str, f64), String>,
    /// The other layers the suite attacked (eligible by shape: their width is the input's) and
    /// their strongest recovered fraction.
    pub others: Vec<(String, f64)>,
    /// Per layer: (name, mean exposed_fraction, mean isolated_share) over the releases.
    pub m6: Vec<(String, Option<f64>, Option<f64>)>,
}

/// One model's sweep.
pub(super) struct AggModel {
    pub model: String,
    pub points: Vec<AggPoint>,
}

/// One model's demo-length run.
pub(super) struct FprRun {
    pub model: String,
    pub steps: usize,
    pub batch: usize,
    /// Accuracy on the held-out (auxiliary) split at the end.
    pub accuracy: f64,
    /// Layer names.
    pub layers: Vec<String>,
    /// (step, exposed_fraction per layer) at every measured release.
    pub series: Vec<(usize, Vec<Option<f64>>)>,
    /// isolated_share per layer at the same releases.
    pub isolated: Vec<Vec<Option<f64>>>,
}

impl FprRun {
    /// Releases measured.
    pub(super) fn measured(&self) -> usize {
        self.series.len()
    }

    /// Releases the rule blocks: some layer (`layer`: that layer only) above `threshold`.
    pub(super) fn blocked(&self, threshold: f64, layer: Option<usize>) -> usize {
        self.series
            .iter()
            .filter(|(_, e)| e.iter().enumerate().any(|(l, v)| layer.is_none_or(|k| k == l) && v.is_some_and(|v| v > threshold)))
            .count()
    }

    /// Releases the rule "isolated_share above `threshold` on some layer" blocks (the rule that
    /// catches fishing, federated/tests/test_refusal.py's `concentration`).
    pub(super) fn blocked_isolated(&self, threshold: f64) -> usize {
        self.isolated.iter().filter(|layers| layers.iter().any(|v| v.is_some_and(|v| v > threshold))).count()
    }

    /// The largest isolated_share of any layer over the run.
    pub(super) fn max_isolated(&self) -> Option<f64> {
        self.isolated.iter().flatten().flatten().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
    }

    /// The largest and the mean exposed_fraction of a layer over the run.
    pub(super) fn layer_stats(&self, l: usize) -> (Option<f64>, Option<f64>) {
        let v: Vec<f64> = self.series.iter().filter_map(|(_, e)| e.get(l).copied().flatten()).collect();
        let max = v.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        (max, (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64))
    }
}

/// M6 of every layer on one release: exposed_fraction and isolated_share (None: absent).
fn isolation(t: &Inspection, tau: f64) -> Result<Vec<(Option<f64>, Option<f64>)>> {
    Ok(t.sample_isolation(&IsolationSettings { tau })
        .metric("M6 (sample isolation)")?
        .iter()
        .map(|m| (m.measured().map(|m| m.exposed_fraction), m.measured().map(|m| m.isolated_share)))
        .collect())
}

/// The analytic attack's part of the suite's "no attack applies: analytic: ...; ..." reason
/// (the whole reason when it has no such part).
fn analytic_reason(reason: &str) -> &str {
    reason.split_once("analytic: ").map_or(reason, |(_, rest)| rest.split("; analytic_differences: ").next().unwrap_or(rest))
}

/// Recovered fraction and M6 against the batch size, on one trained honest model.
pub(super) fn aggregation_sweep(net: &Net, label: &str, data: &Data, plan: &AggregationPlan, seed: u64) -> Result<AggModel> {
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let names = net.layers().names();
    let mut points = Vec::new();
    for &n in &plan.batch_sizes {
        let releases = (plan.samples / n.max(1)).clamp(plan.min_releases, plan.max_releases).min(data.train.len() / n.max(1)).max(1);
        let (xa, ya) = data.first_train(releases * n)?;
        let all = Inspection::new(net.layers(), &loss, Batch::new(&xa, &ya)).seeded(seed, 0);
        let suite = attack_suite(&all, &AttackPlan { batch_size: n, releases, optimisation: None })?;
        let recovered = match suite.layers.first() {
            Some(l) => match l.measured() {
                Some(s) => Ok((s.strongest, s.recovered_fraction)),
                None => Err(format!("{}: {}", names.first().cloned().unwrap_or_default(), analytic_reason(l.absent_reason().unwrap_or("absent")))),
            },
            None => Err("no layers".into()),
        };
        let others = names.iter().zip(&suite.layers).skip(1).filter_map(|(name, l)| l.measured().map(|s| (name.clone(), s.recovered_fraction))).collect();
        let mut sums: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); names.len()];
        for r in 0..releases {
            let (xb, yb) = (xa.f_narrow(0, (r * n) as i64, n as i64)?, ya.f_narrow(0, (r * n) as i64, n as i64)?);
            for (l, (e, i)) in isolation(&all.on(Batch::new(&xb, &yb)).seeded(seed ^ r as u64, r as u64), plan.tau)?.into_iter().enumerate() {
                sums[l].0.extend(e);
                sums[l].1.extend(i);
            }
        }
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let m6 = names.iter().zip(&sums).map(|(name, (e, i))| (name.clone(), mean(e), mean(i))).collect();
        points.push(AggPoint { n, releases, recovered, others, m6 });
    }
    Ok(AggModel { model: label.to_string(), points })
}

/// The demo-length honest run of a freshly initialised model: M6 of every `plan.fpr_every`-th release.
pub(super) fn fpr_run(net: &Net, label: &str, data: &Data, batch: usize, plan: &AggregationPlan, seed: u64) -> Result<FprRun> {
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let (mut series, mut isolated) = (Vec::new(), Vec::new());
    net.train(data, plan.fpr_steps, &|s| data.demo_batch(batch, s), Some(plan.fpr_every), &mut |s, x, y| {
        let t = Inspection::new(net.layers(), &loss, Batch::new(x, y)).seeded(seed, s as u64);
        let (e, i): (Vec<_>, Vec<_>) = isolation(&t, plan.tau)?.into_iter().unzip();
        series.push((s, e));
        isolated.push(i);
        Ok(())
    })?;
    Ok(FprRun {
        model: label.to_string(),
        steps: plan.fpr_steps,
        batch,
        accuracy: net.accuracy(data, &data.aux)?,
        layers: net.layers().names(),
        series,
        isolated,
    })
}
