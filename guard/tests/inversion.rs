//! M4 (usable original information): the layer-restricted inversion attack recovers a known
//! input from the gradient of a single-sample linear layer, and has nothing to attack in a
//! withheld layer.
mod common;
use gradguard_guard::{Batch, Inspection, measure::{InversionPlan, InversionSettings}};
use gradguard_guard::LayerMap;
use tch::{nn, Device, Kind, Tensor};

/// PSNR bound for the linear layer. For y = W x + b the layer gradient is [delta x^T, delta]:
/// matching it in cosine fixes x exactly, so the attack should get far above this.
const PSNR_BOUND: f64 = 30.0;

fn images(n: i64, d: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::rand([n, d], (Kind::Float, Device::Cpu)) // pixels in [0, 1)
}

#[test]
fn single_sample_linear_layer_is_recovered() {
    let (n, d, c) = (6i64, 16i64, 4i64);
    let x = images(n, d, 1);
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 1, 2]);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = common::Mlp::new(&vs.root(), &[d, c]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let plan = InversionPlan { batch_size: 1, releases: 4 };
    let settings = InversionSettings::default();
    let m = Inspection::new(&layers, &loss, Batch::new(&x, &y)).seeded(0, 0).original_information(&plan, &settings, None).unwrap();
    let m = m[0].measured().expect("fc0 is released");
    println!("linear layer: {m:?}");
    assert_eq!((m.samples, m.releases, m.batch_size, m.params), (4, 4, 1, (d * c + c) as usize));
    assert!(m.psnr > PSNR_BOUND, "PSNR {:.2} dB <= {PSNR_BOUND}", m.psnr);
    assert!(m.usable_original_bits_per_dim > 3.0, "{:.3} bits per dimension", m.usable_original_bits_per_dim);
    assert!(m.final_cosine_distance < 1e-4);
    // Same seed, same reconstruction.
    let again = Inspection::new(&layers, &loss, Batch::new(&x, &y)).seeded(0, 0).original_information(&plan, &settings, None).unwrap();
    assert_eq!(again[0].measured().unwrap(), m);
}

#[test]
fn withheld_layer_has_nothing_to_invert() {
    let (n, d) = (4i64, 16i64);
    let x = images(n, d, 2);
    let y = Tensor::from_slice(&[0i64, 1, 2, 0]);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = common::Mlp::new(&vs.root(), &[d, 8, 3]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let plan = InversionPlan { batch_size: 1, releases: 2 };
    let settings = InversionSettings { iterations: 100, ..Default::default() };
    // fc0 withheld (the release leaves without it), fc1 released as is.
    let withhold_fc0 = |l: usize, g: &Tensor, _r: usize| -> gradguard_guard::Result<Option<Tensor>> {
        Ok(if l == 0 { None } else { Some(g.shallow_clone()) })
    };
    let m = Inspection::new(&layers, &loss, Batch::new(&x, &y)).seeded(0, 0).original_information(&plan, &settings, Some(&withhold_fc0)).unwrap();
    assert_eq!(m[0].absent_reason(), Some("layer withheld: no released gradient to invert"));
    assert!(m[1].measured().is_some(), "fc1 is released and attacked");
    // A release replaced by noise independent of the input (every entry 1): the attack matches
    // a constant direction and learns nothing about x (about 0 bits).
    let constant = |_l: usize, g: &Tensor, _r: usize| -> gradguard_guard::Result<Option<Tensor>> {
        Ok(Some(g.ones_like()))
    };
    let m = Inspection::new(&layers, &loss, Batch::new(&x, &y)).seeded(0, 0).original_information(&plan, &settings, Some(&constant)).unwrap();
    for (l, m) in m.iter().enumerate() {
        let m = m.measured().unwrap();
        println!("layer {l} on a constant release: {m:?}");
        assert!(m.usable_original_bits_per_dim < 0.1, "layer {l}: {:.3} bits per dimension", m.usable_original_bits_per_dim);
    }
}

#[test]
fn too_few_samples_is_absent_and_bad_settings_are_errors() {
    let x = images(2, 4, 3);
    let y = Tensor::from_slice(&[0i64, 1]);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = common::Mlp::new(&vs.root(), &[4, 2]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let plan = InversionPlan { batch_size: 1, releases: 3 };
    let m = Inspection::new(&layers, &loss, Batch::new(&x, &y)).seeded(0, 0).original_information(&plan, &InversionSettings::default(), None).unwrap();
    assert!(m[0].absent_reason().unwrap().starts_with("insufficient samples"));
    let bad = InversionSettings { learning_rate: f64::NAN, ..Default::default() };
    assert!(Inspection::new(&layers, &loss, Batch::new(&x, &y)).seeded(0, 0).original_information(&InversionPlan::default(), &bad, None).is_err());
}
