//! The validation study of docs/VALIDATION.md (`gradguard validate`).
//!
//! On the shipped digits, the example CNN and MLP are trained (Adam, lr 1e-3, batches of 64)
//! and measured at steps 0, 100 and 300: per layer every cheap metric (M1: S_l, S_l^rms, R_l;
//! M2: subspace distance and separation) beside the attack-grounded ones (M4 for original
//! information, M3 for latent information). Then, on the CNN at step 100, every metric against
//! the batch size (1..64) and against two defences (Gaussian noise, top-k sparsification).
//! Defended releases are made by `gradguard_defenses::Defence::apply`, and their M1 is measured
//! through the guard's own transform path (the closed loop's). Then a malicious-server section
//! (a digits MLP and trap, fishing and imprint variants made from it by setting parameters:
//! what the attack suite recovers at batch sizes 8/32/128 beside M1, M5 with noise and M6),
//! aggregation revisited on honest models (recovered fraction and M6 against n = 1..128, for the
//! digits MLP and CNN and a tabular MLP), and the false-positive rate of an M6 rule on
//! demo-length honest runs. Writes VALIDATION.md and SVG figures; every statement in
//! VALIDATION.md is computed from the numbers of the run that wrote it.
#![deny(missing_docs, unreachable_pub)]

mod aggregation;
mod bound;
mod groups;
mod malicious;
mod nets;
mod render;
mod render_bound;
mod render_malicious;
mod sweeps;

use gradguard_models::data::Digits;
use gradguard_audit::Result;
use gradguard_models::files::{create_dir, write_file};
use gradguard_audit::estimate::{measure_layers, per_sample_matrices, probe_settings, MetricSettings};
use gradguard_audit::bar_panels_svg;
use gradguard_audit::LayerRow;
use gradguard_models::{LossKind, ModelError, ModelSource, Trainer};
use gradguard_guard::{Batch, Inspection, measure::{InversionPlan, InversionSettings}};
use gradguard_guard::measure::GradientMatrix;
use gradguard_guard::measure::SubspaceSettings;
use gradguard_guard::measure::to_f64_vec;
use gradguard_guard::measure::UsableSettings;
use std::path::PathBuf;
use std::time::Instant;
use sweeps::{DefenceSweeps, Sweep};
use tch::{Device, Tensor};

/// How to run the study (the flags of `gradguard validate`).
#[derive(Clone, Debug)]
pub struct ValidationOptions {
    /// Folder for VALIDATION.md; the figures go to its `validation/` subfolder.
    pub out: PathBuf,
    /// Seed of the models, the data order, probes, splits, projections and attacks.
    pub seed: u64,
    /// Smaller sample counts and fewer attack steps: a smoke run (minutes -> seconds), not the
    /// study.
    pub quick: bool,
    /// libtorch intra-op threads, set by [`run_validation`] (the models are tiny: 1 is fastest
    /// on 2 shared cores).
    pub threads: i32,
}

impl Default for ValidationOptions {
    fn default() -> Self {
        Self { out: PathBuf::from("docs"), seed: 0, quick: false, threads: 1 }
    }
}

/// Where a study was written.
#[derive(Clone, Debug)]
pub struct ValidationSummary {
    /// The VALIDATION.md written.
    pub markdown: PathBuf,
    /// The folder of the figures.
    pub figures: PathBuf,
    /// Seconds the study took.
    pub seconds: f64,
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
    /// The bound's test: noise multipliers (0: the raw release) and attacked single-sample releases.
    bound_noise: Vec<f64>,
    bound_releases: usize,
    /// The malicious-server section.
    malicious: malicious::MaliciousPlan,
    /// Aggregation revisited on honest models, and the M6 rule's false positives.
    honest: aggregation::AggregationPlan,
}

/// Probes K of M1 in the aggregation and defence sweeps.
const SWEEP_PROBES: usize = 8;

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
                bound_noise: vec![0.0, 0.01, 1.0],
                bound_releases: 2,
                malicious: malicious::MaliciousPlan { batch_sizes: vec![8, 32], releases: 2, probes: 4, multipliers: vec![0.01], tau: 0.99 },
                honest: aggregation::AggregationPlan {
                    batch_sizes: vec![1, 8, 32],
                    samples: 32,
                    min_releases: 1,
                    max_releases: 4,
                    tau: 0.99,
                    fpr_steps: 60,
                    fpr_batches: vec![64],
                    fpr_every: 20,
                },
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
                bound_noise: vec![0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                bound_releases: 8,
                malicious: malicious::MaliciousPlan { batch_sizes: vec![8, 32, 128], releases: 8, probes: 8, multipliers: vec![0.01, 0.001], tau: 0.99 },
                honest: aggregation::AggregationPlan {
                    batch_sizes: vec![1, 2, 4, 8, 16, 32, 64, 128],
                    samples: 128,
                    min_releases: 4,
                    max_releases: 32,
                    tau: 0.99,
                    fpr_steps: 1500,
                    fpr_batches: vec![64, 8],
                    fpr_every: 5,
                },
            }
        }
    }
}

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
    micro: Vec<groups::MicroLatent>,
}

