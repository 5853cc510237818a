//! M3's repeated splits (METRICS.md, M3, Uncertainty): the seeded stratified splits, the
//! cross-validated choice of the L2 penalty and the temperature on each training split, and one
//! split's scores.
use super::logistic::{best_temperature, cross_entropy, fit_logistic, score, FitSettings, Logistic};
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
    pub temperature: f64,
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

/// A model fitted on a set of rows: the rows' standardiser, the fit, and its class counts.
struct Fitted {
    standardiser: Standardiser,
    model: Logistic,
    counts: Vec<usize>,
}

/// Standardise on `train` and fit with penalty `l2`, starting from `train`'s class frequencies.
fn fit_rows(features: &[Vec<f64>], class: &[usize], c: usize, train: &[usize], l2: f64, fit: &FitSettings) -> Fitted {
    let standardiser = Standardiser::fit(features, train);
    let ztrain = standardiser.apply(features, train);
    let atrain: Vec<usize> = train.iter().map(|&i| class[i]).collect();
    let mut counts = vec![0usize; c];
    for &a in &atrain {
        counts[a] += 1;
    }
    let prior: Vec<f64> = counts.iter().map(|&k| k as f64 / atrain.len() as f64).collect();
    let model = fit_logistic(&ztrain, &atrain, c, l2, fit, &prior);
    Fitted { standardiser, model, counts }
}

/// Standardise on `train`, fit with penalty `l2`, divide the logits by `temperature`, score on
/// `test` against the intercept-only model of `train`'s class frequencies.
pub(super) fn fit_and_score(features: &[Vec<f64>], class: &[usize], c: usize, train: &[usize], test: &[usize], choice: Choice, fit: &FitSettings) -> SplitScore {
    let Fitted { standardiser, model, counts } = fit_rows(features, class, c, train, choice.l2, fit);
    let ztest = standardiser.apply(features, test);
    let atest: Vec<usize> = test.iter().map(|&i| class[i]).collect();
    let prior: Vec<f64> = counts.iter().map(|&k| k as f64 / train.len() as f64).collect();
    let h_none = atest.iter().map(|&a| -prior[a].ln()).sum::<f64>() / atest.len() as f64;
    let majority = (0..c).max_by_key(|&k| (counts[k], std::cmp::Reverse(k))).unwrap_or(0);
    let majority_accuracy = atest.iter().filter(|&&a| a == majority).count() as f64 / atest.len() as f64;
    let (h_z, correct) = score(&model, &ztest, &atest, choice.temperature);
    SplitScore {
        h_none,
        h_z,
        accuracy: correct as f64 / atest.len() as f64,
        majority: majority_accuracy,
        l2: choice.l2,
        temperature: choice.temperature,
        train: train.len(),
        test: test.len(),
        iterations: model.iterations,
    }
}

/// The attacker chosen on one training split: its L2 penalty and the temperature dividing its
/// logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Choice {
    pub l2: f64,
    pub temperature: f64,
}

