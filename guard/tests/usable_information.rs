//! M3 (usable latent information) on data where the answer is known.
//!
//! 1. Off the training thread, on host gradient matrices: three "layers" of Gaussian
//!    per-sample gradients, an attribute signal planted in the middle one only. M3 must find
//!    that layer (clearly more bits than the others) and report about 0 bits for every layer
//!    once the attribute labels are shuffled.
//! 2. Through a model (the LossFn convenience): an MLP whose inputs carry the attribute in
//!    coordinates the task ignores. Shuffled labels must give about 0 bits in every layer.
mod common;
use gradguard_guard::{Batch, Inspection, measure::GradientMatrix};
use gradguard_guard::measure::{usable_information_layers, UsableSettings};
use gradguard_guard::LayerMap;
use rand::{seq::SliceRandom, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{nn, Device, Tensor};

/// Bound on the bits reported for shuffled labels (no signal): the estimator is clipped at 0
/// and its held-out noise with 300 test samples stays well below this.
const NULL_BOUND: f64 = 0.05;
const N: usize = 1000;

fn gaussian_matrix(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    (0..rows * cols).map(|_| StandardNormal.sample(rng)).collect()
}

fn shuffled(labels: &[i64], seed: u64) -> Vec<i64> {
    let mut s = labels.to_vec();
    s.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    s
}

#[test]
fn planted_layer_is_found_and_shuffled_labels_give_about_zero_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let labels: Vec<i64> = (0..N).map(|i| (i % 2) as i64).collect();
    let widths = [40usize, 600, 3000];
    let planted = 1;
    let mut layers = Vec::new();
    for (l, &p) in widths.iter().enumerate() {
        let mut data = gaussian_matrix(N, p, &mut rng);
        if l == planted {
            // Attribute 1 shifts the gradient along a fixed random unit direction. The projection
            // R (r x p, entries N(0, 1/r)) keeps the shift's length but spreads p/r units of
            // noise variance onto each feature, so the shift is 3 sqrt(p/r): 3 standard
            // deviations in the projected space.
            let dir: Vec<f64> = (0..p).map(|_| StandardNormal.sample(&mut rng)).collect();
            let norm = dir.iter().map(|v: &f64| v * v).sum::<f64>().sqrt();
            for i in 0..N {
                if labels[i] == 1 {
                    for (j, d) in dir.iter().enumerate() {
                        data[i * p + j] += 3.0 * (p as f64 / 64.0).sqrt() * d / norm;
                    }
                }
            }
        }
        layers.push(Some(GradientMatrix::new(N, p, data).unwrap()));
    }
    let settings = UsableSettings::default();
    let real = usable_information_layers(&layers, &labels, &settings, 0).unwrap();
    let bits: Vec<f64> = real.iter().map(|m| m.measured().unwrap().usable_information_bits).collect();
    let acc: Vec<f64> = real.iter().map(|m| m.measured().unwrap().attack_accuracy).collect();
    println!("planted in layer {planted}: bits {bits:?}, held-out attack accuracy {acc:?}");
    for (l, m) in real.iter().enumerate() {
        let m = m.measured().unwrap();
        assert_eq!((m.samples, m.train, m.test, m.classes, m.params), (N, 700, 300, 2, widths[l]));
        assert!((m.majority_accuracy - 0.5).abs() < 1e-12);
    }
    // Measured (5 splits, penalty and temperature cross-validated, fold ensemble): [0, 0.710, 0]
    // bits, attack accuracy [0.49, 0.92, 0.49] (0.666 bits for the planted layer at T = 1).
    assert!(bits[planted] > 0.3, "planted layer gives only {:.4} bits", bits[planted]);
    assert!(acc[planted] > 0.8, "planted layer attack accuracy {:.3}", acc[planted]);
    for l in [0, 2] {
        assert!(bits[planted] > bits[l] + 0.25, "layer {l}: {:.4} bits vs planted {:.4}", bits[l], bits[planted]);
        assert!(bits[l] < NULL_BOUND, "layer {l} carries no signal but gives {:.4} bits", bits[l]);
    }
    for seed in [1u64, 2] {
        let control = usable_information_layers(&layers, &shuffled(&labels, seed), &settings, 0).unwrap();
        let bits: Vec<f64> = control.iter().map(|m| m.measured().unwrap().usable_information_bits).collect();
        println!("shuffled labels (seed {seed}): bits {bits:?}");
        for (l, b) in bits.iter().enumerate() {
            assert!(*b < NULL_BOUND, "layer {l}, shuffled labels: {b:.4} bits (bound {NULL_BOUND})");
        }
    }
}

