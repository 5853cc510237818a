//! M2, subspace distance and separation between the per-sample gradients of groups that differ
//! in a private attribute (METRICS.md, M2). The linear algebra runs on the host in f64.
use crate::error::{GuardError, Result, TorchContext};
use super::inspection::Inspection;
use super::layers::LayerMap;
use super::loss::{one_sample_loss, LossFn};
use crate::report::{Metric, Subspace};
use crate::measure::tensors::{rng_for, to_f64_vec};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How M2 is computed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SubspaceSettings {
    /// m: per-sample gradients per attribute value.
    pub samples_per_group: usize,
    /// r: rank of each subspace.
    pub rank: usize,
    /// Centre the gradients on their overall mean before taking subspaces.
    pub centre: bool,
}

impl Default for SubspaceSettings {
    fn default() -> Self {
        Self { samples_per_group: 16, rank: 4, centre: false }
    }
}

/// Fewest gradients per attribute value: two halves of two.
pub const MIN_PER_GROUP: usize = 4;

impl SubspaceSettings {
    /// Rejects fewer than [`MIN_PER_GROUP`] gradients per group or a rank of 0.
    pub fn validate(&self) -> Result<()> {
        if self.samples_per_group < MIN_PER_GROUP {
            return Err(GuardError::Config {
                setting: "subspace.samples_per_group",
                why: format!("needs at least {MIN_PER_GROUP} (two halves of two), got {}", self.samples_per_group),
            });
        }
        if self.rank == 0 {
            return Err(GuardError::Config { setting: "subspace.rank", why: "must be at least 1".into() });
        }
        Ok(())
    }
}

/// Orthonormal basis (P x k, f64, host) of the top-r left singular vectors of the columns,
/// k = min(r, numerical rank). None when every column is zero.
pub fn orthonormal_basis(columns: &Tensor, rank: usize, eps: f64) -> Result<Option<Tensor>> {
    let a = columns.f_to_device(Device::Cpu).and_then(|a| a.f_to_kind(Kind::Double)).during("preparing gradient columns")?;
    // Legacy svd: linalg_svd fails on CPU through tch (see TCH-NOTES).
    let (u, s, _v) = a.f_svd(true, true).during("taking the SVD of gradient columns")?;
    let s = to_f64_vec(&s)?;
    let top = s.first().copied().unwrap_or(0.0);
    if top <= 0.0 || !top.is_finite() {
        return Ok(None);
    }
    let size = a.size();
    let tol = top * eps * size.iter().copied().max().unwrap_or(1) as f64;
    let k = s.iter().take(rank).filter(|&&v| v > tol).count();
    Ok(Some(u.f_narrow(1, 0, k as i64).during("selecting singular vectors")?))
}

/// Two bases of the same space, the one of fewer columns first; an error names a tensor that
/// is not a P x k matrix, or bases of different spaces.
fn smaller_first<'t>(a: &'t Tensor, b: &'t Tensor) -> Result<(&'t Tensor, &'t Tensor)> {
    let columns = |t: &Tensor| match t.defined().then(|| t.size()).as_deref() {
        Some([rows, cols]) => Ok((*rows, *cols)),
        shape => Err(GuardError::Config { setting: "principal angles", why: format!("a basis must be a P x k matrix, got shape {shape:?}") }),
    };
    let ((rows_a, cols_a), (rows_b, cols_b)) = (columns(a)?, columns(b)?);
    if rows_a != rows_b {
        return Err(GuardError::Config { setting: "principal angles", why: format!("bases of {rows_a} and {rows_b} rows live in different spaces") });
    }
    Ok(if cols_a <= cols_b { (a, b) } else { (b, a) })
}

