//! Trains the GRU classifier under a policy that noises the GRU's gradient, on CUDA when it is
//! available.
use tch::Device;

const POLICY: &str = r#"
version = 1
[settings]
seed = 1
estimate_every = 5
[[rule]]
name = "gru-sensitivity"
metric = "sensitivity"
layers = ["gru"]
act_above = 0.0
relax_below = 0.0
ladder = [{ action = "noise", clip_norm = 1.0, multiplier = 0.05 }]
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::cuda_if_available();
    println!("device: {device:?} (CUDA available: {})", tch::Cuda::is_available());
    let (counts, loss) = gru_guarded::train(POLICY, 40, device)?;
    println!("{counts:?}; last loss {loss:.4}");
    Ok(())
}
