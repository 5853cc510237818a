//! M3, usable latent information (empirical V-information), per layer (METRICS.md, M3).
//!
//! How much of a private attribute the best attacker of a family V reads from a layer's
//! released gradients: V is multinomial logistic regression with an L2 penalty on a fixed,
//! seeded Gaussian projection of the gradients, fitted on a stratified training split and
//! scored on the held-out split against the intercept-only model (the training-split class
//! frequencies).
//!
//! Uncertainty (METRICS.md, M3, Uncertainty): one split of a few hundred samples moves the
//! estimate by about 0.1 bit, so the split is repeated (`splits` seeded stratified splits,
//! default 5) and the mean and its standard error are reported; on each split the L2 penalty is
//! chosen from `l2_grid`, together with a temperature T > 0 dividing the fitted logits (still a
//! logistic regression: an accurate but overconfident fit keeps its accuracy and loses its
//! miscalibration), by stratified `cv_folds`-fold cross-validation on the training split
//! alone (the folds' held-out cross-entropy), so the held-out split never chooses its own
//! attacker. The held-out split is scored by the attacker T was fitted for: the mean of the
//! chosen penalty's fold models' logits (a mean of affine maps: still a logistic regression),
//! divided by T. (T fitted to models trained on (k-1)/k of the training split is too large for
//! a refit on all of it, which is more confident: it under-reported the refit.) With
//! `calibrate_temperature` off the model refitted on the whole training split with the chosen
//! penalty is scored at T = 1, the estimate of earlier releases. The penalties and
//! temperatures chosen, and which attacker was scored, are reported.
//!
//! The core ([`usable_information`], [`attribute_information`]) is plain Rust on host f64
//! data: no libtorch, no autograd, Send + Sync inputs, so it runs off the training thread.
//! From a model ([`Inspection::usable_information`]) the per-sample gradients and R_l stay
//! on the model's device (`projected.rs`): only the n x r features reach the host.
use crate::error::{GuardError, Result};
use super::inspection::Inspection;
use super::inversion::ReleaseTransform;
use super::logistic::FitSettings;
use super::per_sample::GradientMatrix;
use super::projected::{projected_gradients, ProjectedLayer};
use super::projection::project;
use super::usable_splits::{cross_validate, mean_and_se, middle_temperature, most_chosen, score_split, stratified_split, SplitScore, REFIT};
use crate::report::Metric;
use serde::{Deserialize, Serialize};

/// How M3 is computed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UsableSettings {
    /// r: rows of the Gaussian projection R_l (entries N(0, 1/r)).
    pub projection_dim: usize,
    /// L2 penalty on the weights (not the intercepts) when `l2_grid` is empty: the objective is
    /// the mean training cross-entropy plus (l2 / 2) ||W||_F^2, on standardised features.
    pub l2: f64,
    /// Penalties cross-validation chooses from on each training split; empty: always `l2`.
    pub l2_grid: Vec<f64>,
    /// Folds of the cross-validation on the training split (stratified, seeded).
    pub cv_folds: usize,
    /// Choose a temperature T in [1e-2, 1e2] dividing the attacker's logits with each
    /// penalty, by the cross-validation on the training split (METRICS.md, M3), and score the
    /// held-out split by the folds' models at that T (`UsableInformation::attacker`
    /// `"fold_ensemble"`); off: T = 1 and the model refitted on the whole training split, the
    /// fit as it is (`"refit"`, the estimate of earlier releases).
    pub calibrate_temperature: bool,
    /// Seeded stratified splits averaged (mean and standard error).
    pub splits: usize,
    /// Held-out fraction of each attribute value (stratified split).
    pub test_fraction: f64,
    /// Fewest samples for an estimate; below it the metric is absent.
    pub min_samples: usize,
    /// L-BFGS iterations at most.
    pub max_iterations: usize,
    /// Stop when the largest gradient entry of the objective falls below this.
    pub tolerance: f64,
}

impl Default for UsableSettings {
    fn default() -> Self {
        Self {
            projection_dim: 64,
            l2: 1e-2,
            l2_grid: vec![1e-3, 1e-2, 1e-1, 1.0],
            cv_folds: 3,
            calibrate_temperature: true,
            splits: 5,
            test_fraction: 0.3,
            min_samples: 200,
            max_iterations: 500,
            tolerance: 1e-7,
        }
    }
}

