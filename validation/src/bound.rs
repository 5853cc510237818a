//! The validation study tests M5's bound: on one model at one checkpoint, over a grid of noise
//! multipliers, the M4 attack against single-sample releases noised by
//! `noise(clip_norm = C_l, multiplier)` beside the bound the guard computes for the same
//! releases (dFIL averaged over the attacked samples, METRICS.md M5).
//!
//! Both sides use the same prior scale v (the pool's per-dimension variance): the bound says
//! E||x_hat - x||^2 / D >= 1 / (dFIL + 1/v) for an attacker whose prior is a Gaussian of the
//! data's mean and variance, so the attack is put in the bound's unit as
//! 0.5 log2(v / attack MSE) (M4's own number, against the attacked samples' baseline, is shown
//! beside it). A cell where the attack beats the bound is reported, never hidden.
use super::sweeps::median_norms;
use super::Study;
use gradguard_audit::Result;
use gradguard_audit::estimate::bound::{batch_prior_variance, single_sample_dfil};
use gradguard_audit::estimate::inversion_attack;
use gradguard_audit::{line_panels_svg, Panel};
use gradguard_defenses::{derive_seed, Defence};
use gradguard_guard::measure::{reconstruction_bound_bits, reconstruction_bound_se};
use gradguard_guard::measure::{InversionPlan, InversionSettings};
use tch::Tensor;

/// One layer at one noise multiplier.
#[derive(Clone, Debug)]
pub(super) struct BoundCell {
    pub multiplier: f64,
    pub layer: String,
    /// sigma_l = multiplier x C_l.
    pub noise_std: f64,
    /// dFIL averaged over the attacked samples; None without noise.
    pub dfil: Option<f64>,
    /// The bound, bits/dim, and its standard error (over samples and probes); None: no noise.
    pub bound: Option<(f64, f64)>,
    /// The attack's per-dimension MSE, and the attack in the bound's unit, max(0, 0.5 log2(v / MSE)).
    pub attack_mse: Option<f64>,
    pub attack_bits: Option<f64>,
    /// M4 as METRICS.md defines it (baseline: the attacked samples' distance to the mean).
    pub m4_bits: Option<f64>,
}

impl BoundCell {
    /// The attack beats the bound (point estimates).
    pub(crate) fn exceeds(&self) -> bool {
        matches!((self.bound, self.attack_bits), (Some((b, _)), Some(a)) if a > b)
    }
}

/// The grid on one model.
pub(super) struct BoundStudy {
    pub model: &'static str,
    pub step: usize,
    pub prior_variance: f64,
    /// What knowing the label alone gives: 0.5 log2(E||x - x_bar||^2 / E||x - x_bar_y||^2) over
    /// the pool (class means as the guess): the side information M4's attacker has.
    pub label_prior_bits: f64,
    /// C_l per layer.
    pub clip: Vec<(String, f64)>,
    pub releases: usize,
    pub iterations: usize,
    pub probes: usize,
    pub cells: Vec<BoundCell>,
}

/// Probes K per attacked sample for M5.
const BOUND_PROBES: usize = 16;

