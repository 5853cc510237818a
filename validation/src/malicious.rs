//! The malicious-server section: the honest digits MLP, and three models a server could send
//! instead, made from it by setting parameters only (the architecture is unchanged):
//! - **trap** (Boenisch et al. 2021): fc0's rows random, each bias at the 1 - 1/B quantile of
//!   w.x over the server's auxiliary data, so that each unit fires for about one input in a
//!   batch of B (a trap model per batch size: the server knows the clients' B);
//! - **fishing** (Wen et al. 2022, here its class-fishing half): fc1's rows scaled, the other
//!   classes' by 30 (confident and correct: almost no gradient), the target class's by 0.05, so
//!   that the target class's samples dominate the batch gradient; measured on the same
//!   consecutive batches as the others, and (**fishing-one**) on batches that each hold one
//!   sample of the target class and samples of other classes the honest model classifies
//!   correctly: Wen et al.'s setting, where the fished sample's gradient is the release;
//! - **imprint** (Fowl et al. 2022, "Robbing the Fed", set through the existing Linear fc0):
//!   every fc0 row = ones / 64 (brightness), the biases at the 256 inner quantiles of the
//!   brightness, fc1's columns equal across the units, so that the difference of two
//!   consecutive units' gradients is the gradient of the samples in that brightness bin.
//!
//! For each model and batch size: what the attack suite recovers from fc0 (analytic, differences,
//! label recovery), M1 of fc0, M6 of fc0, and M5's bound of fc0 released with noise beside what
//! the analytic attacks recover from that same noised release.
use super::nets::{normals, quantile, Data, Net, DIGITS_MLP};
use gradguard_audit::estimate::attacks::{attack_suite, AttackPlan};
use gradguard_audit::estimate::bound::{batch_prior_variance, release_bounds, Prior};
use gradguard_audit::estimate::{per_sample_matrices, release_probes, release_sensitivity};
use gradguard_audit::{EstimateContext, Result};
use gradguard_defenses::{derive_seed, Defence};
use gradguard_guard::measure::attacks::{analytic, analytic_differences, score, AttackOutcome, LinearRelease};
use gradguard_guard::measure::{to_f64_vec, IsolationSettings};
use gradguard_guard::report::PriorSource;
use gradguard_guard::{Batch, Inspection, Metric};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// The attacks' tolerances (the suite's defaults): the smallest bias gradient divided by, and
/// the cosine tolerance of "the same direction".
const MIN_BIAS_GRADIENT: f64 = 1e-6;
const SAME_DIRECTION: f64 = 1e-6;
/// The class the fishing model fishes for.
pub(super) const FISHING_TARGET: i64 = 3;
/// The fishing model's scales: the other classes' rows, the target's.
const FISHING_CONFIDENT: f64 = 30.0;
const FISHING_DOUBTFUL: f64 = 0.05;
/// Adam steps of the honest model (batches of 64).
pub(super) const HONEST_STEPS: usize = 300;

/// How the section runs.
#[derive(Clone, Debug)]
pub(super) struct MaliciousPlan {
    pub batch_sizes: Vec<usize>,
    pub releases: usize,
    pub probes: usize,
    /// Noise multipliers of the noised release (std = multiplier x the clip).
    pub multipliers: Vec<f64>,
    pub tau: f64,
}

/// The analytic attacks on one layer released with noise, over the releases.
#[derive(Clone, Debug)]
pub(super) struct Noised {
    pub multiplier: f64,
    /// M5's bound of fc0's noised release, bits/dim, mean over the releases.
    pub bound: Option<f64>,
    /// The smallest per-dimension MSE M5 allows the average sample: 1 / (dFIL + 1/v) (mean of
    /// dFIL over the releases), as a PSNR at the data's peak 1.
    pub bound_psnr: Option<f64>,
    /// Samples the stronger analytic attack recovered from the noised releases (PSNR >= 30 dB).
    pub recovered: usize,
    /// The attack that did (the stronger one, summed over releases).
    pub attack: &'static str,
    /// That attack's matched error in the bound's unit, max(0, 0.5 log2(v / MSE)), mean over
    /// the releases (oracle matching).
    pub attack_bits: f64,
}