/// Principal angles (radians, ascending) between the spans of two orthonormal bases, k = the
/// smaller rank. Cosines from sigma(U_S^T U_T); near zero the sines from
/// sigma((I - U_big U_big^T) U_small), which keep precision where acos does not.
pub fn principal_angles(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let (small, big) = smaller_first(a, b)?;
    let cross = big.f_transpose(0, 1).and_then(|bt| bt.f_matmul(small)).during("forming U_S^T U_T")?;
    let cos = to_f64_vec(&cross.f_svd(true, false).during("singular values of U_S^T U_T")?.1)?;
    let residual = small.f_sub(&big.f_matmul(&cross).during("projecting a basis")?).during("projecting a basis")?;
    let mut sin = to_f64_vec(&residual.f_svd(true, false).during("singular values of the residual")?.1)?;
    sin.reverse(); // ascending sines pair with descending cosines
    Ok(cos
        .iter()
        .zip(sin)
        .map(|(&c, s)| if c > std::f64::consts::FRAC_1_SQRT_2 { s.clamp(0.0, 1.0).asin() } else { c.clamp(-1.0, 1.0).acos() })
        .collect())
}

/// d(S, T) = sqrt((1/k) sum_j sin^2 theta_j), the normalised projection distance in [0, 1].
/// sum_j sin^2 theta_j = ||(I - U_big U_big^T) U_small||_F^2 exactly, with no acos.
pub fn projection_distance(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (small, big) = smaller_first(a, b)?;
    let k = small.size().get(1).copied().unwrap_or(0);
    if k == 0 {
        return Ok(1.0);
    }
    let cross = big.f_transpose(0, 1).and_then(|bt| bt.f_matmul(small)).during("forming U_S^T U_T")?;
    let residual = small.f_sub(&big.f_matmul(&cross).during("projecting a basis")?).during("projecting a basis")?;
    let ss = to_f64_vec(&residual.f_square().and_then(|r| r.f_sum(Kind::Double)).during("residual norm")?)?[0];
    Ok((ss / k as f64).sqrt().clamp(0.0, 1.0))
}

/// The attribute values present, with the batch indices of each, as chosen for M2.
struct Selection {
    /// For each attribute value: its two halves of batch indices.
    halves: Vec<(Vec<usize>, Vec<usize>)>,
    m: usize,
}

fn select(attribute: &[i64], settings: &SubspaceSettings, seed: u64, step: u64) -> std::result::Result<Selection, String> {
    let mut values: Vec<i64> = attribute.to_vec();
    values.sort_unstable();
    values.dedup();
    if values.len() < 2 {
        return Err("attribute has a single value in this batch".into());
    }
    let mut rng = rng_for(seed, step, 2);
    let mut groups = Vec::new();
    for v in &values {
        let mut idx: Vec<usize> = attribute.iter().enumerate().filter(|(_, a)| *a == v).map(|(i, _)| i).collect();
        idx.shuffle(&mut rng);
        groups.push((v, idx));
    }
    let m = groups.iter().map(|(_, idx)| idx.len()).min().unwrap_or(0).min(settings.samples_per_group);
    if m < MIN_PER_GROUP {
        let (v, idx) = groups.iter().min_by_key(|(_, idx)| idx.len()).expect("two groups");
        return Err(format!(
            "insufficient samples: attribute value {v} has {} in this batch, at least {MIN_PER_GROUP} needed",
            idx.len()
        ));
    }
    let half = m / 2;
    let halves = groups.into_iter().map(|(_, idx)| (idx[..half].to_vec(), idx[half..2 * half].to_vec())).collect();
    Ok(Selection { halves, m: 2 * half })
}

/// Per-parameter gradients of the loss of a batch holding only sample `i`, in `flat_params`
/// order (undefined where the loss does not reach a parameter). A batch norm in training mode
/// therefore normalises the sample by its own statistics. [`GuardError::NoPerSampleGradients`]
/// when the loss cannot run on one sample.
pub(crate) fn one_sample_grads(layers: &LayerMap, loss_fn: &dyn LossFn, x: &Tensor, y: &Tensor, i: usize) -> Result<Vec<Tensor>> {
    let (params, _) = layers.flat_params();
    let xi = x.f_narrow(0, i as i64, 1).during("selecting a sample")?;
    let yi = y.f_narrow(0, i as i64, 1).during("selecting a sample")?;
    let loss = one_sample_loss(loss_fn, &xi, &yi)?;
    Tensor::f_run_backward(&[&loss], &params, false, false).during("computing a per-sample gradient")
}

