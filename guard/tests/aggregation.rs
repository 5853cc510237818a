//! The aggregation effect of METRICS.md: on a model without batch coupling, G is the batch
//! mean, so J_{l,i} = (1/n) dg_i/dx_i and S_l(B) = RMS_i S_l({x_i}) / n. The batch value comes
//! from the estimator, the single-sample values from exact mode: the 1/n must come out of the
//! measurement.
mod common;
use gradguard_guard::{Batch, Inspection, LayerMap, measure::SensitivitySettings};
use tch::{nn, Device, Kind, Tensor};

#[test]
fn batch_sensitivity_falls_as_one_over_n() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[8, 16, 3]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let x = common::gaussian(32, 8, 1, Kind::Float);
    tch::manual_seed(2);
    let y = Tensor::randint(3, [32], (Kind::Int64, Device::Cpu));
    let loss = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
    let exact = SensitivitySettings { exact: true, ..Default::default() };
    let singles: Vec<Vec<f64>> = (0..32)
        .map(|i| {
            Inspection::new(&layers, &loss, Batch::new(&x.narrow(0, i, 1), &y.narrow(0, i, 1))).seeded(0, 0).sensitivity(&exact)
                .unwrap()
                .iter()
                .map(|m| m.measured().unwrap().sensitivity)
                .collect()
        })
        .collect();
    let estimator = SensitivitySettings { probes: 128, ..Default::default() };
    for n in [1usize, 2, 4, 8, 16, 32] {
        let batch = Inspection::new(&layers, &loss, Batch::new(&x.narrow(0, 0, n as i64), &y.narrow(0, 0, n as i64))).seeded(5, n as u64).sensitivity(&estimator)
            .unwrap();
        for (l, m) in batch.iter().enumerate() {
            let rms = (singles[..n].iter().map(|s| s[l] * s[l]).sum::<f64>() / n as f64).sqrt();
            let expected = rms / n as f64;
            let got = m.measured().unwrap().sensitivity;
            let ratio = got / expected;
            assert!((0.8..=1.2).contains(&ratio), "layer {l}, n = {n}: S_l(B) = {got}, S_l(1)/n = {expected} (ratio {ratio:.3})");
        }
    }
}
