//! `gradguard validate --out docs/`: the validation study of docs/VALIDATION.md.
//!
//! On the shipped digits, the example CNN and MLP are trained (Adam, lr 1e-3, batches of 64)
//! and measured at steps 0, 100 and 300: per layer every cheap metric (M1: S_l, S_l^rms, R_l;
//! M2: subspace distance and separation) beside the attack-grounded ones (M4 for original
//! information, M3 for latent information). Then, on the CNN at step 100, every metric against
//! the batch size (1..64) and against two defences (Gaussian noise, top-k sparsification,
//! through `gradguard_defenses::Defence::apply`). Writes VALIDATION.md and SVG figures; every
//! statement in VALIDATION.md is computed from the numbers of the run that wrote it.
use super::audit::{bar_panels_svg, line_panels_svg, AuditModel, LayerDetails, LayerRow, LossKind, Panel};
use anyhow::Context;
use gradguard::data::Digits;
use gradguard::defenses::{derive_seed, Defence};
use gradguard::guard::inversion::{estimate_original_information, InversionPlan, InversionSettings};
use gradguard::guard::per_sample::{per_sample_gradients, GradientMatrix};
use gradguard::guard::report::{JvpMethod, Metric};
use gradguard::guard::sensitivity::{estimate_sensitivity, jvp_samples, SensitivitySettings};
use gradguard::guard::subspace::{estimate_subspace, orthonormal_basis, projection_distance, SubspaceSettings};
use gradguard::guard::tensors::to_f64_vec;
use gradguard::guard::usable::{attribute_information, project, usable_information, usable_information_layers, UsableSettings};
use gradguard::guard::LayerMap;
use rand::{seq::IndexedRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Tensor};

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// Folder for VALIDATION.md; the figures go to its `validation/` subfolder.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    /// Seed of the models, the data order, probes, splits, projections and attacks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Smaller sample counts and fewer attack steps: a smoke run (minutes -> seconds), not the
    /// study.
    #[arg(long)]
    quick: bool,
    /// libtorch intra-op threads (the models are tiny: 1 is fastest on 2 shared cores).
    #[arg(long, default_value_t = 1)]
    threads: i32,
}

/// The study's sample counts and attack settings.
#[derive(Clone, Debug)]
struct Plan {
    steps: Vec<usize>,
    /// Per-sample gradients for M2/M3 (from the training split).
    pool: usize,
    m1_batch: usize,
    m1_probes: usize,
    m4_releases: usize,
    m4_iterations: usize,
    batch_sizes: Vec<usize>,
    agg_m1_batches: usize,
    agg_m3_releases: usize,
    agg_m4_releases: usize,
    agg_m4_iterations: usize,
    noise: Vec<f64>,
    keep: Vec<f64>,
    def_m4_releases: usize,
    def_m4_iterations: usize,
    /// Group-pure micro-batch size of the second latent comparison, and its release count.
    micro_batch: usize,
    micro_releases: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                steps: vec![0, 30],
                pool: 240,
                m1_batch: 16,
                m1_probes: 4,
                m4_releases: 2,
                m4_iterations: 40,
                batch_sizes: vec![1, 4, 16],
                agg_m1_batches: 2,
                agg_m3_releases: 200,
                agg_m4_releases: 1,
                agg_m4_iterations: 30,
                noise: vec![0.0, 0.1, 1.0],
                keep: vec![1.0, 0.1],
                def_m4_releases: 1,
                def_m4_iterations: 30,
                micro_batch: 8,
                micro_releases: 200,
            }
        } else {
            Self {
                steps: vec![0, 100, 300],
                pool: 1200,
                m1_batch: 32,
                m1_probes: 16,
                m4_releases: 12,
                m4_iterations: 400,
                batch_sizes: vec![1, 2, 4, 8, 16, 32, 64],
                agg_m1_batches: 4,
                agg_m3_releases: 800,
                agg_m4_releases: 4,
                agg_m4_iterations: 300,
                noise: vec![0.0, 0.001, 0.003, 0.01, 0.03, 0.1],
                keep: vec![1.0, 0.3, 0.1, 0.03, 0.01],
                def_m4_releases: 6,
                def_m4_iterations: 300,
                micro_batch: 8,
                micro_releases: 800,
            }
        }
    }
}

const CLASS_LOSS: LossKind = LossKind::CrossEntropy;

/// The audited pool: tensors and attribute labels.
struct Pool {
    x: Tensor,
    y: Tensor,
    attribute: Vec<i64>,
}

/// One checkpoint of one model.
struct Checkpoint {
    model: &'static str,
    step: usize,
    rows: Vec<LayerRow>,
    /// Latent metrics on group-pure micro-batches, per layer.
    micro: Vec<MicroLatent>,
}

/// M2 and M3 of one layer on group-pure micro-batch releases.
#[derive(Clone, Copy, Default)]
struct MicroLatent {
    d_between: Option<f64>,
    separation: Option<f64>,
    bits: Option<f64>,
    accuracy: Option<f64>,
}

