//! M1 against the closed form of softmax regression (logits = W x + b, cross-entropy).
//! For sample i with p = softmax(W x_i + b), A = diag(p) - p p^T and e the one-hot target:
//!   dg_W/dx . e_d = (A W e_d) x_i^T + (p - e) e_d^T,   dg_b/dx = A W,
//! and J_{l,i} = (1/n) dg_{l,i}/dx_i since the batch gradient is the mean.
mod common;
use gradguard_guard::{Batch, Inspection, LayerMap, Metric, measure::SensitivitySettings};
use tch::{nn, Device, Kind, Tensor};

struct Case {
    layers: LayerMap,
    w: Tensor,
    b: Tensor,
    x: Tensor,
    y: Tensor,
}

fn case() -> Case {
    // n * D = 24 input scalars <= 28 parameters: exact mode enumerates the input basis.
    let (n, d, c) = (4, 6, 4);
    tch::manual_seed(3);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _ = vs.root().var("w", &[c, d], nn::Init::Randn { mean: 0.0, stdev: 0.7 });
    let _ = vs.root().var("b", &[c], nn::Init::Randn { mean: 0.0, stdev: 0.3 });
    vs.double();
    let x = common::gaussian(n, d, 4, Kind::Double);
    let y = Tensor::from_slice(&[0i64, 3, 1, 2]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let w = vs.variables()["w"].shallow_clone();
    let b = vs.variables()["b"].shallow_clone();
    Case { layers, w, b, x, y }
}

fn values(t: &Tensor) -> Vec<f64> {
    let t = t.reshape([-1]).to_kind(Kind::Double);
    Vec::<f64>::try_from(&t).unwrap()
}

/// (S_w, S_b) from the closed form, in plain f64 arithmetic.
fn closed_form(case: &Case) -> (f64, f64) {
    let (c, d) = (case.w.size()[0] as usize, case.w.size()[1] as usize);
    let n = case.x.size()[0] as usize;
    let w = values(&case.w);
    let b = values(&case.b);
    let x = values(&case.x);
    let y = values(&case.y);
    let (mut sum_w, mut sum_b) = (0.0, 0.0);
    for i in 0..n {
        let xi = &x[i * d..(i + 1) * d];
        let z: Vec<f64> = (0..c).map(|k| b[k] + (0..d).map(|j| w[k * d + j] * xi[j]).sum::<f64>()).collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|v| v / s).collect();
        let a = |k: usize, l: usize| if k == l { p[k] - p[k] * p[l] } else { -p[k] * p[l] };
        // AW: c x d
        let aw: Vec<f64> = (0..c).flat_map(|k| (0..d).map(move |j| (k, j))).map(|(k, j)| (0..c).map(|l| a(k, l) * w[l * d + j]).sum()).collect();
        let resid: Vec<f64> = (0..c).map(|k| p[k] - if y[i] as usize == k { 1.0 } else { 0.0 }).collect();
        let mut jw = 0.0;
        for dd in 0..d {
            for k in 0..c {
                for j in 0..d {
                    let v = aw[k * d + dd] * xi[j] + if j == dd { resid[k] } else { 0.0 };
                    jw += v * v;
                }
            }
        }
        let jb: f64 = aw.iter().map(|v| v * v).sum();
        sum_w += jw / (n * n) as f64;
        sum_b += jb / (n * n) as f64;
    }
    ((sum_w / n as f64).sqrt(), (sum_b / n as f64).sqrt())
}

fn loss(case: &Case) -> impl Fn(&Tensor, &Tensor) -> Result<Tensor, tch::TchError> + '_ {
    move |x: &Tensor, y: &Tensor| common::cross_entropy(&x.f_linear(&case.w, Some(&case.b))?, y)
}

fn measured(m: &Metric<gradguard_guard::report::Sensitivity>) -> &gradguard_guard::report::Sensitivity {
    m.measured().expect("sensitivity measured")
}

#[test]
fn exact_mode_matches_the_closed_form_in_f64() {
    let case = case();
    assert_eq!(case.layers.names(), vec!["w", "b"]);
    assert!(case.x.numel() <= case.layers.numel(), "input basis is the smaller side");
    let (sw, sb) = closed_form(&case);
    let settings = SensitivitySettings { exact: true, ..Default::default() };
    let got = Inspection::new(&case.layers, &loss(&case), Batch::new(&case.x, &case.y)).seeded(0, 0).sensitivity(&settings).unwrap();
    for (m, expected) in got.iter().zip([sw, sb]) {
        let s = measured(m).sensitivity;
        assert!(((s - expected) / expected).abs() < 1e-6, "exact {s} vs closed form {expected}");
        assert_eq!(measured(m).sensitivity_se, 0.0);
    }
}

#[test]
fn exact_mode_agrees_through_either_basis() {
    // Four copies of the batch: 96 input scalars > 28 parameters, so the parameter basis.
    let case = case();
    let wide_x = Tensor::cat(&[&case.x, &case.x, &case.x, &case.x], 0);
    let wide_y = Tensor::cat(&[&case.y, &case.y, &case.y, &case.y], 0);
    assert!(wide_x.numel() > case.layers.numel(), "parameter basis is the smaller side");
    let settings = SensitivitySettings { exact: true, ..Default::default() };
    let via_params = Inspection::new(&case.layers, &loss(&case), Batch::new(&wide_x, &wide_y)).seeded(0, 0).sensitivity(&settings).unwrap();
    // Same batch repeated 4 times: each J_{l,i} shrinks by 4 (1/n), S by 4.
    let (sw, sb) = closed_form(&case);
    for (m, expected) in via_params.iter().zip([sw / 4.0, sb / 4.0]) {
        let s = measured(m).sensitivity;
        assert!(((s - expected) / expected).abs() < 1e-6, "parameter basis {s} vs {expected}");
    }
}

#[test]
fn estimator_with_64_probes_is_within_three_standard_errors() {
    let case = case();
    let (sw, sb) = closed_form(&case);
    for method in [gradguard_guard::report::JvpMethod::DoubleBackward, gradguard_guard::report::JvpMethod::CentralDifference] {
        let settings = SensitivitySettings { probes: 64, method, exact: false, probe_samples: None };
        let got = Inspection::new(&case.layers, &loss(&case), Batch::new(&case.x, &case.y)).seeded(11, 0).sensitivity(&settings).unwrap();
        for (m, expected) in got.iter().zip([sw, sb]) {
            let s = measured(m);
            assert!(s.sensitivity_se > 0.0);
            let z = (s.sensitivity - expected).abs() / s.sensitivity_se;
            assert!(z < 3.0, "{method:?}: estimate {} ± {} vs exact {expected} ({z:.2} se)", s.sensitivity, s.sensitivity_se);
        }
    }
}
