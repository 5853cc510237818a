//! The guarded digits CNN with the Prometheus exporter on: every step's report goes to the
//! exporter, served on `/metrics`, `/healthz` and `/report` while training runs.
//!
//!     cargo run --release --example exporter_demo -- --addr 127.0.0.1:9464 --steps 0
//!
//! `--steps 0` trains until killed (cycling through the data); `--linger SECS` keeps serving
//! after the last step. The first line on stdout is `gradguard exporter listening on ADDR`
//! (the real port when `--addr` names port 0).
//!
//! The guard runs the example policy (`examples/policy.toml`, or `--policy FILE`); the
//! exporter is a report sink of the guard, so every decided release (blocked ones included)
//! reaches it off the training thread: leakage gauges, thresholds, protection levels, defence
//! actions, release outcomes, the aggregation floor, estimate durations and ages, dropped
//! estimates, training steps and the policy info.
use gradguard::data::Digits;
use gradguard::exporter::DEFAULT_ADDR;
use gradguard::guard::{Policy, Settings, measure::parse_device};
use gradguard::models::DigitsCnn;
use gradguard::{Batch, GuardedOptimizer};
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tch::{nn, nn::OptimizerConfig, Tensor};

#[derive(clap::Parser)]
#[command(about = "Guarded digits-CNN training with the gradguard Prometheus exporter")]
struct Args {
    /// Address of the metrics server (port 0: any free port, printed on the first line).
    #[arg(long, default_value_t = DEFAULT_ADDR)]
    addr: SocketAddr,
    /// Training steps; 0 trains until the process is killed.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Samples per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Estimate the leakage metrics at most every this many steps (overrides the policy's).
    #[arg(long)]
    estimate_every: Option<u64>,
    /// Policy file (default: examples/policy.toml).
    #[arg(long)]
    policy: Option<std::path::PathBuf>,
    /// Seed of the model initialisation, the data order and every estimate.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// Pause between steps, in milliseconds (to watch a slow run in Grafana).
    #[arg(long, default_value_t = 0)]
    step_interval_ms: u64,
    /// Print the report table at every estimate.
    #[arg(long)]
    print_reports: bool,
    /// Keep serving this many seconds after the last step.
    #[arg(long, default_value_t = 0)]
    linger: u64,
}

fn main() -> anyhow::Result<()> {
    let args: Args = clap::Parser::parse();
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let device = parse_device(&args.device)?;
    let digits = Digits::embedded()?;
    let (train, test) = digits.split(0.2, args.seed);
    tch::manual_seed(args.seed as i64);
    let vs = nn::VarStore::new(device);
    let net = DigitsCnn::new(&vs.root());
    let mut policy = match &args.policy {
        Some(path) => Policy::load(path)?,
        None => Policy::from_toml_str(include_str!("policy.toml"), "examples/policy.toml")?,
    };
    if let Some(every) = args.estimate_every {
        let settings = policy.settings();
        let max_estimate_age_steps = settings.max_estimate_age_steps.max(every);
        policy = policy.with_settings(Settings { estimate_every: every, max_estimate_age_steps, ..settings.clone() })?;
    }
    let loss_fn = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
    let mut opt = GuardedOptimizer::builder(&vs, nn::Adam::default().build(&vs, 1e-3)?).policy(policy).loss(loss_fn).build()?;
    let metrics = gradguard::exporter::attach(opt.guard_mut(), args.addr)?;
    let addr = metrics.local_addr();
    println!("gradguard exporter listening on {addr}");
    println!("  metrics: http://{addr}/metrics  report: http://{addr}/report  layers: {:?}", opt.guard().layers().names());
    std::io::stdout().flush()?;

    let started = Instant::now();
    let mut step: u64 = 0;
    while args.steps == 0 || step < args.steps {
        let idx: Vec<usize> =
            (0..args.batch_size).map(|i| train[(step as usize * args.batch_size + i) % train.len()]).collect();
        let (x, y, heavy_stroke) = digits.batch(&idx, device)?;
        let loss = net.f_loss(&x, &y)?;
        let release = opt.backward_step(&loss, &Batch::new(&x, &y).with_attribute(&heavy_stroke))?;
        if let Some(reason) = release.block_reason() {
            // The guard refused the release (non-finite gradient, policy block): nothing applied.
            eprintln!("step {step}: release blocked: {reason}");
        } else if args.print_reports && release.report().estimated {
            println!("{}", release.report().table());
        }
        step += 1;
        if args.step_interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.step_interval_ms));
        }
    }
    let accuracy = digits.accuracy(&test, device, |x| net.f_forward(x))?;
    println!("done: {step} steps in {:.1}s, test accuracy {accuracy:.3}", started.elapsed().as_secs_f64());
    if args.linger > 0 {
        println!("serving metrics for {} more seconds", args.linger);
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_secs(args.linger));
    }
    drop(opt);
    Ok(())
}
