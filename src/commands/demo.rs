//! `gradguard demo`: the showcase and the README's main job. Trains the digits CNN on the
//! shipped data with the guard, a policy (the example policy by default) and the Prometheus
//! exporter on; shows a progress bar and a live per-layer table; ends with a summary of the
//! decisions and where the report and the audit log are.
use anyhow::Context;
use gradguard::data::Digits;
use gradguard::guard::{Policy, measure::parse_device};
use gradguard::models::DigitsCnn;
use gradguard::guard::measure::OwnedBatch;
use gradguard::run::{PolicyReloader, RunLoop, Stepper, StopSignal};
use gradguard::GuardedOptimizer;
use std::net::SocketAddr;
use std::path::PathBuf;
use tch::{nn, nn::OptimizerConfig, Tensor};

/// The example policy, embedded so that the demo runs from any folder.
const EXAMPLE_POLICY: &str = include_str!("../../examples/policy.toml");

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Training steps.
    #[arg(long, default_value_t = 1500)]
    steps: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Policy file (default: examples/policy.toml, built in).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Where the Prometheus exporter listens.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of the model initialisation and the data order (the policy seeds the guard).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rotate the audit log when a file reaches this many bytes.
    #[arg(long, default_value_t = gradguard::guard::decide::DEFAULT_MAX_FILE_BYTES)]
    audit_max_bytes: u64,
    /// Steps between the audit log's checkpoints (the counts of unchanged releases).
    #[arg(long, default_value_t = gradguard::guard::decide::DEFAULT_CHECKPOINT_EVERY)]
    checkpoint_every: u64,
    /// Folder for the final report (report.json), the audit log (audit.jsonl) and the run
    /// report (report.html).
    #[arg(long, default_value = "out")]
    out: PathBuf,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let device = parse_device(&args.device)?;
    let policy = match &args.policy {
        Some(path) => Policy::load(path)?,
        None => Policy::from_toml_str(EXAMPLE_POLICY, "examples/policy.toml (built in)")?,
    };
    let digits = Digits::embedded()?;
    let (train, test) = digits.split(0.2, args.seed);
    tch::manual_seed(args.seed as i64);
    let vs = nn::VarStore::new(device);
    let net = DigitsCnn::new(&vs.root());
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let audit_path = args.out.join("audit.jsonl");
    // An earlier run's log is kept: this run continues its chain.
    // SIGHUP reloads the policy file between steps (without --policy, SIGHUP ends the run).
    let reload = args.policy.as_ref().map(PolicyReloader::on_sighup).transpose()?;
    // Ctrl-C or SIGTERM ends the run between steps, with its log closed and its summary.
    let stop = StopSignal::install()?;
    let loss_fn = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
    let mut opt = GuardedOptimizer::builder(&vs, nn::Adam::default().build(&vs, 1e-3)?)
        .policy(policy)
        .loss(loss_fn)
        .audit_log(&audit_path)
        .audit_rotation(args.audit_max_bytes)
        .audit_checkpoint_every(args.checkpoint_every)
        .build()?;
    // Prometheus: a report sink of the guard's, served until `metrics` is dropped.
    let metrics = gradguard::exporter::attach(opt.guard_mut(), args.metrics_addr)?;
    let addr = metrics.local_addr();
    let guard = opt.guard();
    println!("gradguard demo: digits CNN on {} train / {} test samples, {device:?}", train.len(), test.len());
    println!("{}", super::progress::guard_header(&guard.layers().names(), guard.policy(), Some(addr), &audit_path));
    println!("live page: http://{addr}/");
    if let Some(r) = &reload {
        println!("policy reload: kill -HUP {} re-reads {}\n", std::process::id(), r.path().display());
    }

    let bar = super::progress::steps_bar(args.steps);
    let batches = |step: usize| {
        let idx: Vec<usize> = (0..args.batch_size).map(|i| train[(step * args.batch_size + i) % train.len()]).collect();
        let (x, y, heavy_stroke) = digits.batch(&idx, device).map_err(gradguard::models::ModelError::from)?;
        // Sample ids let the run ledger count each image's releases exactly.
        let ids = Tensor::f_from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>())?;
        Ok(OwnedBatch { inputs: x, targets: y, attribute: Some(heavy_stroke), sample_ids: Some(ids) })
    };
    let mut stepper = Stepper::Guarded(Box::new(opt));
    let run = RunLoop { stop: Some(stop), reload }.run(&mut stepper, args.steps, batches, |p| {
        if let Some(outcome) = p.reload {
            bar.suspend(|| println!("step {}: {outcome}", p.step));
        }
        let Some(release) = p.release else { return };
        super::progress::show_release(&bar, p.step, release);
        if let (true, Some(guard)) = (release.report().estimated, p.guard) {
            bar.suspend(|| println!("{}", guard.table(release.report())));
        }
        bar.set_message(p.counts.to_string());
        bar.inc(1);
    })?;
    if let Some(step) = run.stopped_at {
        bar.suspend(|| println!("step {step}: stop requested: the audit log is closed"));
    }
    bar.finish();
    let accuracy = digits.accuracy(&test, device, |x| net.f_forward(x))?;
    let report_path = args.out.join("report.json");
    if let Some(report) = &run.last {
        std::fs::write(&report_path, report.to_json()).with_context(|| format!("writing {}", report_path.display()))?;
    }
    let summary = run.summary(format!("test accuracy {accuracy:.3}"), report_path, Some(&audit_path))?;
    print!("\n{summary}");
    let html = super::report::write_for_run(&args.out)?;
    println!("run report: {}", html.display());
    drop(metrics);
    drop(stepper);
    Ok(())
}
