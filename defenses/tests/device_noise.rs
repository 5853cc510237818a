//! Noise on a CUDA gradient: drawn on the device by libtorch's Philox generator, privately
//! seeded. Needs a CUDA device, so it is ignored by default (a machine without one cannot
//! pass it): `cargo test --release -p gradguard-defenses --test device_noise -- --ignored`.

mod common;

use common::values;
use gradguard_defenses::{derive_seed, Defence};
use tch::{Device, Kind, Tensor};

fn noise_on(device: Device, n: i64, seed: u64) -> Tensor {
    // A zero gradient: the release is the noise itself (the clip leaves zero unchanged).
    let g = Tensor::zeros([n], (Kind::Float, device));
    let d = Defence::Noise { clip_norm: 2.0, multiplier: 0.25 };
    let out = d.apply(&g, seed).unwrap().unwrap();
    assert_eq!(out.device(), device, "the release left the gradient's device");
    out
}

fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (mean, v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0))
}

#[test]
#[ignore = "needs a CUDA device: run with --ignored on a GPU machine"]
fn cuda_noise_is_seeded_distributed_and_leaves_the_users_stream() {
    assert!(tch::Cuda::is_available(), "no CUDA device: this test cannot run here");
    let cuda = Device::Cuda(0);
    let n = 1 << 20;
    let a = noise_on(cuda, n, derive_seed(7, 0));
    assert!(a.equal(&noise_on(cuda, n, derive_seed(7, 0))), "same seed, other bits on CUDA");
    assert!(!a.equal(&noise_on(cuda, n, derive_seed(7, 0) ^ (1 << 40))), "CUDA noise ignores a seed's high bits");
    let v = values(&a);
    let (mean, var) = mean_var(&v);
    let std = 0.5;
    assert!(mean.abs() < 4.0 * std / (n as f64).sqrt(), "mean {mean}");
    assert!((var / (std * std) - 1.0).abs() < 4.0 * (2.0 / n as f64).sqrt(), "variance {var}");
    let other = values(&noise_on(cuda, n, derive_seed(7, 1)));
    let cov = v.iter().zip(&other).map(|(x, y)| x * y).sum::<f64>() / n as f64;
    assert!((cov / var).abs() < 4.0 / (n as f64).sqrt(), "layers' noise correlates: {}", cov / var);
    // The user's CUDA stream: neither advanced nor followed.
    tch::manual_seed(3);
    let expected = Tensor::randn([16], (Kind::Float, cuda));
    tch::manual_seed(3);
    let again = noise_on(cuda, 1000, 11);
    assert!(Tensor::randn([16], (Kind::Float, cuda)).equal(&expected), "the noise advanced the CUDA generator");
    tch::manual_seed(99);
    assert!(again.equal(&noise_on(cuda, 1000, 11)), "the noise follows the user's seed");
    // Across devices: the same distribution, not the same draw (documented in noise.rs).
    assert!(!noise_on(Device::Cpu, 1000, 11).equal(&again.to_device(Device::Cpu)));
}