/// One model at one batch size.
#[derive(Clone, Debug)]
pub(super) struct Cell {
    pub model: &'static str,
    pub n: usize,
    pub releases: usize,
    /// Samples recovered over the releases by each analytic attack (None: absent, reason in `absent`).
    pub analytic: Option<usize>,
    pub differences: Option<usize>,
    pub absent: Vec<(String, String)>,
    /// The suite's strongest attack on fc0 and its recovered fraction.
    pub strongest: Option<(&'static str, f64)>,
    /// Label recovery: releases whose recovered label set was exact, of releases.
    pub labels: Option<(usize, usize)>,
    /// M1 of fc0 (mean over the releases): S_l, S_l^rms, R_l.
    pub s: Option<f64>,
    pub s_rms: Option<f64>,
    pub r: Option<f64>,
    /// M6 of fc0 (mean over the releases; and the largest exposed fraction).
    pub exposed: Option<f64>,
    pub exposed_max: Option<f64>,
    pub isolated: Option<f64>,
    /// M6 of every layer: (name, mean exposed_fraction, mean isolated_share) over the releases.
    pub m6: Vec<(String, Option<f64>, Option<f64>)>,
    pub noised: Vec<Noised>,
}

impl Cell {
    /// Samples attacked.
    pub(super) fn samples(&self) -> usize {
        self.n * self.releases
    }
}

/// The section's results.
pub(super) struct MaliciousStudy {
    pub plan: MaliciousPlan,
    pub cells: Vec<Cell>,
    /// Accuracy of every model on the auxiliary split (the trap per batch size).
    pub accuracy: Vec<(String, f64)>,
    /// The noise defence's clip: the honest model's median per-sample fc0 gradient norm.
    pub clip: f64,
    /// M5's prior variance v: per-dimension variance of the attacked samples.
    pub prior_variance: f64,
    pub train_samples: usize,
    pub aux_samples: usize,
}

/// The honest digits MLP: PyTorch's `nn.Linear` initialisation (seeded), as the Python
/// fixture's model, then Adam for [`HONEST_STEPS`] steps of 64 samples in the demo's order.
pub(super) fn honest_mlp(data: &Data, seed: u64) -> Result<Net> {
    let net = Net::mlp("honest", &DIGITS_MLP, seed)?.torch_init(seed)?;
    net.train(data, HONEST_STEPS, &|s| data.demo_batch(64, s), None, &mut |_, _, _| Ok(()))?;
    Ok(net)
}

/// Trap weights for batches of `batch`: random rows, biases at the 1 - 1/batch quantile of
/// w.x over the auxiliary data.
pub(super) fn trap(honest: &Net, aux: &(Vec<f64>, usize, usize), batch: usize, seed: u64) -> Result<Net> {
    let net = honest.copy("trap")?;
    let (x, m, d) = (&aux.0, aux.1, aux.2);
    let units = DIGITS_MLP[1] as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7a4 ^ ((batch as u64) << 16));
    let w = normals(&mut rng, units * d);
    let mut bias = Vec::with_capacity(units);
    for u in 0..units {
        let mut pre: Vec<f64> = (0..m).map(|i| (0..d).map(|j| x[i * d + j] * w[u * d + j]).sum()).collect();
        pre.sort_by(f64::total_cmp);
        bias.push(-quantile(&pre, 1.0 - 1.0 / batch.max(1) as f64));
    }
    net.set("fc0.weight", &Tensor::f_from_slice(&w)?.f_reshape([units as i64, d as i64])?)?;
    net.set("fc0.bias", &Tensor::f_from_slice(&bias)?)?;
    Ok(net)
}

/// Fishing for class [`FISHING_TARGET`]: fc1's rows (weight and bias) scaled, the target's by
/// 0.05, the others' by 30.
pub(super) fn fishing(honest: &Net, name: &'static str) -> Result<Net> {
    let net = honest.copy(name)?;
    let classes = DIGITS_MLP[2];
    let scale: Vec<f64> = (0..classes).map(|c| if c == FISHING_TARGET { FISHING_DOUBTFUL } else { FISHING_CONFIDENT }).collect();
    let scale = Tensor::f_from_slice(&scale)?;
    let (w, b) = (net.param("fc1.weight")?, net.param("fc1.bias")?);
    net.set("fc1.weight", &w.f_to_kind(Kind::Double)?.f_mul(&scale.f_unsqueeze(1)?)?)?;
    net.set("fc1.bias", &b.f_to_kind(Kind::Double)?.f_mul(&scale)?)?;
    Ok(net)
}

