//! Per-sample gradients as host matrices, for host-side studies of small models (the audit's
//! validation study). M3 itself projects on the model's device (`projected.rs`). The gradients come from `subspace::sample_gradient` (one micro-batch of one sample per
//! backward pass, the same code M2 uses); this module only stacks them by layer.
use crate::error::{GuardError, Result};
use super::inspection::Inspection;
use crate::measure::subspace::{first_per_sample_pass, one_sample_grads, sample_gradient};
use crate::measure::tensors::to_f64_vec;

/// A row-major host matrix of f64: one row per sample (or per release), one column per
/// parameter scalar of a layer. Plain data: Send + Sync, no autograd.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientMatrix {
    /// Samples (or releases).
    pub rows: usize,
    /// Parameter scalars of the layer.
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f64>,
}

impl GradientMatrix {
    /// Checks that `data` holds `rows * cols` values.
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(GuardError::Config {
                setting: "gradient matrix",
                why: format!("{rows} rows x {cols} columns need {} values, got {}", rows.saturating_mul(cols), data.len()),
            });
        }
        Ok(Self { rows, cols, data })
    }

    /// Row `i` (panics when `i >= rows`, like slice indexing).
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The mean of the rows at `indices`, as a new one-row vector (a batch-mean release built
    /// from per-sample gradients, exact for models that do not couple samples). Panics on an
    /// index `>= rows`.
    pub fn mean_of_rows(&self, indices: &[usize]) -> Vec<f64> {
        let mut out = vec![0.0; self.cols];
        for &i in indices {
            for (o, v) in out.iter_mut().zip(self.row(i)) {
                *o += v;
            }
        }
        let k = indices.len().max(1) as f64;
        out.iter_mut().for_each(|o| *o /= k);
        out
    }

    /// Builds a matrix from rows of equal length.
    pub fn from_rows(rows: Vec<Vec<f64>>) -> Result<Self> {
        let cols = rows.first().map_or(0, |r| r.len());
        if let Some(bad) = rows.iter().position(|r| r.len() != cols) {
            return Err(GuardError::Config {
                setting: "gradient matrix",
                why: format!("row {bad} has {} values, row 0 has {cols}", rows[bad].len()),
            });
        }
        let n = rows.len();
        Ok(Self { rows: n, cols, data: rows.concat() })
    }
}

/// Which layers the loss reaches (some parameter's gradient is defined): one plain backward on
/// the first sample, the first per-sample pass (it tells a model that cannot run on one sample,
/// [`GuardError::NoPerSampleGradients`]).
pub(crate) fn used_layers(ins: &Inspection) -> Result<Vec<bool>> {
    let layers = ins.layers();
    let (_, owner) = layers.flat_params();
    let (inputs, targets) = (ins.batch().inputs(), ins.batch().targets());
    let grads = first_per_sample_pass(layers, || one_sample_grads(layers, ins.loss(), inputs, targets, 0))?;
    let mut used = vec![false; layers.len()];
    for (g, &l) in grads.iter().zip(&owner) {
        used[l] |= g.defined();
    }
    Ok(used)
}

/// Per-sample gradients of every layer: entry l is the n x P_l matrix of dl_i/dW_l, or None
/// when the loss does not reach layer l (its gradient is undefined for every sample).
/// `inputs` and `targets` hold n samples along dimension 0; each sample is its own backward
/// pass (the loss function is called with a batch of one).
/// [`GuardError::NoPerSampleGradients`] when the loss cannot run on one sample.
pub(crate) fn per_sample_gradients(ins: &Inspection) -> Result<Vec<Option<GradientMatrix>>> {
    let n = ins.batch().validate()? as i64;
    let (layers, loss_fn) = (ins.layers(), ins.loss());
    let (inputs, targets) = (ins.batch().inputs(), ins.batch().targets());
    let used = used_layers(ins)?;
    let mut data: Vec<Vec<f64>> = layers.layers().iter().map(|l| Vec::with_capacity(n as usize * l.numel())).collect();
    for i in 0..n as usize {
        let per_layer = sample_gradient(layers, loss_fn, inputs, targets, i)?;
        for (l, g) in per_layer.iter().enumerate() {
            if used[l] {
                let values = to_f64_vec(g)?;
                if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
                    return Err(GuardError::NonFiniteGradient {
                        step: 0,
                        layers: vec![format!("{} (sample {i}, entry {bad})", layers.layers()[l].name)],
                    });
                }
                data[l].extend(values);
            }
        }
    }
    Ok(layers
        .layers()
        .iter()
        .zip(data)
        .zip(used)
        .map(|((layer, data), used)| used.then(|| GradientMatrix { rows: n as usize, cols: layer.numel(), data }))
        .collect())
}

impl Inspection<'_> {
    /// The n x P_l per-sample gradient matrix of every layer (None: the loss does not reach it).
    pub fn per_sample_gradients(&self) -> Result<Vec<Option<GradientMatrix>>> {
        self.observing(|| per_sample_gradients(self))
    }
}
