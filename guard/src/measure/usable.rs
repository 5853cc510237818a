//! M3, usable latent information (empirical V-information), per layer (METRICS.md, M3).
//!
//! How much of a private attribute the best attacker of a family V reads from a layer's
//! released gradients: V is multinomial logistic regression with an L2 penalty on a fixed,
//! seeded Gaussian projection of the gradients, fitted on a stratified training split and
//! scored on the held-out split against the intercept-only model (the training-split class
//! frequencies).
//!
//! The core ([`usable_information`], [`attribute_information`]) is plain Rust on host f64
//! data: no libtorch, no autograd, Send + Sync inputs, so it runs off the training thread.
//! [`estimate_usable_information`] is the convenience that first takes per-sample gradients
//! through a [`LossFn`].
use crate::error::{GuardError, Result};
use super::inspection::Inspection;
use super::per_sample::{per_sample_gradients, GradientMatrix};
use crate::report::Metric;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// How M3 is computed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UsableSettings {
    /// r: rows of the Gaussian projection R_l (entries N(0, 1/r)).
    pub projection_dim: usize,
    /// L2 penalty on the weights (not the intercepts): the objective is the mean training
    /// cross-entropy plus (l2 / 2) ||W||_F^2, on standardised features.
    pub l2: f64,
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
        Self { projection_dim: 64, l2: 1e-2, test_fraction: 0.3, min_samples: 200, max_iterations: 500, tolerance: 1e-7 }
    }
}

impl UsableSettings {
    /// Rejects settings outside their ranges (projection_dim >= 1, l2 >= 0, test_fraction in
    /// (0, 1), min_samples >= 4, max_iterations >= 1).
    pub fn validate(&self) -> Result<()> {
        let bad = |setting: &'static str, why: String| Err(GuardError::Config { setting, why });
        if self.projection_dim == 0 {
            return bad("usable.projection_dim", "must be at least 1".into());
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return bad("usable.l2", format!("must be a finite number >= 0, got {}", self.l2));
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
}

/// M3 for one layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsableInformation {
    /// max(0, H_V(A|none) - H_V(A|Z)) in bits.
    pub usable_information_bits: f64,
    /// Held-out accuracy of the fitted attacker.
    pub attack_accuracy: f64,
    /// Held-out accuracy of always guessing the training split's most frequent value.
    pub majority_accuracy: f64,
    /// H_V(A|none): held-out cross-entropy of the training-split class frequencies, in bits.
    pub prior_entropy_bits: f64,
    /// H_V(A|Z): held-out cross-entropy of the fitted attacker, in bits.
    pub conditional_entropy_bits: f64,
    /// Samples (or releases) used, and the split.
    pub samples: usize,
    /// Samples in the training split.
    pub train: usize,
    /// Samples in the held-out split.
    pub test: usize,
    /// Distinct attribute values.
    pub classes: usize,
    /// r, the projection's rows.
    pub projection_dim: usize,
    /// L2 penalty the attacker was fitted with.
    pub l2: f64,
    /// L-BFGS iterations the fit took.
    pub iterations: usize,
    /// Seed of the projection and the split.
    pub seed: u64,
    /// P_l (columns of the gradient matrix).
    pub params: usize,
}

/// The fixed Gaussian projection of layer `layer`: r x p entries N(0, 1/r), row-major, drawn
/// from a ChaCha8 stream of its own per (seed, layer), so every call projects a layer alike.
pub fn projection(r: usize, p: usize, seed: u64, layer: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0x4d33_0000_0000 + layer as u64);
    let scale = 1.0 / (r as f64).sqrt();
    (0..r * p).map(|_| { let v: f64 = StandardNormal.sample(&mut rng); scale * v }).collect()
}