pub fn run(args: ValidateArgs) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads.max(1));
    let started = Instant::now();
    let plan = Plan::new(args.quick);
    let fig_dir = args.out.join("validation");
    std::fs::create_dir_all(&fig_dir).with_context(|| format!("creating {}", fig_dir.display()))?;
    let digits = Digits::embedded()?;
    let (train, _test) = digits.split(0.2, args.seed);
    let pool_idx: Vec<usize> = train.iter().take(plan.pool).copied().collect();
    let (px, py, pa) = digits.batch(&pool_idx, Device::Cpu)?;
    let pool = Pool { x: px, y: py, attribute: to_f64_vec(&pa)?.into_iter().map(|v| v as i64).collect() };
    let (tx, ty, _) = digits.batch(&train, Device::Cpu)?;
    let train_local: Vec<usize> = (0..train.len()).collect();

    let mut checkpoints = Vec::new();
    let mut aggregation = None;
    let mut defences = None;
    let mut timings = Vec::new();
    for name in ["cnn", "mlp"] {
        let model = AuditModel::builtin(name, args.seed, Device::Cpu).expect("built-in model");
        let mut opt = model.optimizer()?;
        let layers = model.layers()?;
        let mut trained = 0;
        for &step in &plan.steps {
            let t = Instant::now();
            model.train(&tx, &ty, &train_local, trained..step, 64, args.seed, &mut opt)?;
            trained = step;
            let loss_fn = |x: &Tensor, y: &Tensor| model.loss(CLASS_LOSS, x, y);
            let (rows, grads) = measure_checkpoint(&layers, &loss_fn, &pool, &plan, args.seed)?;
            let fig = fig_dir.join(format!("layers_{name}_step{step}.svg"));
            bar_panels_svg(&fig, &format!("{name} at step {step}: per-layer metrics (digits, seed {})", args.seed), &rows)?;
            eprintln!("validate: {name} step {step} measured in {:.1}s", t.elapsed().as_secs_f64());
            timings.push((format!("{name} step {step}"), t.elapsed().as_secs_f64()));
            if name == "cnn" && step == *plan.steps.get(1).unwrap_or(&0) {
                let t = Instant::now();
                aggregation = Some(aggregation_sweep(&layers, &loss_fn, &pool, &grads, &plan, args.seed, &fig_dir, step)?);
                timings.push(("cnn aggregation sweep".into(), t.elapsed().as_secs_f64()));
                eprintln!("validate: aggregation sweep in {:.1}s", t.elapsed().as_secs_f64());
                let t = Instant::now();
                defences = Some(defence_sweep(&layers, &loss_fn, &pool, &grads, &plan, args.seed, &fig_dir, step)?);
                timings.push(("cnn defence sweep".into(), t.elapsed().as_secs_f64()));
                eprintln!("validate: defence sweep in {:.1}s", t.elapsed().as_secs_f64());
            }
            let micro = micro_latent(&grads, &pool.attribute, plan.micro_batch, plan.micro_releases, args.seed)?;
            checkpoints.push(Checkpoint { model: name, step, rows, micro });
        }
    }
    let total = started.elapsed().as_secs_f64();
    let md = render(&args, &plan, &checkpoints, aggregation.as_ref(), defences.as_ref(), &timings, total)?;
    let path = args.out.join("VALIDATION.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    println!("validation study written to {} (figures in {}), {total:.0}s", path.display(), fig_dir.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

fn measure_checkpoint(
    layers: &LayerMap,
    loss_fn: &dyn gradguard::LossFn,
    pool: &Pool,
    plan: &Plan,
    seed: u64,
) -> anyhow::Result<(Vec<LayerRow>, Vec<Option<GradientMatrix>>)> {
    let n = plan.m1_batch as i64;
    let settings = SensitivitySettings { probes: plan.m1_probes, method: JvpMethod::DoubleBackward, exact: false };
    let m1 = estimate_sensitivity(layers, loss_fn, &pool.x.f_narrow(0, 0, n)?, &pool.y.f_narrow(0, 0, n)?, &settings, seed, 0)?;
    let m2 = estimate_subspace(layers, loss_fn, &pool.x, &pool.y, &pool.attribute, &SubspaceSettings::default(), seed, 0)?;
    let grads = per_sample_gradients(layers, loss_fn, &pool.x, &pool.y)?;
    let m3 = usable_information_layers(&grads, &pool.attribute, &UsableSettings::default(), seed)?;
    let inv = InversionSettings { iterations: plan.m4_iterations, ..Default::default() };
    let m4 = estimate_original_information(layers, loss_fn, &pool.x, &pool.y, &InversionPlan { batch_size: 1, releases: plan.m4_releases }, &inv, seed, None)?;
    let rows = layers
        .layers()
        .iter()
        .zip(m1.into_iter().zip(m2).zip(m3).zip(m4))
        .map(|(layer, (((m1, m2), m3), m4))| LayerRow::new(layer.name.clone(), layer.numel(), LayerDetails { m1, m2, m3, m4 }))
        .collect();
    Ok((rows, grads))
}

/// M2 (16 releases per attribute value) and M3 (`releases` releases, balanced) of every layer
/// when each release is the mean gradient of `n` samples that share the attribute value.
fn micro_latent(grads: &[Option<GradientMatrix>], attribute: &[i64], n: usize, releases: usize, seed: u64) -> anyhow::Result<Vec<MicroLatent>> {
    let us = UsableSettings::default();
    let groups = indices_by_group(attribute);
    let values: Vec<i64> = groups.iter().map(|g| attribute[g[0]]).collect();
    let mut out = Vec::new();
    for (l, g) in grads.iter().enumerate() {
        let Some(g) = g else {
            out.push(MicroLatent::default());
            continue;
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d62 ^ ((l as u64) << 32));
        let cols: Vec<Vec<Vec<f64>>> = groups
            .iter()
            .map(|idx| (0..16).map(|_| g.mean_of_rows(&idx.choose_multiple(&mut rng, n.min(idx.len())).copied().collect::<Vec<_>>())).collect())
            .collect();
        let m2 = subspace_of_columns(&cols, 4)?;
        let z = project(g, us.projection_dim, seed, l)?;
        let mut feats = Vec::with_capacity(releases);
        let mut labels = Vec::with_capacity(releases);
        for k in 0..releases {
            let gi = k % groups.len();
            let members: Vec<usize> = groups[gi].choose_multiple(&mut rng, n.min(groups[gi].len())).copied().collect();
            feats.push(mean_rows(&z, &members));
            labels.push(values[gi]);
        }
        let m3 = attribute_information(&feats, &labels, &us, seed)?;
        out.push(MicroLatent {
            d_between: m2.map(|m| m.0),
            separation: m2.map(|m| m.1),
            bits: m3.measured().map(|m| m.usable_information_bits),
            accuracy: m3.measured().map(|m| m.attack_accuracy),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Spearman rank correlation (average ranks for ties); None with fewer than 3 points or a
/// constant side.
fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 3 {
        return None;
    }
    let ranks = |v: &[f64]| -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0 + 1.0;
            for k in i..=j {
                r[idx[k]] = avg;
            }
            i = j + 1;
        }
        r
    };
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    if va <= 0.0 || vb <= 0.0 {
        return None;
    }
    Some(cov / (va * vb).sqrt())
}

fn rho(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:+.2}"))
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-3) => format!("{v:.2e}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// A host vector as a 1-d f64 tensor.
fn tensor(v: &[f64]) -> anyhow::Result<Tensor> {
    Ok(Tensor::f_from_slice(v)?)
}

/// Applies a defence to a flat gradient (host values); None = withheld.
fn defend(defence: Option<&Defence>, g: &[f64], seed: u64) -> anyhow::Result<Option<Vec<f64>>> {
    match defence {
        None => Ok(Some(g.to_vec())),
        Some(d) => match d.apply(&tensor(g)?, seed)? {
            None => Ok(None),
            Some(t) => Ok(Some(to_f64_vec(&t)?)),
        },
    }
}

/// M2 on release columns: `groups[g]` are the columns of attribute value g (random order);
/// each group's first and second halves give the subspaces, rank 4. (d_between, separation).
fn subspace_of_columns(groups: &[Vec<Vec<f64>>], rank: usize) -> anyhow::Result<Option<(f64, f64)>> {
    let mut bases = Vec::new();
    for cols in groups {
        let half = cols.len() / 2;
        let basis = |part: &[Vec<f64>]| -> anyhow::Result<Option<Tensor>> {
            let p = part[0].len() as i64;
            let flat: Vec<f64> = part.concat();
            let m = Tensor::f_from_slice(&flat)?.f_reshape([part.len() as i64, p])?.f_transpose(0, 1)?;
            Ok(orthonormal_basis(&m, rank, f32::EPSILON as f64)?)
        };
        match (basis(&cols[..half])?, basis(&cols[half..2 * half])?) {
            (Some(a), Some(b)) => bases.push((a, b)),
            _ => return Ok(None),
        }
    }
    let (mut between, mut within, mut pairs) = (0.0, 0.0, 0.0);
    for g in 0..bases.len() {
        for h in g + 1..bases.len() {
            let ((a1, a2), (b1, b2)) = (&bases[g], &bases[h]);
            between += (projection_distance(a1, b1)? + projection_distance(a2, b2)?) / 2.0;
            within += (projection_distance(a1, a2)? + projection_distance(b1, b2)?) / 2.0;
            pairs += 1.0;
        }
    }
    Ok((pairs > 0.0).then(|| (between / pairs, (between - within) / pairs)))
}

fn indices_by_group(attribute: &[i64]) -> Vec<Vec<usize>> {
    let mut values: Vec<i64> = attribute.to_vec();
    values.sort_unstable();
    values.dedup();
    values.iter().map(|v| attribute.iter().enumerate().filter(|(_, a)| *a == v).map(|(i, _)| i).collect()).collect()
}

// ---------------------------------------------------------------------------------------------
// Aggregation

#[derive(Clone)]
struct SweepRow {
    x: f64,
    layer: String,
    s: Option<f64>,
    s_rms: Option<f64>,
    r: Option<f64>,
    d_between: Option<f64>,
    separation: Option<f64>,
    m3_bits: Option<f64>,
    m3_acc: Option<f64>,
    m3_group_bits: Option<f64>,
    m4_bits: Option<f64>,
    psnr: Option<f64>,
}

struct Sweep {
    step: usize,
    rows: Vec<SweepRow>,
    figure: String,
}

#[allow(clippy::too_many_arguments)]
fn aggregation_sweep(
    layers: &LayerMap,
    loss_fn: &dyn gradguard::LossFn,
    pool: &Pool,
    grads: &[Option<GradientMatrix>],
    plan: &Plan,
    seed: u64,
    fig_dir: &Path,
    step: usize,
) -> anyhow::Result<Sweep> {
    let us = UsableSettings::default();
    let groups = indices_by_group(&pool.attribute);
    // Projected per-sample features (the projection is linear: the release of a batch mean
    // projects to the mean of the projected samples).
    let features: Vec<Option<Vec<Vec<f64>>>> =
        grads.iter().enumerate().map(|(l, g)| g.as_ref().map(|g| project(g, us.projection_dim, seed, l)).transpose()).collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    let n_pool = pool.attribute.len();
    for &n in &plan.batch_sizes {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n as u64) << 20);
        // M1: mean over batches of n distinct samples.
        let settings = SensitivitySettings { probes: 8, method: JvpMethod::DoubleBackward, exact: false };
        let mut m1: Vec<Vec<(f64, f64, Option<f64>)>> = vec![Vec::new(); layers.len()];
        for b in 0..plan.agg_m1_batches {
            let start = ((b * 64) % n_pool.saturating_sub(n).max(1)) as i64;
            let est = estimate_sensitivity(layers, loss_fn, &pool.x.f_narrow(0, start, n as i64)?, &pool.y.f_narrow(0, start, n as i64)?, &settings, seed, b as u64)?;
            for (l, m) in est.iter().enumerate() {
                if let Some(m) = m.measured() {
                    m1[l].push((m.sensitivity, m.sensitivity_rms, m.relative_sensitivity));
                }
            }
        }
        // M4 on releases of n samples.
        let inv = InversionSettings { iterations: plan.agg_m4_iterations, ..Default::default() };
        let m4 = estimate_original_information(layers, loss_fn, &pool.x, &pool.y, &InversionPlan { batch_size: n, releases: plan.agg_m4_releases }, &inv, seed, None)?;
        for l in 0..layers.len() {
            let mean = |f: &dyn Fn(&(f64, f64, Option<f64>)) -> Option<f64>| -> Option<f64> {
                let v: Vec<f64> = m1[l].iter().filter_map(f).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            };
            let (mut d_between, mut separation, mut m3_bits, mut m3_acc, mut m3_group_bits) = (None, None, None, None, None);
            if let (Some(g), Some(z)) = (&grads[l], &features[l]) {
                // M2 on group-pure micro-batches of n (16 releases per attribute value).
                let cols: Vec<Vec<Vec<f64>>> = groups
                    .iter()
                    .map(|idx| (0..16).map(|_| g.mean_of_rows(&idx.choose_multiple(&mut rng, n.min(idx.len())).copied().collect::<Vec<_>>())).collect())
                    .collect();
                if let Some((d, s)) = subspace_of_columns(&cols, 4)? {
                    d_between = Some(d);
                    separation = Some(s);
                }
                // M3, one person's attribute: release = mean of the target and n - 1 others.
                let mut feats = Vec::new();
                let mut labels = Vec::new();
                for k in 0..plan.agg_m3_releases {
                    let target = k % n_pool;
                    let mut members = vec![target];
                    while members.len() < n {
                        let j = rng.random_range(0..n_pool);
                        if !members.contains(&j) {
                            members.push(j);
                        }
                    }
                    feats.push(mean_rows(z, &members));
                    labels.push(pool.attribute[target]);
                }
                if let Metric::Measured(m) = attribute_information(&feats, &labels, &us, seed)? {
                    m3_bits = Some(m.usable_information_bits);
                    m3_acc = Some(m.attack_accuracy);
                }
                // M3, the batch's attribute: group-pure batches of n.
                let mut feats = Vec::new();
                let mut labels = Vec::new();
                for k in 0..plan.agg_m3_releases {
                    let gi = k % groups.len();
                    let members: Vec<usize> = groups[gi].choose_multiple(&mut rng, n.min(groups[gi].len())).copied().collect();
                    feats.push(mean_rows(z, &members));
                    labels.push(pool.attribute[groups[gi][0]]);
                }
                if let Metric::Measured(m) = attribute_information(&feats, &labels, &us, seed)? {
                    m3_group_bits = Some(m.usable_information_bits);
                }
            }
            rows.push(SweepRow {
                x: n as f64,
                layer: layers.layers()[l].name.clone(),
                s: mean(&|t| Some(t.0)),
                s_rms: mean(&|t| Some(t.1)),
                r: mean(&|t| t.2),
                d_between,
                separation,
                m3_bits,
                m3_acc,
                m3_group_bits,
                m4_bits: m4[l].measured().map(|m| m.usable_original_bits_per_dim),
                psnr: m4[l].measured().map(|m| m.psnr),
            });
        }
    }
    let figure = "aggregation_cnn.svg".to_string();
    sweep_figure(&fig_dir.join(&figure), &format!("cnn at step {step}: every metric against the batch size n"), "batch size n", &rows, true, true)?;
    Ok(Sweep { step, rows, figure })
}

