//! Test helpers: deterministic random tensors (host ChaCha, not libtorch's global RNG) and
//! host-side views of tensors.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tch::{Kind, Tensor};

/// Standard-normal tensor of `shape` and `kind`, determined by `seed`.
pub fn randn(shape: &[i64], kind: Kind, seed: u64) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> = (0..n)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::from_slice(&v).reshape(shape).to_kind(kind)
}

/// All entries as f64, row-major.
pub fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

/// L2 norm computed on the host in f64.
pub fn norm(t: &Tensor) -> f64 {
    values(t).iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Bitwise equality of shape, dtype and values.
pub fn identical(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}
