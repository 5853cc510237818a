//! The analytic attacks on a Linear layer whose input is the model input (flattened), with a
//! bias. For y = W x + b with pre-activation gradient delta_{u,i} of unit u on sample i, the
//! batch-mean gradient is dW_u = (1/n) sum_i delta_{u,i} x_i and db_u = (1/n) sum_i
//! delta_{u,i}, so dW_u / db_u is the delta-weighted mean of the inputs that move unit u: one
//! of them exactly when it alone moves the unit (a ReLU unit that fires for one sample of the
//! batch). Two units on the same direction with thresholds t_u < t_v fire for the same samples
//! except those with t_u < w.x <= t_v: when the layer after treats them alike (equal
//! delta per sample, as in an imprint module), the difference of their gradients is the
//! gradient of the samples between the two thresholds, one sample when a bin holds one.
//!
//! Supported: 2-D weights `[K, D]` on inputs of D values per sample (a `Linear` on the flattened
//! input) with a 1-D bias `[K]`. A convolutional first layer is out of scope (the suite reports it
//! absent with that reason).
use super::AttackKind;
use crate::error::{GuardError, Result, TorchContext};
use crate::measure::tensors::to_f64_vec;
use crate::report::Metric;
use tch::{Device, Kind, Tensor};

/// The released gradient of one Linear layer and its parameters (what the attacker, who sent
/// the model, knows): weight `[K, D]`, bias `[K]`, and their batch-mean gradients of the same shapes.
#[derive(Debug, Clone, Copy)]
pub struct LinearRelease<'a> {
    /// The layer's weight W `[K, D]`.
    pub weight: &'a Tensor,
    /// The layer's bias b `[K]`.
    pub bias: &'a Tensor,
    /// dG/dW `[K, D]`, the released batch-mean weight gradient.
    pub grad_weight: &'a Tensor,
    /// dG/db `[K]`, the released batch-mean bias gradient.
    pub grad_bias: &'a Tensor,
}

/// An attack's candidate reconstructions of the batch's inputs.
#[derive(Debug)]
pub struct Reconstructions {
    /// The attack that produced them.
    pub attack: AttackKind,
    /// The candidates, m x D, Double on the host.
    pub candidates: Tensor,
    /// The units each candidate comes from: (u, None) for dW_u / db_u, (u, Some(v)) for
    /// (dW_u - dW_v) / (db_u - db_v).
    pub units: Vec<(usize, Option<usize>)>,
}

/// The release on the host in Double, checked; Err(reason) when the attack does not apply.
struct Host {
    gw: Tensor,
    gb: Tensor,
    gb_values: Vec<f64>,
    k: usize,
}

fn host(t: &Tensor) -> Result<Tensor> {
    t.f_detach().and_then(|t| t.f_to_device(Device::Cpu)).and_then(|t| t.f_to_kind(Kind::Double)).during("copying a layer's release to the host")
}

fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.f_isfinite().and_then(|f| f.f_all()).and_then(|f| f.f_int64_value(&[])).during("checking a release for non-finite values")? != 0)
}

fn checked_gradients(release: &LinearRelease) -> Result<std::result::Result<Host, String>> {
    let (gw, gb) = (release.grad_weight, release.grad_bias);
    if !gw.defined() || !gb.defined() {
        return Ok(Err("gradient undefined: the layer is not used by the loss".into()));
    }
    if gw.dim() != 2 || gb.dim() != 1 || gw.size()[0] != gb.size()[0] {
        return Err(GuardError::Config {
            setting: "analytic attack release",
            why: format!("the weight gradient must be [K, D] and the bias gradient [K], got {:?} and {:?}", gw.size(), gb.size()),
        });
    }
    let (k, d) = (gw.size()[0] as usize, gw.size()[1] as usize);
    if k == 0 {
        return Ok(Err("the layer has no units".into()));
    }
    if d == 0 {
        return Ok(Err("the layer takes no input values".into()));
    }
    let (gw, gb) = (host(gw)?, host(gb)?);
    if !all_finite(&gw)? || !all_finite(&gb)? {
        return Ok(Err("non-finite gradient: the guard never releases it, there is nothing to attack".into()));
    }
    let gb_values = to_f64_vec(&gb)?;
    Ok(Ok(Host { gw, gb, gb_values, k }))
}