fn mean_rows(z: &[Vec<f64>], members: &[usize]) -> Vec<f64> {
    let mut out = vec![0.0; z[0].len()];
    for &i in members {
        out.iter_mut().zip(&z[i]).for_each(|(o, v)| *o += v);
    }
    out.iter_mut().for_each(|o| *o /= members.len() as f64);
    out
}

fn sweep_figure(path: &Path, title: &str, x_label: &str, rows: &[SweepRow], log_x: bool, group_bits: bool) -> anyhow::Result<()> {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        if !names.contains(&r.layer) {
            names.push(r.layer.clone());
        }
    }
    type Get = fn(&SweepRow) -> Option<f64>;
    let mut metrics: Vec<(&str, bool, Get)> = vec![
        ("sensitivity S_l", true, |r| r.s),
        ("sensitivity_rms", true, |r| r.s_rms),
        ("relative_sensitivity R_l", true, |r| r.r),
        ("subspace_distance", false, |r| r.d_between),
        ("subspace_separation", false, |r| r.separation),
        ("M3 usable_information_bits", false, |r| r.m3_bits),
        ("M3 attack_accuracy", false, |r| r.m3_acc),
        ("M4 usable_original_bits_per_dim", false, |r| r.m4_bits),
        ("M4 psnr (dB)", false, |r| r.psnr),
    ];
    if group_bits {
        metrics.insert(7, ("M3 bits, group-pure batch releases", false, |r| r.m3_group_bits));
    }
    let panels: Vec<Panel> = metrics
        .iter()
        .map(|(title, log_y, get)| Panel {
            title: title.to_string(),
            log_y: *log_y,
            series: names
                .iter()
                .map(|name| (name.clone(), rows.iter().filter(|r| &r.layer == name).filter_map(|r| get(r).map(|v| (r.x, v))).collect()))
                .collect(),
        })
        .collect();
    line_panels_svg(path, title, x_label, &panels, log_x)
}

