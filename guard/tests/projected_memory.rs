//! M3's projection of a layer of 10.2M parameters never holds the n x P host matrix: the peak
//! resident memory the projection adds stays below the size of that matrix (n P 8 bytes),
//! while building the host matrix itself (`per_sample_gradients`) adds at least that much, so
//! the measure can tell the two apart.
//!
//! One test in its own binary: the peak (VmHWM of /proc/self/status, reset through
//! /proc/self/clear_refs) is the process's, and no other test may allocate beside it.
mod common;
use common::peak_increase;
use gradguard_guard::{Batch, Inspection, LayerMap, measure::ProjectedLayer};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// One linear layer of WIDTH x WIDTH weights and WIDTH biases: 10,243,200 parameters.
const WIDTH: i64 = 3200;
const N: i64 = 16;
const R: usize = 8;

#[test]
fn a_ten_million_parameter_layer_is_projected_without_its_host_matrix() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let fc = nn::linear(vs.root() / "fc", WIDTH, WIDTH, Default::default());
    let map = LayerMap::from_var_store(&vs).unwrap();
    let p = map.numel();
    assert_eq!(p, 10_243_200);
    let x = Tensor::randn([N, WIDTH], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(WIDTH, [N], (Kind::Int64, Device::Cpu));
    let loss = |x: &Tensor, y: &Tensor| x.f_linear(&fc.ws, fc.bs.as_ref())?.f_log_softmax(-1, None)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100);
    let look = Inspection::new(&map, &loss, Batch::new(&x, &y)).seeded(3, 0);
    let host_matrix = N as u64 * p as u64 * 8;

    let clock = Instant::now();
    let (projected, device_peak) = peak_increase(|| look.projected_gradients(R, None).unwrap());
    let device_seconds = clock.elapsed().as_secs_f64();
    let ProjectedLayer::Features { rows, params } = &projected[0] else { panic!("{:?}", projected[0]) };
    assert_eq!((rows.len(), rows[0].len(), *params), (N as usize, R, p));
    assert!(rows.iter().flatten().all(|v| v.is_finite()) && rows.iter().flatten().any(|v| *v != 0.0));

    let clock = Instant::now();
    let (host, host_peak) = peak_increase(|| look.per_sample_gradients().unwrap());
    let host_seconds = clock.elapsed().as_secs_f64();
    assert_eq!(host[0].as_ref().map(|g| (g.rows, g.cols)), Some((N as usize, p)));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "P = {p}, n = {N}, r = {R}: host matrix {:.0} MiB; projection on the device added {:.0} MiB at peak ({device_seconds:.1} s; R_l in f32 is {:.0} MiB), the host matrix {:.0} MiB ({host_seconds:.1} s)",
        mib(host_matrix),
        mib(device_peak),
        mib(R as u64 * p as u64 * 4),
        mib(host_peak)
    );
    assert!(device_peak < host_matrix, "the projection added {} bytes at peak, the host matrix is {host_matrix}", device_peak);
    assert!(host_peak >= host_matrix, "building the host matrix added only {host_peak} bytes: the measure does not see it");
}