impl UsableSettings {
    /// One split, the fixed penalty `l2` (the temperature still cross-validated unless
    /// `calibrate_temperature` is turned off).
    pub fn single_split(l2: f64) -> Self {
        Self { l2, l2_grid: Vec::new(), splits: 1, ..Self::default() }
    }

    /// Rejects settings outside their ranges (projection_dim >= 1, l2 and the grid's penalties
    /// finite and >= 0, cv_folds >= 2 with a grid or the temperature's calibration, splits >= 1,
    /// test_fraction in (0, 1), min_samples >= 4, max_iterations >= 1).
    pub fn validate(&self) -> Result<()> {
        let bad = |setting: &'static str, why: String| Err(GuardError::Config { setting, why });
        if self.projection_dim == 0 {
            return bad("usable.projection_dim", "must be at least 1".into());
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return bad("usable.l2", format!("must be a finite number >= 0, got {}", self.l2));
        }
        if let Some(v) = self.l2_grid.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return bad("usable.l2_grid", format!("every penalty must be a finite number >= 0, got {v}"));
        }
        if !self.l2_grid.is_empty() && self.cv_folds < 2 {
            return bad("usable.cv_folds", format!("must be at least 2 to choose a penalty, got {}", self.cv_folds));
        }
        if self.calibrate_temperature && self.cv_folds < 2 {
            return bad("usable.cv_folds", format!("must be at least 2 to choose a temperature (or set calibrate_temperature to false), got {}", self.cv_folds));
        }
        if self.splits == 0 {
            return bad("usable.splits", "must be at least 1".into());
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return bad("usable.test_fraction", format!("must be in (0, 1), got {}", self.test_fraction));
        }
        if self.min_samples < 4 {
            return bad("usable.min_samples", format!("must be at least 4, got {}", self.min_samples));
        }
        if self.max_iterations == 0 {
            return bad("usable.max_iterations", "must be at least 1".into());
        }
        Ok(())
    }

    pub(super) fn fit(&self) -> FitSettings {
        FitSettings { max_iterations: self.max_iterations, tolerance: self.tolerance }
    }
}

/// M3 for one layer: the mean over `splits` seeded stratified splits, with standard errors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsableInformation {
    /// max(0, mean over splits of H_V(A|none) - H_V(A|Z)) in bits.
    pub usable_information_bits: f64,
    /// Standard error of that mean over the splits (0 with one split). The splits share
    /// samples, so this is the spread of the split choice, not of a fresh data set.
    pub usable_information_se: f64,
    /// Held-out accuracy (mean over splits) of the decisions of the model refitted on the whole
    /// training split with the chosen penalty, whichever `attacker` gives the cross-entropy: a
    /// temperature moves no decision, so it is the same with and without calibration.
    pub attack_accuracy: f64,
    /// Standard error of the held-out accuracy over the splits.
    pub attack_accuracy_se: f64,
    /// Held-out accuracy of always guessing the training split's most frequent value (mean).
    pub majority_accuracy: f64,
    /// H_V(A|none): held-out cross-entropy of the training-split class frequencies, in bits
    /// (mean over splits).
    pub prior_entropy_bits: f64,
    /// H_V(A|Z): held-out cross-entropy of the attacker scored (`attacker`), in bits (mean over
    /// splits).
    pub conditional_entropy_bits: f64,
    /// Samples (or releases) used.
    pub samples: usize,
    /// Samples in each training split.
    pub train: usize,
    /// Samples in each held-out split.
    pub test: usize,
    /// Distinct attribute values.
    pub classes: usize,
    /// r, the projection's rows.
    pub projection_dim: usize,
    /// The L2 penalty reported: the one cross-validation chose on most splits (ties: the
    /// smaller), or the fixed penalty.
    pub l2: f64,
    /// The penalty chosen on each split, in split order.
    pub l2_chosen: Vec<f64>,
    /// The temperature reported: the middle of those chosen on the splits (the geometric mean
    /// of the two middle ones for an even count); 1 when calibration is off. The attacker's
    /// logits are divided by it.
    #[serde(default = "unit_temperature")]
    pub temperature: f64,
    /// The temperature chosen on each split (with that split's penalty), in split order.
    #[serde(default)]
    pub temperature_chosen: Vec<f64>,
    /// The attacker whose held-out cross-entropy gives `conditional_entropy_bits` and the bits.
    /// `"fold_ensemble"` (with `calibrate_temperature`): the mean of the logits of the
    /// `cv_folds` models the split's cross-validation fitted with the chosen penalty (each on a
    /// fold's complement within the training split), divided by the split's temperature: the
    /// models and T the folds' cross-entropy was computed for. `"refit"`: one model refitted on
    /// the whole training split with the chosen penalty, its logits divided by `temperature` (1
    /// without calibration; records of earlier releases, which have no field, read as
    /// `"refit"`). `"mixed"` if the splits differ, which only a cross-validation whose every
    /// score is non-finite (no fold models kept, the refit scored) could cause.
    #[serde(default = "refit_attacker")]
    pub attacker: String,
    /// Splits averaged.
    pub splits: usize,
    /// L-BFGS iterations of the slowest fit scored (the refit, or a fold ensemble's model).
    pub iterations: usize,
    /// Seed of the projection and the splits.
    pub seed: u64,
    /// P_l (columns of the gradient matrix).
    pub params: usize,
}