/// A binned imprint layer through fc0: every row ones / D, the biases minus the 256 inner
/// quantiles of the brightness over the auxiliary data, fc1's columns all one seeded column.
pub(super) fn imprint(honest: &Net, aux: &(Vec<f64>, usize, usize), seed: u64) -> Result<Net> {
    let net = honest.copy("imprint")?;
    let (x, m, d) = (&aux.0, aux.1, aux.2);
    let units = DIGITS_MLP[1] as usize;
    let mut brightness: Vec<f64> = (0..m).map(|i| x[i * d..(i + 1) * d].iter().sum::<f64>() / d as f64).collect();
    brightness.sort_by(f64::total_cmp);
    let bias: Vec<f64> = (1..=units).map(|k| -quantile(&brightness, k as f64 / (units + 1) as f64)).collect();
    net.set("fc0.weight", &Tensor::f_full([units as i64, d as i64], 1.0 / d as f64, (Kind::Double, tch::Device::Cpu))?)?;
    net.set("fc0.bias", &Tensor::f_from_slice(&bias)?)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1a9);
    let column: Vec<f64> = normals(&mut rng, DIGITS_MLP[2] as usize).iter().map(|v| 0.1 * v).collect();
    let w = Tensor::f_from_slice(&column)?.f_unsqueeze(1)?.f_expand([DIGITS_MLP[2], units as i64], false)?.f_contiguous()?;
    net.set("fc1.weight", &w)?;
    Ok(net)
}

/// Shared settings of one section run.
struct Ctx<'a> {
    plan: &'a MaliciousPlan,
    clip: f64,
    v: f64,
    seed: u64,
}

/// max - min of a batch (1 when constant): the suite's PSNR peak.
fn batch_peak(x: &Tensor) -> Result<f64> {
    let v = to_f64_vec(x)?;
    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(*x), b.max(*x)));
    Ok(if hi > lo { hi - lo } else { 1.0 })
}

/// The stronger of the analytic attacks on fc0's release `(gw, gb)` of the batch `x`, scored.
fn attack_release(net: &Net, x: &Tensor, gw: &Tensor, gb: &Tensor, peak: f64) -> Result<Option<AttackOutcome>> {
    let (w, b) = (net.param("fc0.weight")?, net.param("fc0.bias")?);
    let release = LinearRelease { weight: &w, bias: &b, grad_weight: gw, grad_bias: gb };
    let mut best: Option<AttackOutcome> = None;
    for r in [analytic(&release, MIN_BIAS_GRADIENT).metric("M4 (analytic attack)")?, analytic_differences(&release, MIN_BIAS_GRADIENT, SAME_DIRECTION).metric("M4 (differences attack)")?] {
        if let Metric::Measured(r) = r {
            let o = score(r.attack, x, &r.candidates, peak, None).metric("M4 (scoring)")?;
            if best.as_ref().is_none_or(|b| (o.samples_recovered, o.bits_per_dim) > (b.samples_recovered, b.bits_per_dim)) {
                best = Some(o);
            }
        }
    }
    Ok(best)
}

/// One multiplier's figures per release, summed or listed over the releases.
#[derive(Default)]
struct NoisedSums {
    bound: Vec<f64>,
    dfil: Vec<f64>,
    recovered: usize,
    attacks: Vec<&'static str>,
    bits: Vec<f64>,
}

/// Mean of the values present.
fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The releases a model is measured on: `releases` batches of n, one after the other.
struct Releases {
    x: Tensor,
    y: Tensor,
    releases: usize,
}

impl Releases {
    /// Consecutive batches from the start of the training split.
    fn consecutive(data: &Data, n: usize, releases: usize) -> Result<Self> {
        let releases = releases.min(data.train.len() / n.max(1)).max(1);
        let (x, y) = data.first_train(releases * n)?;
        Ok(Self { x, y, releases })
    }

