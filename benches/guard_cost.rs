//! What the guard costs, each figure a ratio measured side by side in one run:
//!
//! 1. overhead: guarded / unguarded training wall time on the digits CNN, default budget;
//! 2. depth: one full M1 estimate (K = 8) on MLPs of 2, 4, 8, 16 layers with the same total
//!    parameter count, relative to 2 layers;
//! 3. estimate vs step: one full M1 estimate (K = 8) in training-step equivalents (digits CNN);
//! 4. memory: peak RSS guarded / unguarded (separate child processes);
//! 5. the one-JVP estimator against per-layer VJP probing at equal K: speed ratio, and both
//!    S_l within their standard errors.
//!
//!     cargo bench --bench guard_cost -- [--device cpu|cuda] [--steps 2000] [--repeats 3]
use clap::Parser;
use gradguard::data::Digits;
use gradguard::guard::{Inspection, Settings, measure::mean_and_standard_error};
use gradguard::guard::{LayerMap, Policy, measure::{parse_device, SensitivitySettings}};
use gradguard::models::{DigitsCnn, Mlp};
use gradguard::{Batch, GuardedOptimizer};
use std::time::Instant;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

#[path = "shared/measure.rs"]
mod measure;
use measure::{median, peak_rss_kib, sync};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Training steps per timed run (overhead, memory): long enough for the budget, not the
    /// first estimate, to set the guard's cost.
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    /// Timed repeats of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Internal: run one training job and print its peak RSS (memory ratio).
    #[arg(long, hide = true)]
    rss_child: Option<String>,
    #[arg(long, hide = true)]
    bench: bool,
}

const POLICY: &str = include_str!("../examples/policy.toml");

/// How a timed run is guarded.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Unguarded,
    /// The example policy at the default budget.
    Policy,
    /// The example policy's settings without its rules: the guard only observes.
    Observe,
}

/// Trains the digits CNN for `steps` steps in `mode`; returns (seconds, blocked or held steps).
fn train(digits: &Digits, device: Device, steps: usize, mode: Mode) -> anyhow::Result<(f64, usize)> {
    let (train, _) = digits.split(0.2, 0);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let net = DigitsCnn::new(&vs.root());
    let mut opt = nn::Adam::default().build(&vs, 1e-3)?;
    let batches: Vec<(Tensor, Tensor, Tensor)> = (0..16)
        .map(|b| digits.batch(&(0..64).map(|i| train[(b * 64 + i) % train.len()]).collect::<Vec<_>>(), device))
        .collect::<Result<_, _>>()?;
    let (mut not_applied, mut estimates) = (0, 0);
    sync(device);
    let started = Instant::now();
    if mode != Mode::Unguarded {
        // The example policy at the default budget (5%); estimates may then be rarer than its
        // age bound allows, which would block releases: the bound is lifted so that every
        // step trains and the two runs do the same work.
        let text = match mode {
            Mode::Observe => POLICY.split("[[rule]]").next().unwrap_or(POLICY),
            _ => POLICY,
        };
        let policy = Policy::from_toml_str(text, "examples/policy.toml")?;
        let settings = Settings { aggregation_floor: 1, budget_share: 0.05, max_estimate_age_steps: steps as u64, ..policy.settings().clone() };
        let loss_fn = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
        let mut guarded = GuardedOptimizer::builder(&vs, opt).policy(policy.with_settings(settings)?).loss(loss_fn).build()?;
        let mut last = None;
        for step in 0..steps {
            let (x, y, a) = &batches[step % batches.len()];
            // The step driver: the loss runs once per step, shared with the estimate.
            match guarded.train_step(&Batch::new(x, y).with_attribute(a)) {
                Ok(r) if r.is_released() => {
                    estimates += r.report().estimated as usize;
                    last = Some(r.into_report());
                }
                _ => not_applied += 1,
            }
        }
        let health = &last.expect("a released step").health;
        eprintln!("   guarded run: {estimates} estimates ({:.1} per 1,000 steps), guard share {:.3} (estimates {:.3}), {not_applied} steps not applied", estimates as f64 * 1000.0 / steps as f64, health.spent_share, health.estimate_share);
    } else {
        for step in 0..steps {
            let (x, y, _) = &batches[step % batches.len()];
            let loss = net.f_loss(x, y)?;
            opt.backward_step(&loss);
        }
    }
    sync(device);
    Ok((started.elapsed().as_secs_f64(), not_applied))
}

