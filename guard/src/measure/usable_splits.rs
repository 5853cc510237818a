//! M3's repeated splits (METRICS.md, M3, Uncertainty): the seeded stratified splits, the
//! cross-validated choice of the L2 penalty on each training split, and one split's scores.
use super::logistic::{fit_logistic, score, FitSettings};
use super::sensitivity::mean_and_standard_error;
use super::usable::UsableSettings;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One split's held-out scores.
pub(super) struct SplitScore {
    /// H_V(A|none) and H_V(A|Z) in nats.
    pub h_none: f64,
    pub h_z: f64,
    pub accuracy: f64,
    pub majority: f64,
    pub l2: f64,
    pub train: usize,
    pub test: usize,
    pub iterations: usize,
}

/// Standardises features with the statistics of a set of rows.
struct Standardiser {
    mean: Vec<f64>,
    sd: Vec<f64>,
}

impl Standardiser {
    fn fit(features: &[Vec<f64>], rows: &[usize]) -> Self {
        let d = features.first().map_or(0, |f| f.len());
        let mut mean = vec![0.0; d];
        for &i in rows {
            mean.iter_mut().zip(&features[i]).for_each(|(m, v)| *m += v);
        }
        mean.iter_mut().for_each(|m| *m /= rows.len().max(1) as f64);
        let mut sd = vec![0.0; d];
        for &i in rows {
            sd.iter_mut().zip(&features[i]).zip(&mean).for_each(|((s, v), m)| *s += (v - m) * (v - m));
        }
        sd.iter_mut().for_each(|s| {
            *s = (*s / rows.len().max(1) as f64).sqrt();
            // A constant feature carries nothing: leave it centred, unscaled.
            if !(*s > 1e-300) {
                *s = 1.0;
            }
        });
        Self { mean, sd }
    }

    fn apply(&self, features: &[Vec<f64>], rows: &[usize]) -> Vec<Vec<f64>> {
        rows.iter().map(|&i| features[i].iter().zip(&self.mean).zip(&self.sd).map(|((v, m), s)| (v - m) / s).collect()).collect()
    }
}

/// Standardise on `train`, fit with penalty `l2`, score on `test` against the intercept-only
/// model of `train`'s class frequencies.
pub(super) fn fit_and_score(features: &[Vec<f64>], class: &[usize], c: usize, train: &[usize], test: &[usize], l2: f64, fit: &FitSettings) -> SplitScore {
    let standardiser = Standardiser::fit(features, train);
    let (ztrain, ztest) = (standardiser.apply(features, train), standardiser.apply(features, test));
    let atrain: Vec<usize> = train.iter().map(|&i| class[i]).collect();
    let atest: Vec<usize> = test.iter().map(|&i| class[i]).collect();
    let mut counts = vec![0usize; c];
    for &a in &atrain {
        counts[a] += 1;
    }
    let prior: Vec<f64> = counts.iter().map(|&k| k as f64 / atrain.len() as f64).collect();
    let h_none = atest.iter().map(|&a| -prior[a].ln()).sum::<f64>() / atest.len() as f64;
    let majority = (0..c).max_by_key(|&k| (counts[k], std::cmp::Reverse(k))).unwrap_or(0);
    let majority_accuracy = atest.iter().filter(|&&a| a == majority).count() as f64 / atest.len() as f64;
    let model = fit_logistic(&ztrain, &atrain, c, l2, fit, &prior);
    let (h_z, correct) = score(&model, &ztest, &atest);
    SplitScore { h_none, h_z, accuracy: correct as f64 / atest.len() as f64, majority: majority_accuracy, l2, train: train.len(), test: test.len(), iterations: model.iterations }
}

/// The penalty of the grid with the lowest mean held-out cross-entropy over stratified folds of
/// the training split `train` (ties: the larger penalty); the fixed `l2` without a grid.
pub(super) fn choose_penalty(features: &[Vec<f64>], class: &[usize], c: usize, train: &[usize], settings: &UsableSettings, seed: u64, split: u64) -> f64 {
    if settings.l2_grid.len() < 2 {
        return settings.l2_grid.first().copied().unwrap_or(settings.l2);
    }
    let folds = stratified_folds(train, class, c, settings.cv_folds, seed, split);
    let fit = settings.fit();
    let mut best = (f64::INFINITY, settings.l2_grid[0]);
    for &l2 in &settings.l2_grid {
        let mut ce = 0.0;
        let mut used = 0;
        for f in 0..folds.len() {
            let held = &folds[f];
            let rest: Vec<usize> = folds.iter().enumerate().filter(|(g, _)| *g != f).flat_map(|(_, v)| v.iter().copied()).collect();
            if held.is_empty() || rest.is_empty() {
                continue;
            }
            ce += fit_and_score(features, class, c, &rest, held, l2, &fit).h_z;
            used += 1;
        }
        let ce = ce / used.max(1) as f64;
        if ce < best.0 || (ce == best.0 && l2 > best.1) {
            best = (ce, l2);
        }
    }
    best.1
}

/// `train` dealt into `k` folds, class by class after a seeded shuffle, so each fold keeps the
/// class proportions.
pub(super) fn stratified_folds(train: &[usize], class: &[usize], classes: usize, k: usize, seed: u64, split: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0x4d33_4356_0000 + split);
    let mut folds = vec![Vec::new(); k];
    let mut next = 0;
    for cl in 0..classes {
        let mut idx: Vec<usize> = train.iter().copied().filter(|&i| class[i] == cl).collect();
        idx.shuffle(&mut rng);
        for i in idx {
            folds[next % k].push(i);
            next += 1;
        }
    }
    folds
}

/// Mean and standard error over the splits; the error of a single split is reported as 0.
pub(super) fn mean_and_se(values: &[f64]) -> (f64, f64) {
    let (mean, se) = mean_and_standard_error(values);
    (mean, if se.is_finite() { se } else { 0.0 })
}

/// The value chosen most often (ties: the smaller).
pub(super) fn most_chosen(values: &[f64]) -> f64 {
    let mut best = (0usize, f64::INFINITY);
    for &v in values {
        let count = values.iter().filter(|&&w| w == v).count();
        if count > best.0 || (count == best.0 && v < best.1) {
            best = (count, v);
        }
    }
    best.1
}

/// Stratified seeded split: of each class's k samples, round(k * fraction) go to the held-out
/// split, keeping at least one in training (and one held out when k >= 2).
/// Split `split` of a seed draws its own stream (split 0 is the single split of earlier releases).
pub(super) fn stratified_split(class: &[usize], classes: usize, test_fraction: f64, seed: u64, split: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0x4d33_5350 + (split << 32));
    let mut train = Vec::new();
    let mut test = Vec::new();
    for k in 0..classes {
        let mut idx: Vec<usize> = class.iter().enumerate().filter(|(_, &a)| a == k).map(|(i, _)| i).collect();
        idx.shuffle(&mut rng);
        let count = idx.len();
        let held = if count >= 2 { ((count as f64 * test_fraction).round() as usize).clamp(1, count - 1) } else { 0 };
        test.extend_from_slice(&idx[..held]);
        train.extend_from_slice(&idx[held..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}