    /// Batches that each hold one sample of [`FISHING_TARGET`] (the next one of the training
    /// split) and n - 1 of other classes that `honest` classifies correctly (the next ones).
    fn one_fished(honest: &Net, data: &Data, n: usize, releases: usize) -> Result<Self> {
        let labels = Net::labels(data, &data.train)?;
        let correct = honest.correct(data, &data.train)?;
        let targets: Vec<usize> = data.train.iter().zip(&labels).filter(|(_, y)| **y == FISHING_TARGET).map(|(i, _)| *i).collect();
        let others: Vec<usize> = data.train.iter().zip(labels.iter().zip(&correct)).filter(|(_, (y, c))| **y != FISHING_TARGET && **c).map(|(i, _)| *i).collect();
        let k = n.max(1) - 1;
        let releases = releases.min(targets.len()).min(if k == 0 { usize::MAX } else { others.len() / k });
        if releases == 0 {
            return Err(gradguard_audit::AuditError::Usage(format!("no batch of {n} with one sample of class {FISHING_TARGET}: the training split has {} of them and {} others classified correctly", targets.len(), others.len())));
        }
        let idx: Vec<usize> = (0..releases).flat_map(|r| std::iter::once(targets[r]).chain(others[r * k..(r + 1) * k].iter().copied())).collect();
        let (x, y) = data.rows(&idx)?;
        Ok(Self { x, y, releases })
    }
}

/// One model at batch size `n`, on the releases given.
fn measure(net: &Net, n: usize, ctx: &Ctx, on: Releases) -> Result<Cell> {
    let (plan, seed) = (ctx.plan, ctx.seed);
    let Releases { x: xa, y: ya, releases } = on;
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let all = Inspection::new(net.layers(), &loss, Batch::new(&xa, &ya)).seeded(seed, 0);
    let suite = attack_suite(&all, &AttackPlan { batch_size: n, releases, optimisation: None })?;
    let fc0 = suite.layers.first().and_then(|m| m.measured());
    let recovered = |name: &str| fc0.and_then(|s| s.attacks.get(name)).map(|a| a.samples_recovered);
    let absent = fc0.map(|s| s.absent.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()).unwrap_or_default();
    let labels = suite.labels.measured().map(|l| (l.exact_sets, l.releases));
    let (mut s, mut s_rms, mut r_l, mut exposed, mut isolated) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let names = net.layers().names();
    let mut layer_m6: Vec<(Vec<f64>, Vec<f64>)> = names.iter().map(|_| Default::default()).collect();
    let mut noised: Vec<NoisedSums> = plan.multipliers.iter().map(|_| NoisedSums::default()).collect();
    let (w, b) = (net.param("fc0.weight")?, net.param("fc0.bias")?);
    let (k, d) = (w.size()[0], w.size()[1]);
    for r in 0..releases {
        let (xb, yb) = (xa.f_narrow(0, (r * n) as i64, n as i64)?, ya.f_narrow(0, (r * n) as i64, n as i64)?);
        let t = all.on(Batch::new(&xb, &yb)).seeded(seed ^ r as u64, r as u64);
        // M1 and M5 from the same K probe JVPs of the release.
        let jv = release_probes(&t, n, plan.probes)?;
        if let Some(m) = release_sensitivity(&jv, 0, &[], seed)? {
            s.push(m.s);
            s_rms.push(m.s_rms);
            r_l.extend(m.r);
        }
        // M6 of every layer.
        let m6 = t.sample_isolation(&IsolationSettings { tau: plan.tau }).metric("M6 (sample isolation)")?;
        for (l, m) in m6.iter().enumerate() {
            if let (Some(m), Some(acc)) = (m.measured(), layer_m6.get_mut(l)) {
                acc.0.push(m.exposed_fraction);
                acc.1.push(m.isolated_share);
                if l == 0 {
                    exposed.push(m.exposed_fraction);
                    isolated.push(m.isolated_share);
                }
            }
        }
        // The release of fc0, noised by the defence, attacked.
        let batch_loss = net.loss(&xb, &yb)?;
        let grads = Tensor::f_run_backward(&[&batch_loss], &[&w, &b], false, false)?;
        let flat = Tensor::f_cat(&[grads[0].f_reshape([-1])?, grads[1].f_reshape([-1])?], 0)?;
        let peak = batch_peak(&xb)?;
        for (p, &m) in plan.multipliers.iter().enumerate() {
            let noise = Defence::Noise { clip_norm: ctx.clip, multiplier: m };
            let prior = Prior { v: ctx.v, source: PriorSource::Inputs, described: "per-dimension variance of the attacked samples".into() };
            let (bounds, _) = release_bounds(Some(&jv), net.layers().len(), std::slice::from_ref(&noise), |_| seed, prior)?;
            if let Some(bound) = bounds.first().and_then(|b| b.measured()) {
                noised[p].bound.extend(bound.reconstruction_bound_bits);
                noised[p].dfil.extend(bound.dfil);
            }
            let Some(release) = noise.apply(&flat, derive_seed(seed ^ 0x6a15e, 1000 * r + p))? else { continue };
            let gw = release.f_narrow(0, 0, k * d)?.f_reshape([k, d])?;
            let gb = release.f_narrow(0, k * d, k)?;
            if let Some(o) = attack_release(net, &xb, &gw, &gb, peak)? {
                noised[p].recovered += o.samples_recovered;
                noised[p].attacks.push(o.attack.name());
                noised[p].bits.push(if o.mse > 0.0 { (0.5 * (ctx.v / o.mse).log2()).max(0.0) } else { f64::INFINITY });
            }
        }
    }
    let noised = plan
        .multipliers
        .iter()
        .zip(noised)
        .map(|(&multiplier, NoisedSums { bound, dfil, recovered, attacks, bits })| {
            let attack = if attacks.iter().filter(|a| **a == "analytic_differences").count() * 2 > attacks.len() { "analytic_differences" } else { "analytic" };
            Noised {
                multiplier,
                bound: mean(&bound),
                bound_psnr: mean(&dfil).map(|d| 10.0 * (d + 1.0 / ctx.v).log10()),
                recovered,
                attack,
                attack_bits: mean(&bits).unwrap_or(0.0),
            }
        })
        .collect();
    let exposed_max = exposed.iter().copied().fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    Ok(Cell {
        model: net.name,
        n,
        releases,
        analytic: recovered("analytic"),
        differences: recovered("analytic_differences"),
        absent,
        strongest: fc0.map(|s| (s.strongest, s.recovered_fraction)),
        labels,
        s: mean(&s),
        s_rms: mean(&s_rms),
        r: mean(&r_l),
        exposed: mean(&exposed),
        exposed_max,
        isolated: mean(&isolated),
        m6: names.into_iter().zip(&layer_m6).map(|(name, (e, i))| (name, mean(e), mean(i))).collect(),
        noised,
    })
}

