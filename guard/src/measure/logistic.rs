//! M3's attacker (METRICS.md, M3): multinomial logistic regression with an L2 penalty on the
//! weights, fitted by deterministic full-batch L-BFGS, and its temperature: a scalar T > 0
//! dividing the fitted logits (still a multinomial logistic regression, with weights W / T and
//! intercepts b / T), chosen on validation rows by a deterministic golden-section search.
//! Plain Rust on host f64 data.

/// When L-BFGS stops.
#[derive(Clone, Copy, Debug)]
pub(super) struct FitSettings {
    /// Iterations at most.
    pub max_iterations: usize,
    /// Stop when the largest gradient entry of the objective falls below this.
    pub tolerance: f64,
}

pub(super) fn dot(a: &[f64], b: &[f64]) -> f64 {
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

/// A fitted multinomial logistic regression: weights c x d (row-major) and intercepts.
pub(super) struct Logistic {
    w: Vec<f64>,
    b: Vec<f64>,
    c: usize,
    d: usize,
    pub iterations: usize,
}

impl Logistic {
    /// The c logits of one row.
    pub(super) fn logits(&self, z: &[f64]) -> Vec<f64> {
        (0..self.c).map(|k| self.b[k] + dot(&self.w[k * self.d..(k + 1) * self.d], z)).collect()
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
pub(super) fn fit_logistic(z: &[Vec<f64>], a: &[usize], c: usize, l2: f64, settings: &FitSettings, prior: &[f64]) -> Logistic {
    let d = z.first().map_or(0, |r| r.len());
    let dim = c * d + c;
    let mut theta = vec![0.0; dim];
    for k in 0..c {
        theta[c * d + k] = prior[k].max(1e-300).ln();
    }
    let mut grad = vec![0.0; dim];
    let mut f = objective(&theta, z, a, c, d, l2, &mut grad);
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
            let ft = objective(&trial, z, a, c, d, l2, &mut new_grad);
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

/// Mean cross-entropy (nats) of the rows' `logits` divided by `temperature`, for classes `a`.
pub(super) fn cross_entropy(logits: &[Vec<f64>], a: &[usize], temperature: f64) -> f64 {
    let mut ce = 0.0;
    for (l, &ai) in logits.iter().zip(a) {
        ce -= log_softmax_at(l, temperature)[ai];
    }
    ce / logits.len().max(1) as f64
}

fn log_softmax_at(logits: &[f64], temperature: f64) -> Vec<f64> {
    if temperature == 1.0 {
        log_softmax(logits)
    } else {
        log_softmax(&logits.iter().map(|v| v / temperature).collect::<Vec<_>>())
    }
}

/// Smallest and largest temperature searched.
pub(super) const TEMPERATURE_RANGE: (f64, f64) = (1e-2, 1e2);

/// The temperature T in [`TEMPERATURE_RANGE`] minimising `objective(T)`, a mean validation
/// cross-entropy of logits divided by T, and that minimum. The cross-entropy is convex in 1 / T
/// (a log-sum-exp of functions linear in 1 / T, minus one), hence unimodal in log T: a
/// golden-section search on log T (80 steps: the bracket shrinks below 1e-15 of its width)
/// finds its minimum. T = 1 (the fit as it is) is kept unless the search's minimum is lower,
/// so a flat objective (logits that do not vary) reports 1. Deterministic.
pub(super) fn best_temperature(objective: impl Fn(f64) -> f64) -> (f64, f64) {
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let (mut lo, mut hi) = (TEMPERATURE_RANGE.0.ln(), TEMPERATURE_RANGE.1.ln());
    let f = |u: f64| {
        let v = objective(u.exp());
        if v.is_nan() { f64::INFINITY } else { v }
    };
    let mut x1 = hi - phi * (hi - lo);
    let mut x2 = lo + phi * (hi - lo);
    let (mut f1, mut f2) = (f(x1), f(x2));
    for _ in 0..80 {
        if f1 <= f2 {
            hi = x2;
            x2 = x1;
            f2 = f1;
            x1 = hi - phi * (hi - lo);
            f1 = f(x1);
        } else {
            lo = x1;
            x1 = x2;
            f1 = f2;
            x2 = lo + phi * (hi - lo);
            f2 = f(x2);
        }
    }
    let (u, fu) = if f1 <= f2 { (x1, f1) } else { (x2, f2) };
    let at_one = f(0.0);
    if fu < at_one { (u.exp(), fu) } else { (1.0, at_one) }
}

/// Mean held-out cross-entropy (nats) of `model` with its logits divided by `temperature` on
/// rows `z` with classes `a`, and the count of rows whose most probable class is the true one
/// (ties to the smaller class index; a temperature does not move it).
pub(super) fn score(model: &Logistic, z: &[Vec<f64>], a: &[usize], temperature: f64) -> (f64, usize) {
    let logits: Vec<Vec<f64>> = z.iter().map(|zi| model.logits(zi)).collect();
    score_logits(&logits, a, temperature)
}

/// [`score`] of rows' logits, whatever affine map of the features made them.
pub(super) fn score_logits(logits: &[Vec<f64>], a: &[usize], temperature: f64) -> (f64, usize) {
    let mut ce = 0.0;
    let mut correct = 0usize;
    for (l, &ai) in logits.iter().zip(a) {
        let logp = log_softmax_at(l, temperature);
        ce -= logp[ai];
        let best = (0..logp.len()).max_by(|&i, &j| logp[i].total_cmp(&logp[j]).then(j.cmp(&i))).unwrap_or(0);
        correct += (best == ai) as usize;
    }
    (ce / logits.len().max(1) as f64, correct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_temperature_undoes_a_known_overconfidence() {
        // Binary outcomes drawn with P(a = 1) = sigmoid(u), shown as logits (0, 3u): the
        // cross-entropy is least at T = 3 (up to sampling noise).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut logits, mut a) = (Vec::new(), Vec::new());
        for _ in 0..20000 {
            let u = 8.0 * uniform() - 4.0;
            a.push((uniform() < 1.0 / (1.0 + (-u).exp())) as usize);
            logits.push(vec![0.0, 3.0 * u]);
        }
        let (t, ce) = best_temperature(|t| cross_entropy(&logits, &a, t));
        assert!((t - 3.0).abs() < 0.15, "T = {t}");
        assert!(ce < cross_entropy(&logits, &a, 1.0) - 0.05, "{ce}");
        // Logits that do not vary: every T is as good, and T = 1 is reported.
        let flat = vec![vec![0.0, 0.0]; 10];
        assert_eq!(best_temperature(|t| cross_entropy(&flat, &[0, 1, 0, 1, 0, 1, 0, 1, 0, 1], t)), (1.0, 2f64.ln()));
    }
}
