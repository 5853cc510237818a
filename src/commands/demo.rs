//! `gradguard demo`: the showcase and the README's main job. Trains the digits CNN on the
//! shipped data with the guard, a policy (the example policy by default) and the Prometheus
//! exporter on; shows a progress bar and a live per-layer table; ends with a summary of the
//! decisions and where the report and the audit log are.
use anyhow::Context;
use gradguard::data::Digits;
use gradguard::guard::{parse_device, Policy};
use gradguard::hooks::{GuardSummary, ReleaseCounts, RunSummary};
use gradguard::models::DigitsCnn;
use gradguard::{Batch, GuardedOptimizer, Report};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;
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
    /// Folder for the final report (report.json) and the audit log (audit.jsonl).
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
    let _ = std::fs::remove_file(&audit_path); // one log per demo run
    let loss_fn = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
    let mut opt = GuardedOptimizer::builder(&vs, nn::Adam::default().build(&vs, 1e-3)?)
        .policy(policy)
        .loss(loss_fn)
        .audit_log(&audit_path)
        .metrics(args.metrics_addr)
        .build()?;
    let guard = opt.guard();
    let thresholds = guard.protection().thresholds();
    println!("gradguard demo: digits CNN on {} train / {} test samples, {device:?}", train.len(), test.len());
    println!("{}", super::progress::guard_header(&guard.layers().names(), guard.policy(), opt.metrics_addr(), &audit_path));

    let bar = super::progress::steps_bar(args.steps);
    let started = Instant::now();
    let mut counts = ReleaseCounts::default();
    let mut last = None;
    for step in 0..args.steps {
        let idx: Vec<usize> = (0..args.batch_size).map(|i| train[(step * args.batch_size + i) % train.len()]).collect();
        let (x, y, heavy_stroke) = digits.batch(&idx, device)?;
        let loss = net.f_loss(&x, &y)?;
        // Sample ids let the run ledger count each image's releases exactly.
        let ids = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let release = opt.backward_step(&loss, &Batch::new(&x, &y).with_attribute(&heavy_stroke).with_sample_ids(&ids))?;
        counts.count(&release);
        super::progress::show_release(&bar, step, &release);
        if release.report().estimated {
            bar.suspend(|| println!("{}", live_table(release.report(), &thresholds)));
        }
        last = Some(release.into_report());
        bar.set_message(counts.to_string());
        bar.inc(1);
    }
    bar.finish();
    let seconds = started.elapsed().as_secs_f64();
    let accuracy = digits.accuracy(&test, device, |x| net.f_forward(x))?;
    let report_path = args.out.join("report.json");
    if let Some(report) = &last {
        std::fs::write(&report_path, report.to_json()).with_context(|| format!("writing {}", report_path.display()))?;
    }
    let guard = GuardSummary::read(counts, last.as_ref(), &audit_path)?;
    let summary = RunSummary { steps: args.steps, seconds, score: format!("test accuracy {accuracy:.3}"), guard: Some(guard), report: report_path };
    print!("\n{summary}");
    drop(opt);
    Ok(())
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

/// Per layer: the metrics, the thresholds that apply and the protection in force.
fn live_table(report: &Report, thresholds: &[(String, gradguard::guard::LeakageMetric, f64)]) -> String {
    use std::fmt::Write;
    let mut out = format!("step {} (estimate):\n", report.step);
    let _ = writeln!(out, "  {:<6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<52} {}", "layer", "S_l", "S_rms", "R_l", "separ", "|G_l|", "M5 bits", "thresholds", "protection");
    let manifest = report.release.as_ref();
    for (i, l) in report.layers.iter().enumerate() {
        let s = l.sensitivity.measured();
        let limits: Vec<String> = thresholds.iter().filter(|t| t.0 == l.name).map(|t| format!("{} > {}", t.1.name(), t.2)).collect();
        let actions = manifest.and_then(|m| m.layers.get(i)).map(|m| if m.actions.is_empty() { "none".to_string() } else { m.actions.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" -> ") });
        let _ = writeln!(
            out,
            "  {:<6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<52} level {} {}",
            l.name,
            fmt(s.map(|s| s.sensitivity)),
            fmt(s.map(|s| s.sensitivity_rms)),
            fmt(s.and_then(|s| s.relative_sensitivity)),
            fmt(l.subspace.measured().map(|m| m.subspace_separation)),
            fmt(l.gradient.measured().map(|g| g.norm)),
            // M5: +Inf for a layer released without noise (no bound).
            l.reconstruction_bound.measured().map_or("-".to_string(), |b| b.reconstruction_bound_bits.map_or("+Inf".into(), |v| format!("{v:.4}"))),
            if limits.is_empty() { "-".into() } else { limits.join(", ") },
            l.protection_level,
            actions.unwrap_or_default()
        );
    }
    let _ = writeln!(out, "  {}", report.bound_line());
    out
}