/// What a sweep measures: one model at one checkpoint, on the pool.
struct Study<'a> {
    target: Inspection<'a>,
    attribute: &'a [i64],
    /// Per-sample gradients of the pool, per layer.
    grads: &'a [Option<GradientMatrix>],
    plan: &'a Plan,
    fig_dir: &'a std::path::Path,
    step: usize,
}

/// Everything the study measured, for [`render::render`].
struct Results {
    checkpoints: Vec<Checkpoint>,
    aggregation: Option<Sweep>,
    defences: Option<DefenceSweeps>,
    /// M5's bound against M4, per model, and the figure's file name.
    bounds: Vec<bound::BoundStudy>,
    bound_figure: String,
    /// The malicious-server section, aggregation revisited and the M6 rule's false positives.
    malicious: Option<malicious::MaliciousStudy>,
    honest: Vec<aggregation::AggModel>,
    fpr: Vec<aggregation::FprRun>,
    timings: Vec<(String, f64)>,
    total: f64,
}

/// Runs the study and writes `options.out`/VALIDATION.md and its figures (about 7 minutes on
/// 2 cores; under a minute with `quick`). Sets libtorch's intra-op thread count to `options.threads`.
/// `progress` is told when each part is done.
pub fn run_validation(options: &ValidationOptions, progress: &mut dyn FnMut(&str)) -> Result<ValidationSummary> {
    tch::set_num_threads(options.threads.max(1));
    let started = Instant::now();
    let seed = options.seed;
    let plan = Plan::new(options.quick);
    let fig_dir = options.out.join("validation");
    create_dir(&fig_dir)?;
    let digits = Digits::embedded().map_err(ModelError::from)?;
    let (train, _test) = digits.split(0.2, seed);
    let pool_idx: Vec<usize> = train.iter().take(plan.pool).copied().collect();
    let (px, py, pa) = digits.batch(&pool_idx, Device::Cpu).map_err(ModelError::from)?;
    let pool = Pool { x: px, y: py, attribute: to_f64_vec(&pa)?.into_iter().map(|v| v as i64).collect() };
    let (tx, ty, _) = digits.batch(&train, Device::Cpu).map_err(ModelError::from)?;

    let mut results = Results { checkpoints: Vec::new(), aggregation: None, defences: None, bounds: Vec::new(), bound_figure: "bound_vs_attack.svg".into(), malicious: None, honest: Vec::new(), fpr: Vec::new(), timings: Vec::new(), total: 0.0 };
    let mut timed = |results: &mut Results, what: String, seconds: f64| {
        progress(&format!("{what} in {seconds:.1}s"));
        results.timings.push((what, seconds));
    };
    for (name, source) in [("cnn", ModelSource::Cnn), ("mlp", ModelSource::Mlp)] {
        let model = source.load(seed, Device::Cpu)?;
        let mut trainer = Trainer::new(&model, &tx, &ty, (0..train.len()).collect(), 64, seed)?;
        let layers = model.layers()?;
        let loss_fn = model.loss_fn(LossKind::CrossEntropy);
        for &step in &plan.steps {
            let t = Instant::now();
            trainer.train_to(step)?;
            let target = Inspection::new(&layers, &loss_fn, Batch::new(&pool.x, &pool.y)).seeded(seed, 0);
            let (rows, grads) = measure_checkpoint(&target, &pool.attribute, &plan)?;
            bar_panels_svg(&fig_dir.join(format!("layers_{name}_step{step}.svg")), &format!("{name} at step {step}: per-layer metrics (digits, seed {seed})"), &rows)?;
            timed(&mut results, format!("{name} step {step}"), t.elapsed().as_secs_f64());
            if step == *plan.steps.get(1).unwrap_or(&0) {
                let study = Study { target, attribute: &pool.attribute, grads: &grads, plan: &plan, fig_dir: &fig_dir, step };
                let t = Instant::now();
                results.bounds.push(bound::bound_study(&study, name)?);
                timed(&mut results, format!("{name} bound against attack"), t.elapsed().as_secs_f64());
            }
            if name == "cnn" && step == *plan.steps.get(1).unwrap_or(&0) {
                let study = Study { target, attribute: &pool.attribute, grads: &grads, plan: &plan, fig_dir: &fig_dir, step };
                let t = Instant::now();
                results.aggregation = Some(sweeps::aggregation_sweep(&study)?);
                timed(&mut results, "cnn aggregation sweep".into(), t.elapsed().as_secs_f64());
                let t = Instant::now();
                results.defences = Some(sweeps::defence_sweep(&study)?);
                timed(&mut results, "cnn defence sweep".into(), t.elapsed().as_secs_f64());
            }
            let micro = groups::micro_latent(&grads, &pool.attribute, plan.micro_batch, plan.micro_releases, seed)?;
            results.checkpoints.push(Checkpoint { model: name, step, rows, micro });
        }
    }
    malicious_sections(&plan, &fig_dir, seed, &mut results, &mut timed)?;
    bound::bound_figure(&fig_dir.join(&results.bound_figure), &results.bounds)?;
    results.total = started.elapsed().as_secs_f64();
    let path = options.out.join("VALIDATION.md");
    write_file(&path, &render::render(options, &plan, &results), "writing")?;
    Ok(ValidationSummary { markdown: path, figures: fig_dir, seconds: results.total })
}

