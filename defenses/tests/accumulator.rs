//! `GradientAccumulator` on real tensors.

mod common;

use common::{identical, randn, values};
use gradguard_defenses::{DefenceError, GradientAccumulator};
use tch::{Kind, Tensor};

fn close(a: &Tensor, b: &Tensor, tol: f64) -> bool {
    a.size() == b.size()
        && values(a)
            .iter()
            .zip(values(b))
            .all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn mean_is_sample_weighted() {
    let (a0, a1) = (randn(&[4, 3], Kind::Float, 1), randn(&[5], Kind::Float, 2));
    let (b0, b1) = (randn(&[4, 3], Kind::Float, 3), randn(&[5], Kind::Float, 4));
    let b2 = randn(&[2], Kind::Float, 5);
    let mut acc = GradientAccumulator::new(4);
    acc.add(&[Some(a0.copy()), Some(a1.copy()), None, None], 3)
        .unwrap();
    acc.add(
        &[Some(b0.copy()), Some(b1.copy()), Some(b2.copy()), None],
        5,
    )
    .unwrap();
    assert_eq!(acc.samples(), 8);
    let mean = acc.mean().unwrap();
    let want0 = (&a0 * 3.0 + &b0 * 5.0) / 8.0;
    let want1 = (&a1 * 3.0 + &b1 * 5.0) / 8.0;
    assert!(close(mean[0].as_ref().unwrap(), &want0, 1e-6));
    assert!(close(mean[1].as_ref().unwrap(), &want1, 1e-6));
    // Not the plain mean of the two micro-batch means.
    assert!(!close(
        mean[0].as_ref().unwrap(),
        &((&a0 + &b0) / 2.0),
        1e-3
    ));
    // Absent from the first add: counts as zero there.
    assert!(close(mean[2].as_ref().unwrap(), &(&b2 * 5.0 / 8.0), 1e-6));
    assert!(
        mean[3].is_none(),
        "a layer absent from every add stays None"
    );
    assert_eq!(mean[0].as_ref().unwrap().kind(), Kind::Float);
}

#[test]
fn mean_in_f64_and_half() {
    for (kind, tol) in [(Kind::Double, 1e-12), (Kind::Half, 2e-3)] {
        let (a, b) = (randn(&[16], kind, 6), randn(&[16], kind, 7));
        let mut acc = GradientAccumulator::new(1);
        acc.add(&[Some(a.copy())], 3).unwrap();
        acc.add(&[Some(b.copy())], 5).unwrap();
        let m = acc.mean().unwrap().remove(0).unwrap();
        assert_eq!(m.kind(), kind);
        let want = (a.to_kind(Kind::Double) * 3.0 + b.to_kind(Kind::Double) * 5.0) / 8.0;
        assert!(close(&m, &want, tol), "{kind:?}");
    }
}

#[test]
fn readiness_follows_the_sample_floor() {
    let mut acc = GradientAccumulator::new(1);
    assert!(!acc.is_ready(0), "an empty accumulator is never ready");
    assert!(!acc.is_ready(1));
    acc.add(&[Some(randn(&[2], Kind::Float, 8))], 3).unwrap();
    assert!(acc.is_ready(3) && !acc.is_ready(4));
    acc.add(&[Some(randn(&[2], Kind::Float, 9))], 5).unwrap();
    assert!(acc.is_ready(8) && !acc.is_ready(9));
    acc.reset();
    assert_eq!(acc.samples(), 0);
    assert!(!acc.is_ready(1));
    assert!(matches!(acc.mean(), Err(DefenceError::NothingAccumulated)));
}

#[test]
fn shape_mismatch_names_layer_and_shapes_and_changes_nothing() {
    let mut acc = GradientAccumulator::new(2);
    let first = [
        Some(randn(&[3], Kind::Float, 10)),
        Some(randn(&[2, 3], Kind::Float, 11)),
    ];
    acc.add(&first, 3).unwrap();
    let before = acc.mean().unwrap();
    let bad = [
        Some(randn(&[3], Kind::Float, 12)),
        Some(randn(&[3, 2], Kind::Float, 13)),
    ];
    let err = acc.add(&bad, 5).unwrap_err();
    match &err {
        DefenceError::ShapeMismatch {
            layer: 1,
            expected,
            got,
        } => {
            assert_eq!(
                (expected.as_slice(), got.as_slice()),
                (&[2, 3][..], &[3, 2][..])
            );
        }
        other => panic!("wrong error {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("layer 1") && msg.contains("[2, 3]") && msg.contains("[3, 2]"),
        "{msg}"
    );
    assert_eq!(acc.samples(), 3, "a failed add must not count");
    let after = acc.mean().unwrap();
    assert!(identical(
        before[0].as_ref().unwrap(),
        after[0].as_ref().unwrap()
    ));
}

#[test]
fn other_add_errors() {
    let mut acc = GradientAccumulator::new(2);
    let g = || Some(randn(&[3], Kind::Float, 14));
    assert!(matches!(
        acc.add(&[g()], 1),
        Err(DefenceError::LayerCount {
            expected: 2,
            got: 1
        })
    ));
    assert!(matches!(
        acc.add(&[g(), g()], 0),
        Err(DefenceError::ZeroSamples)
    ));
    let nan = Some(Tensor::from_slice(&[0.0f32, f32::NAN, 1.0]));
    match acc.add(&[g(), nan], 2) {
        Err(DefenceError::NonFinite { what, count: 1, .. }) => assert!(what.contains("layer 1")),
        other => panic!("expected NonFinite, got {other:?}"),
    }
    acc.add(&[g(), g()], 2).unwrap();
    let f64_grad = Some(randn(&[3], Kind::Double, 15));
    assert!(matches!(
        acc.add(&[f64_grad, g()], 2),
        Err(DefenceError::TensorMismatch {
            layer: 0,
            property: "dtype",
            ..
        })
    ));
    assert_eq!(acc.samples(), 2);
}

#[test]
fn stored_gradients_are_deep_copies() {
    let mut g = randn(&[6], Kind::Float, 16);
    let original = g.copy();
    let mut acc = GradientAccumulator::new(1);
    acc.add(&[Some(g.shallow_clone())], 4).unwrap();
    // What an optimizer / zero_grad does to the gradient after the add.
    let _ = g.f_add_scalar_(100.0).unwrap();
    let _ = g.zero_();
    let m = acc.mean().unwrap().remove(0).unwrap();
    assert!(
        close(&m, &original, 1e-6),
        "mutating the source changed the accumulated sum"
    );
    assert!(values(&g).iter().all(|x| *x == 0.0));
}
