//! The noise sources' distribution, independence and reproducibility, on the host: the host
//! draw (ChaCha8) and the device draw (libtorch's private generator, which CUDA gradients use;
//! here on the CPU, so its code path is tested without a GPU).
use super::*;
use crate::derive_seed;

/// Both sources, drawing for a host tensor (the device source then runs libtorch's CPU
/// generator, the code path a CUDA gradient takes with Philox).
fn sources() -> [(&'static str, fn(&Tensor, f64, u64) -> Result<Tensor>); 2] {
    [("host", |t, std, seed| draw_noise(t, std, seed, NoiseSource::Host)), ("device", |t, std, seed| draw_noise(t, std, seed, NoiseSource::Device))]
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (mean, v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0))
}

/// Pearson correlation of two equally long samples.
fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let ((ma, va), (mb, vb)) = (mean_var(a), mean_var(b));
    let cov = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum::<f64>() / (a.len() as f64 - 1.0);
    cov / (va * vb).sqrt()
}

fn like(n: i64, kind: Kind) -> Tensor {
    Tensor::zeros([n], (kind, Device::Cpu))
}

#[test]
fn mean_zero_and_variance_std_squared() {
    let n = 200_000;
    for (name, draw) in sources() {
        for (kind, std) in [(Kind::Float, 0.5), (Kind::Double, 3.0)] {
            let v = values(&draw(&like(n, kind), std, 17).unwrap());
            let (mean, var) = mean_var(&v);
            // Standard errors: std / sqrt(n) for the mean, var * sqrt(2 / n) for the variance.
            let n = n as f64;
            assert!(mean.abs() < 4.0 * std / n.sqrt(), "{name} {kind:?}: mean {mean}");
            assert!((var / (std * std) - 1.0).abs() < 4.0 * (2.0 / n).sqrt(), "{name} {kind:?}: variance {var}, want {}", std * std);
            // Gaussian tails: about 0.27 % of the samples beyond 3 std.
            let tail = v.iter().filter(|x| x.abs() > 3.0 * std).count() as f64 / n;
            assert!((tail - 0.0027).abs() < 0.001, "{name} {kind:?}: {tail} beyond 3 std");
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_bits_and_other_seeds_differ() {
    for (name, draw) in sources() {
        let g = like(10_000, Kind::Float).reshape([100, 100]);
        let a = draw(&g, 1.0, 42).unwrap();
        assert_eq!(a.size(), vec![100, 100], "{name}");
        assert!(a.equal(&draw(&g, 1.0, 42).unwrap()), "{name}: same seed, other bits");
        let b = draw(&g, 1.0, 43).unwrap();
        // Two independent draws share no entry (f32 collisions are rare at this size).
        let same = values(&a).iter().zip(values(&b)).filter(|(x, y)| **x == *y).count();
        assert!(same < 5, "{name}: seeds 42 and 43 agree on {same} entries");
    }
}

#[test]
fn the_host_draw_keys_on_all_64_bits_of_the_seed_and_libtorchs_cpu_generator_does_not() {
    let g = like(1000, Kind::Float);
    let (seed, high) = (42, 42 | (1 << 40));
    let host = |s| draw_noise(&g, 1.0, s, NoiseSource::Host).unwrap();
    assert!(!host(seed).equal(&host(high)), "the host draw ignores a seed's high 32 bits");
    // Why CPU gradients are not noised by libtorch's CPU generator: its Mersenne Twister keeps
    // the low 32 bits of a seed, a key space one can search (CUDA's Philox keys on all 64; the
    // CUDA test checks it).
    let cpu = |s| draw_noise(&g, 1.0, s, NoiseSource::Device).unwrap();
    assert!(cpu(seed).equal(&cpu(high)), "libtorch's CPU generator now keys on 64 bits: reconsider the host draw");
}

#[test]
fn noise_of_two_layers_and_two_steps_is_uncorrelated() {
    // The guard's seeds: derive_seed(base ^ step, layer) (engine/apply.rs, with the step rotated).
    let n = 100_000;
    let bound = 4.0 / (n as f64).sqrt();
    for (name, draw) in sources() {
        let seed = |step: u64, layer: usize| derive_seed(0x5eed ^ step.rotate_left(20), layer);
        let at = |step, layer| values(&draw(&like(n, Kind::Float), 1.0, seed(step, layer)).unwrap());
        let (l0, l1, next) = (at(7, 0), at(7, 1), at(8, 0));
        for (what, other) in [("layers 0 and 1", &l1), ("steps 7 and 8", &next)] {
            let r = correlation(&l0, other);
            assert!(r.abs() < bound, "{name}: {what} correlate ({r}, bound {bound})");
        }
        // Nor do two parts of one draw.
        let half = n as usize / 2;
        let r = correlation(&l0[..half], &l0[half..2 * half]);
        assert!(r.abs() < 4.0 / (half as f64).sqrt(), "{name}: two halves of a draw correlate ({r})");
        // Nor is one draw a shifted copy of another (a counter reused with an offset).
        let r = correlation(&l0[1..], &next[..n as usize - 1]);
        assert!(r.abs() < bound, "{name}: lag-1 correlation across steps {r}");
    }
}

#[test]
fn the_users_random_stream_is_neither_read_nor_advanced() {
    for (name, draw) in sources() {
        let g = like(1000, Kind::Float);
        tch::manual_seed(5);
        let expected = Tensor::randn([8], (Kind::Float, Device::Cpu));
        tch::manual_seed(5);
        let a = draw(&g, 1.0, 9).unwrap();
        let drawn = Tensor::randn([8], (Kind::Float, Device::Cpu));
        assert!(drawn.equal(&expected), "{name}: the noise advanced libtorch's default generator");
        // Reseeding (and drawing from) the default generator does not change the noise.
        tch::manual_seed(123);
        let _ = Tensor::rand([3], (Kind::Float, Device::Cpu));
        assert!(a.equal(&draw(&g, 1.0, 9).unwrap()), "{name}: the noise follows the user's stream");
    }
}

#[test]
fn the_host_draw_is_the_chacha8_stream_of_the_seed() {
    // An audit can regenerate a CPU release's noise from its key without libtorch.
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let want: Vec<f64> = (0..64).map(|_| 0.25 * Distribution::<f64>::sample(&StandardNormal, &mut rng)).collect();
    let got = values(&draw_noise(&like(64, Kind::Double), 0.25, 77, NoiseSource::Host).unwrap());
    assert_eq!(got, want);
}
