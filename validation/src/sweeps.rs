//! The CNN at one checkpoint, every metric against the batch size (aggregation) and against
//! the strength of two defences (noise, top-k sparsification).
use super::groups::{group_columns, group_labels, group_releases, indices_by_group, mean_rows, M2_RANK};
use super::{Study, SWEEP_PROBES};
use gradguard_audit::Result;
use gradguard_audit::estimate::{inversion_attack, probe_settings, projected, release_probes, release_sensitivity, sensitivity, subspace_of_columns, usable_on_features, usable_on_matrix};
use gradguard_audit::{line_panels_svg, Panel};
use gradguard_defenses::{derive_seed, Defence};
use gradguard_guard::{Batch, measure::{InversionPlan, InversionSettings}};
use gradguard_guard::measure::GradientMatrix;
use gradguard_guard::Metric;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::borrow::Cow;
use std::path::Path;
use tch::Tensor;

/// One layer at one sweep point.
#[derive(Clone)]
pub(super) struct SweepRow {
    pub x: f64,
    pub layer: String,
    pub s: Option<f64>,
    pub s_rms: Option<f64>,
    pub r: Option<f64>,
    pub d_between: Option<f64>,
    pub separation: Option<f64>,
    pub m3_bits: Option<f64>,
    pub m3_acc: Option<f64>,
    pub m3_group_bits: Option<f64>,
    pub m4_bits: Option<f64>,
    pub psnr: Option<f64>,
}

/// One metric of a sweep row.
pub(super) type Get = fn(&SweepRow) -> Option<f64>;

/// M1 of one layer on one batch: (S_l, S_l^rms, R_l).
type M1 = (f64, f64, Option<f64>);

/// The aggregation sweep.
pub(super) struct Sweep {
    pub step: usize,
    pub rows: Vec<SweepRow>,
    pub figure: String,
}

/// The two defence sweeps.
pub(super) struct DefenceSweeps {
    pub step: usize,
    /// The noise defence's clip norm C_l per layer.
    pub clip: Vec<(String, f64)>,
    pub noise: Vec<SweepRow>,
    pub sparsify: Vec<SweepRow>,
    pub noise_figure: String,
    pub sparsify_figure: String,
}

/// The latent and attack metrics of one layer at one sweep point (M1 comes separately).
#[derive(Default)]
struct Latent {
    d_between: Option<f64>,
    separation: Option<f64>,
    m3_bits: Option<f64>,
    m3_acc: Option<f64>,
    m3_group_bits: Option<f64>,
}

/// The layer names of the rows, in first-seen order.
pub(super) fn layer_names(rows: &[SweepRow]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        if !names.contains(&r.layer) {
            names.push(r.layer.clone());
        }
    }
    names
}

pub(super) fn aggregation_sweep(study: &Study) -> Result<Sweep> {
    let (t, plan, seed) = (&study.target, study.plan, study.target.seed());
    let groups = indices_by_group(study.attribute);
    // Projected per-sample features (the projection is linear: the release of a batch mean
    // projects to the mean of the projected samples).
    let features: Vec<Option<Vec<Vec<f64>>>> = study.grads.iter().enumerate().map(|(l, g)| g.as_ref().map(|g| projected(g, seed, l)).transpose()).collect::<Result<_>>()?;
    let mut rows = Vec::new();
    let n_pool = study.attribute.len();
    for &n in &plan.batch_sizes {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n as u64) << 20);
        // M1: mean over batches of n distinct samples.
        let mut m1: Vec<Vec<M1>> = vec![Vec::new(); t.layers().len()];
        for b in 0..plan.agg_m1_batches {
            let start = ((b * 64) % n_pool.saturating_sub(n).max(1)) as i64;
            let (xb, yb) = (t.batch().inputs().f_narrow(0, start, n as i64)?, t.batch().targets().f_narrow(0, start, n as i64)?);
            for (l, m) in sensitivity(&t.on(Batch::new(&xb, &yb)), &probe_settings(SWEEP_PROBES), b as u64)?.iter().enumerate() {
                if let Some(m) = m.measured() {
                    m1[l].push((m.sensitivity, m.sensitivity_rms, m.relative_sensitivity));
                }
            }
        }
        // M4 on releases of n samples.
        let inv = InversionSettings { iterations: plan.agg_m4_iterations, ..Default::default() };
        let m4 = inversion_attack(t, &InversionPlan { batch_size: n, releases: plan.agg_m4_releases }, &inv, None)?;
        for (l, m4) in m4.iter().enumerate() {
            let mean = |f: &dyn Fn(&M1) -> Option<f64>| -> Option<f64> {
                let v: Vec<f64> = m1[l].iter().filter_map(f).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            };
            let mut latent = Latent::default();
            if let (Some(g), Some(z)) = (&study.grads[l], &features[l]) {
                // M2 on group-pure micro-batches of n.
                if let Some((d, s)) = subspace_of_columns(&group_columns(&groups, n, &mut rng, |m| g.mean_of_rows(m)), M2_RANK)? {
                    latent.d_between = Some(d);
                    latent.separation = Some(s);
                }
                // M3, one person's attribute: release = mean of the target and n - 1 others.
                let mut feats = Vec::new();
                let mut labels = Vec::new();
                for k in 0..plan.agg_m3_releases {
                    let target = k % n_pool;
                    let mut members = vec![target];
                    while members.len() < n {
                        let j = rng.random_range(0..n_pool);
                        if !members.contains(&j) {
                            members.push(j);
                        }
                    }
                    feats.push(mean_rows(z, &members));
                    labels.push(study.attribute[target]);
                }
                if let Some(m) = usable_on_features(&feats, &labels, seed)? {
                    latent.m3_bits = Some(m.usable_information_bits);
                    latent.m3_acc = Some(m.attack_accuracy);
                }
                // M3, the batch's attribute: group-pure batches of n.
                let feats = group_releases(&groups, n, plan.agg_m3_releases, &mut rng, |m| mean_rows(z, m));
                latent.m3_group_bits = usable_on_features(&feats, &group_labels(&groups, study.attribute, plan.agg_m3_releases), seed)?.map(|m| m.usable_information_bits);
            }
            let s = (mean(&|t| Some(t.0)), mean(&|t| Some(t.1)), mean(&|t| t.2));
            rows.push(sweep_row(n as f64, t.layers().layers()[l].name.clone(), s, latent, m4));
        }
    }
    let figure = "aggregation_cnn.svg".to_string();
    sweep_figure(&study.fig_dir.join(&figure), &format!("cnn at step {}: every metric against the batch size n", study.step), "batch size n", &rows)?;
    Ok(Sweep { step: study.step, rows, figure })
}