// ---------------------------------------------------------------------------------------------
// Defences

struct DefenceSweeps {
    step: usize,
    clip: Vec<(String, f64)>,
    noise: Vec<SweepRow>,
    sparsify: Vec<SweepRow>,
    noise_figure: String,
    sparsify_figure: String,
}

#[allow(clippy::too_many_arguments)]
fn defence_sweep(
    layers: &LayerMap,
    loss_fn: &dyn gradguard::LossFn,
    pool: &Pool,
    grads: &[Option<GradientMatrix>],
    plan: &Plan,
    seed: u64,
    fig_dir: &Path,
    step: usize,
) -> anyhow::Result<DefenceSweeps> {
    // Clip norm per layer: the median per-sample gradient norm (noise std = multiplier x clip).
    let clip: Vec<f64> = grads
        .iter()
        .map(|g| {
            g.as_ref().map_or(1.0, |g| {
                let mut norms: Vec<f64> = (0..g.rows).map(|i| g.row(i).iter().map(|v| v * v).sum::<f64>().sqrt()).collect();
                norms.sort_by(f64::total_cmp);
                norms[norms.len() / 2].max(1e-12)
            })
        })
        .collect();
    let n = plan.m1_batch as i64;
    let jv = jvp_samples(
        layers,
        loss_fn,
        &pool.x.f_narrow(0, 0, n)?,
        &pool.y.f_narrow(0, 0, n)?,
        &SensitivitySettings { probes: 8, method: JvpMethod::DoubleBackward, exact: false },
        seed,
        0,
    )?;
    let groups = indices_by_group(&pool.attribute);
    let us = UsableSettings::default();
    // Group-pure micro-batch releases (mean gradient of `micro_batch` samples sharing the
    // attribute value), balanced over the values: the latent metrics' releases here, since
    // per-sample gradients carry no measurable M3 on this attribute.
    let values: Vec<i64> = groups.iter().map(|g| pool.attribute[g[0]]).collect();
    let micro_labels: Vec<i64> = (0..plan.micro_releases).map(|k| values[k % groups.len()]).collect();
    let micro: Vec<Option<Vec<Vec<f64>>>> = grads
        .iter()
        .enumerate()
        .map(|(l, g)| {
            g.as_ref().map(|g| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd3f ^ ((l as u64) << 32));
                (0..plan.micro_releases)
                    .map(|k| {
                        let idx = &groups[k % groups.len()];
                        g.mean_of_rows(&idx.choose_multiple(&mut rng, plan.micro_batch.min(idx.len())).copied().collect::<Vec<_>>())
                    })
                    .collect()
            })
        })
        .collect();
    let run = |defences: Vec<(f64, Option<Defence>)>| -> anyhow::Result<Vec<SweepRow>> {
        let mut rows = Vec::new();
        for (x, base) in defences {
            let per_layer = |l: usize| -> Option<Defence> {
                base.as_ref().map(|d| match d {
                    Defence::Noise { multiplier, .. } => Defence::Noise { clip_norm: clip[l], multiplier: *multiplier },
                    other => other.clone(),
                })
            };
            let transform = |l: usize, g: &Tensor, r: usize| -> gradguard::guard::Result<Option<Tensor>> {
                match per_layer(l) {
                    None => Ok(Some(g.shallow_clone())),
                    Some(d) => Ok(d.apply(g, derive_seed(seed ^ 0xdef, 1000 * l + r))?),
                }
            };
            let inv = InversionSettings { iterations: plan.def_m4_iterations, ..Default::default() };
            let m4 = estimate_original_information(layers, loss_fn, &pool.x, &pool.y, &InversionPlan { batch_size: 1, releases: plan.def_m4_releases }, &inv, seed, Some(&transform))?;
            for l in 0..layers.len() {
                let d = per_layer(l);
                let (mut s, mut s_rms, mut r) = (None, None, None);
                if let Some(k) = &jv.layers[l] {
                    // M1 of the defended release, linearised: the JVP pushed through the defence by
                    // central differences with the defence's seed held fixed (noise cancels).
                    let g = to_f64_vec(&k.grad)?;
                    let gnorm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
                    let seed_l = derive_seed(seed ^ 0x1e1, l);
                    let released = defend(d.as_ref(), &g, seed_l)?;
                    let rn = released.as_ref().map(|rel| rel.iter().map(|v| v * v).sum::<f64>().sqrt());
                    let mut sq = Vec::new();
                    // Top-k is piecewise linear with jumps where the kept set changes: its
                    // Jacobian at G keeps the JVP's entries on the kept set (differencing across
                    // a jump would measure the jump, not the release's sensitivity).
                    let mask: Option<Vec<bool>> = match (&d, &released) {
                        (Some(Defence::Sparsify { .. }), Some(rel)) => Some(rel.iter().map(|v| *v != 0.0).collect()),
                        _ => None,
                    };
                    for v in &k.jvps {
                        let v = to_f64_vec(v)?;
                        if let Some(mask) = &mask {
                            sq.push(v.iter().zip(mask).filter(|(_, k)| **k).map(|(a, _)| a * a).sum::<f64>() / jv.n as f64);
                            continue;
                        }
                        let vnorm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
                        if vnorm == 0.0 {
                            sq.push(0.0);
                            continue;
                        }
                        let eps = 1e-4 * gnorm.max(1e-12) / vnorm;
                        let plus: Vec<f64> = g.iter().zip(&v).map(|(a, b)| a + eps * b).collect();
                        let minus: Vec<f64> = g.iter().zip(&v).map(|(a, b)| a - eps * b).collect();
                        let (Some(p), Some(m)) = (defend(d.as_ref(), &plus, seed_l)?, defend(d.as_ref(), &minus, seed_l)?) else { break };
                        sq.push(p.iter().zip(&m).map(|(a, b)| ((a - b) / (2.0 * eps)).powi(2)).sum::<f64>() / jv.n as f64);
                    }
                    if !sq.is_empty() {
                        let sl = (sq.iter().sum::<f64>() / sq.len() as f64).sqrt();
                        s = Some(sl);
                        s_rms = Some(sl / (layers.layers()[l].numel() as f64).sqrt());
                        r = rn.filter(|&v| v > 0.0).map(|v| sl / v);
                    }
                }
                let (mut d_between, mut separation, mut m3_bits, mut m3_acc, mut m3_group_bits) = (None, None, None, None, None);
                if let Some(g) = &grads[l] {
                    // Per-sample releases through the defence (seed per sample): M3.
                    let mut rowsd = Vec::with_capacity(g.rows);
                    for i in 0..g.rows {
                        match defend(d.as_ref(), g.row(i), derive_seed(seed ^ 0x5a, 100_000 * l + i))? {
                            Some(v) => rowsd.push(v),
                            None => break,
                        }
                    }
                    if rowsd.len() == g.rows {
                        let m = GradientMatrix::from_rows(rowsd)?;
                        if let Metric::Measured(m) = usable_information(&m, &pool.attribute, &us, seed, l)? {
                            m3_bits = Some(m.usable_information_bits);
                            m3_acc = Some(m.attack_accuracy);
                        }
                    }
                }
                if let Some(releases) = &micro[l] {
                    // Group-pure micro-batch releases through the defence: M2 (16 per value) and M3.
                    let mut defended = Vec::with_capacity(releases.len());
                    for (k, r) in releases.iter().enumerate() {
                        match defend(d.as_ref(), r, derive_seed(seed ^ 0x3b, 100_000 * l + k))? {
                            Some(v) => defended.push(v),
                            None => break,
                        }
                    }
                    if defended.len() == releases.len() {
                        let cols: Vec<Vec<Vec<f64>>> = (0..groups.len())
                            .map(|gi| defended.iter().skip(gi).step_by(groups.len()).take(16).cloned().collect())
                            .collect();
                        if let Some((db, sp)) = subspace_of_columns(&cols, 4)? {
                            d_between = Some(db);
                            separation = Some(sp);
                        }
                        let m = GradientMatrix::from_rows(defended)?;
                        if let Metric::Measured(m) = usable_information(&m, &micro_labels, &us, seed, l)? {
                            m3_group_bits = Some(m.usable_information_bits);
                        }
                    }
                }
                rows.push(SweepRow {
                    x,
                    layer: layers.layers()[l].name.clone(),
                    s,
                    s_rms,
                    r,
                    d_between,
                    separation,
                    m3_bits,
                    m3_acc,
                    m3_group_bits,
                    m4_bits: m4[l].measured().map(|m| m.usable_original_bits_per_dim),
                    psnr: m4[l].measured().map(|m| m.psnr),
                });
            }
        }
        Ok(rows)
    };
    let noise = run(plan.noise.iter().map(|&m| (m, (m > 0.0).then_some(Defence::Noise { clip_norm: 1.0, multiplier: m }))).collect())?;
    let sparsify = run(plan.keep.iter().map(|&k| (k, (k < 1.0).then_some(Defence::Sparsify { keep_fraction: k }))).collect())?;
    let noise_figure = "defence_noise_cnn.svg".to_string();
    let sparsify_figure = "defence_sparsify_cnn.svg".to_string();
    let positive: Vec<SweepRow> = noise.iter().filter(|r| r.x > 0.0).cloned().collect();
    sweep_figure(&fig_dir.join(&noise_figure), &format!("cnn at step {step}: every metric against the noise multiplier (clip = median per-sample norm)"), "noise multiplier", &positive, true, true)?;
    sweep_figure(&fig_dir.join(&sparsify_figure), &format!("cnn at step {step}: every metric against the kept fraction (top-k sparsification)"), "kept fraction", &sparsify, true, true)?;
    Ok(DefenceSweeps {
        step,
        clip: layers.names().into_iter().zip(clip).collect(),
        noise,
        sparsify,
        noise_figure,
        sparsify_figure,
    })
}

