//! Trains the GRU classifier under a policy that releases the embedding's gradient only with
//! the noise its reconstruction bound needs (0.05 bits per dimension), on CUDA when it is
//! available.
use tch::Device;

const POLICY: &str = r#"
version = 2
[settings]
seed = 1
estimate_every = 5
[[rule]]
name = "embedding-bound"
metric = "reconstruction_bound_bits"
layers = ["emb"]
act_above = 0.05
relax_below = 0.01
ladder = [{ action = "noise", clip_norm = 1.0, target = "threshold" }]
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::cuda_if_available();
    println!("device: {device:?} (CUDA available: {})", tch::Cuda::is_available());
    let (counts, loss) = gru_guarded::train(POLICY, 40, device)?;
    println!("{counts:?}; mean loss of the last 10 steps {loss:.4}");
    Ok(())
}
