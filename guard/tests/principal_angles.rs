//! Principal angles and the projection distance on subspaces built with known angles.
use gradguard_guard::measure::{orthonormal_basis, principal_angles, projection_distance};
use tch::{Device, Kind, Tensor};

/// Columns e_0.. e_{k-1} and cos(t_j) e_j + sin(t_j) e_{k+j}: principal angles exactly t_j.
fn pair(dim: i64, angles: &[f64]) -> (Tensor, Tensor) {
    let k = angles.len() as i64;
    let a = Tensor::zeros([dim, k], (Kind::Double, Device::Cpu));
    let b = Tensor::zeros([dim, k], (Kind::Double, Device::Cpu));
    for (j, t) in angles.iter().enumerate() {
        let j = j as i64;
        let _ = a.get(j).get(j).fill_(1.0);
        let _ = b.get(j).get(j).fill_(t.cos());
        let _ = b.get(k + j).get(j).fill_(t.sin());
    }
    (a, b)
}

/// A random rotation of R^dim (QR of a Gaussian matrix), so the test is not axis-aligned.
fn rotate(dim: i64, ts: &[&Tensor]) -> Vec<Tensor> {
    tch::manual_seed(7);
    let (q, _) = Tensor::linalg_qr(&Tensor::randn([dim, dim], (Kind::Double, Device::Cpu)), "reduced");
    ts.iter().map(|t| q.matmul(t)).collect()
}

#[test]
fn known_angles_are_recovered_to_1e_6() {
    let angles = [1e-7, 0.01, 0.3, 0.9, 1.2, std::f64::consts::FRAC_PI_2];
    let (a, b) = pair(20, &angles);
    let r = rotate(20, &[&a, &b]);
    let got = principal_angles(&r[0], &r[1]).unwrap();
    assert_eq!(got.len(), angles.len());
    for (g, t) in got.iter().zip(angles) {
        assert!((g - t).abs() < 1e-6, "angle {g} vs {t}");
    }
    let expected_d = (angles.iter().map(|t| t.sin().powi(2)).sum::<f64>() / angles.len() as f64).sqrt();
    assert!((projection_distance(&r[0], &r[1]).unwrap() - expected_d).abs() < 1e-9);
}

#[test]
fn identical_subspaces_have_distance_zero_and_orthogonal_ones_one() {
    let (a, b) = pair(12, &[std::f64::consts::FRAC_PI_2; 4]);
    let r = rotate(12, &[&a, &b]);
    assert!(projection_distance(&r[0], &r[0]).unwrap() < 1e-7);
    assert!((projection_distance(&r[0], &r[1]).unwrap() - 1.0).abs() < 1e-12);
    // A different basis of the same span is still distance 0.
    let mixed = r[0].matmul(&Tensor::linalg_qr(&Tensor::randn([4, 4], (Kind::Double, Device::Cpu)), "reduced").0);
    assert!(projection_distance(&r[0], &mixed).unwrap() < 1e-7);
}

#[test]
fn unequal_ranks_use_the_smaller_rank() {
    let (a, _) = pair(10, &[0.0, 0.0, 0.0]);
    let line = a.narrow(1, 0, 1);
    assert_eq!(principal_angles(&a, &line).unwrap().len(), 1);
    assert!(projection_distance(&a, &line).unwrap() < 1e-12, "a line inside a plane");
}

#[test]
fn basis_rank_follows_the_numerical_rank() {
    tch::manual_seed(1);
    let cols = Tensor::randn([30, 2], (Kind::Double, Device::Cpu));
    // Six columns spanning only two directions.
    let six = cols.matmul(&Tensor::randn([2, 6], (Kind::Double, Device::Cpu)));
    let basis = orthonormal_basis(&six, 4, f64::EPSILON).unwrap().unwrap();
    assert_eq!(basis.size(), vec![30, 2]);
    let zeros = Tensor::zeros([30, 6], (Kind::Double, Device::Cpu));
    assert!(orthonormal_basis(&zeros, 4, f64::EPSILON).unwrap().is_none());
}

#[test]
fn a_tensor_that_is_not_a_basis_is_an_error_not_a_panic() {
    let basis = Tensor::eye(4, (Kind::Double, Device::Cpu)).narrow(1, 0, 2);
    let vector = Tensor::ones([4], (Kind::Double, Device::Cpu));
    let other_space = Tensor::eye(5, (Kind::Double, Device::Cpu)).narrow(1, 0, 2);
    for (a, b) in [(&basis, &vector), (&vector, &basis), (&basis, &other_space), (&basis, &Tensor::new())] {
        let angles = principal_angles(a, b).unwrap_err().to_string();
        assert!(angles.contains("principal angles"), "{angles}");
        assert!(projection_distance(a, b).is_err());
    }
}
