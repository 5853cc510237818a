//! What the guard costs on models people train, side by side in one run:
//!
//! - `resnet-1m`: a ResNet-18-layout CNN with batch norm at base width 20 (about 1.1M
//!   parameters), 3x32x32 inputs, batches of 32;
//! - `resnet-11m`: ResNet-18 at base width 64 (about 11.2M parameters), the same data, with
//!   `--large-steps` steps (20 by default on CPU, `--steps` on a GPU);
//! - `transformer`: a 2-layer pre-norm transformer text classifier (d = 128, 4 heads, FFN 512,
//!   vocabulary 16,000: about 2.5M parameters) on sequences of 64 token ids, batches of 64,
//!   with the embedding split declared so M1 is measured on the embeddings.
//!
//! The data are the examples' synthetic sets with the planted attribute
//! (examples/shared/synthetic.rs). The guard runs without a policy, `Settings::default()`
//! (budget 5%) with only the age bound lifted to the run's length, as benches/guard_cost.rs
//! does: with the default bound (50 steps) the guard renews estimates over budget rather than
//! let them go stale, which would measure the bound, not the budget.
//!
//! - `cnn` and `mlp`: a CNN without batch norm (about 0.62M parameters) and an MLP (about
//!   1.71M) on the same images: models whose samples do not interact.
//!
//! For each model: guarded / unguarded wall time (each run in its own child process of this
//! binary, which also reports its peak RSS, VmHWM), estimates per 1,000 steps, the largest M1
//! age after step 100 and the M1 route the guard settled on (m, K), one M1 estimate (K = 8,
//! `Inspection::sensitivity`) on the full batch and on sub-batches of n / 4 (with the largest
//! gap between the two in combined standard errors, and the variance per probe of the
//! sub-batch route against the full batch's), one M2 estimate (`Inspection::subspace` with the
//! attribute labels) and one M6 estimate (`Inspection::sample_isolation`), in mean training
//! steps of the unguarded run.
//!
//! First, per model, a guarded step that estimates M1, with `backward_step` (the user's forward,
//! then the guard's own forward and backward for M1) and with `train_step` (one forward and
//! backward for both), beside a plain step.
//!
//!     cargo bench --bench real_models -- [--device cpu|cuda] [--steps 300] [--large-steps N]
//!         [--models resnet-1m,resnet-11m,cnn,mlp,transformer] [--repeats 3] [--estimate-step-only]
use clap::Parser;
use gradguard::guard::{EmbeddingSplit, Inspection, LayerMap, Metric, measure::{parse_device, IsolationSettings, SensitivitySettings, SubspaceSettings}, report::Sensitivity};
use gradguard::{Batch, GuardedOptimizer, LossFn, Settings};
use std::time::Instant;
use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Reduction, TchError, Tensor};

#[path = "../examples/shared/resnet_model.rs"]
mod resnet_model;
#[path = "../examples/shared/synthetic.rs"]
mod synthetic;

use resnet_model::ResNet;

#[path = "shared/plain_models.rs"]
mod plain_models;
use plain_models::{Mlp, PlainCnn};

#[path = "shared/measure.rs"]
mod measure;
use measure::{median, peak_rss_kib, sync};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Training steps of each timed run (ResNet-1M, transformer).
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Training steps of the 11M ResNet's timed runs (default: 20 on CPU, --steps on a GPU).
    #[arg(long)]
    large_steps: Option<usize>,
    /// Which models, comma-separated.
    #[arg(long, default_value = "resnet-1m,resnet-11m,cnn,mlp,transformer")]
    models: String,
    /// Timed repeats of each estimate (after a warm-up); the median is reported. The 11M model
    /// on CPU times one.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Internal: run one training job of this model and print its figures.
    #[arg(long, hide = true)]
    child: Option<String>,
    #[arg(long, hide = true, default_value = "unguarded")]
    mode: String,
    /// Probes K of the guarded runs' M1 (the timed estimates report K = 8 and 4 whatever this).
    #[arg(long, default_value_t = 8)]
    probes: usize,
    /// The guarded runs' `subspace_every_steps` and `isolation_every_steps` (default: the
    /// settings' defaults).
    #[arg(long)]
    subspace_every: Option<u64>,
    /// Only the estimate step (backward_step against train_step), not the timed runs.
    #[arg(long)]
    estimate_step_only: bool,
    #[arg(long, hide = true)]
    bench: bool,
}

