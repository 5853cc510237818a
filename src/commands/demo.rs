//! `gradguard demo`: the guarded digits CNN, the main job of the README.
use anyhow::Context;
use gradguard::data::Digits;
use gradguard::guard::parse_device;
use gradguard::models::DigitsCnn;
use gradguard::{Batch, Guard, GuardConfig, GuardedOptimizer};
use std::path::PathBuf;
use std::time::Instant;
use tch::{nn, nn::OptimizerConfig, Tensor};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Seed of the model initialisation, the data order and every estimate.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Estimate the leakage metrics every this many steps.
    #[arg(long, default_value_t = 25)]
    estimate_every: u64,
    /// Folder for the final report (JSON).
    #[arg(long, default_value = "out")]
    out: PathBuf,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let device = parse_device(&args.device)?;
    let digits = Digits::embedded()?;
    let (train, test) = digits.split(0.2, args.seed);
    tch::manual_seed(args.seed as i64);
    let vs = nn::VarStore::new(device);
    let net = DigitsCnn::new(&vs.root());
    let config = GuardConfig { seed: args.seed, estimate_every: args.estimate_every, ..Default::default() };
    let guard = Guard::new(&vs, config)?;
    println!("gradguard demo: digits CNN, {} train / {} test samples, layers {:?}", train.len(), test.len(), guard.layers().names());
    let mut opt = GuardedOptimizer::new(nn::Adam::default().build(&vs, 1e-3)?, guard);
    let loss_fn = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
    let started = Instant::now();
    let mut last = None;
    for step in 0..args.steps {
        let idx: Vec<usize> = (0..args.batch_size).map(|i| train[(step * args.batch_size + i) % train.len()]).collect();
        let (x, y, heavy_stroke) = digits.batch(&idx, device)?;
        let loss = net.f_loss(&x, &y)?;
        let report = opt.backward_step(&loss, Batch::new(&x, &y).with_attribute(&heavy_stroke), loss_fn)?;
        if report.estimated {
            println!("{}", report.table());
        }
        last = Some(report);
    }
    let accuracy = digits.accuracy(&test, device, |x| net.f_forward(x))?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join("report.json");
    if let Some(report) = last {
        std::fs::write(&path, report.to_json()).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "done: {} steps in {:.1}s, test accuracy {:.3}, last report {}",
        args.steps,
        started.elapsed().as_secs_f64(),
        accuracy,
        path.display()
    );
    Ok(())
}
