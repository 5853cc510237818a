//! A small ResNet-style CNN with batch norm, trained under the guard (no policy: the guard
//! measures and releases what is finite), printing the per-layer table at every estimate.
//!
//!     cargo run --release --example resnet -- [steps] [estimate_every]
//!
//! The data is synthetic: 3x32x32 images, each the template of its class (one of 10 fixed
//! random patterns) plus Gaussian noise of the same scale. The private attribute is planted: a sample with
//! attribute 1 has its channel 0 brightened by 0.5, which the task does not need. M2 (the
//! subspace separation) measures how far the per-sample gradients of the two groups part.
//!
//! The model trains in batch-norm training mode (batch statistics). The guard's own passes
//! (M1's probes, M2's per-sample gradients) leave the running statistics as they were: the
//! run ends with the same model it would have ended with unguarded. M1 is the sensitivity of
//! the batch-mean gradient, batch coupling included; M2's per-sample gradients run each sample
//! alone, so batch norm normalises it by its own statistics.
use gradguard::{Batch, GuardedOptimizer, Settings};
use gradguard::guard::measure::SubspaceSettings;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

#[path = "shared/resnet_model.rs"]
mod resnet_model;
#[path = "shared/synthetic.rs"]
mod synthetic;

use resnet_model::ResNet;

const BATCH: i64 = 32;

fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let steps = args.first().copied().unwrap_or(200);
    let estimate_every = args.get(1).copied().unwrap_or(50);
    tch::manual_seed(0);
    let data = synthetic::Images::new()?;
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet::new(&vs.root(), &[16, 32], 1, synthetic::IMAGE_CLASSES);
    let loss_fn = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let settings = Settings {
        estimate_every,
        budget_share: 1.0,          // estimate every `estimate_every` steps, whatever it costs
        background_estimates: false, // M2 inline: the table shows this step's numbers
        subspace: SubspaceSettings { samples_per_group: 8, ..Default::default() },
        ..Default::default()
    };
    let sgd = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.05)?;
    let mut opt = GuardedOptimizer::builder(&vs, sgd).settings(settings).loss(loss_fn).build()?;
    let clock = std::time::Instant::now();
    for _ in 0..steps {
        let (x, y, a) = data.batch(BATCH)?;
        let release = opt.train_step(&Batch::new(&x, &y).with_attribute(&a))?;
        let report = release.report();
        if report.estimated {
            println!("loss {:.3}, estimate {:.2} s", report.loss.unwrap_or(f64::NAN), report.estimate_seconds.unwrap_or(0.0));
            println!("{}", report.table());
        }
    }
    let (x, y, _) = data.batch(BATCH)?;
    let accuracy = tch::no_grad(|| net.forward(&x, false))?.f_argmax(-1, false)?.f_eq_tensor(&y)?.f_to_kind(Kind::Float)?.f_mean(Kind::Float)?;
    println!("{steps} steps in {:.1} s; accuracy on a fresh batch (running statistics) {:.2}", clock.elapsed().as_secs_f64(), accuracy.f_double_value(&[])?);
    Ok(())
}