/// The malicious-server section, aggregation revisited on honest models, and the M6 rule's
/// false positives on demo-length honest runs (their figures into `fig_dir`).
fn malicious_sections(plan: &Plan, fig_dir: &std::path::Path, seed: u64, results: &mut Results, timed: &mut dyn FnMut(&mut Results, String, f64)) -> Result<()> {
    let t = Instant::now();
    let digits = nets::Data::digits(seed)?;
    let honest = malicious::honest_mlp(&digits, seed)?;
    results.malicious = Some(malicious::malicious_study(&honest, &digits, &plan.malicious, seed)?);
    timed(results, "malicious-server models".into(), t.elapsed().as_secs_f64());

    let t = Instant::now();
    let tabular = nets::Data::tabular(seed)?;
    let cnn = nets::Net::cnn("cnn", seed)?;
    cnn.train(&digits, malicious::HONEST_STEPS, &|s| digits.demo_batch(64, s), None, &mut |_, _, _| Ok(()))?;
    let tab = nets::Net::mlp("tabular", &nets::TABULAR_MLP, seed)?.torch_init(seed)?;
    tab.train(&tabular, malicious::HONEST_STEPS, &|s| tabular.demo_batch(64, s), None, &mut |_, _, _| Ok(()))?;
    // The same digits MLP with tch's default initialisation (weights uniform in +-sqrt(6/fan_in)).
    let tch_mlp = nets::Net::mlp("tch", &nets::DIGITS_MLP, seed)?;
    tch_mlp.train(&digits, malicious::HONEST_STEPS, &|s| digits.demo_batch(64, s), None, &mut |_, _, _| Ok(()))?;
    for (net, label, data) in [(&honest, "digits MLP", &digits), (&tch_mlp, "digits MLP (tch init)", &digits), (&cnn, "digits CNN", &digits), (&tab, "tabular MLP", &tabular)] {
        results.honest.push(aggregation::aggregation_sweep(net, label, data, &plan.honest, seed)?);
    }
    render_malicious::aggregation_figure(&fig_dir.join(render_malicious::AGGREGATION_FIGURE), &results.honest, plan.honest.tau)?;
    timed(results, "aggregation revisited (honest models)".into(), t.elapsed().as_secs_f64());

    for &batch in &plan.honest.fpr_batches {
        for (label, data) in [("digits MLP", &digits), ("digits CNN", &digits), ("tabular MLP", &tabular)] {
            let fresh = match label {
                "digits MLP" => nets::Net::mlp("digits MLP", &nets::DIGITS_MLP, seed)?.torch_init(seed)?,
                "digits CNN" => nets::Net::cnn("digits CNN", seed)?,
                _ => nets::Net::mlp("tabular MLP", &nets::TABULAR_MLP, seed)?.torch_init(seed)?,
            };
            let t = Instant::now();
            results.fpr.push(aggregation::fpr_run(&fresh, label, data, batch, &plan.honest, seed)?);
            timed(results, format!("M6 rule on an honest run ({label}, batch {batch})"), t.elapsed().as_secs_f64());
        }
    }
    render_malicious::fpr_figure(&fig_dir.join(render_malicious::FPR_FIGURE), &results.fpr)?;
    Ok(())
}

/// Every metric of every layer at one checkpoint, and the pool's per-sample gradients.
fn measure_checkpoint(target: &Inspection, attribute: &[i64], plan: &Plan) -> Result<(Vec<LayerRow>, Vec<Option<GradientMatrix>>)> {
    let settings = MetricSettings {
        sensitivity: probe_settings(plan.m1_probes),
        m1_batch: plan.m1_batch,
        subspace: SubspaceSettings::default(),
        usable: UsableSettings::default(),
        inversion: Some((InversionPlan { batch_size: 1, releases: plan.m4_releases }, InversionSettings { iterations: plan.m4_iterations, ..Default::default() })),
        attacks: None,
        defence: Vec::new(),
        prior_variance: None,
        seed: target.seed(),
    };
    let measured = measure_layers(target, Some(attribute), &settings)?;
    Ok((measured.rows, per_sample_matrices(target)?))
}