const VOCAB: i64 = 16_000;
const LENGTH: i64 = 64;
const IMAGE_BATCH: i64 = 32;
const TEXT_BATCH: i64 = 64;
/// Distinct batches each run cycles through.
const POOL: i64 = 8;

/// One pre-norm transformer layer: attention and a GELU feed-forward, each residual.
struct Layer {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::LayerNorm,
    ff1: nn::Linear,
    ff2: nn::Linear,
}

/// Token and position embeddings, layers, final layer norm, mean pool, linear head (2 classes).
struct Transformer {
    emb: nn::Embedding,
    pos: Tensor,
    layers: Vec<Layer>,
    ln: nn::LayerNorm,
    head: nn::Linear,
    heads: i64,
}

impl Transformer {
    fn new(p: &nn::Path, vocab: i64, length: i64, d: i64, heads: i64, depth: usize, ffn: i64) -> Self {
        let lin = |name: String, i, o| nn::linear(p / name, i, o, Default::default());
        let ln = |name: String| nn::layer_norm(p / name, vec![d], Default::default());
        let emb = nn::embedding(p / "emb", vocab, d, Default::default());
        let pos = (p / "pos").var("weight", &[length, d], nn::Init::Randn { mean: 0.0, stdev: 0.02 });
        let layers = (0..depth)
            .map(|i| Layer {
                ln1: ln(format!("layer{i}_ln1")),
                qkv: lin(format!("layer{i}_qkv"), d, 3 * d),
                proj: lin(format!("layer{i}_proj"), d, d),
                ln2: ln(format!("layer{i}_ln2")),
                ff1: lin(format!("layer{i}_ff1"), d, ffn),
                ff2: lin(format!("layer{i}_ff2"), ffn, d),
            })
            .collect();
        Self { emb, pos, layers, ln: ln("ln".into()), head: lin("head".into(), d, 2), heads }
    }

    /// The first continuous representation: [n, length, d].
    fn embed(&self, tokens: &Tensor) -> Result<Tensor, TchError> {
        self.emb.forward(tokens).f_add(&self.pos)
    }

    fn attention(&self, l: &Layer, x: &Tensor) -> Result<Tensor, TchError> {
        let (n, len, d) = x.size3()?;
        let dh = d / self.heads;
        let qkv = l.qkv.forward(x).f_chunk(3, -1)?;
        let split = |t: &Tensor| t.f_view([n, len, self.heads, dh])?.f_transpose(1, 2);
        let (q, k, v) = (split(&qkv[0])?, split(&qkv[1])?, split(&qkv[2])?);
        let att = q.f_matmul(&k.f_transpose(-2, -1)?)?.f_mul_scalar(1.0 / (dh as f64).sqrt())?.f_softmax(-1, Kind::Float)?;
        let y = att.f_matmul(&v)?.f_transpose(1, 2)?.f_contiguous()?.f_view([n, len, d])?;
        Ok(l.proj.forward(&y))
    }

    fn loss_from_embeddings(&self, e: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let mut h = e.shallow_clone();
        for l in &self.layers {
            h = h.f_add(&self.attention(l, &l.ln1.forward(&h))?)?;
            h = h.f_add(&l.ff2.forward(&l.ff1.forward(&l.ln2.forward(&h)).f_gelu("none")?))?;
        }
        let pooled = self.ln.forward(&h).f_mean_dim(1, false, Kind::Float)?;
        self.head.forward(&pooled).f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0)
    }

    fn loss(&self, tokens: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.loss_from_embeddings(&self.embed(tokens)?, y)
    }
}

