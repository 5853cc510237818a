//! Tensor checks and helpers shared by the defences and the accumulator. They use tch's
//! fallible `f_*` forms only, so a bad tensor becomes a `DefenceError`, never a panic.

use tch::{Kind, Tensor};

use crate::error::{DefenceError, Result};

/// Dtypes a gradient may have. Other floating kinds (float8) have no reliable arithmetic in
/// libtorch; integer kinds are not gradients.
fn supported_kind(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    )
}

/// Checks that `grad` is a defined, dense, floating-point tensor and returns its dtype.
/// Does not read the values (no host synchronisation).
pub(crate) fn check_tensor(grad: &Tensor, what: &dyn Fn() -> String) -> Result<Kind> {
    if !grad.defined() {
        return Err(DefenceError::UnsupportedTensor {
            what: what(),
            reason: "the tensor is undefined (no gradient was computed)".into(),
        });
    }
    if grad.is_sparse() {
        return Err(DefenceError::UnsupportedTensor {
            what: what(),
            reason: "sparse tensors are not supported; pass a dense gradient".into(),
        });
    }
    let kind = grad.f_kind()?;
    if !supported_kind(kind) {
        return Err(DefenceError::UnsupportedTensor {
            what: what(),
            reason: format!(
                "dtype {kind:?} is not a supported gradient dtype (f16, bf16, f32, f64)"
            ),
        });
    }
    Ok(kind)
}

/// Number of entries of `t` that are NaN or infinite (one host synchronisation).
pub(crate) fn count_non_finite(t: &Tensor) -> Result<i64> {
    Ok(t.f_isfinite()?.f_logical_not()?.f_sum(Kind::Int64)?.f_int64_value(&[])?)
}

/// Number of entries, as i64 (libtorch's own count type), without panicking.
pub(crate) fn numel(t: &Tensor) -> i64 {
    t.size().iter().product()
}

/// Rejects an input gradient that holds NaN or infinite entries.
pub(crate) fn check_finite_input(grad: &Tensor, what: &dyn Fn() -> String) -> Result<()> {
    let count = count_non_finite(grad)?;
    if count > 0 {
        return Err(DefenceError::NonFinite {
            what: what(),
            count,
            numel: numel(grad),
        });
    }
    Ok(())
}

/// Refuses to hand back an output that holds NaN or infinite entries.
pub(crate) fn check_finite_output(out: Tensor, what: &dyn Fn() -> String) -> Result<Tensor> {
    let count = count_non_finite(&out)?;
    if count > 0 {
        return Err(DefenceError::NonFiniteOutput {
            what: what(),
            count,
            numel: numel(&out),
        });
    }
    Ok(out)
}

/// A deep copy that shares no storage with `t` and carries no autograd history, so later
/// in-place edits of `t` (optimizer steps, `zero_grad`) cannot change it.
pub(crate) fn deep_copy(t: &Tensor) -> Result<Tensor> {
    let src = t.f_detach()?;
    let mut out = src.f_zeros_like()?;
    out.f_copy_(&src)?;
    Ok(out)
}