/// The section: the honest model given, the malicious ones made from it, every batch size.
pub(super) fn malicious_study(honest: &Net, data: &Data, plan: &MaliciousPlan, seed: u64) -> Result<MaliciousStudy> {
    if data.aux.is_empty() || data.train.is_empty() {
        return Err(gradguard_audit::AuditError::Usage("the malicious-server section needs training and auxiliary samples".into()));
    }
    let aux = data.aux_matrix()?;
    let largest = plan.batch_sizes.iter().copied().max().unwrap_or(1);
    let (xp, yp) = data.first_train(largest * plan.releases)?;
    let loss = |x: &Tensor, y: &Tensor| honest.loss(x, y);
    let pool = Inspection::new(honest.layers(), &loss, Batch::new(&xp, &yp)).seeded(seed, 0);
    let v = batch_prior_variance(&pool)?;
    // The clip a user of the honest model would set: its median per-sample fc0 norm over 64 samples.
    let (x64, y64) = data.first_train(64)?;
    let clip = super::sweeps::median_norms(&per_sample_matrices(&pool.on(Batch::new(&x64, &y64)))?)[0];
    let ctx = Ctx { plan, clip, v, seed };
    let fishing_one = fishing(honest, "fishing-one")?;
    let fishing = fishing(honest, "fishing")?;
    let imprint = imprint(honest, &aux, seed)?;
    let mut accuracy = vec![("honest".to_string(), honest.accuracy(data, &data.aux)?), ("fishing".to_string(), fishing.accuracy(data, &data.aux)?), ("imprint".to_string(), imprint.accuracy(data, &data.aux)?)];
    let mut cells = Vec::new();
    for &n in &plan.batch_sizes {
        let trap = trap(honest, &aux, n, seed)?;
        accuracy.push((format!("trap (B = {n})"), trap.accuracy(data, &data.aux)?));
        for net in [honest, &trap, &fishing, &imprint] {
            cells.push(measure(net, n, &ctx, Releases::consecutive(data, n, plan.releases)?)?);
        }
        cells.push(measure(&fishing_one, n, &ctx, Releases::one_fished(honest, data, n, plan.releases)?)?);
    }
    Ok(MaliciousStudy { plan: plan.clone(), cells, accuracy, clip, prior_variance: v, train_samples: data.train.len(), aux_samples: data.aux.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Share of the auxiliary samples that move each fc0 unit (pre-activation > 0).
    fn firing_rates(net: &Net, data: &Data) -> Vec<f64> {
        let (x, _) = data.rows(&data.aux).unwrap();
        let x = x.reshape([data.aux.len() as i64, -1]).to_kind(Kind::Double);
        let pre = x.matmul(&net.param("fc0.weight").unwrap().to_kind(Kind::Double).tr()) + net.param("fc0.bias").unwrap().to_kind(Kind::Double);
        to_f64_vec(&pre.gt(0.0).to_kind(Kind::Double).mean_dim(0, false, Kind::Double)).unwrap()
    }

    #[test]
    fn the_constructions_set_what_they_claim() {
        let data = Data::digits(0).unwrap();
        let honest = Net::mlp("honest", &DIGITS_MLP, 0).unwrap().torch_init(0).unwrap();
        let aux = data.aux_matrix().unwrap();
        // Trap for batches of 32: each unit fires for about 1 auxiliary input in 32.
        let rates = firing_rates(&trap(&honest, &aux, 32, 0).unwrap(), &data);
        let mean = rates.iter().sum::<f64>() / rates.len() as f64;
        assert!((mean - 1.0 / 32.0).abs() < 0.01, "mean firing rate {mean}");
        // Imprint: equal rows, thresholds ascending along the brightness, one fc1 column repeated.
        let imprint = imprint(&honest, &aux, 0).unwrap();
        let rates = firing_rates(&imprint, &data);
        assert!(rates.windows(2).all(|p| p[0] >= p[1]), "bins nest: each unit fires for a subset of the one before");
        assert!(rates[0] > 0.95 && rates[rates.len() - 1] < 0.05, "{} .. {}", rates[0], rates[rates.len() - 1]);
        let w1 = imprint.param("fc1.weight").unwrap();
        assert_eq!(f64::try_from((&w1 - w1.narrow(1, 0, 1)).abs().max()).unwrap(), 0.0);
        // Fishing: the target's row scaled by 0.05, the others' by 30.
        let fishing = fishing(&honest, "fishing").unwrap();
        let (a, b) = (honest.param("fc1.weight").unwrap(), fishing.param("fc1.weight").unwrap());
        let ratio = |c: i64| f64::try_from(b.get(c).norm() / a.get(c).norm()).unwrap();
        assert!((ratio(FISHING_TARGET) - FISHING_DOUBTFUL).abs() < 1e-4 && (ratio(0) - FISHING_CONFIDENT).abs() < 1e-3);
        // fc0 of the fishing model is the honest one.
        assert_eq!(f64::try_from((fishing.param("fc0.weight").unwrap() - honest.param("fc0.weight").unwrap()).abs().max()).unwrap(), 0.0);
    }

    #[test]
    fn m6_flags_the_trap_not_the_honest_model_and_the_analytic_attack_gives_the_trap_batch_back() {
        let data = Data::digits(0).unwrap();
        let honest = honest_mlp(&data, 0).unwrap();
        let plan = MaliciousPlan { batch_sizes: vec![32], releases: 2, probes: 2, multipliers: vec![0.01], tau: 0.99 };
        let s = malicious_study(&honest, &data, &plan, 0).unwrap();
        let cell = |m: &str| s.cells.iter().find(|c| c.model == m && c.n == 32).unwrap();
        let (trap, honest, imprint) = (cell("trap"), cell("honest"), cell("imprint"));
        assert!(trap.exposed.unwrap() >= 0.5, "trap exposed {:?}", trap.exposed);
        assert!(honest.exposed.unwrap() <= 0.25, "honest exposed {:?}", honest.exposed);
        assert!(trap.analytic.unwrap() as f64 >= 0.7 * trap.samples() as f64, "trap analytic {:?} of {}", trap.analytic, trap.samples());
        // The imprint layer: the differences attack gives samples back that M6 does not see.
        assert!(imprint.differences.unwrap() as f64 >= 0.5 * imprint.samples() as f64 && imprint.exposed.unwrap() < 0.25, "{imprint:?}");
        // Noise at multiplier 0.01 has a finite bound on every model.
        assert!(s.cells.iter().all(|c| c.noised[0].bound.is_some_and(f64::is_finite)));
    }
}