enum Net {
    Image(ResNet),
    Cnn(PlainCnn),
    Mlp(Mlp),
    Text(Transformer),
}

/// M1 on the embeddings: the split the guarded runs declare with `.embedding(..)`.
impl EmbeddingSplit for Transformer {
    fn embed(&self, tokens: &Tensor) -> Result<Tensor, TchError> {
        Transformer::embed(self, tokens)
    }

    fn loss_from_embedded(&self, embedded: &Tensor, targets: &Tensor) -> Result<Tensor, TchError> {
        self.loss_from_embeddings(embedded, targets)
    }
}

impl Net {
    fn split(&self) -> Option<&dyn EmbeddingSplit> {
        match self {
            Net::Text(t) => Some(t),
            _ => None,
        }
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        match self {
            Net::Image(net) => net.loss(x, y),
            Net::Cnn(net) => net.loss(x, y),
            Net::Mlp(net) => net.loss(x, y),
            Net::Text(net) => net.loss(x, y),
        }
    }
}

/// A model, its batches (inputs, targets, attribute) and its optimizer's configuration.
struct Setup {
    vs: nn::VarStore,
    net: Net,
    batches: Vec<(Tensor, Tensor, Tensor)>,
}

impl Setup {
    fn new(model: &str, device: Device) -> anyhow::Result<Self> {
        let to = |(x, y, a): (Tensor, Tensor, Tensor)| (x.to_device(device), y.to_device(device), a.to_device(device));
        let (batches, net_of): (Vec<_>, Box<dyn Fn(&nn::Path) -> Net>) = match model {
            "resnet-1m" | "resnet-11m" => {
                tch::manual_seed(1);
                let images = synthetic::Images::new()?;
                let batches = (0..POOL).map(|_| images.batch(IMAGE_BATCH).map(to)).collect::<Result<_, _>>()?;
                let base = if model == "resnet-1m" { 20 } else { 64 };
                (batches, Box::new(move |p| Net::Image(ResNet::new(p, &[base, 2 * base, 4 * base, 8 * base], 2, synthetic::IMAGE_CLASSES))))
            }
            "cnn" | "mlp" => {
                tch::manual_seed(1);
                let images = synthetic::Images::new()?;
                let batches = (0..POOL).map(|_| images.batch(IMAGE_BATCH).map(to)).collect::<Result<_, _>>()?;
                let cnn = model == "cnn";
                (batches, Box::new(move |p| if cnn { Net::Cnn(PlainCnn::new(p, synthetic::IMAGE_CLASSES)) } else { Net::Mlp(Mlp::new(p, synthetic::IMAGE_CLASSES)) }))
            }
            "transformer" => {
                let (t, y, a) = synthetic::text(POOL * TEXT_BATCH, VOCAB, LENGTH, 1)?;
                let batches = (0..POOL).map(|b| to((t.narrow(0, b * TEXT_BATCH, TEXT_BATCH), y.narrow(0, b * TEXT_BATCH, TEXT_BATCH), a.narrow(0, b * TEXT_BATCH, TEXT_BATCH)))).collect();
                (batches, Box::new(|p| Net::Text(Transformer::new(p, VOCAB, LENGTH, 128, 4, 2, 512))))
            }
            other => anyhow::bail!("unknown model {other:?} (resnet-1m, resnet-11m, cnn, mlp, transformer)"),
        };
        tch::manual_seed(0);
        let vs = nn::VarStore::new(device);
        let net = net_of(&vs.root());
        Ok(Self { vs, net, batches })
    }

    fn optimizer(&self) -> anyhow::Result<nn::Optimizer> {
        Ok(match self.net {
            Net::Text(_) => nn::Adam::default().build(&self.vs, 1e-3)?,
            Net::Image(_) => nn::Sgd { momentum: 0.9, ..Default::default() }.build(&self.vs, 0.05)?,
            // Without batch norm, 0.05 diverges within a few steps on these images.
            Net::Cnn(_) | Net::Mlp(_) => nn::Sgd { momentum: 0.9, ..Default::default() }.build(&self.vs, 0.005)?,
        })
    }

