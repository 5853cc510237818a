//! M2 on a layer of 10M parameters: the linear algebra makes no P x N host matrix. (Its own
//! test binary, one test, so no other test's allocations move the process's peak RSS.)
mod common;
use gradguard_guard::{Batch, Inspection, LayerMap, measure::SubspaceSettings};
use tch::{nn, nn::Module, Device, Kind, Tensor};

const IN: i64 = 10_000;
const OUT: i64 = 1_000;
const N: i64 = 8;

#[test]
fn m2_of_a_10m_parameter_layer_grows_peak_rss_far_below_a_host_copy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let fc = nn::linear(vs.root() / "fc", IN, OUT, Default::default());
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| common::cross_entropy(&fc.forward(x), y);
    let x = common::gaussian(N, IN, 3, Kind::Float);
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
    let attribute = Tensor::from_slice(&[0i64, 1, 0, 1, 0, 1, 0, 1]);
    let settings = SubspaceSettings { samples_per_group: 4, ..Default::default() };
    let look = Inspection::new(&layers, &loss, Batch::new(&x, &y).with_attribute(&attribute)).seeded(0, 0);
    let samples = look.subspace_samples(&settings).unwrap().unwrap();
    let l = layers.names().iter().position(|n| n == "fc").unwrap();
    let p = layers.layers()[l].numel() as u64;
    assert!(p >= 10_000_000);

    // The peak of M2's linear algebra alone, the per-sample gradients already held.
    let started = std::time::Instant::now();
    let (metric, growth) = common::peak_increase(|| samples.layer_metric(l, None).unwrap());
    let seconds = started.elapsed().as_secs_f64();
    let host_copy = p * N as u64 * 8;
    eprintln!("M2 of {p} parameters x {N} columns: {seconds:.2} s, peak RSS growth {} MiB (an f64 host copy: {} MiB)", growth >> 20, host_copy >> 20);
    assert!(metric.measured().is_some());
    // The SVD form stacked the N columns as one P x N f64 matrix (640 MiB here) before its SVD;
    // the Gram form holds one row chunk (32 MiB in f64) at a time.
    assert!(growth < host_copy / 4, "peak RSS grew {growth} bytes, an f64 P x N host copy is {host_copy}");
}
