//! VALIDATION.md: every table, verdict and sentence computed from the study's numbers.
use super::sweeps::{layer_names, Get, SweepRow};
use super::groups::{MicroLatent, M2_COLUMNS};
use super::render_bound::render_bound;
use super::{Checkpoint, Plan, Results, ValidationOptions, SWEEP_PROBES};
use gradguard_audit::LayerRow;
use std::fmt::Write as _;

/// `writeln!` into a String, which cannot fail.
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!($($arg)*);
    }};
}

/// Spearman rank correlation (average ranks for ties); None with fewer than 3 points or a
/// constant side.
fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 3 {
        return None;
    }
    let ranks = |v: &[f64]| -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0 + 1.0;
            for k in i..=j {
                r[idx[k]] = avg;
            }
            i = j + 1;
        }
        r
    };
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    if va <= 0.0 || vb <= 0.0 {
        return None;
    }
    Some(cov / (va * vb).sqrt())
}

fn rho(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:+.2}"))
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-3) => format!("{v:.2e}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// One layer at one checkpoint, as the comparisons see it.
struct Point<'a> {
    row: &'a LayerRow,
    micro: MicroLatent,
}

type Getter = fn(&Point) -> Option<f64>;

/// (cheap metric, attack-grounded metric) pairs of the main table.
const COMPARISONS: [(&str, Getter, Getter); 7] = [
    ("S_l vs M4", |p| p.row.sensitivity, |p| p.row.usable_original_bits_per_dim),
    ("S_l^rms vs M4", |p| p.row.sensitivity_rms, |p| p.row.usable_original_bits_per_dim),
    ("R_l vs M4", |p| p.row.relative_sensitivity, |p| p.row.usable_original_bits_per_dim),
    ("d_between vs M3", |p| p.row.subspace_distance, |p| p.row.usable_information_bits),
    ("separation vs M3", |p| p.row.subspace_separation, |p| p.row.usable_information_bits),
    ("d_between vs M3, micro-batches", |p| p.micro.d_between, |p| p.micro.bits),
    ("separation vs M3, micro-batches", |p| p.micro.separation, |p| p.micro.bits),
];

/// Below this an attack's best layer is not a finding (bits, or bits per dimension).
const ATTACK_FLOOR: f64 = 0.05;

fn correlations(points: &[Point]) -> Vec<Option<f64>> {
    COMPARISONS
        .iter()
        .map(|(_, cheap, attack)| {
            let (a, b): (Vec<f64>, Vec<f64>) = points.iter().filter_map(|p| Some((cheap(p)?, attack(p)?))).unzip();
            // An attack that measured nothing anywhere has no ranking to track.
            if b.iter().all(|v| *v < ATTACK_FLOOR) {
                return None;
            }
            spearman(&a, &b)
        })
        .collect()
}

fn argmax(points: &[Point], get: Getter) -> Option<(String, f64)> {
    points.iter().filter_map(|p| Some((p.row.name.clone(), get(p)?))).max_by(|a, b| a.1.total_cmp(&b.1))
}

/// How many checkpoints a claim survives the error bars in (checkpoint: (survives, the attack
/// measured anything)).
fn survives(results: &[(bool, bool)]) -> String {
    let measured: Vec<bool> = results.iter().filter(|r| r.1).map(|r| r.0).collect();
    if measured.is_empty() {
        return format!("**undetermined** (the attack stayed below {ATTACK_FLOOR} at every checkpoint)");
    }
    let kept = measured.iter().filter(|w| **w).count();
    let verdict = if kept == measured.len() { "survives" } else if kept == 0 { "does not survive" } else { "survives in part" };
    format!("**{verdict}** ({kept} of {} checkpoints where the attack measured anything)", measured.len())
}