    fn params(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }
}

/// One training run, in a child process: (seconds, estimates, steps not applied, guard share).
/// The guarded runs' settings: `Settings::default()` with the age bound lifted to the run (so
/// that no estimate is forced over budget) and the probes and M2 cadence of the command line.
fn guarded_settings(args: &Args, steps: usize) -> Settings {
    Settings {
        max_estimate_age_steps: (steps as u64).max(Settings::default().estimate_every),
        probes: args.probes,
        subspace_every_steps: args.subspace_every.unwrap_or(Settings::default().subspace_every_steps),
        isolation_every_steps: args.subspace_every.unwrap_or(Settings::default().isolation_every_steps),
        ..Settings::default()
    }
}

/// What a guarded run saw: the largest M1 age after step 100 and the last M1's route
/// (probe_samples m, probes K) in its first layer that M1 measured.
#[derive(Default)]
struct Seen {
    max_age_after_100: u64,
    route: Option<(usize, usize)>,
}

fn train(s: &Setup, device: Device, steps: usize, guard: Option<Settings>) -> anyhow::Result<(f64, usize, usize, f64, Seen)> {
    // Two plain steps first, in both modes: thread pools and allocator warm.
    let mut warm = s.optimizer()?;
    for (x, y, _) in s.batches.iter().take(2) {
        warm.backward_step(&s.net.loss(x, y)?);
    }
    let (mut estimates, mut not_applied, mut share, mut seen) = (0, 0, 0.0, Seen::default());
    sync(device);
    let started = Instant::now();
    if let Some(settings) = guard {
        let mut guarded = guarded_optimizer(s, settings)?;
        for step in 0..steps {
            let (x, y, a) = &s.batches[step % s.batches.len()];
            match guarded.train_step(&Batch::new(x, y).with_attribute(a)) {
                Ok(r) if r.is_released() => {
                    let report = r.report();
                    estimates += report.estimated as usize;
                    share = report.health.spent_share;
                    if step >= 100 {
                        seen.max_age_after_100 = seen.max_age_after_100.max(report.health.estimate_age_steps.unwrap_or(u64::MAX));
                    }
                    if let Some(m1) = report.layers.iter().find_map(|l| l.sensitivity.measured()) {
                        seen.route = Some((m1.probe_samples.unwrap_or(m1.n), m1.probes.unwrap_or(0)));
                    }
                }
                Ok(r) => {
                    if not_applied == 0 {
                        eprintln!("step {step}: not applied: {:?}", r.block_reason());
                    }
                    not_applied += 1;
                }
                Err(e) => {
                    if not_applied == 0 {
                        eprintln!("step {step}: {e}");
                    }
                    not_applied += 1;
                }
            }
        }
    } else {
        let mut opt = s.optimizer()?;
        for step in 0..steps {
            let (x, y, _) = &s.batches[step % s.batches.len()];
            opt.backward_step(&s.net.loss(x, y)?);
        }
    }
    sync(device);
    Ok((started.elapsed().as_secs_f64(), estimates, not_applied, share, seen))
}

/// The model's optimizer wrapped by a guard with `settings` (the text model's embedding split
/// declared).
fn guarded_optimizer(s: &Setup, settings: Settings) -> anyhow::Result<GuardedOptimizer<'_>> {
    let builder = GuardedOptimizer::builder(&s.vs, s.optimizer()?).settings(settings).loss(|x: &Tensor, y: &Tensor| s.net.loss(x, y));
    let builder = match &s.net {
        Net::Text(t) => builder.embedding(|x: &Tensor| t.embed(x), |e: &Tensor, y: &Tensor| t.loss_from_embeddings(e, y)),
        _ => builder,
    };
    Ok(builder.build()?)
}