/// Records of earlier releases had no temperature: their logits were used as fitted.
fn unit_temperature() -> f64 {
    1.0
}

/// Records of earlier releases had no attacker field: they scored the refit.
fn refit_attacker() -> String {
    REFIT.to_string()
}

/// M3 of one layer from its per-sample (or per-release) gradient matrix and one attribute
/// label per row. `layer` picks the layer's projection stream. Absent (not an error) when
/// there are fewer than `min_samples` rows or a single attribute value.
pub fn usable_information(
    grads: &GradientMatrix,
    labels: &[i64],
    settings: &UsableSettings,
    seed: u64,
    layer: usize,
) -> Result<Metric<UsableInformation>> {
    settings.validate()?;
    if grads.rows.checked_mul(grads.cols) != Some(grads.data.len()) {
        return Err(GuardError::Config {
            setting: "usable information gradients",
            why: format!("{} rows x {} columns need {} values, the matrix holds {}", grads.rows, grads.cols, grads.rows.saturating_mul(grads.cols), grads.data.len()),
        });
    }
    if labels.len() != grads.rows {
        return Err(GuardError::BatchMismatch { what: "attribute labels", inputs: grads.rows as i64, got: labels.len() as i64 });
    }
    if grads.rows < settings.min_samples {
        return Ok(Metric::absent(format!("insufficient samples: {} < {}", grads.rows, settings.min_samples)));
    }
    let features = project(grads, settings.projection_dim, seed, layer)?;
    usable_information_of_features(&features, grads.cols, labels, settings, seed)
}

/// M3 of one layer from its projected features (n rows of r, [`project`] or
/// [`Inspection::projected_gradients`]) and its parameter count P_l.
pub fn usable_information_of_features(features: &[Vec<f64>], params: usize, labels: &[i64], settings: &UsableSettings, seed: u64) -> Result<Metric<UsableInformation>> {
    let mut metric = attribute_information(features, labels, settings, seed)?;
    if let Metric::Measured(m) = &mut metric {
        m.params = params;
    }
    Ok(metric)
}

/// M3 of every layer: None (a layer the loss does not reach) is absent.
pub fn usable_information_layers(
    grads: &[Option<GradientMatrix>],
    labels: &[i64],
    settings: &UsableSettings,
    seed: u64,
) -> Result<Vec<Metric<UsableInformation>>> {
    grads
        .iter()
        .enumerate()
        .map(|(l, g)| match g {
            None => Ok(Metric::absent("layer not used by the loss (gradient undefined)")),
            Some(g) => usable_information(g, labels, settings, seed, l),
        })
        .collect()
}

