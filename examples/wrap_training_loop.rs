//! An unguarded tch training loop and the same loop guarded by gradguard, side by side on the
//! digits CNN. The two loops differ in the lines marked `// guard`.
//!
//!     cargo run --release --example wrap_training_loop -- [steps] [print_every]
use gradguard::data::Digits;
use gradguard::models::DigitsCnn;
use gradguard::{Batch, GuardedOptimizer};
use tch::{nn, nn::OptimizerConfig, Device};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let steps = args.first().copied().unwrap_or(200);
    let print_every = args.get(1).copied().unwrap_or(50);
    let digits = Digits::embedded()?;
    let (train, test) = digits.split(0.2, 0);
    let batch_at = |step: usize| -> Vec<usize> { (0..64).map(|i| train[(step * 64 + i) % train.len()]).collect() };

    // Unguarded.
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = DigitsCnn::new(&vs.root());
    let mut opt = nn::Adam::default().build(&vs, 1e-3)?;
    for step in 0..steps {
        let (x, y, _) = digits.batch(&batch_at(step), Device::Cpu)?;
        let loss = net.f_loss(&x, &y)?;
        opt.backward_step(&loss);
    }
    println!("unguarded: test accuracy {:.3}", digits.accuracy(&test, Device::Cpu, |x| net.f_forward(x))?);

    // Guarded.
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = DigitsCnn::new(&vs.root());
    let opt = nn::Adam::default().build(&vs, 1e-3)?;
    let mut opt = GuardedOptimizer::builder(&vs, opt).loss(|x: &tch::Tensor, y: &tch::Tensor| net.f_loss(x, y)).build()?; // guard
    for step in 0..steps {
        let (x, y, heavy_stroke) = digits.batch(&batch_at(step), Device::Cpu)?; // guard: attribute
        let loss = net.f_loss(&x, &y)?;
        let release = opt.backward_step(&loss, &Batch::new(&x, &y).with_attribute(&heavy_stroke))?; // guard
        if step % print_every == 0 { println!("{}", release.report().table()) } // guard
    }
    println!("guarded:   test accuracy {:.3}", digits.accuracy(&test, Device::Cpu, |x| net.f_forward(x))?);
    Ok(())
}