fn sweep_row(x: f64, layer: String, (s, s_rms, r): (Option<f64>, Option<f64>, Option<f64>), latent: Latent, m4: &Metric<gradguard_guard::measure::Inversion>) -> SweepRow {
    SweepRow {
        x,
        layer,
        s,
        s_rms,
        r,
        d_between: latent.d_between,
        separation: latent.separation,
        m3_bits: latent.m3_bits,
        m3_acc: latent.m3_acc,
        m3_group_bits: latent.m3_group_bits,
        m4_bits: m4.measured().map(|m| m.usable_original_bits_per_dim),
        psnr: m4.measured().map(|m| m.psnr),
    }
}

fn sweep_figure(path: &Path, title: &str, x_label: &str, rows: &[SweepRow]) -> Result<()> {
    let metrics: [(&str, bool, Get); 10] = [
        ("sensitivity S_l", true, |r| r.s),
        ("sensitivity_rms", true, |r| r.s_rms),
        ("relative_sensitivity R_l", true, |r| r.r),
        ("subspace_distance", false, |r| r.d_between),
        ("subspace_separation", false, |r| r.separation),
        ("M3 usable_information_bits", false, |r| r.m3_bits),
        ("M3 attack_accuracy", false, |r| r.m3_acc),
        ("M3 bits, group-pure batch releases", false, |r| r.m3_group_bits),
        ("M4 usable_original_bits_per_dim", false, |r| r.m4_bits),
        ("M4 psnr (dB)", false, |r| r.psnr),
    ];
    let names = layer_names(rows);
    let panels: Vec<Panel> = metrics
        .iter()
        .map(|(title, log_y, get)| Panel {
            title: title.to_string(),
            log_y: *log_y,
            series: names.iter().map(|name| (name.clone(), rows.iter().filter(|r| &r.layer == name).filter_map(|r| get(r).map(|v| (r.x, v))).collect())).collect(),
        })
        .collect();
    line_panels_svg(path, title, x_label, &panels, true)
}

/// Each row of `g` released through `defence` (row i seeded with `seed_of(i)`), by
/// `Defence::apply`; unchanged without a defence, None when the defence withholds.
fn defend_rows<'g>(defence: Option<&Defence>, g: &'g GradientMatrix, seed_of: impl Fn(usize) -> u64) -> Result<Option<Cow<'g, GradientMatrix>>> {
    gradguard_audit::estimate::defended::defend_rows(defence.map(std::slice::from_ref).unwrap_or(&[]), g, seed_of)
}

/// Clip norm per layer: the median per-sample gradient norm (noise std = multiplier x clip);
/// 1 for a layer without per-sample gradients.
pub(super) fn median_norms(grads: &[Option<GradientMatrix>]) -> Vec<f64> {
    grads
        .iter()
        .map(|g| {
            g.as_ref().map_or(1.0, |g| {
                let mut norms: Vec<f64> = (0..g.rows).map(|i| g.row(i).iter().map(|v| v * v).sum::<f64>().sqrt()).collect();
                norms.sort_by(f64::total_cmp);
                norms[norms.len() / 2].max(1e-12)
            })
        })
        .collect()
}