/// M3 of every layer from the model: each sample's gradient (one backward per sample, through
/// `transform` when given: a defence chain) projected on the model's device
/// ([`projected_gradients`]), then the attack against the batch's attribute labels.
fn estimate_usable_information(ins: &Inspection, settings: &UsableSettings, transform: Option<&ReleaseTransform>) -> Result<Vec<Metric<UsableInformation>>> {
    settings.validate()?;
    let n = ins.batch().validate()?;
    let layers = ins.layers();
    let Some(attribute) = ins.batch().attribute_values()? else {
        return Ok((0..layers.len()).map(|_| Metric::absent("no attribute labels given")).collect());
    };
    if n < settings.min_samples {
        let reason = format!("insufficient samples: {n} < {}", settings.min_samples);
        return Ok((0..layers.len()).map(|_| Metric::absent(reason.clone())).collect());
    }
    let projected = match projected_gradients(ins, settings.projection_dim, transform) {
        Err(e @ GuardError::NoPerSampleGradients { .. }) => return Ok((0..layers.len()).map(|_| Metric::absent(e.to_string())).collect()),
        projected => projected?,
    };
    projected
        .iter()
        .map(|p| match p {
            ProjectedLayer::Unused => Ok(Metric::absent("layer not used by the loss (gradient undefined)")),
            ProjectedLayer::Withheld { sample } => Ok(Metric::absent(format!("the release transform withholds the layer (sample {sample}): nothing is released"))),
            ProjectedLayer::Features { rows, params } => usable_information_of_features(rows, *params, &attribute, settings, ins.seed()),
        })
        .collect()
}

/// The attack on arbitrary features (one row per sample), on each of `settings.splits` seeded
/// stratified splits: choose the penalty and the temperature by cross-validation on the
/// training split (each fold model standardised with its own rows' statistics), score the
/// held-out split by the chosen penalty's fold models' mean logits divided by the temperature
/// (without calibration: by the L2-penalised multinomial logistic regression refitted on the
/// whole training split, standardised with its statistics); then the mean and standard error
/// over the splits. `params` of the result is the feature count; [`usable_information`] sets it to P_l.
pub fn attribute_information(
    features: &[Vec<f64>],
    labels: &[i64],
    settings: &UsableSettings,
    seed: u64,
) -> Result<Metric<UsableInformation>> {
    settings.validate()?;
    let n = features.len();
    if labels.len() != n {
        return Err(GuardError::BatchMismatch { what: "attribute labels", inputs: n as i64, got: labels.len() as i64 });
    }
    if n < settings.min_samples {
        return Ok(Metric::absent(format!("insufficient samples: {n} < {}", settings.min_samples)));
    }
    let d = features.first().map_or(0, |f| f.len());
    if let Some(bad) = features.iter().position(|f| f.len() != d) {
        return Err(GuardError::Config { setting: "usable information features", why: format!("row {bad} has {} features, row 0 has {d}", features[bad].len()) });
    }
    if features.iter().flatten().any(|v| !v.is_finite()) {
        return Err(GuardError::Config { setting: "usable information features", why: "non-finite feature value".into() });
    }
    let mut values: Vec<i64> = labels.to_vec();
    values.sort_unstable();
    values.dedup();
    if values.len() < 2 {
        return Ok(Metric::absent("attribute has a single value: nothing to infer"));
    }
    let c = values.len();
    let class: Vec<usize> = labels.iter().map(|a| values.binary_search(a).expect("value listed")).collect();
    let mut scores = Vec::with_capacity(settings.splits);
    for split in 0..settings.splits {
        let (train, test) = stratified_split(&class, c, settings.test_fraction, seed, split as u64);
        if test.is_empty() {
            return Ok(Metric::absent("held-out split is empty (every attribute value has a single sample)"));
        }
        let chosen = cross_validate(features, &class, c, &train, settings, seed, split as u64);
        scores.push(score_split(features, &class, c, &train, &test, &chosen, settings));
    }
    let ln2 = std::f64::consts::LN_2;
    let gains: Vec<f64> = scores.iter().map(|s| (s.h_none - s.h_z) / ln2).collect();
    let (gain, gain_se) = mean_and_se(&gains);
    let (accuracy, accuracy_se) = mean_and_se(&scores.iter().map(|s| s.accuracy).collect::<Vec<_>>());
    let mean = |f: fn(&SplitScore) -> f64| scores.iter().map(f).sum::<f64>() / scores.len() as f64;
    let l2_chosen: Vec<f64> = scores.iter().map(|s| s.l2).collect();
    let temperature_chosen: Vec<f64> = scores.iter().map(|s| s.temperature).collect();
    Ok(Metric::Measured(UsableInformation {
        usable_information_bits: gain.max(0.0),
        usable_information_se: gain_se,
        attack_accuracy: accuracy,
        attack_accuracy_se: accuracy_se,
        majority_accuracy: mean(|s| s.majority),
        prior_entropy_bits: mean(|s| s.h_none) / ln2,
        conditional_entropy_bits: mean(|s| s.h_z) / ln2,
        samples: n,
        train: scores[0].train,
        test: scores[0].test,
        classes: c,
        projection_dim: d,
        l2: most_chosen(&l2_chosen),
        l2_chosen,
        temperature: middle_temperature(&temperature_chosen),
        temperature_chosen,
        // The same on every split: with calibration each training split (two rows or more)
        // gives fold models.
        attacker: if scores.iter().all(|s| s.attacker == scores[0].attacker) { scores[0].attacker.to_string() } else { "mixed".to_string() },
        splits: scores.len(),
        iterations: scores.iter().map(|s| s.iterations).max().unwrap_or(0),
        seed,
        params: d,
    }))
}

