//! M2, subspace distance and separation between the per-sample gradients of groups that differ
//! in a private attribute (METRICS.md, M2). The per-sample gradients stay on the model's
//! device; the linear algebra works from their Gram matrix (`gram.rs`), of which only the
//! small N x N matrix comes to the host.
use crate::error::{GuardError, Result, TorchContext};
use super::gram::{gram, gram_basis, gram_projection_distance};
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
pub(crate) const MIN_PER_GROUP: usize = 4;

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

/// The singular value at or below which a direction of m gradient columns is rounding, not
/// signal: top * eps * m, with eps the gradients' machine epsilon.
///
/// Why m and not numpy's max(P, m): each stored entry carries a relative error of at most eps,
/// so the columns' error E has ||E||_2 <= ||E||_F <= eps ||A||_F <= eps sqrt(m) top; a further
/// sqrt(m) is margin for the rounding of the backward pass that computed them. A rule that grows
/// with P drops every direction of an f32 layer above 1/eps = 8.4M parameters (tolerance above
/// the top singular value), which made M2 of such layers meaningless.
pub(crate) fn rank_tolerance(top: f64, eps: f64, m: usize) -> f64 {
    top * eps * m.max(1) as f64
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
    let tol = rank_tolerance(top, eps, s.len());
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

/// Per-layer flattened gradients of one sample ([`one_sample_grads`]; zeros where a parameter
/// is not reached), on the model's device in the gradient's dtype.
pub(crate) fn sample_gradient(layers: &LayerMap, loss_fn: &dyn LossFn, x: &Tensor, y: &Tensor, i: usize) -> Result<Vec<Tensor>> {
    let (params, owner) = layers.flat_params();
    let grads = one_sample_grads(layers, loss_fn, x, y, i)?;
    let mut per_layer: Vec<Vec<Tensor>> = (0..layers.len()).map(|_| Vec::new()).collect();
    for ((g, p), &l) in grads.iter().zip(&params).zip(&owner) {
        let flat = if g.defined() { g.f_reshape([-1]) } else { p.f_zeros_like().and_then(|z| z.f_reshape([-1])) };
        per_layer[l].push(flat.during("flattening a per-sample gradient")?);
    }
    per_layer
        .into_iter()
        .map(|parts| Tensor::f_cat(&parts, 0).during("joining a per-sample gradient"))
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
    /// samples[i][l]: flattened gradient of batch sample i, layer l, on the model's device in
    /// the gradient's dtype (f64 when centred); empty if unused.
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
            // In f64 on the device, one column at a time: no P x N copy.
            let mut sum = samples[chosen[0]][l].f_to_kind(Kind::Double).during("centring")?;
            for &i in &chosen[1..] {
                sum = sum.f_add(&samples[i][l]).during("centring")?;
            }
            let mean = sum.f_div_scalar(chosen.len() as f64).during("centring")?;
            for &i in &chosen {
                samples[i][l] = samples[i][l].f_to_kind(Kind::Double).and_then(|c| c.f_sub(&mean)).during("centring")?;
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
pub(crate) type ColumnTransform<'a> = dyn Fn(&Tensor, u64) -> Result<Tensor> + 'a;

impl SubspaceSamples {
    /// The step these gradients were taken at.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The chosen columns of layer `l`, halves in order (A1, A2, B1, B2, ...), each passed
    /// through `transform` (None: raw), with each half's positions among them.
    fn columns(&self, l: usize, transform: Option<&ColumnTransform>) -> Result<(Vec<Tensor>, Vec<(Vec<usize>, Vec<usize>)>)> {
        let mut cols = Vec::new();
        let mut halves = Vec::new();
        for (a, b) in &self.selection.halves {
            let mut positions = |which: &[usize]| -> Result<Vec<usize>> {
                which
                    .iter()
                    .map(|&i| {
                        cols.push(match transform {
                            None => self.samples[i][l].shallow_clone(),
                            Some(t) => t(&self.samples[i][l], self.seed ^ ((i as u64) << 32) ^ self.step)?,
                        });
                        Ok(cols.len() - 1)
                    })
                    .collect()
            };
            let pa = positions(a)?;
            let pb = positions(b)?;
            halves.push((pa, pb));
        }
        Ok((cols, halves))
    }

    /// M2 of layer `l`, on each per-sample gradient passed through `transform` (None: raw),
    /// from the Gram matrix of the chosen columns.
    pub fn layer_metric(&self, l: usize, transform: Option<&ColumnTransform>) -> Result<Metric<Subspace>> {
        let (cols, halves) = self.columns(l, transform)?;
        let g = gram(&cols)?;
        drop(cols);
        let mut bases = Vec::new();
        for (a, b) in &halves {
            bases.push((gram_basis(&g, a, self.settings.rank, self.eps)?, gram_basis(&g, b, self.settings.rank, self.eps)?));
        }
        self.metric_of(l, bases, |a, b| Ok(gram_projection_distance(&g, a, b)))
    }

    /// The reference M2 of layer `l`: SVDs of the stacked P x m host columns of each half.
    #[cfg(test)]
    fn layer_metric_svd(&self, l: usize, transform: Option<&ColumnTransform>) -> Result<Metric<Subspace>> {
        let (cols, halves) = self.columns(l, transform)?;
        let basis = |which: &[usize]| -> Result<Option<Tensor>> {
            let picked: Vec<&Tensor> = which.iter().map(|&p| &cols[p]).collect();
            orthonormal_basis(&Tensor::f_stack(&picked, 1).during("stacking gradient columns")?, self.settings.rank, self.eps)
        };
        let bases = halves.iter().map(|(a, b)| Ok((basis(a)?, basis(b)?))).collect::<Result<Vec<_>>>()?;
        self.metric_of(l, bases, projection_distance)
    }

    /// d_between, d_within and the separation of layer `l` from each group's two half bases
    /// (None: a half of zero gradients) and a distance between two bases.
    fn metric_of<B>(&self, l: usize, bases: Vec<(Option<B>, Option<B>)>, distance: impl Fn(&B, &B) -> Result<f64>) -> Result<Metric<Subspace>> {
        let Some(bases) = bases.into_iter().map(|(a, b)| Some((a?, b?))).collect::<Option<Vec<_>>>() else {
            return Ok(Metric::absent("zero per-sample gradients in a group: no subspace to compare"));
        };
        let groups = bases.len();
        let mut between = Vec::new();
        let mut within = Vec::new();
        for g in 0..groups {
            for h in g + 1..groups {
                let ((a1, a2), (b1, b2)) = (&bases[g], &bases[h]);
                between.push((distance(a1, b1)? + distance(a2, b2)?) / 2.0);
                within.push((distance(a1, a2)? + distance(b1, b2)?) / 2.0);
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

#[cfg(test)]
mod tests {
    //! The Gram-based M2 against the SVD-based reference, on fixed seeded columns.
    use super::*;
    use crate::measure::gram::{gram_principal_angles, resolved};
    use crate::measure::tensors::gaussian_probes;
    use gradguard_defenses::{apply_all, Defence};

    const P: i64 = 200;
    const TOL: f64 = 1e-6;

    /// A rows x cols f64 Gaussian matrix from its own seeded stream.
    fn gaussian(rows: i64, cols: i64, seed: u64) -> Tensor {
        let like = Tensor::zeros([rows], (Kind::Double, Device::Cpu));
        gaussian_probes(&like, cols as usize, &mut rng_for(seed, 0, 0)).unwrap().transpose(0, 1)
    }

    /// `groups` groups of m columns: group g spans `dims` directions, 0.8 of a shared set and
    /// 0.6 of its own (moderate angles between groups), plus `noise` times Gaussian columns.
    fn groups_of(groups: u64, m: i64, dims: i64, noise: f64, seed: u64) -> Vec<Vec<Tensor>> {
        let shared = gaussian(P, dims, seed);
        (0..groups)
            .map(|g| {
                let basis = &shared * 0.8 + gaussian(P, dims, seed + 1 + g) * 0.6;
                let cols = basis.matmul(&gaussian(dims, m, seed + 100 + g)) + gaussian(P, m, seed + 200 + g) * noise;
                (0..m).map(|j| cols.select(1, j).contiguous()).collect()
            })
            .collect()
    }

    /// One layer of samples: each group's columns in order, halved as they come.
    fn samples_of(groups: Vec<Vec<Tensor>>, rank: usize, eps: f64) -> SubspaceSamples {
        let m = groups[0].len();
        let (mut samples, mut halves) = (Vec::new(), Vec::new());
        for cols in groups {
            let first = samples.len();
            samples.extend(cols.into_iter().map(|c| vec![c]));
            halves.push(((first..first + m / 2).collect(), (first + m / 2..first + m).collect()));
        }
        SubspaceSamples {
            selection: Selection { halves, m },
            samples,
            params: vec![P as usize],
            eps,
            settings: SubspaceSettings { samples_per_group: m, rank, centre: false },
            seed: 3,
            step: 1,
        }
    }

    fn assert_same(gram: &Metric<Subspace>, svd: &Metric<Subspace>, moderate: bool) {
        let (g, s) = (gram.measured().unwrap(), svd.measured().unwrap());
        for (what, a, b) in [
            ("d_between", g.subspace_distance, s.subspace_distance),
            ("d_within", g.within_distance, s.within_distance),
            ("separation", g.subspace_separation, s.subspace_separation),
        ] {
            assert!((a - b).abs() < TOL, "{what}: Gram {a} vs SVD {b}");
        }
        if moderate {
            assert!(s.subspace_distance > 0.05 && s.subspace_distance < 0.95, "not moderate: {}", s.subspace_distance);
        }
    }

    #[test]
    fn gram_m2_equals_the_svd_reference_on_seeded_columns() {
        for seed in [0u64, 17, 40] {
            for (groups, rank) in [(2, 4), (3, 4), (2, 2)] {
                let samples = samples_of(groups_of(groups, 8, 3, 0.3, seed), rank, f64::EPSILON);
                assert_same(&samples.layer_metric(0, None).unwrap(), &samples.layer_metric_svd(0, None).unwrap(), true);
            }
        }
    }

    #[test]
    fn gram_m2_equals_the_svd_reference_through_a_defence_chain() {
        let chain = [Defence::Clip { max_norm: 1.0 }, Defence::Noise { clip_norm: 1.0, multiplier: 0.05 }];
        let column = |col: &Tensor, seed: u64| -> Result<Tensor> { Ok(apply_all(&chain, col, seed)?.expect("no withhold")) };
        let samples = samples_of(groups_of(2, 8, 3, 0.3, 5), 4, f32::EPSILON as f64);
        assert_same(&samples.layer_metric(0, Some(&column)).unwrap(), &samples.layer_metric_svd(0, Some(&column)).unwrap(), true);
    }

    #[test]
    fn gram_m2_equals_the_svd_reference_on_rank_deficient_columns() {
        // Exactly two directions per group, rank 4 asked: both keep 2.
        for eps in [f64::EPSILON, f32::EPSILON as f64] {
            let samples = samples_of(groups_of(2, 8, 2, 0.0, 11), 4, eps);
            assert_same(&samples.layer_metric(0, None).unwrap(), &samples.layer_metric_svd(0, None).unwrap(), false);
            let cols: Vec<Tensor> = samples.samples.iter().map(|s| s[0].shallow_clone()).collect();
            let g = gram(&cols).unwrap();
            let basis = gram_basis(&g, &[0, 1, 2, 3], 4, eps).unwrap().unwrap();
            let svd = orthonormal_basis(&Tensor::stack(&cols[..4], 1), 4, eps).unwrap().unwrap();
            assert_eq!((basis.rank(), svd.size()[1]), (2, 2));
        }
    }

    /// Pairs of halves and the principal angles between their bases, both ways.
    fn angles_both_ways(a: &[Tensor], b: &[Tensor], rank: usize) -> (Vec<f64>, Vec<f64>) {
        let cols: Vec<Tensor> = a.iter().chain(b).map(|c| c.shallow_clone()).collect();
        let g = gram(&cols).unwrap();
        let (ia, ib): (Vec<usize>, Vec<usize>) = ((0..a.len()).collect(), (a.len()..cols.len()).collect());
        let (ga, gb) = (gram_basis(&g, &ia, rank, f64::EPSILON).unwrap().unwrap(), gram_basis(&g, &ib, rank, f64::EPSILON).unwrap().unwrap());
        let svd = |c: &[Tensor]| orthonormal_basis(&Tensor::stack(c, 1), rank, f64::EPSILON).unwrap().unwrap();
        (gram_principal_angles(&g, &ga, &gb).unwrap(), principal_angles(&svd(a), &svd(b)).unwrap())
    }

    #[test]
    fn gram_principal_angles_equal_the_svd_ones() {
        for seed in [1u64, 8] {
            let groups = groups_of(2, 6, 3, 0.3, seed);
            let (gram_angles, svd_angles) = angles_both_ways(&groups[0], &groups[1], 4);
            assert_eq!(gram_angles.len(), 4);
            for (g, s) in gram_angles.iter().zip(&svd_angles) {
                assert!((g - s).abs() < TOL, "angles {gram_angles:?} vs {svd_angles:?}");
            }
        }
        // Nearly the same subspace: angles about 1e-4, where the cosine form is weakest.
        let a = &groups_of(1, 4, 3, 0.3, 2)[0];
        let b: Vec<Tensor> = a.iter().enumerate().map(|(j, c)| c + gaussian(P, 1, 50 + j as u64).squeeze_dim(1) * 1e-4).collect();
        let (gram_angles, svd_angles) = angles_both_ways(a, &b, 4);
        assert!(svd_angles.iter().all(|&t| t < 1e-3) && svd_angles[3] > 1e-6, "{svd_angles:?}");
        for (g, s) in gram_angles.iter().zip(&svd_angles) {
            assert!((g - s).abs() < TOL, "angles {gram_angles:?} vs {svd_angles:?}");
        }
    }

    #[test]
    fn the_rank_rule_matches_for_f32_and_drops_unresolved_directions_for_f64() {
        // Two strong directions and a third at 1e-3 or 1e-9 of them.
        let base = gaussian(P, 2, 30).matmul(&gaussian(2, 4, 31));
        let top = base.linalg_norm(2.0, None::<&[i64]>, false, Kind::Double).double_value(&[]);
        for (weak, eps, gram_rank, svd_rank) in [
            (1e-3, f32::EPSILON as f64, 3, 3),
            (1e-9, f32::EPSILON as f64, 2, 2),
            (1e-3, f64::EPSILON, 3, 3),
            // Resolved by the SVD (above top * eps * m = 9e-16 top), not by the Gram matrix
            // (below resolved(4, P) = 4.4e-7 top): the precision the Gram form gives up.
            (1e-9, f64::EPSILON, 2, 3),
        ] {
            let cols = &base + gaussian(P, 1, 32).matmul(&gaussian(1, 4, 33)) * (weak * top / 10.0);
            let cols: Vec<Tensor> = (0..4).map(|j| cols.select(1, j).contiguous()).collect();
            let basis = gram_basis(&gram(&cols).unwrap(), &[0, 1, 2, 3], 4, eps).unwrap().unwrap();
            let svd = orthonormal_basis(&Tensor::stack(&cols, 1), 4, eps).unwrap().unwrap();
            assert_eq!((basis.rank(), svd.size()[1] as usize), (gram_rank, svd_rank), "weak {weak}, eps {eps}");
        }
        assert!(resolved(4, P as usize) < 5e-7 && resolved(4, P as usize) > 1e-9);
    }

    #[test]
    fn an_f32_layer_above_one_over_eps_parameters_keeps_its_directions() {
        // 9M > 1/f32::EPSILON = 8.4M: a tolerance growing with P would exceed the top singular
        // value and keep nothing.
        const BIG: i64 = 9_000_000;
        let cols = gaussian(BIG, 2, 40).matmul(&gaussian(2, 4, 41)).to_kind(Kind::Float);
        let cols: Vec<Tensor> = (0..4).map(|j| cols.select(1, j).contiguous()).collect();
        let basis = gram_basis(&gram(&cols).unwrap(), &[0, 1, 2, 3], 4, f32::EPSILON as f64).unwrap().unwrap();
        assert_eq!(basis.rank(), 2);
    }
}
