//! What protection costs (issue 21, item 3), each figure measured side by side in one run:
//!
//! 1. noise per parameter: the host draw (ChaCha8, copied over when the gradient is not on the
//!    host: the only draw before device noise) against the device draw (libtorch's generator
//!    of the gradient's device, privately seeded: what a CUDA gradient now gets; on the CPU it
//!    is libtorch's CPU generator, which CPU gradients do NOT use, see defenses/src/noise.rs),
//!    and the whole noise defence (clip on the device, draw, add, finiteness read once);
//! 2. resnet-1m (examples/shared/resnet_model.rs at base width 20, 1.09M parameters, batches of
//!    32) trained unguarded, guarded without rules (observe-only) and guarded with a calibrated
//!    noise rung on every layer (a reconstruction-bound rule whose threshold every layer
//!    exceeds, `target = "threshold"`), each in its own child process of this binary: wall
//!    time of each, the ratios to the unguarded run, and how many layers carried noise;
//! 3. the protection of one resnet-1m release alone: a noise defence on every layer's gradient
//!    with the finiteness read once for the release (as the guard applies it) and read once per
//!    layer, beside a plain training step.
//!
//!     cargo bench --bench protection_cost -- [--device cpu|cuda] [--steps 300] [--repeats 5]
use clap::Parser;
use gradguard::defenses::{apply_all, apply_all_deferred, derive_seed, draw_noise, Defence, FiniteChecks, NoiseSource};
use gradguard::guard::{measure::parse_device, LayerMap};
use std::cell::RefCell;
use gradguard::{Batch, GuardedOptimizer, Policy, Settings};
use std::time::Instant;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

#[path = "../examples/shared/resnet_model.rs"]
mod resnet_model;
#[path = "../examples/shared/synthetic.rs"]
mod synthetic;
#[path = "shared/measure.rs"]
mod measure;

use measure::{median, peak_rss_kib, sync};
use resnet_model::ResNet;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Training steps of each timed resnet-1m run.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Timed repeats of each noise draw (after a warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Internal: run one resnet-1m training job in this mode and print its figures.
    #[arg(long, hide = true)]
    child: Option<String>,
    #[arg(long, hide = true)]
    bench: bool,
}

/// Calibrated noise on every layer: without noise a layer's reconstruction bound is unbounded
/// (+inf bits), above any threshold, so the first estimate puts the rung in force everywhere.
const NOISE_POLICY: &str = r#"version = 2
[[rule]]
name = "noise-everywhere"
metric = "reconstruction_bound_bits"
layers = ["*"]
act_above = 0.01
relax_below = 0.002
ladder = [{ action = "noise", clip_norm = 10.0, target = "threshold" }]
"#;