/// Per-layer flattened f64 host gradients of one sample ([`one_sample_grads`]; zeros where a
/// parameter is not reached).
pub(crate) fn sample_gradient(layers: &LayerMap, loss_fn: &dyn LossFn, x: &Tensor, y: &Tensor, i: usize) -> Result<Vec<Tensor>> {
    let (params, owner) = layers.flat_params();
    let grads = one_sample_grads(layers, loss_fn, x, y, i)?;
    let mut per_layer: Vec<Vec<Tensor>> = (0..layers.len()).map(|_| Vec::new()).collect();
    for ((g, p), &l) in grads.iter().zip(&params).zip(&owner) {
        let flat = if g.defined() { g.f_reshape([-1]) } else { p.f_zeros_like().and_then(|z| z.f_reshape([-1])) };
        per_layer[l].push(flat.and_then(|f| f.f_to_kind(Kind::Double)).during("flattening a per-sample gradient")?);
    }
    per_layer
        .into_iter()
        .map(|parts| Tensor::f_cat(&parts, 0).and_then(|t| t.f_to_device(Device::Cpu)).during("joining a per-sample gradient"))
        .collect()
}

/// Runs the first per-sample pass of an estimate, and fails with
/// [`GuardError::NoPerSampleGradients`] when it turned a finite buffer non-finite. A batch norm that
/// sees one value per channel (tch's `nn::batch_norm1d` in training mode on one sample, or a
/// `batch_norm2d` on 1x1 maps) raises no error: it divides by a zero count in its running
/// variance, and its output no longer depends on the input, so the per-sample gradients would
/// carry nothing of the sample. (A scripted PyTorch batch norm raises instead:
/// [`one_sample_loss`] catches that.) Only models with buffers pay for the check.
pub(crate) fn first_per_sample_pass<T>(layers: &LayerMap, pass: impl FnOnce() -> Result<T>) -> Result<T> {
    let finite_before = layers.non_finite_buffer()?.is_none();
    let out = pass()?;
    match layers.non_finite_buffer()? {
        Some(name) if finite_before => Err(GuardError::NoPerSampleGradients {
            why: format!("it made buffer {name} non-finite (a batch norm with one value per channel normalises every sample to its bias)"),
        }),
        _ => Ok(out),
    }
}

/// The per-sample gradients chosen for M2 on one batch, kept so that M2 can be measured on
/// the raw gradients and again on transformed ones (the closed loop).
pub struct SubspaceSamples {
    selection: Selection,
    /// samples[i][l]: flattened f64 host gradient of batch sample i, layer l (empty if unused).
    samples: Vec<Vec<Tensor>>,
    params: Vec<usize>,
    eps: f64,
    settings: SubspaceSettings,
    seed: u64,
    step: u64,
}

/// Computes the per-sample gradients M2 needs, or the reason M2 cannot be computed.
fn subspace_samples(ins: &Inspection, settings: &SubspaceSettings) -> Result<std::result::Result<SubspaceSamples, String>> {
    settings.validate()?;
    ins.batch().validate()?;
    let Some(attribute) = ins.batch().attribute_values()? else { return Ok(Err("no attribute labels given".into())) };
    let attribute = attribute.as_slice();
    let (layers, seed, step) = (ins.layers(), ins.seed(), ins.step());
    let (inputs, targets) = (ins.batch().inputs(), ins.batch().targets());
    let selection = match select(attribute, settings, seed, step) {
        Ok(s) => s,
        Err(reason) => return Ok(Err(reason)),
    };
    let mut samples: Vec<Vec<Tensor>> = (0..attribute.len()).map(|_| Vec::new()).collect();
    for (k, &i) in selection.halves.iter().flat_map(|(a, b)| a.iter().chain(b)).enumerate() {
        let pass = || sample_gradient(layers, ins.loss(), inputs, targets, i);
        samples[i] = match if k == 0 { first_per_sample_pass(layers, pass) } else { pass() } {
            Err(e @ GuardError::NoPerSampleGradients { .. }) => return Ok(Err(e.to_string())),
            other => other?,
        };
    }
    if settings.centre {
        let chosen: Vec<usize> = selection.halves.iter().flat_map(|(a, b)| a.iter().chain(b).copied()).collect();
        for l in 0..layers.len() {
            let cols: Vec<&Tensor> = chosen.iter().map(|&i| &samples[i][l]).collect();
            let mean = Tensor::f_stack(&cols, 0).and_then(|s| s.f_mean_dim(0, false, Kind::Double)).during("centring")?;
            for &i in &chosen {
                samples[i][l] = samples[i][l].f_sub(&mean).during("centring")?;
            }
        }
    }
    let eps = if inputs.kind() == Kind::Double { f64::EPSILON } else { f32::EPSILON as f64 };
    Ok(Ok(SubspaceSamples {
        selection,
        samples,
        params: layers.layers().iter().map(|l| l.numel()).collect(),
        eps,
        settings: settings.clone(),
        seed,
        step,
    }))
}