pub(super) fn bound_study(study: &Study, model: &'static str) -> Result<BoundStudy> {
    let (t, plan, seed) = (&study.target, study.plan, study.target.seed());
    let clip = median_norms(study.grads);
    let names = t.layers().names();
    let grid = &plan.bound_noise;
    let v = batch_prior_variance(t)?;
    let chain = |l: usize, p: usize| -> Vec<Defence> { if grid[p] > 0.0 { vec![Defence::Noise { clip_norm: clip[l], multiplier: grid[p] }] } else { Vec::new() } };
    let dfil = single_sample_dfil(t, plan.bound_releases, BOUND_PROBES, grid.len(), &chain)?;
    let mut cells = Vec::new();
    for (p, &m) in grid.iter().enumerate() {
        let transform = |l: usize, g: &Tensor, r: usize| -> gradguard_guard::Result<Option<Tensor>> {
            match chain(l, p).first() {
                None => Ok(Some(g.shallow_clone())),
                Some(d) => Ok(d.apply(g, derive_seed(seed ^ 0xb0d5, 1000 * l + r))?),
            }
        };
        let inv = InversionSettings { iterations: plan.def_m4_iterations, ..Default::default() };
        let m4 = inversion_attack(t, &InversionPlan { batch_size: 1, releases: plan.bound_releases }, &inv, Some(&transform))?;
        for (l, m4) in m4.iter().enumerate() {
            let d = dfil[p][l];
            let m4 = m4.measured();
            cells.push(BoundCell {
                multiplier: m,
                layer: names[l].clone(),
                noise_std: m * clip[l],
                dfil: d.map(|d| d.0),
                bound: d.map(|(d, se)| (reconstruction_bound_bits(v, d), reconstruction_bound_se(v, d, se))),
                attack_mse: m4.map(|m| m.mse),
                attack_bits: m4.map(|m| if m.mse > 0.0 { (0.5 * (v / m.mse).log2()).max(0.0) } else { f64::INFINITY }),
                m4_bits: m4.map(|m| m.usable_original_bits_per_dim),
            });
        }
    }
    Ok(BoundStudy {
        model,
        step: study.step,
        prior_variance: v,
        label_prior_bits: label_prior_bits(t)?,
        clip: names.into_iter().zip(clip).collect(),
        releases: plan.bound_releases,
        iterations: plan.def_m4_iterations,
        probes: BOUND_PROBES,
        cells,
    })
}

/// 0.5 log2(E||x - x_bar||^2 / E||x - x_bar_y||^2) over the inspected batch (class labels).
fn label_prior_bits(t: &gradguard_guard::Inspection) -> Result<f64> {
    let x = gradguard_guard::measure::to_f64_vec(t.batch().inputs())?;
    let y: Vec<i64> = gradguard_guard::measure::to_f64_vec(t.batch().targets())?.into_iter().map(|v| v as i64).collect();
    let n = y.len();
    let d = x.len() / n.max(1);
    let mean = |rows: &[usize]| -> Vec<f64> {
        let mut m = vec![0.0; d];
        for &i in rows {
            m.iter_mut().zip(&x[i * d..(i + 1) * d]).for_each(|(a, b)| *a += b / rows.len() as f64);
        }
        m
    };
    let all: Vec<usize> = (0..n).collect();
    let overall = mean(&all);
    let (mut base, mut within) = (0.0, 0.0);
    let mut classes = y.clone();
    classes.sort_unstable();
    classes.dedup();
    for c in classes {
        let rows: Vec<usize> = (0..n).filter(|&i| y[i] == c).collect();
        let centre = mean(&rows);
        for &i in &rows {
            let row = &x[i * d..(i + 1) * d];
            base += row.iter().zip(&overall).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
            within += row.iter().zip(&centre).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
        }
    }
    Ok(0.5 * (base / within).log2())
}

/// The figure: per model, attack bits/dim against the bound per layer (log x), with the line
/// attack = bound; a point above it is an attack that beat the bound.
pub(super) fn bound_figure(path: &std::path::Path, studies: &[BoundStudy]) -> Result<()> {
    let panels: Vec<Panel> = studies
        .iter()
        .map(|s| {
            let mut names: Vec<String> = Vec::new();
            for c in &s.cells {
                if !names.contains(&c.layer) {
                    names.push(c.layer.clone());
                }
            }
            let points = |name: &str| -> Vec<(f64, f64)> {
                let mut p: Vec<(f64, f64)> = s.cells.iter().filter(|c| c.layer == name).filter_map(|c| Some((c.bound?.0, c.attack_bits?))).collect();
                p.sort_by(|a, b| a.0.total_cmp(&b.0));
                p
            };
            let mut series: Vec<(String, Vec<(f64, f64)>)> = names.iter().map(|n| (n.clone(), points(n))).collect();
            let xs: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)).collect();
            let (lo, hi) = xs.iter().fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(*x), b.max(*x)));
            if lo.is_finite() {
                let line: Vec<(f64, f64)> = (0..=40).map(|k| lo * (hi / lo).powf(k as f64 / 40.0)).map(|x| (x, x)).collect();
                series.push(("attack = bound".into(), line));
            }
            Panel { title: format!("{} at step {}: attack (bits/dim vs prior v) against the M5 bound", s.model, s.step), log_y: false, series }
        })
        .collect();
    line_panels_svg(path, "M5 bound against the M4 attack on noised single-sample releases, per layer", "M5 reconstruction bound, bits/dim (log)", &panels, true)
}
