//! Behaviour of each `Defence` on real tensors.

mod common;

use common::{identical, norm, randn, values};
use gradguard_defenses::{apply_all, apply_all_deferred, derive_seed, Defence, DefenceError, FiniteChecks};
use tch::{Kind, Tensor};

fn some(d: &Defence, g: &Tensor, seed: u64) -> Tensor {
    d.apply(g, seed).unwrap().expect("defence released nothing")
}

// ---------------------------------------------------------------- withhold

#[test]
fn withhold_returns_none() {
    let g = randn(&[4, 5], Kind::Float, 1);
    assert!(Defence::Withhold.apply(&g, 0).unwrap().is_none());
    // Documented: withholding never reads the tensor, so it is safe on a broken gradient.
    let bad = Tensor::from_slice(&[f32::NAN, 1.0]);
    assert!(Defence::Withhold.apply(&bad, 0).unwrap().is_none());
}

// ---------------------------------------------------------------- clip

#[test]
fn clip_bounds_norm_and_preserves_direction() {
    for kind in [Kind::Float, Kind::Double] {
        let g = randn(&[64, 32], kind, 2);
        let before = g.copy();
        let n = norm(&g);
        assert!(n > 10.0);
        let out = some(&Defence::Clip { max_norm: 1.0 }, &g, 0);
        assert_eq!(out.size(), g.size());
        assert_eq!(out.kind(), kind);
        let on = norm(&out);
        assert!(on <= 1.0 * (1.0 + 1e-6), "{kind:?}: norm {on} > 1");
        assert!(on >= 1.0 - 1e-5, "{kind:?}: norm {on} clipped too far");
        // out == g / ||g||, entry by entry: the direction is unchanged.
        for (o, x) in values(&out).iter().zip(values(&g)) {
            assert!((o - x / n).abs() <= 1e-6, "{kind:?}: {o} vs {}", x / n);
        }
        assert!(identical(&g, &before), "input modified");
    }
}

#[test]
fn clip_leaves_small_gradient_untouched_but_copies() {
    let g = randn(&[10, 10], Kind::Float, 3);
    let mut out = some(&Defence::Clip { max_norm: 1e3 }, &g, 0);
    assert!(identical(&out, &g));
    let _ = out.fill_(0.0);
    assert!(norm(&g) > 1.0, "output shares storage with the input");
}

// ---------------------------------------------------------------- noise

#[test]
fn noise_is_seeded_and_independent_of_libtorch_rng() {
    let g = randn(&[1000], Kind::Float, 4);
    let d = Defence::Noise {
        clip_norm: 1.0,
        multiplier: 1.0,
    };
    tch::manual_seed(1);
    let a = some(&d, &g, 7);
    tch::manual_seed(99);
    let _ = Tensor::randn([10], (Kind::Float, tch::Device::Cpu));
    let b = some(&d, &g, 7);
    assert!(identical(&a, &b), "same seed must be bit-identical");
    let c = some(&d, &g, 8);
    assert!(!a.equal(&c), "different seeds gave the same noise");
}