/// The smallest |denominator| taken: `min_bias_gradient` times the largest |dG/db_u|.
fn floor_of(gb: &[f64], min_bias_gradient: f64) -> Result<std::result::Result<f64, String>> {
    if !(min_bias_gradient.is_finite() && (0.0..1.0).contains(&min_bias_gradient)) {
        return Err(GuardError::Config { setting: "attacks.min_bias_gradient", why: format!("must be in [0, 1), got {min_bias_gradient}") });
    }
    let largest = gb.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    if largest == 0.0 {
        return Ok(Err("the bias gradient is 0 on every unit: no unit was moved by the batch".into()));
    }
    Ok(Ok(min_bias_gradient * largest))
}

/// Rows `num` minus rows `sub` (if any) of dW, divided by the matching bias-gradient entries.
fn ratios(h: &Host, num: &[i64], sub: Option<&[i64]>) -> Result<Tensor> {
    (|| -> std::result::Result<Tensor, tch::TchError> {
        let idx = Tensor::f_from_slice(num)?;
        let (mut w, mut b) = (h.gw.f_index_select(0, &idx)?, h.gb.f_index_select(0, &idx)?);
        if let Some(sub) = sub {
            let idx = Tensor::f_from_slice(sub)?;
            w = w.f_sub(&h.gw.f_index_select(0, &idx)?)?;
            b = b.f_sub(&h.gb.f_index_select(0, &idx)?)?;
        }
        w.f_div(&b.f_unsqueeze(1)?)
    })()
    .during("forming the analytic reconstructions")
}

/// The single-unit analytic attack: x_hat_u = dW_u / db_u for every unit with |db_u| above
/// `min_bias_gradient` times the largest |db| (exact for a unit that one sample alone moves).
/// Only the gradients of `release` are read. Absent (with the reason) for a layer without
/// units, a gradient that is undefined or non-finite (never released), or a bias gradient that
/// is 0 everywhere. Errors on gradients that are not `[K, D]` and `[K]`, or a bad setting.
pub fn analytic(release: &LinearRelease, min_bias_gradient: f64) -> Result<Metric<Reconstructions>> {
    let h = match checked_gradients(release)? {
        Ok(h) => h,
        Err(reason) => return Ok(Metric::absent(reason)),
    };
    let floor = match floor_of(&h.gb_values, min_bias_gradient)? {
        Ok(f) => f,
        Err(reason) => return Ok(Metric::absent(reason)),
    };
    let units: Vec<i64> = (0..h.k).filter(|&u| h.gb_values[u].abs() > floor && h.gb_values[u] != 0.0).map(|u| u as i64).collect();
    let candidates = ratios(&h, &units, None)?;
    Ok(Metric::Measured(Reconstructions { attack: AttackKind::Analytic, candidates, units: units.iter().map(|&u| (u as usize, None)).collect() }))
}

/// Disjoint-set forest over the units, for grouping rows by direction.
struct Groups(Vec<usize>);

impl Groups {
    fn find(&mut self, mut u: usize) -> usize {
        while self.0[u] != u {
            self.0[u] = self.0[self.0[u]];
            u = self.0[u];
        }
        u
    }

    fn join(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.0[a.max(b)] = a.min(b);
        }
    }
}

/// Rows of the weight per block of the Gram matrix read back at once (bounds host memory at
/// 1024 K bytes).
const GRAM_BLOCK: i64 = 1024;