// ---------------------------------------------------------------------------------------------
// VALIDATION.md

/// One layer at one checkpoint, as the comparisons see it.
struct Point<'a> {
    row: &'a LayerRow,
    micro: MicroLatent,
}

type Getter = fn(&Point) -> Option<f64>;

/// (cheap metric, attack-grounded metric) pairs of the main table.
const COMPARISONS: [(&str, Getter, Getter); 7] = [
    ("S_l vs M4", |p| p.row.sensitivity, |p| p.row.usable_original_bits_per_dim),
    ("S_l^rms vs M4", |p| p.row.sensitivity_rms, |p| p.row.usable_original_bits_per_dim),
    ("R_l vs M4", |p| p.row.relative_sensitivity, |p| p.row.usable_original_bits_per_dim),
    ("d_between vs M3", |p| p.row.subspace_distance, |p| p.row.usable_information_bits),
    ("separation vs M3", |p| p.row.subspace_separation, |p| p.row.usable_information_bits),
    ("d_between vs M3, micro-batches", |p| p.micro.d_between, |p| p.micro.bits),
    ("separation vs M3, micro-batches", |p| p.micro.separation, |p| p.micro.bits),
];

/// Below this an attack's best layer is not a finding (bits, or bits per dimension).
const ATTACK_FLOOR: f64 = 0.05;

fn correlations(points: &[Point]) -> Vec<Option<f64>> {
    COMPARISONS
        .iter()
        .map(|(_, cheap, attack)| {
            let (a, b): (Vec<f64>, Vec<f64>) = points.iter().filter_map(|p| Some((cheap(p)?, attack(p)?))).unzip();
            // An attack that measured nothing anywhere has no ranking to track.
            if b.iter().all(|v| *v < ATTACK_FLOOR) {
                return None;
            }
            spearman(&a, &b)
        })
        .collect()
}

fn argmax(points: &[Point], get: Getter) -> Option<(String, f64)> {
    points.iter().filter_map(|p| Some((p.row.name.clone(), get(p)?))).max_by(|a, b| a.1.total_cmp(&b.1))
}

fn points(c: &Checkpoint) -> Vec<Point<'_>> {
    c.rows.iter().zip(&c.micro).map(|(row, micro)| Point { row, micro: *micro }).collect()
}

/// "held" / "did not hold" / "undetermined" for a claim about which layer an attack ranks
/// first, over checkpoints: (winner is as claimed, the attack measured something).
fn claim(results: &[(bool, bool)]) -> String {
    let measured: Vec<bool> = results.iter().filter(|r| r.1).map(|r| r.0).collect();
    if measured.is_empty() {
        return format!("**undetermined** (the attack stayed below {ATTACK_FLOOR} at every checkpoint)");
    }
    let wins = measured.iter().filter(|w| **w).count();
    let verdict = if wins * 2 > measured.len() { "held" } else { "did not hold" };
    format!(
        "**{verdict}** ({wins} of {} checkpoints where the attack measured anything{})",
        measured.len(),
        if measured.len() < results.len() { format!("; {} checkpoint(s) below {ATTACK_FLOOR}", results.len() - measured.len()) } else { String::new() }
    )
}