/// Median seconds of `f` over `repeats` runs after one warm-up.
fn timed(device: Device, repeats: usize, f: &dyn Fn() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for r in 0..=repeats {
        sync(device);
        let t = Instant::now();
        f()?;
        sync(device);
        if r > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// Section 1: nanoseconds per parameter of each noise source and of the whole defence.
fn noise_per_parameter(device: Device, repeats: usize) -> anyhow::Result<()> {
    println!("noise per parameter on {device:?} (f32, median of {repeats}), ns:");
    println!("| parameters | host ChaCha8{} | device draw (libtorch, private) | noise defence, whole |", if device == Device::Cpu { "" } else { " + copy" });
    println!("|---|---|---|---|");
    let defence = Defence::Noise { clip_norm: 1.0, multiplier: 1.0 };
    for n in [16_384i64, 262_144, 1_048_576] {
        let like = Tensor::f_zeros([n], (Kind::Float, device))?;
        let per = |t: f64| t * 1e9 / n as f64;
        let host = timed(device, repeats, &|| Ok(drop(draw_noise(&like, 1.0, 7, NoiseSource::Host)?)))?;
        let on_device = timed(device, repeats, &|| Ok(drop(draw_noise(&like, 1.0, 7, NoiseSource::Device)?)))?;
        let whole = timed(device, repeats, &|| Ok(drop(defence.apply(&like, 7)?)))?;
        println!("| {n} | {:.2} | {:.2} | {:.2} |", per(host), per(on_device), per(whole));
    }
    println!();
    Ok(())
}

/// The model and its batches.
struct Setup {
    vs: nn::VarStore,
    net: ResNet,
    batches: Vec<(Tensor, Tensor)>,
}

impl Setup {
    fn new(device: Device) -> anyhow::Result<Self> {
        tch::manual_seed(1);
        let images = synthetic::Images::new()?;
        let batches = (0..8).map(|_| images.batch(32).map(|(x, y, _)| (x.to_device(device), y.to_device(device)))).collect::<Result<_, _>>()?;
        tch::manual_seed(0);
        let vs = nn::VarStore::new(device);
        let net = ResNet::new(&vs.root(), &[20, 40, 80, 160], 2, synthetic::IMAGE_CLASSES);
        Ok(Self { vs, net, batches })
    }

    fn optimizer(&self) -> anyhow::Result<nn::Optimizer> {
        Ok(nn::Sgd { momentum: 0.9, ..Default::default() }.build(&self.vs, 0.05)?)
    }
}

/// Section 3: one release's protection (noise on every layer) against a plain step, seconds:
/// (read once per release, read once per layer, plain step, layers, parameters).
fn protection_per_release(device: Device, repeats: usize) -> anyhow::Result<(f64, f64, f64, usize, i64)> {
    let s = Setup::new(device)?;
    let layers = LayerMap::from_var_store(&s.vs)?;
    let opt = RefCell::new(s.optimizer()?);
    let (x, y) = &s.batches[0];
    let plain = timed(device, repeats, &|| Ok(opt.borrow_mut().backward_step(&s.net.loss(x, y)?)))?;
    let grads: Vec<Tensor> = (0..layers.len())
        .filter_map(|l| layers.join(l, &layers.layers()[l].params.iter().map(|p| p.tensor.grad()).collect::<Vec<_>>()).transpose())
        .collect::<Result<_, _>>()?;
    let chain = [Defence::Noise { clip_norm: 10.0, multiplier: 0.5 }];
    let once = timed(device, repeats, &|| {
        let mut checks = FiniteChecks::new();
        for (l, g) in grads.iter().enumerate() {
            drop(apply_all_deferred(&chain, g, derive_seed(3, l), &mut checks)?);
        }
        Ok(checks.verify()?)
    })?;
    let per_layer = timed(device, repeats, &|| {
        for (l, g) in grads.iter().enumerate() {
            drop(apply_all(&chain, g, derive_seed(3, l))?);
        }
        Ok(())
    })?;
    let params = grads.iter().map(|g| g.numel() as i64).sum();
    Ok((once, per_layer, plain, grads.len(), params))
}

/// One resnet-1m run in `mode` (unguarded, observe, noise): (seconds, steps not applied,
/// estimates, layers with noise in force at the end, layers).
fn train(device: Device, steps: usize, mode: &str) -> anyhow::Result<(f64, usize, usize, usize, usize)> {
    let s = Setup::new(device)?;
    let mut warm = s.optimizer()?;
    for (x, y) in s.batches.iter().take(2) {
        warm.backward_step(&s.net.loss(x, y)?);
    }
    // The default budget (5%) with the age bound lifted to the run, as the other benches do:
    // every step trains, and the guard's cost is the budget's and the protection's.
    let settings = Settings { max_estimate_age_steps: (steps as u64).max(Settings::default().estimate_every), ..Settings::default() };
    let (mut not_applied, mut estimates, mut noised, mut layers) = (0, 0, 0, 0);
    sync(device);
    let started = Instant::now();
    if mode == "unguarded" {
        let mut opt = s.optimizer()?;
        for step in 0..steps {
            let (x, y) = &s.batches[step % s.batches.len()];
            opt.backward_step(&s.net.loss(x, y)?);
        }
    } else {
        let policy = match mode {
            "observe" => Policy::permissive(),
            "noise" => Policy::from_toml_str(NOISE_POLICY, "noise-everywhere")?,
            other => anyhow::bail!("unknown mode {other:?}"),
        };
        let loss = |x: &Tensor, y: &Tensor| s.net.loss(x, y);
        let mut guarded = GuardedOptimizer::builder(&s.vs, s.optimizer()?).policy(policy.with_settings(settings)?).loss(loss).build()?;
        for step in 0..steps {
            let (x, y) = &s.batches[step % s.batches.len()];
            match guarded.train_step(&Batch::new(x, y)) {
                Ok(r) if r.is_released() => estimates += r.report().estimated as usize,
                _ => not_applied += 1,
            }
        }
        let levels = guarded.guard().protection().layer_levels();
        noised = levels.iter().filter(|l| **l > 0).count();
        layers = levels.len();
    }
    sync(device);
    Ok((started.elapsed().as_secs_f64(), not_applied, estimates, noised, layers))
}

/// A run in a child process: (seconds, not applied, estimates, noised layers, layers, peak RSS KiB).
fn child(mode: &str, args: &Args) -> anyhow::Result<(f64, usize, usize, usize, usize, u64)> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--child", mode, "--device", &args.device, "--steps", &args.steps.to_string()])
        .output()?;
    anyhow::ensure!(out.status.success(), "child {mode} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let f: Vec<&str> = text.split_whitespace().collect();
    anyhow::ensure!(f.len() == 6, "child {mode} printed {text:?}");
    Ok((f[0].parse()?, f[1].parse()?, f[2].parse()?, f[3].parse()?, f[4].parse()?, f[5].parse()?))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    if let Some(mode) = &args.child {
        let (secs, not_applied, estimates, noised, layers) = train(device, args.steps, mode)?;
        println!("{secs} {not_applied} {estimates} {noised} {layers} {}", peak_rss_kib());
        return Ok(());
    }
    println!("gradguard protection_cost on {device:?}, {} libtorch threads\n", tch::get_num_threads());
    noise_per_parameter(device, args.repeats.max(1))?;
    let (once, per_layer, plain_step, noised, params) = protection_per_release(device, args.repeats.max(1))?;
    println!("one resnet-1m release, noise on {noised} layers ({params} parameters), median of {}:", args.repeats.max(1));
    println!("  finiteness read once per release {:.2} ms, once per layer {:.2} ms; a plain training step {:.1} ms", once * 1e3, per_layer * 1e3, plain_step * 1e3);
    println!("  (step + protection) / step = {:.3} (read once per release)\n", (plain_step + once) / plain_step);
    let steps = args.steps;
    let (plain, _, _, _, _, plain_rss) = child("unguarded", &args)?;
    let (observe, observe_na, observe_est, _, _, observe_rss) = child("observe", &args)?;
    let (noise, noise_na, noise_est, noised, layers, noise_rss) = child("noise", &args)?;
    let mib = |kib: u64| kib / 1024;
    println!("resnet-1m, {steps} steps, default budget (5%), age bound lifted:");
    println!("| run | wall time (s) | / unguarded | estimates | steps not applied | peak RSS (MiB) |");
    println!("|---|---|---|---|---|---|");
    println!("| unguarded | {plain:.2} | 1 | - | - | {} |", mib(plain_rss));
    println!("| observe-only (no rules) | {observe:.2} | {:.3} | {observe_est} | {observe_na} | {} |", observe / plain, mib(observe_rss));
    println!("| calibrated noise on every layer ({noised}/{layers} layers at the end) | {noise:.2} | {:.3} (target <= 1.05) | {noise_est} | {noise_na} | {} |", noise / plain, mib(noise_rss));
    println!("\nprotection alone (noise run - observe-only run) / unguarded: {:.3}", (noise - observe) / plain);
    Ok(())
}