/// z_i = R_l g_l(i) for every row of `grads` (unstandardised): n rows of r features.
pub fn project(grads: &GradientMatrix, r: usize, seed: u64, layer: usize) -> Result<Vec<Vec<f64>>> {
    if let Some(bad) = grads.data.iter().position(|v| !v.is_finite()) {
        return Err(GuardError::Config {
            setting: "usable information gradients",
            why: format!("non-finite value in row {}, column {}", bad / grads.cols.max(1), bad % grads.cols.max(1)),
        });
    }
    let rmat = projection(r, grads.cols, seed, layer);
    Ok((0..grads.rows)
        .map(|i| {
            let g = grads.row(i);
            rmat.chunks(grads.cols.max(1)).take(r).map(|row| dot(row, g)).collect()
        })
        .collect())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    // Four accumulators: the compiler vectorises this; the order is fixed, so it is
    // deterministic.
    let mut acc = [0.0f64; 4];
    let chunks = a.len() / 4;
    for c in 0..chunks {
        for k in 0..4 {
            acc[k] += a[4 * c + k] * b[4 * c + k];
        }
    }
    let mut s = acc[0] + acc[1] + acc[2] + acc[3];
    for k in 4 * chunks..a.len() {
        s += a[k] * b[k];
    }
    s
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
    let mut metric = attribute_information(&features, labels, settings, seed)?;
    if let Metric::Measured(m) = &mut metric {
        m.params = grads.cols;
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

/// Convenience: per-sample gradients of `inputs` through `loss_fn` (one backward per sample),
/// then M3 of every layer against `attribute` (one label per sample).
fn estimate_usable_information(ins: &Inspection, settings: &UsableSettings) -> Result<Vec<Metric<UsableInformation>>> {
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
    match per_sample_gradients(ins) {
        Err(e @ GuardError::NoPerSampleGradients { .. }) => Ok((0..layers.len()).map(|_| Metric::absent(e.to_string())).collect()),
        grads => usable_information_layers(&grads?, &attribute, settings, ins.seed()),
    }
}

/// The attack on arbitrary features (one row per sample): standardise with the training
/// split's statistics, fit the L2-penalised multinomial logistic regression, score the held-out
/// split. `params` of the result is the feature count; [`usable_information`] sets it to P_l.
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
    let (train, test) = stratified_split(&class, c, settings.test_fraction, seed);
    if test.is_empty() {
        return Ok(Metric::absent("held-out split is empty (every attribute value has a single sample)"));
    }

    // Standardise with training-split statistics.
    let mut mean = vec![0.0; d];
    for &i in &train {
        for (m, v) in mean.iter_mut().zip(&features[i]) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= train.len() as f64);
    let mut sd = vec![0.0; d];
    for &i in &train {
        for ((s, v), m) in sd.iter_mut().zip(&features[i]).zip(&mean) {
            *s += (v - m) * (v - m);
        }
    }
    sd.iter_mut().for_each(|s| {
        *s = (*s / train.len() as f64).sqrt();
        if !(*s > 1e-300) {
            *s = 1.0;
        }
    });
    let standardise = |idx: &[usize]| -> Vec<Vec<f64>> {
        idx.iter().map(|&i| features[i].iter().zip(&mean).zip(&sd).map(|((v, m), s)| (v - m) / s).collect()).collect()
    };
    let ztrain = standardise(&train);
    let ztest = standardise(&test);
    let atrain: Vec<usize> = train.iter().map(|&i| class[i]).collect();
    let atest: Vec<usize> = test.iter().map(|&i| class[i]).collect();

    // H_V(A|none): training-split frequencies on held-out labels.
    let mut counts = vec![0usize; c];
    for &a in &atrain {
        counts[a] += 1;
    }
    let prior: Vec<f64> = counts.iter().map(|&k| k as f64 / atrain.len() as f64).collect();
    let h_none = atest.iter().map(|&a| -prior[a].ln()).sum::<f64>() / atest.len() as f64;
    let majority = (0..c).max_by_key(|&k| (counts[k], std::cmp::Reverse(k))).unwrap_or(0);
    let majority_accuracy = atest.iter().filter(|&&a| a == majority).count() as f64 / atest.len() as f64;

    let model = fit_logistic(&ztrain, &atrain, c, settings, &prior);
    let mut h_z = 0.0;
    let mut correct = 0usize;
    for (z, &a) in ztest.iter().zip(&atest) {
        let logp = model.log_probs(z);
        h_z -= logp[a];
        let best = (0..c).max_by(|&i, &j| logp[i].total_cmp(&logp[j]).then(j.cmp(&i))).unwrap_or(0);
        correct += (best == a) as usize;
    }
    h_z /= atest.len() as f64;
    let ln2 = std::f64::consts::LN_2;
    Ok(Metric::Measured(UsableInformation {
        usable_information_bits: ((h_none - h_z) / ln2).max(0.0),
        attack_accuracy: correct as f64 / atest.len() as f64,
        majority_accuracy,
        prior_entropy_bits: h_none / ln2,
        conditional_entropy_bits: h_z / ln2,
        samples: n,
        train: train.len(),
        test: test.len(),
        classes: c,
        projection_dim: d,
        l2: settings.l2,
        iterations: model.iterations,
        seed,
        params: d,
    }))
}

/// Stratified seeded split: of each class's k samples, round(k * fraction) go to the held-out
/// split, keeping at least one in training (and one held out when k >= 2).
pub fn stratified_split(class: &[usize], classes: usize, test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0x4d33_5350);
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

/// A fitted multinomial logistic regression: weights c x d (row-major) and intercepts.
struct Logistic {
    w: Vec<f64>,
    b: Vec<f64>,
    c: usize,
    d: usize,
    iterations: usize,
}

impl Logistic {
    fn log_probs(&self, z: &[f64]) -> Vec<f64> {
        let logits: Vec<f64> = (0..self.c).map(|k| self.b[k] + dot(&self.w[k * self.d..(k + 1) * self.d], z)).collect();
        log_softmax(&logits)
    }
}

fn log_softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + logits.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    logits.iter().map(|v| v - lse).collect()
}

