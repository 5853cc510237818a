//! Symmetric uniform quantisation: coarsens every entry to one of 2^bits levels, destroying
//! the low-order detail of the gradient while keeping its sign pattern and scale.

use tch::{Kind, Tensor};

use crate::error::Result;

/// Maps every entry to the nearest of the `L = 2^bits` levels
/// `level(i) = -m + i * 2m / (L - 1)`, `i = 0..L-1`, where `m = max|g|` (computed as
/// `m * (2i / (L - 1) - 1)`, which cannot overflow even for `m` near the dtype's maximum). The levels are
/// symmetric (`level(L-1-i) = -level(i)`), include `-m` and `+m`, and do NOT include 0
/// (L is even); with `bits = 1` they are `{-m, +m}`. Rounding is to the nearest level, ties to
/// the even index (libtorch's `round`), so the result is deterministic and the error per entry
/// is at most half a step `m / (L - 1)`. The arithmetic runs in f64 and the result is cast
/// back to `kind` (the cast rounds each level to the dtype). An all-zero gradient stays zero.
/// `m` stays on the gradient's device: nothing is read back. Also returns `m` (0-dim f64),
/// which is NaN or infinite when an entry of `grad` is (the input's finiteness check).
pub(crate) fn quantize(grad: &Tensor, kind: Kind, bits: u32) -> Result<(Tensor, Tensor)> {
    // max|g| is exact in every dtype, so computing it before the cast to f64 loses nothing.
    let m = grad.f_abs()?.f_max()?.f_to_kind(Kind::Double)?;
    let top = ((1u64 << bits) - 1) as f64; // L - 1
    // i = round((g/m + 1) * (L-1) / 2): g/m is in [-1, 1], so nothing overflows.
    let index = grad
        .f_to_kind(Kind::Double)?
        .f_div(&m)?
        .f_add_scalar(1.0)?
        .f_mul_scalar(top / 2.0)?
        .f_round()?
        .f_clamp(0.0, top)?;
    let levels = index.f_mul_scalar(2.0 / top)?.f_sub_scalar(1.0)?.f_mul(&m)?;
    // m = 0 (an all-zero gradient) made every index 0/0 = NaN: the release is zero instead.
    let all_zero = m.f_eq(0.0)?;
    Ok((levels.f_masked_fill(&all_zero, 0.0)?.f_to_kind(kind)?, m))
}
