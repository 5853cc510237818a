//! Property test: any finite gradient under any valid defence (or chain) gives `None` or a
//! finite tensor of the input's shape and dtype.

mod common;

use gradguard_defenses::{apply_all, Defence};
use proptest::prelude::*;
use tch::{Kind, Tensor};

fn defence() -> impl Strategy<Value = Defence> {
    prop_oneof![
        Just(Defence::Withhold),
        (1e-6..1e4f64).prop_map(|max_norm| Defence::Clip { max_norm }),
        (1e-6..1e4f64, 0.0..10.0f64).prop_map(|(clip_norm, multiplier)| Defence::Noise {
            clip_norm,
            multiplier
        }),
        (1e-6..=1.0f64).prop_map(|keep_fraction| Defence::Sparsify { keep_fraction }),
        (1u32..=16).prop_map(|bits| Defence::Quantize { bits }),
    ]
}

/// A shape of 1 to 4 dimensions (some of size 1) and finite values of widely varying scale.
fn gradient() -> impl Strategy<Value = (Vec<i64>, Vec<f64>, bool)> {
    (
        prop::collection::vec(1i64..=6, 1..=4),
        -30i32..=30,
        any::<bool>(),
    )
        .prop_flat_map(|(shape, exp, double)| {
            let n = shape.iter().product::<i64>() as usize;
            let scale = 10f64.powi(exp);
            (
                Just(shape),
                prop::collection::vec((-1.0..1.0f64).prop_map(move |x| x * scale), n),
                Just(double),
            )
        })
}

fn check(
    out: Option<Tensor>,
    shape: &[i64],
    kind: Kind,
    withheld: bool,
) -> Result<(), TestCaseError> {
    match out {
        None => prop_assert!(withheld, "released nothing without a withhold"),
        Some(t) => {
            prop_assert!(!withheld, "released a withheld layer");
            prop_assert_eq!(t.size(), shape.to_vec());
            prop_assert_eq!(t.kind(), kind);
            prop_assert!(
                common::values(&t).iter().all(|x| x.is_finite()),
                "non-finite output"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn single_defence_output_is_none_or_finite_same_shape(
        (shape, vals, double) in gradient(), d in defence(), seed in any::<u64>()
    ) {
        let kind = if double { Kind::Double } else { Kind::Float };
        let g = Tensor::from_slice(&vals).reshape(shape.as_slice()).to_kind(kind);
        let out = d.apply(&g, seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check(out, &shape, kind, d == Defence::Withhold)?;
    }

    #[test]
    fn chain_output_is_none_or_finite_same_shape(
        (shape, vals, double) in gradient(),
        chain in prop::collection::vec(defence(), 0..4),
        seed in any::<u64>()
    ) {
        let kind = if double { Kind::Double } else { Kind::Float };
        let g = Tensor::from_slice(&vals).reshape(shape.as_slice()).to_kind(kind);
        let out = apply_all(&chain, &g, seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check(out, &shape, kind, chain.contains(&Defence::Withhold))?;
    }
}