/// For the latent claim with error bars: (the best fc layer leads the best conv layer by more
/// than 2 standard errors of the difference, the attack measured anything).
fn fc_lead(points: &[Point], get: Getter, se: Getter) -> (bool, bool) {
    let best = |fc: bool| {
        points
            .iter()
            .filter(|p| (p.row.name == "fc1" || p.row.name == "fc2") == fc)
            .filter_map(|p| Some((get(p)?, se(p).unwrap_or(0.0))))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    };
    match (best(true), best(false)) {
        (Some((f, fse)), Some((c, cse))) => (f - c > 2.0 * (fse * fse + cse * cse).sqrt(), f.max(c) >= ATTACK_FLOOR),
        _ => (false, false),
    }
}

fn points(c: &Checkpoint) -> Vec<Point<'_>> {
    c.rows.iter().zip(&c.micro).map(|(row, micro)| Point { row, micro: *micro }).collect()
}

/// "held" / "did not hold" / "undetermined" for a claim about which layer an attack ranks
/// first, over checkpoints: (winner is as claimed, the attack measured something).
fn claim(results: &[(bool, bool)]) -> String {
    let measured: Vec<bool> = results.iter().filter(|r| r.1).map(|r| r.0).collect();
    if measured.is_empty() {
        return format!("**undetermined** (the attack stayed below {ATTACK_FLOOR} at every checkpoint)");
    }
    let wins = measured.iter().filter(|w| **w).count();
    let verdict = if wins * 2 > measured.len() { "held" } else { "did not hold" };
    format!(
        "**{verdict}** ({wins} of {} checkpoints where the attack measured anything{})",
        measured.len(),
        if measured.len() < results.len() { format!("; {} checkpoint(s) below {ATTACK_FLOOR}", results.len() - measured.len()) } else { String::new() }
    )
}