#[test]
fn deterministic_and_absent_below_the_sample_floor() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let labels: Vec<i64> = (0..300).map(|i| (i % 3) as i64).collect();
    let g = GradientMatrix::new(300, 50, gaussian_matrix(300, 50, &mut rng)).unwrap();
    let settings = UsableSettings::default();
    let a = usable_information_layers(&[Some(g.clone()), None], &labels, &settings, 4).unwrap();
    let b = usable_information_layers(&[Some(g.clone()), None], &labels, &settings, 4).unwrap();
    assert_eq!(a, b, "same seed, same numbers");
    assert_eq!(a[1].absent_reason(), Some("layer not used by the loss (gradient undefined)"));
    let few = GradientMatrix::new(120, 50, g.data[..120 * 50].to_vec()).unwrap();
    let m = usable_information_layers(&[Some(few)], &labels[..120], &settings, 4).unwrap();
    assert_eq!(m[0].absent_reason(), Some("insufficient samples: 120 < 200"));
    // A single attribute value: nothing to infer, absent rather than 0.
    let m = usable_information_layers(&[Some(g)], &[5; 300], &settings, 4).unwrap();
    assert!(m[0].absent_reason().unwrap().contains("single value"));
    // Mismatched labels are an error, not a number.
    assert!(usable_information_layers(&[Some(GradientMatrix::new(2, 1, vec![0.0, 1.0]).unwrap())], &[0], &settings, 0).is_err());
    assert!(GradientMatrix::new(3, 2, vec![0.0; 5]).is_err());
}

#[test]
fn through_a_model_shuffled_attribute_gives_about_zero_bits() {
    let (x, y, attribute) = common::planted_attribute(400, 2.0, 11);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[20, 32, 16, 2]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
    let settings = UsableSettings::default();
    let grads = Inspection::new(&layers, &loss, Batch::new(&x, &y)).per_sample_gradients().unwrap();
    assert_eq!(grads.iter().map(|g| g.as_ref().unwrap().cols).collect::<Vec<_>>(), vec![20 * 32 + 32, 32 * 16 + 16, 16 * 2 + 2]);
    let real = Inspection::new(&layers, &loss, Batch::new(&x, &y).with_attribute(&Tensor::from_slice(&attribute))).seeded(0, 0).usable_information(&settings).unwrap();
    let control = Inspection::new(&layers, &loss, Batch::new(&x, &y).with_attribute(&Tensor::from_slice(&shuffled(&attribute, 5)))).seeded(0, 0).usable_information(&settings).unwrap();
    let bits = |v: &[gradguard_guard::Metric<gradguard_guard::measure::UsableInformation>]| -> Vec<f64> {
        v.iter().map(|m| m.measured().unwrap().usable_information_bits).collect()
    };
    println!("model: attribute {:?}, shuffled {:?}", bits(&real), bits(&control));
    // Measured (5 splits, temperature cross-validated, fold ensemble): [0.246, 0.266, 0.235]
    // bits with the attribute (0.258, 0.269, 0.236 at T = 1), [0, 0, 0] shuffled. Every layer's
    // gradient moves with the shifted input coordinates, so every layer must show some.
    for (l, b) in bits(&real).into_iter().enumerate() {
        assert!(b > 0.08, "layer {l}: {b:.4} bits with the planted attribute");
    }
    for b in bits(&control) {
        assert!(b < NULL_BOUND, "shuffled attribute gives {b:.4} bits (bound {NULL_BOUND})");
    }
}