fn rss_of_child(mode: &str, args: &Args) -> anyhow::Result<u64> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--rss-child", mode, "--device", &args.device, "--steps", &args.steps.to_string()])
        .output()?;
    anyhow::ensure!(out.status.success(), "child {mode} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

/// An MLP of `depth` linear layers on 64 inputs and 10 outputs, hidden width chosen so the
/// model has about `params` parameters.
fn mlp_widths(depth: usize, params: f64) -> Vec<i64> {
    let (a, b) = ((depth - 2) as f64, 64.0 + 10.0 + (depth - 1) as f64);
    let h = if depth == 2 { params / b } else { (-b + (b * b + 4.0 * a * params).sqrt()) / (2.0 * a) };
    let h = h.round().max(1.0) as i64;
    let mut w = vec![64];
    w.extend(std::iter::repeat_n(h, depth - 1));
    w.push(10);
    w
}

fn time_m1(layers: &LayerMap, loss: &dyn gradguard::LossFn, x: &Tensor, y: &Tensor, device: Device, repeats: usize) -> anyhow::Result<f64> {
    let settings = SensitivitySettings { probes: 8, ..Default::default() };
    Inspection::new(layers, loss, Batch::new(x, y)).seeded(0, 0).sensitivity(&settings)?; // warm-up
    let mut times = Vec::new();
    for r in 0..repeats {
        sync(device);
        let t = Instant::now();
        Inspection::new(layers, loss, Batch::new(x, y)).seeded(0, r as u64).sensitivity(&settings)?;
        sync(device);
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// The slow path: per layer and probe, a double backward restricted to that layer.
fn per_layer_probing(layers: &LayerMap, loss: &dyn gradguard::LossFn, x: &Tensor, y: &Tensor, probes: usize, seed: i64) -> anyhow::Result<Vec<(f64, f64)>> {
    let n = x.size()[0] as f64;
    let mut out = Vec::new();
    tch::manual_seed(seed);
    for layer in layers.layers() {
        let params: Vec<Tensor> = layer.params.iter().map(|p| p.tensor.shallow_clone()).collect();
        let xr = x.detach().set_requires_grad(true);
        let l = loss.loss(&xr, y)?;
        let g = Tensor::f_run_backward(&[&l], &params, true, true)?;
        let w: Vec<Tensor> = g.iter().map(|g| g.zeros_like().set_requires_grad(true)).collect();
        let inner = g.iter().zip(&w).map(|(g, w)| (g * w).sum(Kind::Double)).reduce(|a, b| a + b).unwrap();
        let h = Tensor::f_run_backward(&[&inner], &[&xr], true, true)?.remove(0);
        let mut per = Vec::new();
        for _ in 0..probes {
            let v = Tensor::randn(x.size(), (x.kind(), x.device()));
            let t = (&h * &v).sum(Kind::Double);
            let jv = Tensor::f_run_backward(&[&t], &w, true, false)?;
            per.push(jv.iter().map(|j| j.square().sum(Kind::Double).double_value(&[])).sum::<f64>() / n);
        }
        let (s2, se2) = mean_and_standard_error(&per);
        let s = s2.sqrt();
        out.push((s, se2 / (2.0 * s)));
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    tch::set_num_threads(tch::get_num_threads());
    let digits = Digits::embedded()?;
    if let Some(mode) = &args.rss_child {
        train(&digits, device, args.steps, if mode == "guarded" { Mode::Policy } else { Mode::Unguarded })?;
        println!("{}", peak_rss_kib());
        return Ok(());
    }
    println!("gradguard guard_cost on {device:?}, {} libtorch threads, {} steps x {} repeats\n", tch::get_num_threads(), args.steps, args.repeats);

    // 1. Overhead (alternating runs, medians).
    train(&digits, device, 50, Mode::Policy)?;
    let (mut plain, mut guarded, mut observed, mut skipped) = (vec![], vec![], vec![], 0);
    for _ in 0..args.repeats {
        plain.push(train(&digits, device, args.steps, Mode::Unguarded)?.0);
        let (t, s) = train(&digits, device, args.steps, Mode::Policy)?;
        guarded.push(t);
        skipped += s;
        observed.push(train(&digits, device, args.steps, Mode::Observe)?.0);
    }
    let (plain, guarded, observed) = (median(plain), median(guarded), median(observed));
    println!("1. overhead      guarded / unguarded wall time = {:.3}  ({:.3} s vs {:.3} s for {} steps; {} guarded steps not applied)  target <= 1.05", guarded / plain, guarded, plain, args.steps, skipped);
    println!("1. observe-only  no rules / unguarded wall time = {:.3}  ({:.3} s vs {:.3} s)", observed / plain, observed, plain);

    // 2. Depth, at the demo's batch (64) and a larger one (512): with tiny layers the cost of
    //    a backward pass is per autograd node, not per FLOP, so the ratio depends on the batch.
    let x = digits.batch(&(0..64).collect::<Vec<_>>(), device)?;
    let x512 = digits.batch(&(0..512).collect::<Vec<_>>(), device)?;
    for (n, (xs, ys)) in [(64, (x.0.flatten(1, -1), x.1.shallow_clone())), (512, (x512.0.flatten(1, -1), x512.1.shallow_clone()))] {
        let mut depth_times = Vec::new();
        for depth in [2usize, 4, 8, 16] {
            tch::manual_seed(0);
            let vs = nn::VarStore::new(device);
            let widths = mlp_widths(depth, 100_000.0);
            let mlp = Mlp::new(&vs.root(), &widths);
            let layers = LayerMap::from_var_store(&vs)?;
            let loss = |x: &Tensor, y: &Tensor| mlp.f_loss(x, y);
            let t = time_m1(&layers, &loss, &xs, &ys, device, args.repeats.max(5))?;
            depth_times.push(t);
            println!("2. depth {depth:>2} n={n:<3} M1 (K=8) {:.2} ms, {} parameters, hidden width {}", t * 1e3, layers.numel(), widths[1]);
        }
        println!("2. depth   n={n:<3} 16-layer / 2-layer = {:.3}  target <= 1.5", depth_times[3] / depth_times[0]);
    }

    // 3. Estimate vs step (digits CNN, batch 64).
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let net = DigitsCnn::new(&vs.root());
    let layers = LayerMap::from_var_store(&vs)?;
    let loss = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
    let (cx, cy) = (&x.0, &x.1);
    let m1 = time_m1(&layers, &loss, cx, cy, device, args.repeats.max(5))?;
    let mut opt = nn::Sgd::default().build(&vs, 0.0)?;
    for _ in 0..5 {
        opt.backward_step(&net.f_loss(cx, cy)?);
    }
    let mut steps = Vec::new();
    for _ in 0..args.repeats.max(5) {
        sync(device);
        let t = Instant::now();
        for _ in 0..20 {
            opt.backward_step(&net.f_loss(cx, cy)?);
        }
        sync(device);
        steps.push(t.elapsed().as_secs_f64() / 20.0);
    }
    let step = median(steps);
    println!("3. estimate      one M1 estimate (K=8) = {:.2} training steps ({:.2} ms vs {:.3} ms)  target <= 18", m1 / step, m1 * 1e3, step * 1e3);

    // 4. Memory.
    let rss_plain = rss_of_child("unguarded", &args)?;
    let rss_guarded = rss_of_child("guarded", &args)?;
    println!("4. memory        peak RSS guarded / unguarded = {:.3}  ({} MiB vs {} MiB)  target <= 1.25", rss_guarded as f64 / rss_plain as f64, rss_guarded / 1024, rss_plain / 1024);

    // 5. One JVP for all layers vs per-layer probing, equal K.
    let probes = 32;
    let settings = SensitivitySettings { probes, ..Default::default() };
    let t = Instant::now();
    let fast = Inspection::new(&layers, &loss, Batch::new(cx, cy)).seeded(3, 0).sensitivity(&settings)?;
    sync(device);
    let fast_t = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let slow = per_layer_probing(&layers, &loss, cx, cy, probes, 4)?;
    sync(device);
    let slow_t = t.elapsed().as_secs_f64();
    let mut agree = true;
    for ((name, f), (s, se)) in layers.names().iter().zip(&fast).zip(&slow) {
        let f = f.measured().expect("measured");
        let z = (f.sensitivity - s).abs() / (f.sensitivity_se.powi(2) + se.powi(2)).sqrt();
        agree &= z < 3.0;
        println!("5. {name:<6}       one-JVP S_l {:.4} ± {:.4}, per-layer {:.4} ± {:.4} ({z:.2} combined se)", f.sensitivity, f.sensitivity_se, s, se);
    }
    println!("5. slow path     per-layer / one-JVP time = {:.2}  ({:.1} ms vs {:.1} ms at K = {probes}); agree within 3 se: {agree}", slow_t / fast_t, slow_t * 1e3, fast_t * 1e3);

    // 6. CPU/CUDA parity: the same model, batch and probes (drawn on the host) on both.
    if device != Device::Cpu {
        tch::manual_seed(0);
        let cpu_vs = nn::VarStore::new(Device::Cpu);
        let cpu_net = DigitsCnn::new(&cpu_vs.root());
        let mut gpu_vs = nn::VarStore::new(device);
        let gpu_net = DigitsCnn::new(&gpu_vs.root());
        gpu_vs.copy(&cpu_vs)?;
        let (x_cpu, y_cpu) = (cx.to_device(Device::Cpu), cy.to_device(Device::Cpu));
        let cpu_loss = |x: &Tensor, y: &Tensor| cpu_net.f_loss(x, y);
        let gpu_loss = |x: &Tensor, y: &Tensor| gpu_net.f_loss(x, y);
        let on_cpu = Inspection::new(&LayerMap::from_var_store(&cpu_vs)?, &cpu_loss, Batch::new(&x_cpu, &y_cpu)).seeded(9, 0).sensitivity(&settings)?;
        let on_gpu = Inspection::new(&LayerMap::from_var_store(&gpu_vs)?, &gpu_loss, Batch::new(cx, cy)).seeded(9, 0).sensitivity(&settings)?;
        for ((name, c), g) in layers.names().iter().zip(&on_cpu).zip(&on_gpu) {
            let (c, g) = (c.measured().expect("cpu"), g.measured().expect("gpu"));
            println!("6. parity {name:<6} S_l cpu {:.6} cuda {:.6}, relative difference {:.2e}", c.sensitivity, g.sensitivity, (c.sensitivity - g.sensitivity).abs() / c.sensitivity);
        }
    }
    Ok(())
}