/// VALIDATION.md of a run with `options` and `plan` that measured `results`.
pub(super) fn render(args: &ValidationOptions, plan: &Plan, results: &Results) -> String {
    let (checkpoints, aggregation, defences) = (&results.checkpoints, results.aggregation.as_ref(), results.defences.as_ref());
    let (timings, total) = (&results.timings, results.total);
    let mut md = String::new();
    let w = &mut md;
    let out = args.out.display().to_string();
    let cmd = format!(
        "cargo run --release -- validate --out {}{}{}",
        out.trim_end_matches('/'),
        if args.seed != 0 { format!(" --seed {}", args.seed) } else { String::new() },
        if args.quick { " --quick" } else { "" }
    );
    out!(w, "# Validation study: do the cheap leakage metrics track the attacks?\n");
    out!(w, "Generated by `{cmd}` (or `scripts/validation.sh`) in {total:.0} s ({} libtorch thread(s), 2-core machine). Every number, table, figure and", args.threads);
    out!(w, "verdict below is computed by that run; rerunning it regenerates this file and `{}/validation/*.svg`.", out.trim_end_matches('/'));
    if args.quick {
        out!(w, "\n**This is a `--quick` smoke run with reduced sample counts: not the study.**");
    }
    out!(w, "\n## Set-up\n");
    out!(w, "- Data: the shipped UCI digits (8x8, pixels/16), split 80/20 with seed {}; private attribute: stroke weight (ink above the median of the digit's class, about half the samples).", args.seed);
    out!(w, "- Models: `cnn` (gradguard::models::DigitsCnn: conv1, conv2, fc1, fc2) and `mlp` (widths {:?}: fc0, fc1, fc2), seed {}, trained with Adam (lr 1e-3, batches of 64) and measured at steps {:?}.", gradguard_models::MLP_WIDTHS, args.seed, plan.steps);
    out!(w, "- Audited pool: the first {} training samples.", plan.pool);
    out!(w, "- M1: one batch of the first {} pool samples, K = {} probes (double backward).", plan.m1_batch, plan.m1_probes);
    out!(w, "- M2: m = 16 gradients per attribute value, rank r = 4; per-sample gradients, and group-pure micro-batches of {} samples.", plan.micro_batch);
    out!(w, "- M3: projection r = 64, stratified 70/30 split repeated over 5 seeds (mean ± standard error), the L2 penalty chosen on each training split by 3-fold cross-validation from 1e-3, 1e-2, 1e-1, 1; on all {} pool samples' per-sample gradients, and on {} group-pure micro-batch releases of {} (the mean gradient of {} samples sharing the attribute value, labelled with it).", plan.pool, plan.micro_releases, plan.micro_batch, plan.micro_batch);
    out!(w, "- M4: {} single-sample releases, {} Adam steps (step 0.1 sigma, cosine decay), started at the mean input plus 0.1 sigma seeded noise, labels known.", plan.m4_releases, plan.m4_iterations);
    out!(w, "- Spearman rank correlations are across layers; with 3-4 layers per checkpoint a single checkpoint decides little (|rho| = 1 happens by chance with probability 1/12 for 4 layers, 1/3 for 3), so the pooled rows (all checkpoints of a model, then both models) are the ones to read. Ties (e.g. several layers at 0 bits) get average ranks; n/a: fewer than 3 points, a constant side, or an attack below {ATTACK_FLOOR} bits at every point compared (no ranking to track).");

    // Main table: correlations.
    out!(w, "\n## Cheap metrics against the attacks\n");
    out!(w, "Spearman rho between each cheap metric and the attack-grounded one, across layers: original information against M4 bits per dimension, latent information against M3 bits (per-sample releases, and group-pure micro-batches of {}).\n", plan.micro_batch);
    out!(w, "| model | checkpoint | {} |", COMPARISONS.iter().map(|c| c.0).collect::<Vec<_>>().join(" | "));
    out!(w, "|---|---|{}", "---|".repeat(COMPARISONS.len()));
    let mut all: Vec<Point> = Vec::new();
    let mut summary: Vec<(String, Vec<Option<f64>>)> = Vec::new();
    for model in ["cnn", "mlp"] {
        let mut pooled: Vec<Point> = Vec::new();
        for c in checkpoints.iter().filter(|c| c.model == model) {
            let pts = points(c);
            out!(w, "| {model} | step {} | {} |", c.step, correlations(&pts).iter().map(|v| rho(*v)).collect::<Vec<_>>().join(" | "));
            pooled.extend(pts);
        }
        let cells = correlations(&pooled);
        out!(w, "| **{model}** | **pooled ({} points)** | {} |", pooled.len(), cells.iter().map(|v| format!("**{}**", rho(*v))).collect::<Vec<_>>().join(" | "));
        summary.push((model.to_string(), cells));
        all.extend(pooled);
    }
    let cells = correlations(&all);
    out!(w, "| **both** | **pooled ({} points)** | {} |", all.len(), cells.iter().map(|v| format!("**{}**", rho(*v))).collect::<Vec<_>>().join(" | "));
    summary.push(("both".into(), cells.clone()));

    let names = ["S_l", "S_l^rms", "R_l"];
    let best = cells[..3].iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).max_by(|a, b| a.1.total_cmp(&b.1));
    out!(w);
    match best {
        Some((i, v)) => out!(
            w,
            "**Which normalisation of M1 tracks the attack best (pooled over both models):** {} (rho {v:+.2}; the others: {}).",
            names[i],
            (0..3).filter(|&j| j != i).map(|j| format!("{} {}", names[j], rho(cells[j]))).collect::<Vec<_>>().join(", ")
        ),
        None => out!(w, "**Which normalisation of M1 tracks the attack best:** undetermined (no usable correlation)."),
    }
    let pick = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (None, None) => "undetermined".to_string(),
        (a, b) if a.unwrap_or(f64::NEG_INFINITY) >= b.unwrap_or(f64::NEG_INFINITY) => "d_between".to_string(),
        _ => "separation".to_string(),
    };
    out!(
        w,
        "\n**Which M2 score tracks M3 best (pooled over both models):** per-sample releases: {} (d_between {}, separation {}); micro-batches of {}: {} (d_between {}, separation {}).",
        pick(cells[3], cells[4]),
        rho(cells[3]),
        rho(cells[4]),
        plan.micro_batch,
        pick(cells[5], cells[6]),
        rho(cells[5]),
        rho(cells[6])
    );

    // Paper findings.
    out!(w, "\n## The paper's findings, checked here\n");
    out!(w, "M3 is the mean over 5 seeded stratified splits ± its standard error (METRICS.md, M3 Uncertainty; the L2 penalty chosen by 3-fold cross-validation on each training split). The splits share the pool, so the error is that of the split choice, not of drawing a new pool. M4 is a single seeded attack per sample: it has no error bar here.\n");
    out!(w, "| model | checkpoint | most M4 bits | most M3 bits (per sample) | most M3 bits (micro-batches) | largest S_l | largest S_l^rms | largest R_l | largest separation |");
    out!(w, "|---|---|---|---|---|---|---|---|---|");
    let m4: Getter = |p| p.row.usable_original_bits_per_dim;
    let m3: Getter = |p| p.row.usable_information_bits;
    let m3_micro: Getter = |p| p.micro.bits;
    let m3_se: Getter = |p| p.row.usable_information_se;
    let m3_micro_se: Getter = |p| p.micro.bits_se;
    let mut latent_se: Vec<(bool, bool)> = Vec::new();
    let mut latent_micro_se: Vec<(bool, bool)> = Vec::new();
    let mut first: Vec<(&str, Vec<(bool, bool)>)> = vec![("cnn", vec![]), ("mlp", vec![])];
    let mut latent: Vec<(bool, bool)> = Vec::new();
    let mut latent_micro: Vec<(bool, bool)> = Vec::new();
    for c in checkpoints {
        let pts = points(c);
        let show = |g: Getter| argmax(&pts, g).map_or("–".into(), |(n, v)| format!("{n} ({})", num(Some(v))));
        let show_se = |g: Getter, se: Getter| {
            argmax(&pts, g).map_or("–".into(), |(n, v)| format!("{n} ({} ± {})", num(Some(v)), num(pts.iter().find(|p| p.row.name == n).and_then(se))))
        };
        out!(
            w,
            "| {} | step {} | {} | {} | {} | {} | {} | {} | {} |",
            c.model,
            c.step,
            show(m4),
            show_se(m3, m3_se),
            show_se(m3_micro, m3_micro_se),
            show(|p| p.row.sensitivity),
            show(|p| p.row.sensitivity_rms),
            show(|p| p.row.relative_sensitivity),
            show(|p| p.row.subspace_separation)
        );
        let first_name = c.rows.first().map(|r| r.name.clone()).unwrap_or_default();
        if let Some((n, v)) = argmax(&pts, m4) {
            if let Some(entry) = first.iter_mut().find(|e| e.0 == c.model) {
                entry.1.push((n == first_name, v >= ATTACK_FLOOR));
            }
        }
        if c.model == "cnn" {
            if let Some((n, v)) = argmax(&pts, m3) {
                latent.push((n == "fc1" || n == "fc2", v >= ATTACK_FLOOR));
            }
            if let Some((n, v)) = argmax(&pts, m3_micro) {
                latent_micro.push((n == "fc1" || n == "fc2", v >= ATTACK_FLOOR));
            }
            latent_se.push(fc_lead(&pts, m3, m3_se));
            latent_micro_se.push(fc_lead(&pts, m3_micro, m3_micro_se));
        }
    }
    out!(w);
    out!(w, "- *First layers carry the most original information* (the first layer has the most M4 bits): CNN (conv1): {}; MLP (fc0): {}.", claim(&first[0].1), claim(&first[1].1));
    out!(w, "- *The fully-connected layers after the feature extractor carry the most latent information* (CNN: fc1 or fc2 has the most M3 bits): per-sample releases: {}; micro-batches of {}: {}.", claim(&latent), plan.micro_batch, claim(&latent_micro));
    out!(w, "- *The same, with M3's error bars* (a checkpoint counts for the claim only when the best fully-connected layer beats the best convolutional layer by more than twice the standard error of the difference, sqrt(se_fc^2 + se_conv^2)): per-sample releases: {}; micro-batches of {}: {}.", survives(&latent_se), plan.micro_batch, survives(&latent_micro_se));

    // Per-checkpoint numbers.
    out!(w, "\n## Per-layer numbers\n");
    out!(w, "| model | step | layer | P_l | S_l | S_l^rms | R_l | d_between | separation | M3 bits | M3 acc (majority) | micro: separation | micro: M3 bits (acc) | M4 bits/dim | PSNR dB |");
    out!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for c in checkpoints {
        for (r, mb) in c.rows.iter().zip(&c.micro) {
            out!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} ({}) | {} | {} |",
                c.model,
                c.step,
                r.name,
                r.params,
                num(r.sensitivity),
                num(r.sensitivity_rms),
                num(r.relative_sensitivity),
                num(r.subspace_distance),
                num(r.subspace_separation),
                format!("{} ± {}", num(r.usable_information_bits), num(r.usable_information_se)),
                num(r.attack_accuracy),
                num(r.majority_accuracy),
                num(mb.separation),
                format!("{} ± {}", num(mb.bits), num(mb.bits_se)),
                num(mb.accuracy),
                num(r.usable_original_bits_per_dim),
                num(r.psnr)
            );
        }
    }
    out!(w, "\nPer-layer bars of every metric (per-sample releases; `{cmd}` writes them): {}.", checkpoints.iter().map(|c| format!("[{} step {}](validation/layers_{}_step{}.svg)", c.model, c.step, c.model, c.step)).collect::<Vec<_>>().join(", "));
    if let Some(c) = checkpoints.iter().find(|c| c.model == "cnn" && c.step == *plan.steps.last().unwrap_or(&0)) {
        out!(w, "\nFigure (`{cmd}` writes it): ![cnn at step {}](validation/layers_cnn_step{}.svg)", c.step, c.step);
    }

    // Aggregation.
    if let Some(agg) = aggregation {
        out!(w, "\n## Aggregation: every metric against the batch size\n");
        out!(w, "CNN at step {}. Batch sizes {:?}. M1: mean over {} batches of n distinct pool samples (K = {}). M2: {} group-pure micro-batches of n per attribute value (METRICS.md, per-micro-batch granularity). M3 (one person): {} releases, each the mean gradient of a target sample and n - 1 random others, labelled with the target's attribute. M3 (batch): {} group-pure batches of n, labelled with the group. M4: {} releases of n samples, {} Adam steps, reconstructions matched to the true samples within each label.\n", agg.step, plan.batch_sizes, plan.agg_m1_batches, SWEEP_PROBES, M2_COLUMNS, plan.agg_m3_releases, plan.agg_m3_releases, plan.agg_m4_releases, plan.agg_m4_iterations);
        out!(w, "Figure (`{cmd}` writes it): ![aggregation](validation/{})\n", agg.figure);
        sweep_table(w, "n", &agg.rows, true);
        out!(w);
        aggregation_verdicts(w, &agg.rows, plan);
    }
    if let Some(d) = defences {
        out!(w, "\n## Defences: every metric against noise and sparsification\n");
        out!(w, "CNN at step {}. The defence is applied to each layer's release with `gradguard_defenses::Defence::apply`: per-sample gradients for one M3 (n = 1; seed per sample), {} group-pure micro-batch releases of {} for M2 ({} per value) and the other M3, the batch-{} release for M1, single-sample releases for M4 ({} releases, {} Adam steps; the attacker matches the defended gradient). M1 of a defended release is measured the way the guard's closed loop measures it (`gradguard_guard::measure::transform`): the {} probe JVPs pushed through the defence's Jacobian at the release (noise: the clip's Jacobian, since the added noise does not depend on the input, so S_l sees only what clipping does to the signal; top-k: the JVP restricted to the kept entries); R_l divides by the norm of the defended release. Noise: `noise(clip_norm = C_l, multiplier)` with C_l the layer's median per-sample gradient norm ({}).\n", d.step, plan.micro_releases, plan.micro_batch, M2_COLUMNS, plan.m1_batch, plan.def_m4_releases, plan.def_m4_iterations, SWEEP_PROBES, d.clip.iter().map(|(n, c)| format!("{n}: {}", num(Some(*c)))).collect::<Vec<_>>().join(", "));
        out!(w, "Figure (`{cmd}` writes it): ![noise](validation/{})\n", d.noise_figure);
        sweep_table(w, "noise multiplier", &d.noise, true);
        out!(w, "\nFigure (`{cmd}` writes it): ![sparsify](validation/{})\n", d.sparsify_figure);
        sweep_table(w, "kept fraction", &d.sparsify, true);
        out!(w);
        defence_verdicts(w, "noise", &d.noise, true);
        defence_verdicts(w, "sparsification", &d.sparsify, false);
    }

    render_bound(w, &results.bounds, &results.bound_figure, &cmd);
    if let Some(m) = &results.malicious {
        super::render_malicious::render_malicious(w, m);
    }
    super::render_malicious::render_aggregation(w, &results.honest, &plan.honest, &cmd);
    super::render_malicious::render_fpr(w, &results.fpr, &plan.honest, &cmd);
    let bound_summary = super::render_bound::summary(&results.bounds);

    // What held.
    out!(w, "\n## What held and what did not\n");
    for (model, cells) in &summary {
        let line: Vec<String> = COMPARISONS.iter().zip(cells).map(|((name, _, _), v)| format!("{name}: {}", verdict(*v))).collect();
        out!(w, "- {model}, pooled: {}.", line.join("; "));
    }
    out!(w, "- A rho above +0.5 is read as \"tracks the attack\", between -0.5 and +0.5 as \"does not track it\", below -0.5 as \"ranks the layers against the attack\".");
    if let Some(line) = bound_summary {
        out!(w, "- {line}");
    }
    if let Some(agg) = aggregation {
        let falls = |get: Get| trend(&agg.rows, get).iter().filter(|t| t.3.is_some_and(|r| r <= -0.5)).count();
        let rises = |get: Get| trend(&agg.rows, get).iter().filter(|t| t.3.is_some_and(|r| r >= 0.5)).count();
        let layers = trend(&agg.rows, |r| r.s).len();
        let measured = |get: Get| agg.rows.iter().filter_map(get).any(|v| v >= ATTACK_FLOOR);
        out!(w, "- Aggregation (CNN, n = 1..64): S_l fell with n in {} of {layers} layers, S_l^rms in {}, R_l in {}; M4 bits fell in {} of {layers}; subspace separation fell in {} of {layers} (rose in {}).", falls(|r| r.s), falls(|r| r.s_rms), falls(|r| r.r), falls(|r| r.m4_bits), falls(|r| r.separation), rises(|r| r.separation));
        out!(
            w,
            "- M3 for one person's attribute in a mixed batch: {}. M3 for an attribute the whole (group-pure) batch shares rose with n in {} of {layers} layers: aggregation lowers what a release says about one person but raises what it says about a group the batch is drawn from.",
            if measured(|r| r.m3_bits) { format!("fell with n in {} of {layers} layers", falls(|r| r.m3_bits)) } else { format!("below {ATTACK_FLOOR} bits at every n (no per-person latent leakage measured to lower)") },
            rises(|r| r.m3_group_bits)
        );
    }
    if let Some(d) = defences {
        // Falls: ranks against the protection strength, and moved by more than 0.1 %.
        let falls = |rows: &[SweepRow], sign: f64, get: Get| {
            trend(rows, get)
                .iter()
                .filter(|t| t.3.is_some_and(|r| sign * r <= -0.5) && matches!((t.1, t.2), (Some(a), Some(b)) if (a - b).abs() > 1e-3 * a.abs().max(b.abs())))
                .count()
        };
        let changed = |rows: &[SweepRow], get: Get| {
            trend(rows, get).iter().filter(|(_, a, b, _)| matches!((a, b), (Some(a), Some(b)) if (a - b).abs() > 1e-3 * a.abs().max(b.abs()))).count()
        };
        let layers = trend(&d.noise, |r| r.s).len();
        for (what, rows, sign) in [("Noise", &d.noise, 1.0), ("Sparsification", &d.sparsify, -1.0)] {
            out!(
                w,
                "- {what}: as protection grows, M4 bits fell in {} of {layers} layers and micro-batch M3 bits in {}; R_l fell in {}, S_l in {} (S_l changed at all in {} of {layers}), separation in {}.",
                falls(rows, sign, |r| r.m4_bits),
                falls(rows, sign, |r| r.m3_group_bits),
                falls(rows, sign, |r| r.r),
                falls(rows, sign, |r| r.s),
                changed(rows, |r| r.s),
                falls(rows, sign, |r| r.separation)
            );
        }
        let through_clip = match changed(&d.noise, |r| r.s) {
            0 => format!("S_l changed in none of the {layers} layers, so S_l and S_l^rms cannot see a noise defence"),
            k => format!("S_l changed in {k} of {layers} layers, through the clip (a batch gradient above C_l is scaled down), not through the noise"),
        };
        out!(w, "- S_l and S_l^rms measure how the release moves with the input; the added noise does not depend on the input (the defended release's Jacobian is the clip's): {through_clip}. Only R_l (which divides by the noisier release's norm) and the attacks see the noise itself.");
    }
    for line in super::render_malicious::summary(results.malicious.as_ref(), &results.honest, &results.fpr, &plan.honest) {
        out!(w, "- {line}");
    }
    out!(w, "\n## Runtime\n");
    for (what, s) in timings {
        out!(w, "- {what}: {s:.1} s");
    }
    out!(w, "- total: {total:.1} s");
    md
}