/// One guarded step that estimates M1 (K = 8; M2 measured once before the timing), in seconds:
/// (median over `repeats` with the user's forward then `backward_step`, whose estimate runs the
/// loss forward and backward again; median with `train_step`, whose one forward and backward
/// serves the estimate too; median of a plain step), side by side.
fn estimate_steps(s: &Setup, device: Device, repeats: usize) -> anyhow::Result<(f64, f64, f64)> {
    let settings = Settings { estimate_every: 1, budget_share: 1.0, background_estimates: false, probes: 8, subspace_every_steps: 1 << 40, max_estimate_age_steps: 1 << 40, ..Settings::default() };
    let (mut by_backward, mut by_train, mut plain) = (vec![], vec![], vec![]);
    let mut guarded = [guarded_optimizer(s, settings.clone())?, guarded_optimizer(s, settings)?];
    let mut opt = s.optimizer()?;
    for r in 0..=repeats + 1 {
        let (x, y, a) = &s.batches[r % s.batches.len()];
        let batch = Batch::new(x, y).with_attribute(a);
        let timed = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
            sync(device);
            let t = Instant::now();
            f()?;
            sync(device);
            Ok(t.elapsed().as_secs_f64())
        };
        let [first, second] = &mut guarded;
        let tb = timed(&mut || {
            first.backward_step(&s.net.loss(x, y)?, &batch)?;
            Ok(())
        })?;
        let tt = timed(&mut || {
            second.train_step(&batch)?;
            Ok(())
        })?;
        let tp = timed(&mut || {
            opt.backward_step(&s.net.loss(x, y)?);
            Ok(())
        })?;
        // The first step measures M2 and warms up; the second warms the timing.
        if r > 1 {
            by_backward.push(tb);
            by_train.push(tt);
            plain.push(tp);
        }
    }
    Ok((median(by_backward), median(by_train), median(plain)))
}

/// What a child's training run printed.
struct Run {
    seconds: f64,
    estimates: usize,
    not_applied: usize,
    share: f64,
    peak_rss_kib: u64,
    max_age_after_100: u64,
    /// The last M1's (m, K); (0, 0) without one.
    route: (usize, usize),
}

/// A training run in a child process of this binary.
fn child(model: &str, mode: &str, steps: usize, args: &Args) -> anyhow::Result<Run> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command.args(["--child", model, "--mode", mode, "--device", &args.device, "--steps", &steps.to_string()]).args(["--probes", &args.probes.to_string()]);
    if let Some(every) = args.subspace_every {
        command.args(["--subspace-every", &every.to_string()]);
    }
    let out = command.output()?;
    anyhow::ensure!(out.status.success(), "child {model} {mode} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let f: Vec<&str> = text.split_whitespace().collect();
    anyhow::ensure!(f.len() == 8, "child {model} {mode} printed {text:?}");
    Ok(Run {
        seconds: f[0].parse()?,
        estimates: f[1].parse()?,
        not_applied: f[2].parse()?,
        share: f[3].parse()?,
        peak_rss_kib: f[4].parse()?,
        max_age_after_100: f[5].parse()?,
        route: (f[6].parse()?, f[7].parse()?),
    })
}

/// Peak RSS (KiB) after three plain training steps, and after one M1 estimate (K = 8) on top:
/// what M1's graph and probes add, measured alone in a fresh child process.
fn m1_memory(s: &Setup, device: Device) -> anyhow::Result<(u64, u64)> {
    train(s, device, 3, None)?;
    let before = peak_rss_kib();
    let layers = LayerMap::from_var_store(&s.vs)?;
    let loss = |x: &Tensor, y: &Tensor| s.net.loss(x, y);
    let (x, y, _) = &s.batches[0];
    let split = s.net.split();
    inspection(&layers, &loss, split, Batch::new(x, y), 0).sensitivity(&SensitivitySettings { probes: 8, ..Default::default() })?;
    sync(device);
    Ok((before, peak_rss_kib()))
}