/// Objective and gradient at theta = [W (c x d), b (c)].
fn objective(theta: &[f64], z: &[Vec<f64>], a: &[usize], c: usize, d: usize, l2: f64, grad: &mut [f64]) -> f64 {
    grad.iter_mut().for_each(|g| *g = 0.0);
    let n = z.len() as f64;
    let (w, b) = theta.split_at(c * d);
    let mut loss = 0.0;
    let mut logits = vec![0.0; c];
    for (zi, &ai) in z.iter().zip(a) {
        for k in 0..c {
            logits[k] = b[k] + dot(&w[k * d..(k + 1) * d], zi);
        }
        let lp = log_softmax(&logits);
        loss -= lp[ai];
        for k in 0..c {
            let r = (lp[k].exp() - if k == ai { 1.0 } else { 0.0 }) / n;
            let gw = &mut grad[k * d..(k + 1) * d];
            for (g, v) in gw.iter_mut().zip(zi) {
                *g += r * v;
            }
            grad[c * d + k] += r;
        }
    }
    loss /= n;
    let mut penalty = 0.0;
    for (g, v) in grad[..c * d].iter_mut().zip(w) {
        *g += l2 * v;
        penalty += v * v;
    }
    loss + 0.5 * l2 * penalty
}

/// Deterministic full-batch L-BFGS (memory 10, Armijo backtracking) from the intercept-only
/// optimum (W = 0, b = log prior), so the fit never ends above the intercept-only model's
/// training objective.
fn fit_logistic(z: &[Vec<f64>], a: &[usize], c: usize, settings: &UsableSettings, prior: &[f64]) -> Logistic {
    let d = z.first().map_or(0, |r| r.len());
    let dim = c * d + c;
    let mut theta = vec![0.0; dim];
    for k in 0..c {
        theta[c * d + k] = prior[k].max(1e-300).ln();
    }
    let mut grad = vec![0.0; dim];
    let mut f = objective(&theta, z, a, c, d, settings.l2, &mut grad);
    let memory = 10;
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let mut iterations = 0;
    let mut new_grad = vec![0.0; dim];
    for it in 0..settings.max_iterations {
        iterations = it;
        let gmax = grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        if gmax < settings.tolerance {
            break;
        }
        // Two-loop recursion.
        let mut q = grad.clone();
        let mut alphas = Vec::with_capacity(s_hist.len());
        for (s, y) in s_hist.iter().zip(&y_hist).rev() {
            let rho = 1.0 / dot(y, s);
            let alpha = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= alpha * yi);
            alphas.push((alpha, rho));
        }
        if let (Some(s), Some(y)) = (s_hist.last(), y_hist.last()) {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|qi| *qi *= gamma);
        } else {
            let gnorm = dot(&grad, &grad).sqrt();
            q.iter_mut().for_each(|qi| *qi /= gnorm.max(1.0));
        }
        for ((s, y), (alpha, rho)) in s_hist.iter().zip(&y_hist).zip(alphas.into_iter().rev()) {
            let beta = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (alpha - beta) * si);
        }
        let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&grad, &dir);
        if !(slope < 0.0) {
            // Not a descent direction: restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            let gnorm = dot(&grad, &grad).sqrt().max(1.0);
            dir = grad.iter().map(|g| -g / gnorm).collect();
            slope = dot(&grad, &dir);
        }
        let mut step = 1.0;
        let mut accepted = None;
        for _ in 0..40 {
            let trial: Vec<f64> = theta.iter().zip(&dir).map(|(t, d)| t + step * d).collect();
            let ft = objective(&trial, z, a, c, d, settings.l2, &mut new_grad);
            if ft.is_finite() && ft <= f + 1e-4 * step * slope {
                accepted = Some((trial, ft));
                break;
            }
            step *= 0.5;
        }
        let Some((trial, ft)) = accepted else { break };
        let s: Vec<f64> = trial.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = new_grad.iter().zip(&grad).map(|(a, b)| a - b).collect();
        let decrease = f - ft;
        theta = trial;
        std::mem::swap(&mut grad, &mut new_grad);
        f = ft;
        if dot(&s, &y) > 1e-12 {
            s_hist.push(s);
            y_hist.push(y);
            if s_hist.len() > memory {
                s_hist.remove(0);
                y_hist.remove(0);
            }
        }
        iterations = it + 1;
        if decrease.abs() <= 1e-14 * f.abs().max(1.0) {
            break;
        }
    }
    let (w, b) = theta.split_at(c * d);
    Logistic { w: w.to_vec(), b: b.to_vec(), c, d, iterations }
}


impl Inspection<'_> {
    /// M3 of every layer against the batch's attribute labels, from per-sample gradients.
    pub fn usable_information(&self, settings: &UsableSettings) -> Result<Vec<Metric<UsableInformation>>> {
        self.observing(|| estimate_usable_information(self, settings))
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
}