/// Features with a planted attribute signal of fixed strength: `n` rows of 8 Gaussian features,
/// attribute 1 shifting the first one by `shift` standard deviations.
fn planted_features(n: usize, shift: f64, seed: u64) -> (Vec<Vec<f64>>, Vec<i64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let labels: Vec<i64> = (0..n).map(|i| (i % 2) as i64).collect();
    let features = labels
        .iter()
        .map(|&a| (0..8).map(|j| { let v: f64 = StandardNormal.sample(&mut rng); v } + if j == 0 && a == 1 { shift } else { 0.0 }).collect::<Vec<f64>>())
        .collect();
    (features, labels)
}

#[test]
fn the_standard_error_over_splits_shrinks_as_samples_grow_and_the_penalty_is_reported() {
    let settings = UsableSettings::default();
    assert_eq!(settings.splits, 5, "METRICS.md: 5 seeded splits by default");
    let (mut se, mut penalty, mut last_bits) = (Vec::new(), Vec::new(), 0.0);
    for n in [300usize, 1200, 4800, 19200] {
        let (features, labels) = planted_features(n, 2.0, 21);
        let m = gradguard_guard::measure::attribute_information(&features, &labels, &settings, 3).unwrap();
        let m = m.measured().unwrap().clone();
        println!("n = {n}: {:.4} +- {:.4} bits, accuracy {:.3} +- {:.3}, penalties {:?} (reported {})", m.usable_information_bits, m.usable_information_se, m.attack_accuracy, m.attack_accuracy_se, m.l2_chosen, m.l2);
        assert_eq!(m.splits, 5);
        assert_eq!(m.l2_chosen.len(), 5, "one chosen penalty per split");
        assert!(m.l2_chosen.iter().all(|l| settings.l2_grid.contains(l)), "{:?} outside the grid", m.l2_chosen);
        assert!(m.l2_chosen.contains(&m.l2), "the reported penalty {} was chosen on some split", m.l2);
        assert!(m.usable_information_se > 0.0, "five different splits give different estimates");
        // A shift of 2 sd between two equiprobable Gaussians: I(A; Z) = 0.486 bits (numerical
        // integration); a finite attacker reads less in expectation, so the estimate stays
        // below it up to its error.
        assert!(m.usable_information_bits > 0.25 && m.usable_information_bits < 0.486 + 3.0 * m.usable_information_se, "{m:?}");
        se.push(m.usable_information_se);
        penalty.push(m.l2);
        last_bits = m.usable_information_bits;
    }
    // Measured (seeds 21 and 3, temperature cross-validated, fold ensemble): se 0.0275, 0.0236,
    // 0.0144, 0.0046 bits for n = 300 ... 19200 (0.0240, 0.0229, 0.0143, 0.0046 at T = 1).
    // 64x the samples: the held-out noise falls about 8x. A 5-split estimate of a spread has
    // about 35% noise of its own, so require the fall over two quadruplings and 3x over the range.
    assert!(se[2] < se[0] && se[3] < se[1], "standard errors {se:?} do not shrink");
    assert!(se[3] < se[0] / 3.0, "standard errors {se:?}");
    assert!(penalty[3] <= penalty[0], "more samples should not need a larger penalty: {penalty:?}");
    // With many samples the estimate reaches the true value.
    assert!((last_bits - 0.486).abs() < 3.0 * se[3] + 0.01, "{last_bits} bits at n = 19200, true 0.486");

    // A fixed penalty (no grid) is the penalty reported; one split has no spread.
    let (features, labels) = planted_features(300, 1.0, 21);
    let m = gradguard_guard::measure::attribute_information(&features, &labels, &UsableSettings::single_split(0.5), 3).unwrap();
    let m = m.measured().unwrap();
    assert_eq!((m.l2, m.splits, m.usable_information_se), (0.5, 1, 0.0));
    assert!(UsableSettings { splits: 0, ..UsableSettings::default() }.validate().is_err());
    assert!(UsableSettings { l2_grid: vec![0.1, f64::NAN], ..UsableSettings::default() }.validate().is_err());
}