impl Inspection<'_> {
    /// M3 of every layer against the batch's attribute labels, from per-sample gradients.
    pub fn usable_information(&self, settings: &UsableSettings) -> Result<Vec<Metric<UsableInformation>>> {
        self.observing(|| estimate_usable_information(self, settings, None))
    }

    /// M3 of every layer's per-sample releases: each sample's gradient of layer l passed
    /// through `transform(l, gradient, sample)` (a defence chain; None withholds the layer)
    /// on the model's device before the projection.
    pub fn released_usable_information(&self, settings: &UsableSettings, transform: &ReleaseTransform) -> Result<Vec<Metric<UsableInformation>>> {
        self.observing(|| estimate_usable_information(self, settings, Some(transform)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lbfgs_matches_the_closed_form_of_the_intercept_only_model() {
        // Features carry nothing: the fit must stay at (or near) the prior.
        let z: Vec<Vec<f64>> = (0..300).map(|i| vec![((i * 7919) % 13) as f64 - 6.0]).collect();
        let labels: Vec<i64> = (0..300).map(|i| (i % 3 == 0) as i64).collect();
        let m = attribute_information(&z, &labels, &UsableSettings::default(), 1).unwrap();
        let m = m.measured().unwrap();
        assert!(m.usable_information_bits < 0.05, "{m:?}");
    }

    #[test]
    fn perfectly_separable_features_give_about_the_prior_entropy() {
        let z: Vec<Vec<f64>> = (0..400).map(|i| vec![if i % 2 == 0 { -1.0 } else { 1.0 } + 0.01 * (i % 5) as f64]).collect();
        let labels: Vec<i64> = (0..400).map(|i| (i % 2) as i64).collect();
        let m = attribute_information(&z, &labels, &UsableSettings::default(), 1).unwrap();
        let m = m.measured().unwrap();
        assert_eq!(m.attack_accuracy, 1.0);
        assert!(m.usable_information_bits > 0.8 * m.prior_entropy_bits, "{m:?}");
    }

    #[test]
    fn the_held_out_split_moves_the_bits_but_not_the_choices() {
        // Attribute in the first feature, 10% of the labels flipped; one split, so its
        // held-out rows are known here.
        let n = 300;
        let z: Vec<Vec<f64>> = (0..n).map(|i| (0..6).map(|j| if j == 0 { 3.0 * (i % 2) as f64 } else { 0.0 } + (((i * 7 + j * 13) * 2654435761usize) % 1000) as f64 / 500.0 - 1.0).collect()).collect();
        let labels: Vec<i64> = (0..n).map(|i| if i % 10 == 4 { 1 - (i % 2) as i64 } else { (i % 2) as i64 }).collect();
        let settings = UsableSettings { splits: 1, ..UsableSettings::default() };
        let m = attribute_information(&z, &labels, &settings, 2).unwrap().measured().unwrap().clone();
        let (_, test) = stratified_split(&labels.iter().map(|&a| a as usize).collect::<Vec<_>>(), 2, settings.test_fraction, 2, 0);
        let mut scrambled = z.clone();
        for &i in &test {
            scrambled[i].iter_mut().for_each(|v| *v = -7.0 * *v + 1.0);
        }
        let s = attribute_information(&scrambled, &labels, &settings, 2).unwrap().measured().unwrap().clone();
        assert_eq!((s.l2_chosen, s.temperature_chosen), (m.l2_chosen, m.temperature_chosen));
        assert!(s.conditional_entropy_bits > m.conditional_entropy_bits + 0.1, "{} vs {}", s.conditional_entropy_bits, m.conditional_entropy_bits);
    }
}
