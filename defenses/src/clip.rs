//! L2 norm clipping: bounds how much one release can say about the data, and is the first
//! half of the noise defence.

use tch::{Kind, Tensor};

use crate::error::Result;

/// Returns a new tensor equal to `grad` scaled by `min(1, max_norm / ||grad||_2)`: scaled down
/// when the norm exceeds `max_norm`, otherwise an unscaled copy (times exactly 1, bit-identical).
/// The direction is preserved exactly; the resulting norm is `max_norm` up to the rounding of
/// `grad`'s dtype (about 1e-7 relative in f32). The norm and the scale stay on `grad`'s device
/// (f64, so large f16/f32 layers neither overflow nor lose precision): nothing is read back.
/// `grad` must be finite and `max_norm` finite and positive (checked by the caller); a zero
/// gradient's scale is 1 (max_norm / 0 = inf, clamped). Also returns the norm (0-dim f64 on
/// the device), which is NaN or infinite when an entry of `grad` is: the input's finiteness
/// check, for free.
pub(crate) fn clip(grad: &Tensor, max_norm: f64) -> Result<(Tensor, Tensor)> {
    let norm = grad.f_norm_scalaropt_dtype(2.0, Kind::Double)?;
    // max_norm / norm as one division (not max_norm * (1 / norm)): the scale the host
    // computed when it read the norm, to the last bit.
    let scale = norm.f_full_like(max_norm)?.f_div(&norm)?.f_clamp_max(1.0)?;
    Ok((grad.f_mul(&scale)?, norm))
}
