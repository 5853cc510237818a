//! Per-layer statistics of the released gradient (`.grad()` after backward): a handful of
//! kernels whatever the number of layers, and one host read. Non-finite entries are counted
//! only when a layer's norm shows there are some.
use crate::error::{Result, TorchContext};
use crate::measure::layers::LayerMap;
use crate::report::{GradientStats, Metric};
use crate::measure::tensors::to_f64_vec;
use tch::{Kind, Tensor};

/// ||G_l||_2, max |G_l| and the count of non-finite entries per layer.
pub(crate) fn gradient_stats(layers: &LayerMap, grads: &[Vec<Tensor>], step: u64) -> Result<Vec<Metric<GradientStats>>> {
    let aligned: Vec<Tensor> = grads.iter().flatten().map(|g| if g.defined() { g.shallow_clone() } else { Tensor::new() }).collect();
    let defined: Vec<bool> = grads.iter().map(|l| l.iter().any(|g| g.defined())).collect();
    if !defined.iter().any(|d| *d) {
        return Ok(defined.iter().map(|_| absent()).collect());
    }
    let norms = layers.param_norms(&aligned)?;
    let maxes = layers.param_max_abs(&aligned)?;
    let values = to_f64_vec(&Tensor::f_cat(&[norms, maxes], 0).during("stacking statistics")?)?;
    let (norms, maxes) = values.split_at(aligned.len());
    let squares = layers.layer_square_sums(norms);
    let mut max_abs = vec![0.0f64; layers.len()];
    let mut it = maxes.iter();
    for (l, layer) in layers.layers().iter().enumerate() {
        for _ in &layer.params {
            let m = *it.next().expect("one max per parameter");
            max_abs[l] = if m.is_nan() || max_abs[l].is_nan() { f64::NAN } else { max_abs[l].max(m) };
        }
    }
    let mut out = Vec::with_capacity(layers.len());
    for (l, layer) in layers.layers().iter().enumerate() {
        if !defined[l] {
            out.push(absent());
            continue;
        }
        let non_finite = if squares[l].is_finite() { 0 } else { count_non_finite(&grads[l])? };
        out.push(Metric::Measured(GradientStats {
            norm: squares[l].sqrt(),
            max_abs: max_abs[l],
            non_finite,
            step,
            params: layer.numel(),
        }));
    }
    Ok(out)
}

fn absent() -> Metric<GradientStats> {
    Metric::absent("no gradient: the layer is not used by the loss or backward was not run")
}

fn count_non_finite(grads: &[Tensor]) -> Result<u64> {
    let mut count = 0;
    for g in grads.iter().filter(|g| g.defined()) {
        let n = g
            .f_isfinite()
            .and_then(|f| f.f_logical_not())
            .and_then(|nf| nf.f_sum(Kind::Int64))
            .and_then(|s| s.f_int64_value(&[]))
            .during("counting non-finite entries")?;
        count += n as u64;
    }
    Ok(count)
}

/// The current `.grad()` of every parameter, grouped by layer (undefined tensors kept).
pub(crate) fn current_grads(layers: &LayerMap) -> Vec<Vec<Tensor>> {
    layers.layers().iter().map(|l| l.params.iter().map(|p| p.tensor.grad()).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    #[test]
    fn max_abs_is_the_largest_magnitude_of_either_sign_and_nan_propagates() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let _a = (&root / "a").var("weight", &[3], nn::Init::Const(0.0));
        let _b = (&root / "b").var("weight", &[2], nn::Init::Const(0.0));
        let layers = LayerMap::from_var_store(&vs).unwrap();
        let stats = |a: &[f32], b: &[f32]| {
            let grads = vec![vec![Tensor::from_slice(a)], vec![Tensor::from_slice(b)]];
            gradient_stats(&layers, &grads, 0).unwrap().into_iter().map(|m| m.measured().map(|s| s.max_abs)).collect::<Vec<_>>()
        };
        // All-negative, mixed, all-positive: max |x| is the min's magnitude in the first.
        assert_eq!(stats(&[-3.0, -1.0, -2.0], &[0.5, -0.25]), [Some(3.0), Some(0.5)]);
        assert_eq!(stats(&[1.0, 4.0, -2.0], &[0.0, 0.0]), [Some(4.0), Some(0.0)]);
        let with_nan = stats(&[1.0, f32::NAN, -2.0], &[1.0, 2.0]);
        assert!(with_nan[0].unwrap().is_nan() && with_nan[1] == Some(2.0));
    }
}