#[allow(clippy::too_many_arguments)]
fn render(
    args: &ValidateArgs,
    plan: &Plan,
    checkpoints: &[Checkpoint],
    aggregation: Option<&Sweep>,
    defences: Option<&DefenceSweeps>,
    timings: &[(String, f64)],
    total: f64,
) -> anyhow::Result<String> {
    let mut md = String::new();
    let w = &mut md;
    let out = args.out.display().to_string();
    let cmd = format!(
        "cargo run --release -- validate --out {}{}{}",
        out.trim_end_matches('/'),
        if args.seed != 0 { format!(" --seed {}", args.seed) } else { String::new() },
        if args.quick { " --quick" } else { "" }
    );
    writeln!(w, "# Validation study: do the cheap leakage metrics track the attacks?\n")?;
    writeln!(w, "Generated by `{cmd}` (or `scripts/validation.sh`) in {total:.0} s ({} libtorch thread(s), 2-core machine). Every number, table, figure and", args.threads)?;
    writeln!(w, "verdict below is computed by that run; rerunning it regenerates this file and `{}/validation/*.svg`.", out.trim_end_matches('/'))?;
    if args.quick {
        writeln!(w, "\n**This is a `--quick` smoke run with reduced sample counts: not the study.**")?;
    }
    writeln!(w, "\n## Set-up\n")?;
    writeln!(w, "- Data: the shipped UCI digits (8x8, pixels/16), split 80/20 with seed {}; private attribute: stroke weight (ink above the median of the digit's class, about half the samples).", args.seed)?;
    writeln!(w, "- Models: `cnn` (gradguard::models::DigitsCnn: conv1, conv2, fc1, fc2) and `mlp` (widths {:?}: fc0, fc1, fc2), seed {}, trained with Adam (lr 1e-3, batches of 64) and measured at steps {:?}.", super::audit::MLP_WIDTHS, args.seed, plan.steps)?;
    writeln!(w, "- Audited pool: the first {} training samples.", plan.pool)?;
    writeln!(w, "- M1: one batch of the first {} pool samples, K = {} probes (double backward).", plan.m1_batch, plan.m1_probes)?;
    writeln!(w, "- M2: m = 16 gradients per attribute value, rank r = 4; per-sample gradients, and group-pure micro-batches of {} samples.", plan.micro_batch)?;
    writeln!(w, "- M3: projection r = 64, L2 = 1e-2, stratified 70/30 split; on all {} pool samples' per-sample gradients, and on {} group-pure micro-batch releases of {} (the mean gradient of {} samples sharing the attribute value, labelled with it).", plan.pool, plan.micro_releases, plan.micro_batch, plan.micro_batch)?;
    writeln!(w, "- M4: {} single-sample releases, {} Adam steps (step 0.1 sigma, cosine decay), started at the mean input plus 0.1 sigma seeded noise, labels known.", plan.m4_releases, plan.m4_iterations)?;
    writeln!(w, "- Spearman rank correlations are across layers; with 3-4 layers per checkpoint a single checkpoint decides little (|rho| = 1 happens by chance with probability 1/12 for 4 layers, 1/3 for 3), so the pooled rows (all checkpoints of a model, then both models) are the ones to read. Ties (e.g. several layers at 0 bits) get average ranks; n/a: fewer than 3 points, a constant side, or an attack below {ATTACK_FLOOR} bits at every point compared (no ranking to track).")?;

    // Main table: correlations.
    writeln!(w, "\n## Cheap metrics against the attacks\n")?;
    writeln!(w, "Spearman rho between each cheap metric and the attack-grounded one, across layers: original information against M4 bits per dimension, latent information against M3 bits (per-sample releases, and group-pure micro-batches of {}).\n", plan.micro_batch)?;
    writeln!(w, "| model | checkpoint | {} |", COMPARISONS.iter().map(|c| c.0).collect::<Vec<_>>().join(" | "))?;
    writeln!(w, "|---|---|{}", "---|".repeat(COMPARISONS.len()))?;
    let mut all: Vec<Point> = Vec::new();
    let mut summary: Vec<(String, Vec<Option<f64>>)> = Vec::new();
    for model in ["cnn", "mlp"] {
        let mut pooled: Vec<Point> = Vec::new();
        for c in checkpoints.iter().filter(|c| c.model == model) {
            let pts = points(c);
            writeln!(w, "| {model} | step {} | {} |", c.step, correlations(&pts).iter().map(|v| rho(*v)).collect::<Vec<_>>().join(" | "))?;
            pooled.extend(pts);
        }
        let cells = correlations(&pooled);
        writeln!(w, "| **{model}** | **pooled ({} points)** | {} |", pooled.len(), cells.iter().map(|v| format!("**{}**", rho(*v))).collect::<Vec<_>>().join(" | "))?;
        summary.push((model.to_string(), cells));
        all.extend(pooled);
    }
    let cells = correlations(&all);
    writeln!(w, "| **both** | **pooled ({} points)** | {} |", all.len(), cells.iter().map(|v| format!("**{}**", rho(*v))).collect::<Vec<_>>().join(" | "))?;
    summary.push(("both".into(), cells.clone()));

    let names = ["S_l", "S_l^rms", "R_l"];
    let best = cells[..3].iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).max_by(|a, b| a.1.total_cmp(&b.1));
    writeln!(w)?;
    match best {
        Some((i, v)) => writeln!(
            w,
            "**Which normalisation of M1 tracks the attack best (pooled over both models):** {} (rho {v:+.2}; the others: {}).",
            names[i],
            (0..3).filter(|&j| j != i).map(|j| format!("{} {}", names[j], rho(cells[j]))).collect::<Vec<_>>().join(", ")
        )?,
        None => writeln!(w, "**Which normalisation of M1 tracks the attack best:** undetermined (no usable correlation).")?,
    }
    let pick = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (None, None) => "undetermined".to_string(),
        (a, b) if a.unwrap_or(f64::NEG_INFINITY) >= b.unwrap_or(f64::NEG_INFINITY) => "d_between".to_string(),
        _ => "separation".to_string(),
    };
    writeln!(
        w,
        "\n**Which M2 score tracks M3 best (pooled over both models):** per-sample releases: {} (d_between {}, separation {}); micro-batches of {}: {} (d_between {}, separation {}).",
        pick(cells[3], cells[4]),
        rho(cells[3]),
        rho(cells[4]),
        plan.micro_batch,
        pick(cells[5], cells[6]),
        rho(cells[5]),
        rho(cells[6])
    )?;

    // Paper findings.
    writeln!(w, "\n## The paper's findings, checked here\n")?;
    writeln!(w, "| model | checkpoint | most M4 bits | most M3 bits (per sample) | most M3 bits (micro-batches) | largest S_l | largest S_l^rms | largest R_l | largest separation |")?;
    writeln!(w, "|---|---|---|---|---|---|---|---|---|")?;
    let m4: Getter = |p| p.row.usable_original_bits_per_dim;
    let m3: Getter = |p| p.row.usable_information_bits;
    let m3_micro: Getter = |p| p.micro.bits;
    let mut first: Vec<(&str, Vec<(bool, bool)>)> = vec![("cnn", vec![]), ("mlp", vec![])];
    let mut latent: Vec<(bool, bool)> = Vec::new();
    let mut latent_micro: Vec<(bool, bool)> = Vec::new();
    for c in checkpoints {
        let pts = points(c);
        let show = |g: Getter| argmax(&pts, g).map_or("–".into(), |(n, v)| format!("{n} ({})", num(Some(v))));
        writeln!(
            w,
            "| {} | step {} | {} | {} | {} | {} | {} | {} | {} |",
            c.model,
            c.step,
            show(m4),
            show(m3),
            show(m3_micro),
            show(|p| p.row.sensitivity),
            show(|p| p.row.sensitivity_rms),
            show(|p| p.row.relative_sensitivity),
            show(|p| p.row.subspace_separation)
        )?;
        let first_name = c.rows.first().map(|r| r.name.clone()).unwrap_or_default();
        if let Some((n, v)) = argmax(&pts, m4) {
            if let Some(entry) = first.iter_mut().find(|e| e.0 == c.model) {
                entry.1.push((n == first_name, v >= ATTACK_FLOOR));
            }
        }
        if c.model == "cnn" {
            if let Some((n, v)) = argmax(&pts, m3) {
                latent.push((n == "fc1" || n == "fc2", v >= ATTACK_FLOOR));
            }
            if let Some((n, v)) = argmax(&pts, m3_micro) {
                latent_micro.push((n == "fc1" || n == "fc2", v >= ATTACK_FLOOR));
            }
        }
    }
    writeln!(w)?;
    writeln!(w, "- *First layers carry the most original information* (the first layer has the most M4 bits): CNN (conv1): {}; MLP (fc0): {}.", claim(&first[0].1), claim(&first[1].1))?;
    writeln!(w, "- *The fully-connected layers after the feature extractor carry the most latent information* (CNN: fc1 or fc2 has the most M3 bits): per-sample releases: {}; micro-batches of {}: {}.", claim(&latent), plan.micro_batch, claim(&latent_micro))?;

    // Per-checkpoint numbers.
    writeln!(w, "\n## Per-layer numbers\n")?;
    writeln!(w, "| model | step | layer | P_l | S_l | S_l^rms | R_l | d_between | separation | M3 bits | M3 acc (majority) | micro: separation | micro: M3 bits (acc) | M4 bits/dim | PSNR dB |")?;
    writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for c in checkpoints {
        for (r, mb) in c.rows.iter().zip(&c.micro) {
            writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} ({}) | {} | {} |",
                c.model,
                c.step,
                r.name,
                r.params,
                num(r.sensitivity),
                num(r.sensitivity_rms),
                num(r.relative_sensitivity),
                num(r.subspace_distance),
                num(r.subspace_separation),
                num(r.usable_information_bits),
                num(r.attack_accuracy),
                num(r.majority_accuracy),
                num(mb.separation),
                num(mb.bits),
                num(mb.accuracy),
                num(r.usable_original_bits_per_dim),
                num(r.psnr)
            )?;
        }
    }
    writeln!(w, "\nPer-layer bars of every metric (per-sample releases): {}.", checkpoints.iter().map(|c| format!("[{} step {}](validation/layers_{}_step{}.svg)", c.model, c.step, c.model, c.step)).collect::<Vec<_>>().join(", "))?;
    if let Some(c) = checkpoints.iter().find(|c| c.model == "cnn" && c.step == *plan.steps.last().unwrap_or(&0)) {
        writeln!(w, "\n![cnn at step {}](validation/layers_cnn_step{}.svg)", c.step, c.step)?;
    }

    // Aggregation.
    if let Some(agg) = aggregation {
        writeln!(w, "\n## Aggregation: every metric against the batch size\n")?;
        writeln!(w, "CNN at step {}. Batch sizes {:?}. M1: mean over {} batches of n distinct pool samples (K = 8). M2: 16 group-pure micro-batches of n per attribute value (METRICS.md, per-micro-batch granularity). M3 (one person): {} releases, each the mean gradient of a target sample and n - 1 random others, labelled with the target's attribute. M3 (batch): {} group-pure batches of n, labelled with the group. M4: {} releases of n samples, {} Adam steps, reconstructions matched to the true samples within each label.\n", agg.step, plan.batch_sizes, plan.agg_m1_batches, plan.agg_m3_releases, plan.agg_m3_releases, plan.agg_m4_releases, plan.agg_m4_iterations)?;
        writeln!(w, "Figure (`cmd` above regenerates it): ![aggregation](validation/{})\n", agg.figure)?;
        sweep_table(w, "n", &agg.rows, true)?;
        writeln!(w)?;
        aggregation_verdicts(w, &agg.rows, plan)?;
    }
    if let Some(d) = defences {
        writeln!(w, "\n## Defences: every metric against noise and sparsification\n")?;
        writeln!(w, "CNN at step {}. The defence is applied to each layer's release with `gradguard_defenses::Defence::apply`: per-sample gradients for one M3 (n = 1; seed per sample), {} group-pure micro-batch releases of {} for M2 (16 per value) and the other M3, the batch-{} release for M1, single-sample releases for M4 ({} releases, {} Adam steps; the attacker matches the defended gradient). M1 of a defended release is linearised: the {} probe JVPs pushed through the defence's Jacobian at the release (noise: central differences with the noise seed held fixed, so additive noise cancels and S_l sees only what clipping does to the signal; top-k: the JVP restricted to the kept entries); R_l divides by the norm of the defended release. Noise: `noise(clip_norm = C_l, multiplier)` with C_l the layer's median per-sample gradient norm ({}).\n", d.step, plan.micro_releases, plan.micro_batch, plan.m1_batch, plan.def_m4_releases, plan.def_m4_iterations, 8, d.clip.iter().map(|(n, c)| format!("{n}: {}", num(Some(*c)))).collect::<Vec<_>>().join(", "))?;
        writeln!(w, "![noise](validation/{})\n", d.noise_figure)?;
        sweep_table(w, "noise multiplier", &d.noise, true)?;
        writeln!(w, "\n![sparsify](validation/{})\n", d.sparsify_figure)?;
        sweep_table(w, "kept fraction", &d.sparsify, true)?;
        writeln!(w)?;
        defence_verdicts(w, "noise", &d.noise, true)?;
        defence_verdicts(w, "sparsification", &d.sparsify, false)?;
    }

    // What held.
    writeln!(w, "\n## What held and what did not\n")?;
    for (model, cells) in &summary {
        let line: Vec<String> = COMPARISONS.iter().zip(cells).map(|((name, _, _), v)| format!("{name}: {}", verdict(*v))).collect();
        writeln!(w, "- {model}, pooled: {}.", line.join("; "))?;
    }
    writeln!(w, "- A rho above +0.5 is read as \"tracks the attack\", between -0.5 and +0.5 as \"does not track it\", below -0.5 as \"ranks the layers against the attack\".")?;
    if let Some(agg) = aggregation {
        let falls = |get: fn(&SweepRow) -> Option<f64>| trend(&agg.rows, get).iter().filter(|t| t.3.is_some_and(|r| r <= -0.5)).count();
        let rises = |get: fn(&SweepRow) -> Option<f64>| trend(&agg.rows, get).iter().filter(|t| t.3.is_some_and(|r| r >= 0.5)).count();
        let layers = trend(&agg.rows, |r| r.s).len();
        let measured = |get: fn(&SweepRow) -> Option<f64>| agg.rows.iter().filter_map(get).any(|v| v >= ATTACK_FLOOR);
        writeln!(w, "- Aggregation (CNN, n = 1..64): S_l fell with n in {} of {layers} layers, S_l^rms in {}, R_l in {}; M4 bits fell in {} of {layers}; subspace separation fell in {} of {layers} (rose in {}).", falls(|r| r.s), falls(|r| r.s_rms), falls(|r| r.r), falls(|r| r.m4_bits), falls(|r| r.separation), rises(|r| r.separation))?;
        writeln!(
            w,
            "- M3 for one person's attribute in a mixed batch: {}. M3 for an attribute the whole (group-pure) batch shares rose with n in {} of {layers} layers: aggregation lowers what a release says about one person but raises what it says about a group the batch is drawn from.",
            if measured(|r| r.m3_bits) { format!("fell with n in {} of {layers} layers", falls(|r| r.m3_bits)) } else { format!("below {ATTACK_FLOOR} bits at every n (no per-person latent leakage measured to lower)") },
            rises(|r| r.m3_group_bits)
        )?;
    }
    if let Some(d) = defences {
        // Falls: ranks against the protection strength, and moved by more than 0.1 %.
        let falls = |rows: &[SweepRow], sign: f64, get: fn(&SweepRow) -> Option<f64>| {
            trend(rows, get)
                .iter()
                .filter(|t| t.3.is_some_and(|r| sign * r <= -0.5) && matches!((t.1, t.2), (Some(a), Some(b)) if (a - b).abs() > 1e-3 * a.abs().max(b.abs())))
                .count()
        };
        let layers = trend(&d.noise, |r| r.s).len();
        for (what, rows, sign) in [("Noise", &d.noise, 1.0), ("Sparsification", &d.sparsify, -1.0)] {
            let changed = |get: fn(&SweepRow) -> Option<f64>| {
                trend(rows, get).iter().filter(|(_, a, b, _)| matches!((a, b), (Some(a), Some(b)) if (a - b).abs() > 1e-3 * a.abs().max(b.abs()))).count()
            };
            writeln!(
                w,
                "- {what}: as protection grows, M4 bits fell in {} of {layers} layers and micro-batch M3 bits in {}; R_l fell in {}, S_l in {} (S_l changed at all in {} of {layers}), separation in {}.",
                falls(rows, sign, |r| r.m4_bits),
                falls(rows, sign, |r| r.m3_group_bits),
                falls(rows, sign, |r| r.r),
                falls(rows, sign, |r| r.s),
                changed(|r| r.s),
                falls(rows, sign, |r| r.separation)
            )?;
        }
        writeln!(w, "- S_l and S_l^rms measure how the release moves with the input; additive noise does not change that (the linearisation holds the noise fixed), so they cannot see a noise defence: only R_l (which divides by the noisier release's norm) and the attacks do.")?;
    }
    writeln!(w, "\n## Runtime\n")?;
    for (what, s) in timings {
        writeln!(w, "- {what}: {s:.1} s")?;
    }
    writeln!(w, "- total: {total:.1} s")?;
    Ok(md)
}

