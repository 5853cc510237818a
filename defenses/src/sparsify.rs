//! Top-k sparsification: releases only the largest-magnitude entries, which removes most of
//! the fine detail that gradient-inversion attacks reconstruct inputs from.

use tch::Tensor;

use crate::checks::numel;
use crate::error::Result;

/// Number of entries kept: `ceil(keep_fraction * n)`, at least 1 and at most `n`.
pub(crate) fn kept_count(keep_fraction: f64, n: i64) -> i64 {
    let k = (keep_fraction * n as f64).ceil();
    // `keep_fraction` is in (0, 1], so `k` is in [0, n]; the clamp guards rounding only.
    (k as i64).clamp(1, n.max(1))
}

/// Keeps exactly `kept_count(keep_fraction, numel)` entries with the largest |g| (ties broken
/// by libtorch's `topk`) and zeroes the rest. A kept entry that was zero stays zero. `grad`
/// must not be empty.
pub(crate) fn sparsify(grad: &Tensor, keep_fraction: f64) -> Result<Tensor> {
    let n = numel(grad);
    let k = kept_count(keep_fraction, n);
    let flat = grad.f_reshape([-1])?;
    let (_, idx) = flat.f_abs()?.f_topk(k, 0, true, false)?;
    let kept = flat.f_gather(0, &idx, false)?;
    let out = flat.f_zeros_like()?.f_scatter(0, &idx, &kept)?;
    Ok(out.f_reshape(grad.size())?)
}
