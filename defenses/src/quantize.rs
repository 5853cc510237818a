//! Symmetric uniform quantisation: coarsens every entry to one of 2^bits levels, destroying
//! the low-order detail of the gradient while keeping its sign pattern and scale.

use tch::{Kind, Tensor};

use crate::checks::max_abs;
use crate::error::Result;

/// Maps every entry to the nearest of the `L = 2^bits` levels
/// `level(i) = -m + i * 2m / (L - 1)`, `i = 0..L-1`, where `m = max|g|` (computed as
/// `m * (2i / (L - 1) - 1)`, which cannot overflow even for `m` near the dtype's maximum). The levels are
/// symmetric (`level(L-1-i) = -level(i)`), include `-m` and `+m`, and do NOT include 0
/// (L is even); with `bits = 1` they are `{-m, +m}`. Rounding is to the nearest level, ties to
/// the even index (libtorch's `round`), so the result is deterministic and the error per entry
/// is at most half a step `m / (L - 1)`. The arithmetic runs in f64 and the result is cast
/// back to `kind` (the cast rounds each level to the dtype). An all-zero gradient stays zero.
pub(crate) fn quantize(grad: &Tensor, kind: Kind, bits: u32) -> Result<Tensor> {
    let m = max_abs(grad)?;
    if m == 0.0 {
        return Ok(grad.f_zeros_like()?);
    }
    let top = ((1u64 << bits) - 1) as f64; // L - 1
                                           // i = round((g/m + 1) * (L-1) / 2): g/m is in [-1, 1], so nothing overflows.
    let index = grad
        .f_to_kind(Kind::Double)?
        .f_div_scalar(m)?
        .f_add_scalar(1.0)?
        .f_mul_scalar(top / 2.0)?
        .f_round()?
        .f_clamp(0.0, top)?;
    let levels = index
        .f_mul_scalar(2.0 / top)?
        .f_sub_scalar(1.0)?
        .f_mul_scalar(m)?;
    Ok(levels.f_to_kind(kind)?)
}