fn verdict(v: Option<f64>) -> String {
    match v {
        None => "undetermined (n/a)".into(),
        Some(v) if v > 0.5 => format!("tracks the attack (rho {v:+.2})"),
        Some(v) if v < -0.5 => format!("ranks the layers against the attack (rho {v:+.2})"),
        Some(v) => format!("does not track it (rho {v:+.2})"),
    }
}

fn sweep_table(w: &mut String, x_name: &str, rows: &[SweepRow], group_bits: bool) {
    out!(
        w,
        "| {x_name} | layer | S_l | S_l^rms | R_l | d_between | separation | M3 bits | M3 acc |{} M4 bits/dim | PSNR dB |",
        if group_bits { " M3 bits (group-pure batches) |" } else { "" }
    );
    out!(w, "|---|---|---|---|---|---|---|---|---|{}---|---|", if group_bits { "---|" } else { "" });
    for r in rows {
        out!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |{} {} | {} |",
            r.x,
            r.layer,
            num(r.s),
            num(r.s_rms),
            num(r.r),
            num(r.d_between),
            num(r.separation),
            num(r.m3_bits),
            num(r.m3_acc),
            if group_bits { format!(" {} |", num(r.m3_group_bits)) } else { String::new() },
            num(r.m4_bits),
            num(r.psnr)
        );
    }
}