/// A transformation of one per-sample gradient column (the seed is distinct per column).
pub type ColumnTransform<'a> = dyn Fn(&Tensor, u64) -> Result<Tensor> + 'a;

impl SubspaceSamples {
    /// The step these gradients were taken at.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// M2 of layer `l`, on each per-sample gradient passed through `transform` (None: raw).
    pub fn layer_metric(&self, l: usize, transform: Option<&ColumnTransform>) -> Result<Metric<Subspace>> {
        let bases_of = |which: &[usize]| -> Result<Option<Tensor>> {
            let cols = which
                .iter()
                .map(|&i| match transform {
                    None => Ok(self.samples[i][l].shallow_clone()),
                    Some(t) => t(&self.samples[i][l], self.seed ^ ((i as u64) << 32) ^ self.step),
                })
                .collect::<Result<Vec<_>>>()?;
            orthonormal_basis(&Tensor::f_stack(&cols, 1).during("stacking gradient columns")?, self.settings.rank, self.eps)
        };
        let mut bases = Vec::new();
        for (a, b) in &self.selection.halves {
            match (bases_of(a)?, bases_of(b)?) {
                (Some(ua), Some(ub)) => bases.push((ua, ub)),
                _ => return Ok(Metric::absent("zero per-sample gradients in a group: no subspace to compare")),
            }
        }
        let groups = bases.len();
        let mut between = Vec::new();
        let mut within = Vec::new();
        for g in 0..groups {
            for h in g + 1..groups {
                let ((a1, a2), (b1, b2)) = (&bases[g], &bases[h]);
                between.push((projection_distance(a1, b1)? + projection_distance(a2, b2)?) / 2.0);
                within.push((projection_distance(a1, a2)? + projection_distance(b1, b2)?) / 2.0);
            }
        }
        let d_between = between.iter().sum::<f64>() / between.len() as f64;
        let d_within = within.iter().sum::<f64>() / within.len() as f64;
        Ok(Metric::Measured(Subspace {
            subspace_distance: d_between,
            subspace_separation: d_between - d_within,
            within_distance: d_within,
            step: self.step,
            m: self.selection.m,
            rank: self.settings.rank,
            groups,
            centred: self.settings.centre,
            seed: self.seed,
            params: self.params[l],
        }))
    }
}

/// Estimates M2 for every layer. `attribute` holds one integer label per sample.
fn estimate_subspace(ins: &Inspection, settings: &SubspaceSettings) -> Result<Vec<Metric<Subspace>>> {
    let layers = ins.layers().len();
    match subspace_samples(ins, settings)? {
        Err(reason) => Ok((0..layers).map(|_| Metric::absent(reason.clone())).collect()),
        Ok(samples) => (0..layers).map(|l| samples.layer_metric(l, None)).collect(),
    }
}

impl Inspection<'_> {
    /// The per-sample gradients M2 needs (from the batch's attribute labels), or the reason M2
    /// cannot be computed on this batch.
    pub fn subspace_samples(&self, settings: &SubspaceSettings) -> Result<std::result::Result<SubspaceSamples, String>> {
        self.observing(|| subspace_samples(self, settings))
    }

    /// M2 of every layer (absent, with its reason, without attribute labels).
    pub fn subspace(&self, settings: &SubspaceSettings) -> Result<Vec<Metric<Subspace>>> {
        self.observing(|| estimate_subspace(self, settings))
    }
}