fn m1_memory_of_child(model: &str, args: &Args) -> anyhow::Result<(u64, u64)> {
    let out = std::process::Command::new(std::env::current_exe()?).args(["--child", model, "--mode", "m1-memory", "--device", &args.device]).output()?;
    anyhow::ensure!(out.status.success(), "child {model} m1-memory failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let f: Vec<u64> = text.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    anyhow::ensure!(f.len() == 2, "child {model} m1-memory printed {text:?}");
    Ok((f[0], f[1]))
}

fn inspection<'a>(layers: &'a LayerMap, loss: &'a dyn LossFn, split: Option<&'a dyn EmbeddingSplit>, batch: Batch<'a>, r: u64) -> Inspection<'a> {
    let i = Inspection::new(layers, loss, batch).seeded(0, r);
    match split {
        Some(split) => i.with_embedding(split),
        None => i,
    }
}

/// What one estimate costs on the first batch: medians over the timed repeats (after a
/// warm-up of each), in seconds.
struct Estimates {
    /// M1 (K = 8) on the full batch, the default double backward.
    m1: f64,
    /// M1 (K = 8) on sub-batches of m = n / 4 (the trial the guard's calibration runs; a model
    /// whose samples interact probes the full batch there).
    m1_sub: f64,
    /// m the sub-batch estimate ran on (n where the samples interact).
    sub_m: usize,
    /// The largest |S_l(sub) - S_l(full)| / sqrt(se_sub^2 + se_full^2) over layers and repeats.
    sub_gap_se: f64,
    /// The mean over layers of se(sub)^2 / se(full)^2 relative to S_l^2, over the repeats.
    sub_variance_ratio: f64,
    m2: f64,
    m6: f64,
    m1_layers: usize,
    m2_layers: usize,
    m6_layers: usize,
    layers: usize,
}

fn time_estimates(s: &Setup, device: Device, repeats: usize) -> anyhow::Result<Estimates> {
    let layers = LayerMap::from_var_store(&s.vs)?;
    let loss = |x: &Tensor, y: &Tensor| s.net.loss(x, y);
    let (x, y, a) = &s.batches[0];
    let n = x.size()[0] as usize;
    let split = s.net.split();
    let inspect = |batch, r| inspection(&layers, &loss, split, batch, r);
    let m1_settings = SensitivitySettings { probes: 8, ..Default::default() };
    let sub = SensitivitySettings { probe_samples: Some(n / 4), ..m1_settings.clone() };
    let m2_settings = SubspaceSettings::default();
    let timed = |f: &dyn Fn() -> anyhow::Result<usize>| -> anyhow::Result<(f64, usize)> {
        sync(device);
        let t = Instant::now();
        let out = f()?;
        sync(device);
        Ok((t.elapsed().as_secs_f64(), out))
    };
    let measured = |m: &[Metric<Sensitivity>]| m.iter().filter(|m| m.measured().is_some()).count();
    let (mut m1, mut m1_sub, mut m2, mut m6) = (vec![], vec![], vec![], vec![]);
    let (mut gap, mut ratios, mut sub_m, mut counts) = (0.0f64, vec![], n, (0, 0, 0));
    for r in 0..=repeats {
        let full = inspect(Batch::new(x, y), r as u64).sensitivity(&m1_settings)?;
        let (t1, _) = timed(&|| Ok(measured(&inspect(Batch::new(x, y), r as u64).sensitivity(&m1_settings)?)))?;
        let by_sub = inspect(Batch::new(x, y), r as u64 + 1000).sensitivity(&sub)?;
        let (ts, _) = timed(&|| Ok(measured(&inspect(Batch::new(x, y), r as u64 + 1000).sensitivity(&sub)?)))?;
        let (t2, l2) = timed(&|| Ok(inspect(Batch::new(x, y).with_attribute(a), r as u64).subspace(&m2_settings)?.iter().filter(|m| m.measured().is_some()).count()))?;
        let (t6, l6) = timed(&|| Ok(inspect(Batch::new(x, y), r as u64).sample_isolation(&IsolationSettings::default())?.iter().filter(|m| m.measured().is_some()).count()))?;
        if r > 0 {
            m1.push(t1);
            m1_sub.push(ts);
            m2.push(t2);
            m6.push(t6);
        }
        let mut layer_ratios = vec![];
        for (f, b) in full.iter().zip(&by_sub) {
            if let (Some(f), Some(b)) = (f.measured(), b.measured()) {
                sub_m = b.probe_samples.unwrap_or(n);
                let se = (f.sensitivity_se.powi(2) + b.sensitivity_se.powi(2)).sqrt();
                if se > 0.0 {
                    gap = gap.max((b.sensitivity - f.sensitivity).abs() / se);
                }
                if f.sensitivity_se > 0.0 && b.sensitivity > 0.0 {
                    layer_ratios.push((b.sensitivity_se / b.sensitivity).powi(2) / (f.sensitivity_se / f.sensitivity).powi(2));
                }
            }
        }
        if !layer_ratios.is_empty() {
            ratios.push(layer_ratios.iter().sum::<f64>() / layer_ratios.len() as f64);
        }
        counts = (measured(&full), l2, l6);
    }
    let sub_variance_ratio = if ratios.is_empty() { f64::NAN } else { ratios.iter().sum::<f64>() / ratios.len() as f64 };
    Ok(Estimates {
        m1: median(m1),
        m1_sub: median(m1_sub),
        sub_m,
        sub_gap_se: gap,
        sub_variance_ratio,
        m2: median(m2),
        m6: median(m6),
        m1_layers: counts.0,
        m2_layers: counts.1,
        m6_layers: counts.2,
        layers: layers.layers().len(),
    })
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    if let Some(model) = &args.child {
        let s = Setup::new(model, device)?;
        if args.mode == "m1-memory" {
            let (before, after) = m1_memory(&s, device)?;
            println!("{before} {after}");
            return Ok(());
        }
        let (secs, estimates, not_applied, share, seen) = train(&s, device, args.steps, (args.mode == "guarded").then(|| guarded_settings(&args, args.steps)))?;
        let (m, k) = seen.route.unwrap_or((0, 0));
        println!("{secs} {estimates} {not_applied} {share} {} {} {m} {k}", peak_rss_kib(), seen.max_age_after_100);
        return Ok(());
    }
    let large_steps = args.large_steps.unwrap_or(if device == Device::Cpu { 20 } else { args.steps });
    println!(
        "gradguard real_models on {device:?}, {} libtorch threads; no policy, Settings::default() (budget 5%) with K = {} and M2/M6 cadences {} in the guarded runs, age bound lifted to the run\n",
        tch::get_num_threads(),
        args.probes,
        args.subspace_every.map_or("default".to_string(), |e| format!("{e} steps"))
    );
    let mut rows = Vec::new();
    for model in args.models.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let large = model == "resnet-11m";
        let repeats = if large && device == Device::Cpu { 1 } else { args.repeats.max(1) };
        let s = Setup::new(model, device)?;
        let (by_backward, by_train, plain) = estimate_steps(&s, device, repeats)?;
        println!(
            "{model}: a step that estimates (M1, K = 8), in plain training steps ({:.1} ms): backward_step {:.2} (estimate {:.2}), train_step {:.2} (estimate {:.2}); the shared forward and backward saves {:.2} steps",
            plain * 1e3,
            by_backward / plain,
            by_backward / plain - 1.0,
            by_train / plain,
            by_train / plain - 1.0,
            (by_backward - by_train) / plain
        );
        if args.estimate_step_only {
            continue;
        }
        let steps = if large { large_steps } else { args.steps };
        let plain = child(model, "unguarded", steps, &args)?;
        let guarded = child(model, "guarded", steps, &args)?;
        let step = plain.seconds / steps as f64;
        let e = time_estimates(&s, device, repeats)?;
        let n_layers = e.layers;
        let per_1000 = guarded.estimates as f64 * 1000.0 / steps as f64;
        let wall = guarded.seconds / plain.seconds;
        let rss = guarded.peak_rss_kib as f64 / plain.peak_rss_kib as f64;
        let coupled = e.sub_m == s.batches[0].0.size()[0] as usize;
        let age_target = if coupled { 200 } else { 100 };
        let age = if steps > 100 { guarded.max_age_after_100.to_string() } else { "-".into() };
        println!("{model}: {} parameters, {n_layers} layers, {steps} steps", s.params());
        println!("  wall time   guarded {:.2} s / unguarded {:.2} s = {wall:.3}  target <= 1.05: {}", guarded.seconds, plain.seconds, met(wall <= 1.05));
        println!("  estimates   {} in {steps} steps = {per_1000:.1} per 1,000 steps; guard share {:.3}; {} steps not applied", guarded.estimates, guarded.share, guarded.not_applied);
        println!("  M1 age      largest after step 100: {age} steps  target <= {age_target}: {}; the guard's last M1 probed m = {} samples with K = {}", met(steps > 100 && guarded.max_age_after_100 <= age_target), guarded.route.0, guarded.route.1);
        println!("  M1 (K=8)    full batch {:.1} ms = {:.2} training steps (step {:.1} ms; {}/{n_layers} layers measured)", e.m1 * 1e3, e.m1 / step, step * 1e3, e.m1_layers);
        println!(
            "  M1 sub      m = {} (K=8): {:.1} ms = {:.2} training steps; vs the full batch: largest gap {:.2} combined se (<= 3: {}), variance per probe {:.2}x{}",
            e.sub_m,
            e.m1_sub * 1e3,
            e.m1_sub / step,
            e.sub_gap_se,
            met(e.sub_gap_se <= 3.0),
            e.sub_variance_ratio,
            if coupled { " (the samples interact: the full batch)" } else { "" }
        );
        println!("  M2          {:.1} ms = {:.2} training steps ({}/{n_layers} layers measured)", e.m2 * 1e3, e.m2 / step, e.m2_layers);
        println!("  M6          {:.1} ms = {:.2} training steps ({}/{n_layers} layers measured)", e.m6 * 1e3, e.m6 / step, e.m6_layers);
        let (trained, with_m1) = m1_memory_of_child(model, &args)?;
        let columns = 2 * SubspaceSettings::default().samples_per_group as u64 * s.params() as u64 * 4;
        println!("  memory      M1 (K=8) alone adds {} MiB to the peak after 3 plain steps ({} -> {} MiB); M2 keeps 2m = {} per-sample gradients of {} MiB each, {} MiB", (with_m1.saturating_sub(trained)) / 1024, trained / 1024, with_m1 / 1024, 2 * SubspaceSettings::default().samples_per_group, s.params() * 4 / (1 << 20), columns / (1 << 20));
        println!("  peak RSS    guarded {} MiB / unguarded {} MiB = {rss:.3}  target <= 1.25: {}\n", guarded.peak_rss_kib / 1024, plain.peak_rss_kib / 1024, met(rss <= 1.25));
        rows.push(format!(
            "| {model} | {} | {steps} | {wall:.3} ({}) | {per_1000:.1} | {age} ({}) | m = {}, K = {} | {:.1} | {:.1} ({:.2} se, {:.2}x var) | {:.1} | {:.1} | {rss:.3} ({}) |",
            s.params(),
            met(wall <= 1.05),
            met(steps > 100 && guarded.max_age_after_100 <= age_target),
            guarded.route.0,
            guarded.route.1,
            e.m1 / step,
            e.m1_sub / step,
            e.sub_gap_se,
            e.sub_variance_ratio,
            e.m2 / step,
            e.m6 / step,
            met(rss <= 1.25)
        ));
    }
    println!("| model | parameters | steps | guarded / unguarded (<= 1.05) | estimates / 1,000 steps | largest M1 age after step 100 (<= 100; 200 with batch norm) | guard's M1 route | M1 K=8 full batch, in steps | M1 K=8 on m = n/4, in steps (gap to full; variance per probe) | M2 in steps | M6 in steps | peak RSS ratio (<= 1.25) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}
