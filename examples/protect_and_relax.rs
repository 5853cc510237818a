//! A layer protected, then relaxed: the digits CNN trains under examples/protect_and_relax.toml
//! with batches of 16 (the first layer's sensitivity is above the threshold: the guard clips
//! it), then with batches of 64 (the sensitivity falls below `relax_below`: the guard relaxes
//! one rung per estimate). Prints the audit log's decision lines for conv1.
//!
//!     cargo run --release --example protect_and_relax
use gradguard::data::Digits;
use gradguard::guard::{AuditLog, Policy, decide::Outcome};
use gradguard::models::DigitsCnn;
use gradguard::{Batch, GuardedOptimizer};
use tch::{nn, nn::OptimizerConfig, Device, Tensor};

fn main() -> anyhow::Result<()> {
    let policy = Policy::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/protect_and_relax.toml")))?;
    let log_path = std::env::temp_dir().join("gradguard-protect-and-relax.jsonl");
    let _ = std::fs::remove_file(&log_path);
    let digits = Digits::embedded()?;
    let (train, _) = digits.split(0.2, 0);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = DigitsCnn::new(&vs.root());
    let loss_fn = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
    let mut opt = GuardedOptimizer::builder(&vs, nn::Adam::default().build(&vs, 1e-3)?).policy(policy).loss(loss_fn).audit_log(&log_path).build()?;
    let mut cursor = 0;
    for step in 0..60 {
        let batch_size = if step < 30 { 16 } else { 64 };
        let idx: Vec<usize> = (0..batch_size).map(|i| train[(cursor + i) % train.len()]).collect();
        cursor += batch_size;
        let (x, y, a) = digits.batch(&idx, Device::Cpu)?;
        let loss = net.f_loss(&x, &y)?;
        let release = opt.backward_step(&loss, &Batch::new(&x, &y).with_attribute(&a))?;
        let report = release.report();
        if report.estimated {
            let conv1 = report.layer("conv1").expect("conv1");
            let manifest = report.release.as_ref().expect("a release");
            println!(
                "step {step:>2} batch {batch_size:>2}: conv1 S_rms {:.4}, level {}, released as {:?}",
                conv1.sensitivity.measured().map_or(f64::NAN, |s| s.sensitivity_rms),
                conv1.protection_level,
                manifest.layers[0].actions.iter().map(|a| a.to_string()).collect::<Vec<_>>()
            );
        }
    }
    println!("\ndecision log {} (conv1: each change of level and the release at the new level; the rest is counted in checkpoints):", log_path.display());
    for r in AuditLog::read_all(&log_path)? {
        if r.layer == "conv1" && (r.outcome != Outcome::Released || r.rule.is_some()) && r.reason.is_none() {
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}