fn verdict(v: Option<f64>) -> String {
    match v {
        None => "undetermined (n/a)".into(),
        Some(v) if v > 0.5 => format!("tracks the attack (rho {v:+.2})"),
        Some(v) if v < -0.5 => format!("ranks the layers against the attack (rho {v:+.2})"),
        Some(v) => format!("does not track it (rho {v:+.2})"),
    }
}

fn sweep_table(w: &mut String, x_name: &str, rows: &[SweepRow], group_bits: bool) -> anyhow::Result<()> {
    writeln!(
        w,
        "| {x_name} | layer | S_l | S_l^rms | R_l | d_between | separation | M3 bits | M3 acc |{} M4 bits/dim | PSNR dB |",
        if group_bits { " M3 bits (group-pure batches) |" } else { "" }
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|---|---|{}---|---|", if group_bits { "---|" } else { "" })?;
    for r in rows {
        writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |{} {} | {} |",
            r.x,
            r.layer,
            num(r.s),
            num(r.s_rms),
            num(r.r),
            num(r.d_between),
            num(r.separation),
            num(r.m3_bits),
            num(r.m3_acc),
            if group_bits { format!(" {} |", num(r.m3_group_bits)) } else { String::new() },
            num(r.m4_bits),
            num(r.psnr)
        )?;
    }
    Ok(())
}