/// A layer's (name, metric at the first sweep point, at the last, Spearman rho with the sweep
/// variable).
type Trend = (String, Option<f64>, Option<f64>, Option<f64>);

/// Per layer: the metric at the first and last sweep point and its Spearman correlation with
/// the sweep variable.
fn trend(rows: &[SweepRow], get: Get) -> Vec<Trend> {
    layer_names(rows)
        .into_iter()
        .map(|name| {
            let pts: Vec<(f64, f64)> = rows.iter().filter(|r| r.layer == name).filter_map(|r| get(r).map(|v| (r.x, v))).collect();
            let (xs, ys): (Vec<f64>, Vec<f64>) = pts.iter().copied().unzip();
            (name, pts.first().map(|p| p.1), pts.last().map(|p| p.1), spearman(&xs, &ys))
        })
        .collect()
}

/// The metrics of a sweep's verdict table, named; the three names are those the sweep gives
/// its separation, its M3 bits on single releases and its M3 bits on group-pure releases.
fn verdict_metrics([separation, m3, m3_group]: [&'static str; 3]) -> [(&'static str, Get); 8] {
    [
        ("S_l", |r| r.s),
        ("S_l^rms", |r| r.s_rms),
        ("R_l", |r| r.r),
        (separation, |r| r.separation),
        (m3, |r| r.m3_bits),
        (m3_group, |r| r.m3_group_bits),
        ("M4 bits/dim", |r| r.m4_bits),
        ("M4 PSNR", |r| r.psnr),
    ]
}

