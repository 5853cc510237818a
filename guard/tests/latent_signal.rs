//! M2 finds a planted latent attribute: inputs of attribute 1 are shifted along directions the
//! task does not use. The last layers' separation must exceed its value on the same data with
//! the attribute labels shuffled.
mod common;
use gradguard_guard::{Batch, Inspection, LayerMap, measure::SubspaceSettings};
use rand::{seq::SliceRandom, SeedableRng};
use tch::{nn, Device, Tensor};

/// Separation must beat the shuffled labels by this much. Measured with these seeds:
/// fc1 0.145 vs 0.023 shuffled, fc2 0.133 vs 0.054 (a shift of 2 gave fc2 only 0.057 vs 0.044).
const MARGIN: f64 = 0.05;
const SHIFT: f64 = 4.0;
const N: i64 = 64;

#[test]
fn separation_of_the_last_layers_exceeds_shuffled_attribute() {
    let (x, y, attribute) = common::planted_attribute(N, SHIFT, 9);

    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[20, 32, 16, 2]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
    let settings = SubspaceSettings::default();
    let real = Inspection::new(&layers, &loss, Batch::new(&x, &y).with_attribute(&Tensor::from_slice(&attribute))).seeded(0, 0).subspace(&settings).unwrap();
    let mut shuffled = attribute.clone();
    shuffled.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
    let control = Inspection::new(&layers, &loss, Batch::new(&x, &y).with_attribute(&Tensor::from_slice(&shuffled))).seeded(0, 0).subspace(&settings).unwrap();
    for (name, (r, c)) in layers.names().iter().zip(real.iter().zip(&control)).skip(1) {
        let r = r.measured().unwrap();
        let c = c.measured().unwrap();
        assert_eq!(r.m, 16);
        assert!(
            r.subspace_separation > c.subspace_separation + MARGIN,
            "{name}: separation {:.4} with the attribute vs {:.4} shuffled (margin {MARGIN})",
            r.subspace_separation,
            c.subspace_separation
        );
    }
}
