//! Per-layer statistics of the released gradient (`.grad()` after backward), read back in one
//! host transfer.
use crate::error::{Result, TorchContext};
use crate::layers::LayerMap;
use crate::report::{GradientStats, Metric};
use crate::tensors::to_f64_vec;
use tch::{Kind, Tensor};

/// ||G_l||_2 (over finite entries), max |G_l| and the count of non-finite entries per layer.
pub fn gradient_stats(layers: &LayerMap, grads: &[Vec<Tensor>], step: u64) -> Result<Vec<Metric<GradientStats>>> {
    let mut rows = Vec::new();
    let mut defined = Vec::new();
    for layer_grads in grads {
        let present: Vec<&Tensor> = layer_grads.iter().filter(|g| g.defined()).collect();
        defined.push(!present.is_empty());
        if present.is_empty() {
            continue;
        }
        let flat: Vec<Tensor> = present
            .iter()
            .map(|g| g.f_detach().and_then(|g| g.f_reshape([-1])).and_then(|g| g.f_to_kind(Kind::Double)))
            .collect::<std::result::Result<_, _>>()
            .during("flattening gradients")?;
        let all = Tensor::f_cat(&flat, 0).during("joining a layer's gradients")?;
        let finite = all.f_isfinite().during("checking finiteness")?;
        let clean = all.f_where_self(&finite, &all.f_zeros_like().during("zeros")?).during("masking non-finite")?;
        let row = Tensor::f_stack(
            &[
                clean.f_square().and_then(|s| s.f_sum(Kind::Double)).during("norm")?,
                clean.f_abs().and_then(|a| a.f_max()).during("max")?,
                finite.f_logical_not().and_then(|nf| nf.f_sum(Kind::Double)).during("count")?,
            ],
            0,
        )
        .during("stacking statistics")?;
        rows.push(row);
    }
    let values = if rows.is_empty() { vec![] } else { to_f64_vec(&Tensor::f_stack(&rows, 0).during("stacking statistics")?)? };
    let mut chunks = values.chunks(3);
    Ok(layers
        .layers()
        .iter()
        .zip(defined)
        .map(|(layer, defined)| {
            if !defined {
                return Metric::absent("no gradient: the layer is not used by the loss or backward was not run");
            }
            let c = chunks.next().expect("one row per defined layer");
            Metric::Measured(GradientStats {
                norm: c[0].sqrt(),
                max_abs: c[1],
                non_finite: c[2] as u64,
                step,
                params: layer.numel(),
            })
        })
        .collect())
}

/// The current `.grad()` of every parameter, grouped by layer (undefined tensors kept).
pub fn current_grads(layers: &LayerMap) -> Vec<Vec<Tensor>> {
    layers.layers().iter().map(|l| l.params.iter().map(|p| p.tensor.grad()).collect()).collect()
}