/// The (penalty, temperature) pair with the lowest mean cross-entropy over stratified folds of
/// the training split `train` alone: for each penalty (the grid, or the fixed `l2` without a
/// grid of two or more), fit on each fold's complement and keep the logits of the fold's rows;
/// the penalty's temperature is the one minimising the mean over folds of those rows'
/// cross-entropy ([`best_temperature`]; 1 when `calibrate_temperature` is off). Ties: the
/// larger penalty. Rows outside `train` are never read. Without cross-validation to do (one
/// penalty, no calibration) the fixed penalty at temperature 1.
pub(super) fn choose_attacker(features: &[Vec<f64>], class: &[usize], c: usize, train: &[usize], settings: &UsableSettings, seed: u64, split: u64) -> Choice {
    let grid: Vec<f64> = if settings.l2_grid.len() < 2 { vec![settings.l2_grid.first().copied().unwrap_or(settings.l2)] } else { settings.l2_grid.clone() };
    if grid.len() < 2 && !settings.calibrate_temperature {
        return Choice { l2: grid[0], temperature: 1.0 };
    }
    let folds = stratified_folds(train, class, c, settings.cv_folds, seed, split);
    let fit = settings.fit();
    let mut best = (f64::INFINITY, Choice { l2: grid[0], temperature: 1.0 });
    for &l2 in &grid {
        // Each used fold's logits and classes under the fit on its complement.
        let mut held_out: Vec<(Vec<Vec<f64>>, Vec<usize>)> = Vec::with_capacity(folds.len());
        for f in 0..folds.len() {
            let held = &folds[f];
            let rest: Vec<usize> = folds.iter().enumerate().filter(|(g, _)| *g != f).flat_map(|(_, v)| v.iter().copied()).collect();
            if held.is_empty() || rest.is_empty() {
                continue;
            }
            let fitted = fit_rows(features, class, c, &rest, l2, &fit);
            let logits = fitted.standardiser.apply(features, held).iter().map(|z| fitted.model.logits(z)).collect();
            held_out.push((logits, held.iter().map(|&i| class[i]).collect()));
        }
        let cv = |temperature: f64| held_out.iter().map(|(l, a)| cross_entropy(l, a, temperature)).sum::<f64>() / held_out.len().max(1) as f64;
        let (temperature, ce) = if settings.calibrate_temperature { best_temperature(cv) } else { (1.0, cv(1.0)) };
        if ce < best.0 || (ce == best.0 && l2 > best.1.l2) {
            best = (ce, Choice { l2, temperature });
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

/// The middle of the temperatures chosen on the splits (the geometric mean of the two middle
/// ones for an even count); 1 without splits.
pub(super) fn middle_temperature(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 1.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] * sorted[n / 2]).sqrt(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, StandardNormal};

    /// Two classes shifted 8 apart in the first of 64 features, 5% of the labels flipped: a
    /// fit with a small penalty interpolates the flipped ones and is overconfident.
    fn noisy(n: usize) -> (Vec<Vec<f64>>, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut normal = move || -> f64 { StandardNormal.sample(&mut rng) };
        let features: Vec<Vec<f64>> = (0..n).map(|i| (0..64).map(|j| normal() + if j == 0 { 8.0 * ((i % 2) as f64 - 0.5) } else { 0.0 }).collect()).collect();
        let class = (0..n).map(|i| if i % 20 == 3 { 1 - i % 2 } else { i % 2 }).collect();
        (features, class)
    }

    #[test]
    fn the_held_out_split_never_chooses_the_penalty_or_the_temperature() {
        let (features, class) = noisy(400);
        let settings = UsableSettings { l2_grid: vec![1e-3, 1e-2, 1e-1, 1.0], ..UsableSettings::default() };
        for split in 0..3u64 {
            let (train, test) = stratified_split(&class, 2, settings.test_fraction, 5, split);
            let chosen = choose_attacker(&features, &class, 2, &train, &settings, 5, split);
            assert!(chosen.temperature != 1.0, "split {split}: the temperature was not calibrated: {chosen:?}");
            // The held-out rows' labels flipped and their features unreadable (NaN): the same
            // choice, to the bit.
            let (mut poisoned, mut relabelled) = (features.clone(), class.clone());
            for &i in &test {
                poisoned[i] = vec![f64::NAN; 64];
                relabelled[i] = 1 - relabelled[i];
            }
            assert_eq!(choose_attacker(&poisoned, &relabelled, 2, &train, &settings, 5, split), chosen, "split {split}");
        }
        // Without calibration the temperature is 1, and with one penalty there is nothing to
        // cross-validate.
        let (train, _) = stratified_split(&class, 2, 0.3, 5, 0);
        let off = UsableSettings { calibrate_temperature: false, ..settings.clone() };
        assert_eq!(choose_attacker(&features, &class, 2, &train, &off, 5, 0).temperature, 1.0);
        let fixed = UsableSettings { l2: 0.25, l2_grid: Vec::new(), calibrate_temperature: false, ..settings };
        assert_eq!(choose_attacker(&features, &class, 2, &train, &fixed, 5, 0), Choice { l2: 0.25, temperature: 1.0 });
    }

    #[test]
    fn the_temperature_of_a_fixed_small_penalty_cools_an_overconfident_fit() {
        let (features, class) = noisy(400);
        let (train, test) = stratified_split(&class, 2, 0.3, 5, 0);
        let settings = UsableSettings { l2: 1e-3, l2_grid: Vec::new(), ..UsableSettings::default() };
        let chosen = choose_attacker(&features, &class, 2, &train, &settings, 5, 0);
        assert_eq!(chosen.l2, 1e-3);
        assert!(chosen.temperature > 1.5, "{chosen:?}");
        let calibrated = fit_and_score(&features, &class, 2, &train, &test, chosen, &settings.fit());
        let raw = fit_and_score(&features, &class, 2, &train, &test, Choice { l2: 1e-3, temperature: 1.0 }, &settings.fit());
        // The same fit: the same decisions, a better held-out cross-entropy.
        assert_eq!(calibrated.accuracy, raw.accuracy);
        assert!(calibrated.h_z < raw.h_z - 0.1, "calibrated {} nats, raw {} nats", calibrated.h_z, raw.h_z);
    }
}
