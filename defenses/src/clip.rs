//! L2 norm clipping: bounds how much one release can say about the data, and is the first
//! half of the noise defence.

use tch::Tensor;

use crate::checks::{deep_copy, l2_norm};
use crate::error::Result;

/// Returns a new tensor equal to `grad` scaled by `max_norm / ||grad||_2` when the norm exceeds
/// `max_norm`, otherwise an unscaled copy. The direction is preserved exactly; the resulting
/// norm is `max_norm` up to the rounding of `grad`'s dtype (about 1e-7 relative in f32).
/// `grad` must be finite and `max_norm` finite and positive (checked by the caller).
pub(crate) fn clip(grad: &Tensor, max_norm: f64) -> Result<Tensor> {
    let norm = l2_norm(grad)?;
    if norm <= max_norm {
        return deep_copy(grad);
    }
    Ok(grad.f_mul_scalar(max_norm / norm)?)
}