/// Per layer: the metric at the first and last sweep point and its Spearman correlation with
/// the sweep variable.
fn trend(rows: &[SweepRow], get: fn(&SweepRow) -> Option<f64>) -> Vec<(String, Option<f64>, Option<f64>, Option<f64>)> {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        if !names.contains(&r.layer) {
            names.push(r.layer.clone());
        }
    }
    names
        .into_iter()
        .map(|name| {
            let pts: Vec<(f64, f64)> = rows.iter().filter(|r| r.layer == name).filter_map(|r| get(r).map(|v| (r.x, v))).collect();
            let (xs, ys): (Vec<f64>, Vec<f64>) = pts.iter().copied().unzip();
            (name, pts.first().map(|p| p.1), pts.last().map(|p| p.1), spearman(&xs, &ys))
        })
        .collect()
}

fn aggregation_verdicts(w: &mut String, rows: &[SweepRow], plan: &Plan) -> anyhow::Result<()> {
    let (lo, hi) = (plan.batch_sizes.first().copied().unwrap_or(1), plan.batch_sizes.last().copied().unwrap_or(1));
    let metrics: [(&str, fn(&SweepRow) -> Option<f64>); 8] = [
        ("S_l", |r| r.s),
        ("S_l^rms", |r| r.s_rms),
        ("R_l", |r| r.r),
        ("separation", |r| r.separation),
        ("M3 bits (one person)", |r| r.m3_bits),
        ("M3 bits (batch attribute)", |r| r.m3_group_bits),
        ("M4 bits/dim", |r| r.m4_bits),
        ("M4 PSNR", |r| r.psnr),
    ];
    writeln!(w, "Does aggregation lower each metric? Per layer: value at n = {lo} -> n = {hi}, and Spearman rho with n (negative: falls as n grows).\n")?;
    writeln!(w, "| metric | {} | falls with n in | rises with n in |", trend(rows, |r| r.s).iter().map(|t| t.0.clone()).collect::<Vec<_>>().join(" | "))?;
    writeln!(w, "|---|{}---|---|", "---|".repeat(trend(rows, |r| r.s).len()))?;
    for (name, get) in metrics {
        let t = trend(rows, get);
        let falls = t.iter().filter(|x| x.3.is_some_and(|r| r <= -0.5)).count();
        let rises = t.iter().filter(|x| x.3.is_some_and(|r| r >= 0.5)).count();
        writeln!(
            w,
            "| {name} | {} | {falls} of {} layers | {rises} of {} layers |",
            t.iter().map(|(_, a, b, r)| format!("{} -> {} ({})", num(*a), num(*b), rho(*r))).collect::<Vec<_>>().join(" | "),
            t.len(),
            t.len()
        )?;
    }
    // S_l ~ 1/n?
    let t = trend(rows, |r| r.s);
    let ratios: Vec<String> = t.iter().filter_map(|(n, a, b, _)| Some(format!("{n} {:.1}x", (*a)? / (*b)?))).collect();
    writeln!(w, "\nS_l at n = {lo} over S_l at n = {hi} (1/n scaling predicts {}x): {}.", hi / lo.max(1), ratios.join(", "))?;
    Ok(())
}

fn defence_verdicts(w: &mut String, what: &str, rows: &[SweepRow], noise: bool) -> anyhow::Result<()> {
    // For noise the sweep variable grows with protection; for sparsification the kept fraction
    // falls with protection: flip the sign so that "negative" always means "falls as protection grows".
    let sign = if noise { 1.0 } else { -1.0 };
    let metrics: [(&str, fn(&SweepRow) -> Option<f64>); 8] = [
        ("S_l", |r| r.s),
        ("S_l^rms", |r| r.s_rms),
        ("R_l", |r| r.r),
        ("separation (micro-batches)", |r| r.separation),
        ("M3 bits (per sample)", |r| r.m3_bits),
        ("M3 bits (micro-batches)", |r| r.m3_group_bits),
        ("M4 bits/dim", |r| r.m4_bits),
        ("M4 PSNR", |r| r.psnr),
    ];
    writeln!(w, "With {what}, per layer: value without the defence -> at the strongest setting, and Spearman rho with the protection strength (negative: the metric falls as protection grows):\n")?;
    let header = trend(rows, |r| r.s);
    writeln!(w, "| metric | {} |", header.iter().map(|t| t.0.clone()).collect::<Vec<_>>().join(" | "))?;
    writeln!(w, "|---|{}", "---|".repeat(header.len()))?;
    for (name, get) in metrics {
        let t = trend(rows, get);
        writeln!(w, "| {name} | {} |", t.iter().map(|(_, a, b, r)| format!("{} -> {} ({})", num(*a), num(*b), rho(r.map(|r| sign * r)))).collect::<Vec<_>>().join(" | "))?;
    }
    writeln!(w)?;
    Ok(())
}