pub(super) fn defence_sweep(study: &Study) -> Result<DefenceSweeps> {
    let (t, plan, seed) = (&study.target, study.plan, study.target.seed());
    let clip = median_norms(study.grads);
    let jv = release_probes(t, plan.m1_batch, SWEEP_PROBES)?;
    let groups = indices_by_group(study.attribute);
    // Group-pure micro-batch releases (mean gradient of `micro_batch` samples sharing the
    // attribute value), balanced over the values: the latent metrics' releases here, since
    // per-sample gradients carry no measurable M3 on this attribute.
    let micro_labels = group_labels(&groups, study.attribute, plan.micro_releases);
    let micro: Vec<Option<GradientMatrix>> = study
        .grads
        .iter()
        .enumerate()
        .map(|(l, g)| {
            g.as_ref()
                .map(|g| {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd3f ^ ((l as u64) << 32));
                    GradientMatrix::from_rows(group_releases(&groups, plan.micro_batch, plan.micro_releases, &mut rng, |m| g.mean_of_rows(m)))
                })
                .transpose()
        })
        .collect::<Result<_, _>>()?;
    let run = |points: Vec<(f64, Option<Defence>)>| -> Result<Vec<SweepRow>> {
        let mut rows = Vec::new();
        for (x, base) in points {
            let per_layer = |l: usize| -> Option<Defence> {
                base.as_ref().map(|d| match d {
                    Defence::Noise { multiplier, .. } => Defence::Noise { clip_norm: clip[l], multiplier: *multiplier },
                    other => other.clone(),
                })
            };
            let transform = |l: usize, g: &Tensor, r: usize| -> gradguard_guard::Result<Option<Tensor>> {
                match per_layer(l) {
                    None => Ok(Some(g.shallow_clone())),
                    Some(d) => Ok(d.apply(g, derive_seed(seed ^ 0xdef, 1000 * l + r))?),
                }
            };
            let inv = InversionSettings { iterations: plan.def_m4_iterations, ..Default::default() };
            let m4 = inversion_attack(t, &InversionPlan { batch_size: 1, releases: plan.def_m4_releases }, &inv, Some(&transform))?;
            for (l, m4) in m4.iter().enumerate() {
                let d = per_layer(l);
                // M1 of the defended batch-`m1_batch` release, as the guard's closed loop measures it.
                let m1 = release_sensitivity(&jv, l, d.as_slice(), derive_seed(seed ^ 0x1e1, l))?;
                let mut latent = Latent::default();
                if let Some(g) = &study.grads[l] {
                    // Per-sample releases through the defence (seed per sample): M3.
                    if let Some(m) = defend_rows(d.as_ref(), g, |i| derive_seed(seed ^ 0x5a, 100_000 * l + i))? {
                        if let Some(m) = usable_on_matrix(&m, study.attribute, seed, l)? {
                            latent.m3_bits = Some(m.usable_information_bits);
                            latent.m3_acc = Some(m.attack_accuracy);
                        }
                    }
                }
                if let Some(releases) = &micro[l] {
                    // Group-pure micro-batch releases through the defence: M2 (16 per value) and M3.
                    if let Some(defended) = defend_rows(d.as_ref(), releases, |k| derive_seed(seed ^ 0x3b, 100_000 * l + k))? {
                        let cols: Vec<Vec<Vec<f64>>> = (0..groups.len())
                            .map(|gi| (0..defended.rows).skip(gi).step_by(groups.len()).take(super::groups::M2_COLUMNS).map(|k| defended.row(k).to_vec()).collect())
                            .collect();
                        if let Some((db, sp)) = subspace_of_columns(&cols, M2_RANK)? {
                            latent.d_between = Some(db);
                            latent.separation = Some(sp);
                        }
                        latent.m3_group_bits = usable_on_matrix(&defended, &micro_labels, seed, l)?.map(|m| m.usable_information_bits);
                    }
                }
                let s = (m1.map(|m| m.s), m1.map(|m| m.s_rms), m1.and_then(|m| m.r));
                rows.push(sweep_row(x, t.layers().layers()[l].name.clone(), s, latent, m4));
            }
        }
        Ok(rows)
    };
    let noise = run(plan.noise.iter().map(|&m| (m, (m > 0.0).then_some(Defence::Noise { clip_norm: 1.0, multiplier: m }))).collect())?;
    let sparsify = run(plan.keep.iter().map(|&k| (k, (k < 1.0).then_some(Defence::Sparsify { keep_fraction: k }))).collect())?;
    let noise_figure = "defence_noise_cnn.svg".to_string();
    let sparsify_figure = "defence_sparsify_cnn.svg".to_string();
    let positive: Vec<SweepRow> = noise.iter().filter(|r| r.x > 0.0).cloned().collect();
    let step = study.step;
    sweep_figure(&study.fig_dir.join(&noise_figure), &format!("cnn at step {step}: every metric against the noise multiplier (clip = median per-sample norm)"), "noise multiplier", &positive)?;
    sweep_figure(&study.fig_dir.join(&sparsify_figure), &format!("cnn at step {step}: every metric against the kept fraction (top-k sparsification)"), "kept fraction", &sparsify)?;
    Ok(DefenceSweeps { step, clip: t.layers().names().into_iter().zip(clip).collect(), noise, sparsify, noise_figure, sparsify_figure })
}