#[test]
fn noise_has_zero_mean_and_requested_std() {
    for kind in [Kind::Float, Kind::Double] {
        let g = randn(&[100_000], kind, 5);
        let (clip_norm, multiplier) = (2.0, 0.5);
        let out = some(
            &Defence::Noise {
                clip_norm,
                multiplier,
            },
            &g,
            11,
        );
        assert_eq!(out.kind(), kind);
        let clipped = some(
            &Defence::Clip {
                max_norm: clip_norm,
            },
            &g,
            0,
        );
        let noise: Vec<f64> = values(&out)
            .iter()
            .zip(values(&clipped))
            .map(|(o, c)| o - c)
            .collect();
        let n = noise.len() as f64;
        let mean = noise.iter().sum::<f64>() / n;
        let std = (noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let want = multiplier * clip_norm;
        assert!(
            mean.abs() < 4.0 * want / n.sqrt(),
            "{kind:?}: noise mean {mean}"
        );
        assert!(
            (std / want - 1.0).abs() < 0.02,
            "{kind:?}: noise std {std}, want {want}"
        );
    }
}

#[test]
fn noise_with_zero_multiplier_is_clip() {
    let g = randn(&[300], Kind::Float, 6);
    let a = some(
        &Defence::Noise {
            clip_norm: 0.5,
            multiplier: 0.0,
        },
        &g,
        1,
    );
    let b = some(&Defence::Clip { max_norm: 0.5 }, &g, 1);
    assert!(identical(&a, &b));
}

#[test]
fn noise_overflowing_the_dtype_is_refused() {
    // std 1e6 exceeds f16's maximum (65504): the noise would be infinite.
    let g = randn(&[64], Kind::Half, 7);
    let err = Defence::Noise {
        clip_norm: 1.0,
        multiplier: 1e6,
    }
    .apply(&g, 0)
    .unwrap_err();
    assert!(
        matches!(err, DefenceError::NonFiniteOutput { numel: 64, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("noise(clip_norm=1, multiplier=1000000)"),
        "{err}"
    );
}

// ---------------------------------------------------------------- sparsify

#[test]
fn sparsify_keeps_exactly_the_largest_entries() {
    for (kind, f) in [
        (Kind::Float, 0.1),
        (Kind::Double, 0.0137),
        (Kind::Float, 1.0),
    ] {
        let g = randn(&[50, 40], kind, 8);
        let out = some(&Defence::Sparsify { keep_fraction: f }, &g, 0);
        assert_eq!(out.size(), g.size());
        assert_eq!(out.kind(), kind);
        let k = (f * 2000.0_f64).ceil() as usize;
        let (gv, ov) = (values(&g), values(&out));
        let kept: Vec<usize> = (0..gv.len()).filter(|&i| ov[i] != 0.0).collect();
        assert_eq!(kept.len(), k, "keep_fraction {f}");
        for &i in &kept {
            assert_eq!(ov[i], gv[i], "kept entry changed");
        }
        let min_kept = kept
            .iter()
            .map(|&i| gv[i].abs())
            .fold(f64::INFINITY, f64::min);
        let max_dropped = (0..gv.len())
            .filter(|i| ov[*i] == 0.0)
            .map(|i| gv[i].abs())
            .fold(0.0, f64::max);
        assert!(
            min_kept >= max_dropped,
            "dropped {max_dropped} > kept {min_kept}"
        );
    }
}

#[test]
fn sparsify_keeps_at_least_one() {
    let g = Tensor::from_slice(&[0.1f32, -3.0, 2.0, 0.5]);
    let out = some(
        &Defence::Sparsify {
            keep_fraction: 1e-9,
        },
        &g,
        0,
    );
    assert_eq!(values(&out), vec![0.0, -3.0, 0.0, 0.0]);
}

// ---------------------------------------------------------------- quantize

/// Checks the documented level set and error bound, returns the distinct output values.
fn check_quantized(g: &Tensor, bits: u32, tol: f64) -> Vec<f64> {
    let out = some(&Defence::Quantize { bits }, g, 0);
    assert_eq!(out.size(), g.size());
    assert_eq!(out.kind(), g.kind());
    let (gv, ov) = (values(g), values(&out));
    let m = gv.iter().fold(0.0_f64, |a, x| a.max(x.abs()));
    let top = ((1u64 << bits) - 1) as f64;
    let step = 2.0 * m / top;
    for (x, q) in gv.iter().zip(&ov) {
        let i = ((q + m) / step).round();
        assert!(
            (0.0..=top).contains(&i),
            "bits {bits}: level index {i} out of range"
        );
        let level = -m + i * step;
        assert!(
            (q - level).abs() <= tol * m,
            "bits {bits}: {q} is not a level (nearest {level})"
        );
        assert!(
            (q - x).abs() <= step / 2.0 + tol * m,
            "bits {bits}: |{q} - {x}| > half step"
        );
    }
    let mut distinct = ov.clone();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    assert!(
        distinct.len() as u64 <= 1u64 << bits,
        "bits {bits}: {} values",
        distinct.len()
    );
    distinct
}

#[test]
fn quantize_uses_documented_levels() {
    for bits in [1, 2, 3, 8, 16] {
        check_quantized(&randn(&[1000], Kind::Float, 9), bits, 1e-6);
        check_quantized(&randn(&[7, 11], Kind::Double, 10), bits, 1e-12);
    }
    let g = randn(&[500], Kind::Float, 11);
    let m = values(&g).iter().fold(0.0_f64, |a, x| a.max(x.abs()));
    assert_eq!(
        check_quantized(&g, 1, 1e-6),
        vec![-m, m],
        "bits=1 levels are {{-m, +m}}"
    );
    assert_eq!(
        check_quantized(&g, 2, 1e-6).len(),
        4,
        "2 bits on 500 normals use all levels"
    );
}

#[test]
fn quantize_all_zero_stays_zero() {
    let g = Tensor::zeros([3, 3], (Kind::Float, tch::Device::Cpu));
    assert!(identical(&some(&Defence::Quantize { bits: 4 }, &g, 0), &g));
}

// ---------------------------------------------------------------- chains

#[test]
fn apply_all_applies_in_order_with_derived_seeds() {
    let g = randn(&[20, 20], Kind::Float, 12);
    let clip = Defence::Clip { max_norm: 1.0 };
    let quant = Defence::Quantize { bits: 1 };
    let cq = apply_all(&[clip.clone(), quant.clone()], &g, 5)
        .unwrap()
        .unwrap();
    let qc = apply_all(&[quant.clone(), clip.clone()], &g, 5)
        .unwrap()
        .unwrap();
    assert!(identical(&cq, &some(&quant, &some(&clip, &g, 0), 0)));
    assert!(identical(&qc, &some(&clip, &some(&quant, &g, 0), 0)));
    assert!(!cq.equal(&qc), "order must matter");
    assert!(
        (norm(&qc) - 1.0).abs() < 1e-5,
        "clip applied last bounds the norm"
    );

    let noise = Defence::Noise {
        clip_norm: 1.0,
        multiplier: 0.3,
    };
    let nn = apply_all(&[noise.clone(), noise.clone()], &g, 42)
        .unwrap()
        .unwrap();
    let manual = some(
        &noise,
        &some(&noise, &g, derive_seed(42, 0)),
        derive_seed(42, 1),
    );
    assert!(identical(&nn, &manual));
    assert_ne!(derive_seed(42, 0), derive_seed(42, 1));
}

#[test]
fn apply_all_withhold_short_circuits_but_validates_everything() {
    let g = randn(&[5], Kind::Float, 13);
    let chain = [
        Defence::Clip { max_norm: 1.0 },
        Defence::Withhold,
        Defence::Quantize { bits: 2 },
    ];
    assert!(apply_all(&chain, &g, 0).unwrap().is_none());
    let bad = [Defence::Withhold, Defence::Quantize { bits: 0 }];
    assert!(matches!(
        apply_all(&bad, &g, 0),
        Err(DefenceError::InvalidParameter {
            parameter: "bits",
            ..
        })
    ));
    let copy = apply_all(&[], &g, 0).unwrap().unwrap();
    assert!(identical(&copy, &g));
}

// ---------------------------------------------------------------- validation

#[test]
fn every_bad_parameter_is_named() {
    let cases: Vec<(Defence, &str, &str, &str)> = vec![
        (Defence::Clip { max_norm: 0.0 }, "clip", "max_norm", "0"),
        (Defence::Clip { max_norm: -1.0 }, "clip", "max_norm", "-1"),
        (
            Defence::Clip { max_norm: f64::NAN },
            "clip",
            "max_norm",
            "NaN",
        ),
        (
            Defence::Clip {
                max_norm: f64::INFINITY,
            },
            "clip",
            "max_norm",
            "inf",
        ),
        (
            Defence::Noise {
                clip_norm: 0.0,
                multiplier: 1.0,
            },
            "noise",
            "clip_norm",
            "0",
        ),
        (
            Defence::Noise {
                clip_norm: f64::NAN,
                multiplier: 1.0,
            },
            "noise",
            "clip_norm",
            "NaN",
        ),
        (
            Defence::Noise {
                clip_norm: 1.0,
                multiplier: -0.1,
            },
            "noise",
            "multiplier",
            "-0.1",
        ),
        (
            Defence::Noise {
                clip_norm: 1.0,
                multiplier: f64::INFINITY,
            },
            "noise",
            "multiplier",
            "inf",
        ),
        (
            Defence::Noise {
                clip_norm: 1e10,
                multiplier: 1e300,
            },
            "noise",
            "multiplier",
            "1e300",
        ),
        (
            Defence::Sparsify { keep_fraction: 0.0 },
            "sparsify",
            "keep_fraction",
            "0",
        ),
        (
            Defence::Sparsify { keep_fraction: 1.5 },
            "sparsify",
            "keep_fraction",
            "1.5",
        ),
        (
            Defence::Sparsify {
                keep_fraction: f64::NAN,
            },
            "sparsify",
            "keep_fraction",
            "NaN",
        ),
        (Defence::Quantize { bits: 0 }, "quantize", "bits", "0"),
        (Defence::Quantize { bits: 17 }, "quantize", "bits", "17"),
    ];
    let g = randn(&[3], Kind::Float, 14);
    for (d, name, param, value) in cases {
        let err = d.validate().unwrap_err();
        match &err {
            DefenceError::InvalidParameter {
                defence,
                parameter,
                value: v,
                ..
            } => {
                assert_eq!((*defence, *parameter), (name, param), "{d:?}");
                let parsed: f64 = v.parse().unwrap();
                let want: f64 = value.parse().unwrap();
                assert!(
                    parsed == want || (parsed.is_nan() && want.is_nan()),
                    "{v} vs {value}"
                );
            }
            other => panic!("{d:?}: wrong variant {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(name) && msg.contains(param), "{msg}");
        assert!(d.apply(&g, 0).is_err(), "apply must validate {d:?}");
    }
    for ok in [
        Defence::Withhold,
        Defence::Clip { max_norm: 1e-12 },
        Defence::Noise {
            clip_norm: 1.0,
            multiplier: 0.0,
        },
        Defence::Sparsify { keep_fraction: 1.0 },
        Defence::Quantize { bits: 1 },
        Defence::Quantize { bits: 16 },
    ] {
        ok.validate().unwrap();
    }
}

fn all_releasing() -> Vec<Defence> {
    vec![
        Defence::Clip { max_norm: 1.0 },
        Defence::Noise {
            clip_norm: 1.0,
            multiplier: 0.5,
        },
        Defence::Sparsify { keep_fraction: 0.5 },
        Defence::Quantize { bits: 4 },
    ]
}

#[test]
fn non_finite_input_is_rejected() {
    let g = Tensor::from_slice(&[1.0f32, f32::NAN, 2.0, f32::INFINITY, -1.0]);
    for d in all_releasing() {
        match d.apply(&g, 0) {
            Err(DefenceError::NonFinite {
                count: 2,
                numel: 5,
                what,
            }) => {
                assert!(what.starts_with(d.name()), "{what}")
            }
            other => panic!("{d}: expected NonFinite, got {other:?}"),
        }
    }
    assert!(matches!(
        apply_all(&[], &g, 0),
        Err(DefenceError::NonFinite { .. })
    ));
}

#[test]
fn unusable_tensors_are_rejected() {
    let ints = Tensor::from_slice(&[1i64, 2, 3]);
    let undefined = Tensor::new();
    for d in all_releasing() {
        for t in [&ints, &undefined] {
            let err = d.apply(t, 0).unwrap_err();
            assert!(
                matches!(err, DefenceError::UnsupportedTensor { .. }),
                "{d}: {err}"
            );
        }
    }
    assert!(Defence::Clip { max_norm: 1.0 }
        .apply(&ints, 0)
        .unwrap_err()
        .to_string()
        .contains("Int64"));
}

#[test]
fn outputs_are_new_tensors_of_the_input_kind() {
    for kind in [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16] {
        let g = randn(&[8, 9], kind, 15).set_requires_grad(true);
        let before = g.detach().copy();
        for d in all_releasing() {
            let out = some(&d, &g, 3);
            assert_eq!(out.kind(), kind, "{d}");
            assert_eq!(out.size(), vec![8, 9], "{d}");
            assert!(!out.requires_grad(), "{d}: output carries autograd history");
            assert_ne!(
                out.data_ptr(),
                g.data_ptr(),
                "{d}: output aliases the input"
            );
            assert!(identical(&g.detach(), &before), "{d}: input modified");
        }
    }
}

#[test]
fn empty_gradient_passes_through() {
    let g = Tensor::zeros([0, 4], (Kind::Float, tch::Device::Cpu));
    for d in all_releasing() {
        assert_eq!(some(&d, &g, 0).size(), vec![0, 4], "{d}");
    }
}

// ---------------------------------------------------------------- names, display, serde

#[test]
fn names_display_and_serde() {
    let ds = [
        (Defence::Withhold, "withhold", "withhold"),
        (Defence::Clip { max_norm: 1.0 }, "clip", "clip(max_norm=1)"),
        (
            Defence::Noise {
                clip_norm: 2.0,
                multiplier: 0.5,
            },
            "noise",
            "noise(clip_norm=2, multiplier=0.5)",
        ),
        (
            Defence::Sparsify { keep_fraction: 0.1 },
            "sparsify",
            "sparsify(keep_fraction=0.1)",
        ),
        (
            Defence::Quantize { bits: 8 },
            "quantize",
            "quantize(bits=8)",
        ),
    ];
    for (d, name, shown) in ds {
        assert_eq!(d.name(), name);
        assert_eq!(d.to_string(), shown);
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains(&format!("\"action\":\"{name}\"")), "{json}");
        assert_eq!(serde_json::from_str::<Defence>(&json).unwrap(), d);
    }
    let parsed: Defence = serde_json::from_str(r#"{"action":"clip","max_norm":0.5}"#).unwrap();
    assert_eq!(parsed, Defence::Clip { max_norm: 0.5 });
    assert!(serde_json::from_str::<Defence>(r#"{"action":"clip","max_norm":1,"typo":2}"#).is_err());
    assert!(serde_json::from_str::<Defence>(r#"{"action":"blur"}"#).is_err());
    assert!(serde_json::from_str::<Defence>(r#"{"action":"noise","clip_norm":1}"#).is_err());
}

// ---------------------------------------------------------------- deferred checks

#[test]
fn deferred_chains_release_what_apply_all_releases() {
    let chain = [
        Defence::Clip { max_norm: 1.0 },
        Defence::Noise { clip_norm: 0.5, multiplier: 0.2 },
        Defence::Quantize { bits: 6 },
    ];
    let mut checks = FiniteChecks::new();
    let layers: Vec<Tensor> = (0..3).map(|l| randn(&[40, 7], Kind::Float, 100 + l)).collect();
    let deferred: Vec<Tensor> = layers
        .iter()
        .enumerate()
        .map(|(l, g)| apply_all_deferred(&chain, g, l as u64, &mut checks).unwrap().unwrap())
        .collect();
    // Per chain, its input and the noise's output: clip and quantize keep a finite input
    // finite (their outputs are not checked again); all six read together.
    assert_eq!(checks.len(), 3 * 2);
    checks.verify().unwrap();
    for (l, (g, out)) in layers.iter().zip(&deferred).enumerate() {
        assert!(identical(out, &apply_all(&chain, g, l as u64).unwrap().unwrap()), "layer {l}");
    }
}

#[test]
fn deferred_checks_fail_with_the_first_failing_layer_and_defence() {
    let clip = [Defence::Clip { max_norm: 1.0 }];
    let loud = [Defence::Noise { clip_norm: 1.0, multiplier: 1e6 }];
    let fine = randn(&[64], Kind::Half, 21);
    let nan = Tensor::from_slice(&[1.0f32, f32::NAN, f32::INFINITY]);
    let mut checks = FiniteChecks::new();
    for (name, chain, g) in [("ok", &clip[..], &fine), ("loud", &loud[..], &fine), ("broken", &clip[..], &nan)] {
        checks.set_context(format!("layer {name}"));
        // Nothing is refused before the checks are read.
        assert!(apply_all_deferred(chain, g, 0, &mut checks).unwrap().is_some());
    }
    match checks.verify() {
        Err(DefenceError::NonFiniteOutput { what, numel: 64, .. }) => {
            assert_eq!(what, "layer loud: noise(clip_norm=1, multiplier=1000000)")
        }
        other => panic!("expected the loud layer's output refused, got {other:?}"),
    }
    let mut checks = FiniteChecks::new();
    checks.set_context("layer broken");
    let _ = apply_all_deferred(&clip, &nan, 0, &mut checks).unwrap();
    match checks.verify() {
        Err(DefenceError::NonFinite { what, count: 2, numel: 3 }) => assert_eq!(what, "layer broken: clip(max_norm=1)"),
        other => panic!("expected the broken input named, got {other:?}"),
    }
    assert!(FiniteChecks::new().verify().is_ok(), "no checks, nothing to refuse");
}

#[test]
fn clip_scales_on_the_device_exactly_as_the_norm_says() {
    // Below the bound the scale is exactly 1 (bit-identical); a zero gradient stays zero.
    let g = randn(&[30], Kind::Double, 22);
    assert!(identical(&some(&Defence::Clip { max_norm: 1e3 }, &g, 0), &g));
    let zero = Tensor::zeros([5], (Kind::Float, tch::Device::Cpu));
    assert!(identical(&some(&Defence::Clip { max_norm: 1.0 }, &zero, 0), &zero));
    // Above it, bit for bit what the host computed when it read the norm (f64) to scale.
    for kind in [Kind::Float, Kind::Double, Kind::Half] {
        let g = randn(&[300], kind, 23);
        let read = g.norm_scalaropt_dtype(2.0, Kind::Double).double_value(&[]);
        let out = some(&Defence::Clip { max_norm: 0.5 }, &g, 0);
        assert!(identical(&out, &g.f_mul_scalar(0.5 / read).unwrap()), "{kind:?}");
    }
}

#[test]
fn a_check_whose_sum_overflows_on_finite_entries_passes() {
    // The deferred check reads a sum (or a norm); 3e38 + 3e38 overflows f32 but no entry is
    // infinite, which the count on that path confirms.
    let g = Tensor::from_slice(&[3e38f32, 3e38, -1.0]);
    let kept = apply_all(&[Defence::Sparsify { keep_fraction: 1.0 }], &g, 0).unwrap().unwrap();
    assert!(identical(&kept, &g));
    assert!(identical(&apply_all(&[], &g, 0).unwrap().unwrap(), &g));
    // f64 entries whose squares overflow the norm: finite, so clipped (to zero: the scale
    // max_norm / inf is 0, as when the host read the norm).
    let big = Tensor::from_slice(&[1e200f64, -1e200]);
    assert_eq!(values(&some(&Defence::Clip { max_norm: 1.0 }, &big, 0)), vec![0.0, 0.0]);
}