fn aggregation_verdicts(w: &mut String, rows: &[SweepRow], plan: &Plan) {
    let (lo, hi) = (plan.batch_sizes.first().copied().unwrap_or(1), plan.batch_sizes.last().copied().unwrap_or(1));
    let metrics = verdict_metrics(["separation", "M3 bits (one person)", "M3 bits (batch attribute)"]);
    out!(w, "Does aggregation lower each metric? Per layer: value at n = {lo} -> n = {hi}, and Spearman rho with n (negative: falls as n grows).\n");
    out!(w, "| metric | {} | falls with n in | rises with n in |", trend(rows, |r| r.s).iter().map(|t| t.0.clone()).collect::<Vec<_>>().join(" | "));
    out!(w, "|---|{}---|---|", "---|".repeat(trend(rows, |r| r.s).len()));
    for (name, get) in metrics {
        let t = trend(rows, get);
        let falls = t.iter().filter(|x| x.3.is_some_and(|r| r <= -0.5)).count();
        let rises = t.iter().filter(|x| x.3.is_some_and(|r| r >= 0.5)).count();
        out!(
            w,
            "| {name} | {} | {falls} of {} layers | {rises} of {} layers |",
            t.iter().map(|(_, a, b, r)| format!("{} -> {} ({})", num(*a), num(*b), rho(*r))).collect::<Vec<_>>().join(" | "),
            t.len(),
            t.len()
        );
    }
    // S_l ~ 1/n?
    let t = trend(rows, |r| r.s);
    let ratios: Vec<String> = t.iter().filter_map(|(n, a, b, _)| Some(format!("{n} {:.1}x", (*a)? / (*b)?))).collect();
    out!(w, "\nS_l at n = {lo} over S_l at n = {hi} (1/n scaling predicts {}x): {}.", hi / lo.max(1), ratios.join(", "));
}

fn defence_verdicts(w: &mut String, what: &str, rows: &[SweepRow], noise: bool) {
    // For noise the sweep variable grows with protection; for sparsification the kept fraction
    // falls with protection: flip the sign so that "negative" always means "falls as protection grows".
    let sign = if noise { 1.0 } else { -1.0 };
    let metrics = verdict_metrics(["separation (micro-batches)", "M3 bits (per sample)", "M3 bits (micro-batches)"]);
    out!(w, "With {what}, per layer: value without the defence -> at the strongest setting, and Spearman rho with the protection strength (negative: the metric falls as protection grows):\n");
    let header = trend(rows, |r| r.s);
    out!(w, "| metric | {} |", header.iter().map(|t| t.0.clone()).collect::<Vec<_>>().join(" | "));
    out!(w, "|---|{}", "---|".repeat(header.len()));
    for (name, get) in metrics {
        let t = trend(rows, get);
        out!(w, "| {name} | {} |", t.iter().map(|(_, a, b, r)| format!("{} -> {} ({})", num(*a), num(*b), rho(r.map(|r| sign * r)))).collect::<Vec<_>>().join(" | "));
    }
    out!(w);
}