/// The differences attack: units whose weight rows point the same way (cosine of the rows
/// above 1 - `same_direction`) are grouped; within a group, ordered by their threshold along
/// the shared direction t_u = -b_u / ||w_u||, each consecutive pair (u, v) gives
/// x_hat = (dW_u - dW_v) / (db_u - db_v) where |db_u - db_v| is above `min_bias_gradient`
/// times the largest |db|. Exact for a bin (t_u, t_v] that holds one sample of the batch when
/// the layer after gives both units the same gradient per sample (an imprint layer).
/// Absent, with the reason, as [`analytic`], and when no two rows point the same way or no
/// consecutive pair differs. Errors on shapes that disagree, non-finite parameters, or a bad
/// setting.
pub fn analytic_differences(release: &LinearRelease, min_bias_gradient: f64, same_direction: f64) -> Result<Metric<Reconstructions>> {
    if !(same_direction.is_finite() && same_direction > 0.0 && same_direction < 1.0) {
        return Err(GuardError::Config { setting: "attacks.same_direction", why: format!("must be in (0, 1), got {same_direction}") });
    }
    let h = match checked_gradients(release)? {
        Ok(h) => h,
        Err(reason) => return Ok(Metric::absent(reason)),
    };
    let (w, b) = (release.weight, release.bias);
    if !w.defined() || !b.defined() || w.size() != release.grad_weight.size() || b.size() != release.grad_bias.size() {
        return Err(GuardError::Config {
            setting: "analytic attack release",
            why: format!(
                "the weight and bias must have their gradients' shapes {:?} and {:?}, got {:?} and {:?}",
                release.grad_weight.size(),
                release.grad_bias.size(),
                if w.defined() { w.size() } else { vec![] },
                if b.defined() { b.size() } else { vec![] }
            ),
        });
    }
    let (w, b) = (host(w)?, host(b)?);
    if !all_finite(&w)? || !all_finite(&b)? {
        return Err(GuardError::Config { setting: "analytic attack release", why: "the layer's parameters hold a non-finite value".into() });
    }
    let floor = match floor_of(&h.gb_values, min_bias_gradient)? {
        Ok(f) => f,
        Err(reason) => return Ok(Metric::absent(reason)),
    };
    let norms = to_f64_vec(&w.f_norm_scalaropt_dim(2, [1i64].as_slice(), false).during("norms of the weight rows")?)?;
    let unit = w.f_div(&w.f_norm_scalaropt_dim(2, [1i64].as_slice(), true).and_then(|n| n.f_clamp_min(f64::MIN_POSITIVE)).during("normalising the weight rows")?).during("normalising the weight rows")?;
    let k = h.k;
    let mut groups = Groups((0..k).collect());
    let mut start = 0i64;
    while start < k as i64 {
        let rows = GRAM_BLOCK.min(k as i64 - start);
        let same = unit
            .f_narrow(0, start, rows)
            .and_then(|block| block.f_matmul(&unit.f_tr()?))
            .and_then(|cos| cos.f_gt(1.0 - same_direction))
            .and_then(|m| m.f_to_kind(Kind::Uint8))
            .and_then(|m| m.f_reshape([-1]))
            .during("comparing weight rows")?;
        let mut mask = vec![0u8; (rows as usize) * k];
        same.f_copy_data(&mut mask, (rows as usize) * k).during("reading the row comparison")?;
        for r in 0..rows as usize {
            let u = start as usize + r;
            if norms[u] == 0.0 {
                continue;
            }
            for v in (u + 1)..k {
                if mask[r * k + v] != 0 && norms[v] != 0.0 {
                    groups.join(u, v);
                }
            }
        }
        start += rows;
    }
    let bias = to_f64_vec(&b)?;
    let mut members: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for u in 0..k {
        let root = groups.find(u);
        members.entry(root).or_default().push(u);
    }
    let (mut num, mut sub) = (Vec::new(), Vec::new());
    let mut shared = false;
    for group in members.values().filter(|g| g.len() >= 2) {
        shared = true;
        let mut order = group.clone();
        let threshold = |u: usize| -bias[u] / norms[u];
        order.sort_by(|&a, &b| threshold(a).total_cmp(&threshold(b)).then(a.cmp(&b)));
        for pair in order.windows(2) {
            let gap = h.gb_values[pair[0]] - h.gb_values[pair[1]];
            if gap.abs() > floor && gap != 0.0 {
                num.push(pair[0] as i64);
                sub.push(pair[1] as i64);
            }
        }
    }
    if !shared {
        return Ok(Metric::absent(format!("no two units' weight rows point the same way (cosine > 1 - {same_direction:e}): no differences to take")));
    }
    if num.is_empty() {
        return Ok(Metric::absent("units that share a direction have equal bias gradients: no difference is a reconstruction"));
    }
    let candidates = ratios(&h, &num, Some(&sub))?;
    let units = num.iter().zip(&sub).map(|(&u, &v)| (u as usize, Some(v as usize))).collect();
    Ok(Metric::Measured(Reconstructions { attack: AttackKind::AnalyticDifferences, candidates, units }))
}
