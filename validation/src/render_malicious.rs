//! VALIDATION.md's malicious-server, aggregation-revisited and M6-rule sections, and their
//! figures: every table and sentence computed from the run's numbers.
use super::aggregation::{AggModel, AggregationPlan, FprRun, M6_RULES};
use super::malicious::{Cell, MaliciousStudy, FISHING_TARGET, HONEST_STEPS};
use gradguard_audit::{line_panels_svg, Panel, Result};
use std::fmt::Write as _;
use std::path::Path;

macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!($($arg)*);
    }};
}

/// The aggregation figure's file name.
pub(super) const AGGREGATION_FIGURE: &str = "aggregation_recovered.svg";
/// The M6-rule figure's file name.
pub(super) const FPR_FIGURE: &str = "m6_rule_honest_runs.svg";

/// Steps per point of the M6-rule figure (the largest exposed_fraction measured in them).
const FPR_WINDOW: usize = 50;

/// The PSNR (dB) at which a sample counts as recovered (METRICS.md, M4).
const RECOVERED_DB: f64 = 30.0;

fn num(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.is_infinite() => "+inf".into(),
        Some(v) if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-3) => format!("{v:.2e}"),
        Some(v) => format!("{v:.3}"),
    }
}

fn pct(v: f64) -> String {
    format!("{:.0} %", 100.0 * v)
}

/// "8, 32 and 128".
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// The isolated_share rule read beside the exposed_fraction ones.
const ISOLATED_RULE: f64 = 0.5;

/// The malicious models in the table's order.
const MODELS: [&str; 5] = ["honest", "trap", "fishing", "imprint", "fishing-one"];

/// What each malicious model is, in a few words.
fn describe(model: &str) -> &'static str {
    match model {
        "trap" => "trap weights (Boenisch et al. 2021)",
        "fishing" => "fishing for one class (Wen et al. 2022)",
        "fishing-one" => "the fishing model on batches that each hold one sample of the fished class",
        "imprint" => "an imprint-like binned fc0 (Fowl et al. 2022)",
        _ => "the honest model",
    }
}

fn cell<'a>(s: &'a MaliciousStudy, model: &str, n: usize) -> Option<&'a Cell> {
    s.cells.iter().find(|c| c.model == model && c.n == n)
}

/// The layer with the largest mean of an M6 figure (`isolated`: isolated_share, else
/// exposed_fraction), and its value.
fn most(c: &Cell, isolated: bool) -> Option<(&str, f64)> {
    c.m6.iter().filter_map(|(l, e, i)| Some((l.as_str(), if isolated { (*i)? } else { (*e)? }))).max_by(|a, b| a.1.total_cmp(&b.1))
}

/// Samples recovered by the suite's strongest attack on fc0.
fn strongest_count(c: &Cell) -> Option<usize> {
    c.strongest.map(|(_, f)| (f * c.samples() as f64).round() as usize)
}

/// One check of a number on a cell: (flagged, the value shown).
type Check = fn(&Cell, &Cell, f64) -> Option<(bool, String)>;

/// The numbers read for "which number caught which attack", each with its reading rule.
fn checks() -> [(&'static str, &'static str, Check); 7] {
    [
        ("M4 attack suite", "the strongest attack recovers at least 25 % of the batch and more than the honest model", |c, h, _| {
            let (f, hf) = (c.strongest?.1, h.strongest.map_or(0.0, |s| s.1));
            Some((f >= 0.25 && f > hf, format!("{} ({}, honest {})", pct(f), c.strongest?.0, pct(hf))))
        }),
        ("M6 exposed_fraction > 0.5", "above 0.5 on some layer (the rule of the M6 section below; the value shown is the most exposed layer's)", |c, _, _| {
            let (l, v) = most(c, false)?;
            Some((v > M6_RULES[0], format!("{} ({l})", num(Some(v)))))
        }),
        ("M6 exposed_fraction > 0.1", "above 0.1 on some layer (the rule of federated/tests/test_refusal.py's policy)", |c, _, _| {
            let (l, v) = most(c, false)?;
            Some((v > M6_RULES[1], format!("{} ({l})", num(Some(v)))))
        }),
        ("M6 isolated_share", "above 0.5 on some layer", |c, _, _| {
            let (l, v) = most(c, true)?;
            Some((v > ISOLATED_RULE, format!("{} ({l})", num(Some(v)))))
        }),
        ("M1 S_l", "above the honest model's at the same n", |c, h, _| Some((c.s? > h.s?, format!("{:.2}x honest", c.s? / h.s?)))),
        ("M1 R_l", "above the honest model's at the same n", |c, h, _| Some((c.r? > h.r?, format!("{:.2}x honest", c.r? / h.r?)))),
        ("M5 bound (noised)", "allows the average sample a PSNR of 30 dB or more", |c, _, _| {
            let n = c.noised.first()?;
            Some((n.bound_psnr? >= RECOVERED_DB, format!("{} bits/dim, <= {:.1} dB", num(n.bound), n.bound_psnr?)))
        }),
    ]
}

/// The malicious-server section.
pub(super) fn render_malicious(w: &mut String, s: &MaliciousStudy) {
    let p = &s.plan;
    let sizes: Vec<String> = p.batch_sizes.iter().map(|n| n.to_string()).collect();
    out!(w, "\n## Malicious server: which number catches which attack\n");
    out!(
        w,
        "A server that chooses the parameters it sends can make the release of a batch give samples back without changing the architecture. The digits MLP (fc0 Linear(64, 256), ReLU, fc1 Linear(256, 10); built and trained in Rust as `tests/fixtures/malicious_models.py` builds it in Python, with PyTorch's `nn.Linear` initialisation, seeded) is trained honestly ({HONEST_STEPS} Adam steps of 64, lr 1e-3), then three malicious variants are made from it by setting parameters only:"
    );
    out!(w, "- **trap**: fc0's rows drawn N(0, 1), each bias at minus the 1 - 1/B quantile of w.x over the server's auxiliary data, so that each unit fires for about one input in B; one trap model per batch size B = n (the server knows the clients' batch size).");
    out!(w, "- **fishing**: fc1's rows (weight and bias) scaled, class {FISHING_TARGET}'s by 0.05 and the others' by 30, so that the samples of class {FISHING_TARGET} dominate the batch gradient (Wen et al.'s class fishing; their feature-binning half is not built).");
    out!(w, "- **fishing-one**: the fishing model on the batch Wen et al.'s attack is after, where it succeeds: each release holds one sample of class {FISHING_TARGET} (the next one of the training split) and n - 1 samples of other classes that the honest model classifies correctly (the next ones), so that the fished sample's gradient is the release. Its comparisons with the honest model use the honest model's consecutive batches.");
    out!(w, "- **imprint**: every fc0 row set to ones / 64 (brightness), the biases at minus the 256 inner quantiles of the brightness over the auxiliary data, and fc1's columns one seeded column repeated, so that consecutive units differ by the samples in one brightness bin (Fowl et al.'s binned layer, set through the existing Linear).");
    out!(
        w,
        "\nData: the shipped digits, the seeded 80/20 split; the server's auxiliary data (for the quantiles) is the 20 % split ({} samples), the attacked releases are consecutive batches from the start of the training split ({} samples). Accuracy on the auxiliary split: {}.",
        s.aux_samples,
        s.train_samples,
        s.accuracy.iter().map(|(m, a)| format!("{m} {}", pct(*a))).collect::<Vec<_>>().join(", ")
    );
    out!(
        w,
        "\nAt batch sizes {} ({} releases each): M4 is the audit's attack suite on fc0 (`gradguard_audit::estimate::attacks::attack_suite`, no optimisation attack: the analytic attacks, single units and differences of aligned units, and label recovery; samples recovered at PSNR >= 30 dB with oracle matching, an upper bound on each attack); M1 of fc0's release (K = {} probes, mean over the releases); M6 of fc0 and fc1 (tau {}, mean over the releases, fc0's largest in brackets); M5: fc0 released as `noise(clip_norm = C, multiplier)` by `Defence::apply`, with C = {} (the honest model's median per-sample fc0 gradient norm over 64 samples: the clip a user of the honest model would have set) and v = {:.4} (per-dimension variance of the attacked samples); the bound from the same probe JVPs, and its floor on the average sample's error written as the highest PSNR it allows (peak 1). The analytic attacks are then run on that noised release (`analytic`/`analytic_differences` on a `LinearRelease` of the noised gradients), the stronger kept: samples recovered, and its error in the bound's unit (max(0, 0.5 log2(v / MSE)), oracle matching: the attacker is told which candidate is whose, which the bound does not grant).\n",
        and_list(&sizes),
        p.releases,
        p.probes,
        p.tau,
        num(Some(s.clip)),
        s.prior_variance
    );
    let noise_heads: Vec<String> = p.multipliers.iter().map(|m| format!("M5 bound @{m} bits/dim (PSNR floor) | noised attack @{m}: recovered (bits/dim)")).collect();
    out!(w, "| model | n | releases | analytic | differences | strongest (fraction) | labels: exact sets | S_l | S_l^rms | R_l | M6 fc0 exposed (max) | M6 fc0 isolated_share | M6 fc1 exposed | M6 fc1 isolated_share | {} |", noise_heads.join(" | "));
    out!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|{}", "---|---|".repeat(p.multipliers.len()));
    for &n in &p.batch_sizes {
        for model in MODELS {
            let Some(c) = cell(s, model, n) else { continue };
            let total = c.samples();
            let count = |v: Option<usize>| v.map_or("absent".to_string(), |k| format!("{k}/{total}"));
            let noised: Vec<String> = c
                .noised
                .iter()
                .map(|x| format!("{} ({}) | {}/{total} ({}, {})", num(x.bound), x.bound_psnr.map_or("–".into(), |p| format!("{p:.1} dB")), x.recovered, x.attack, num(Some(x.attack_bits))))
                .collect();
            out!(
                w,
                "| {model} | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} |",
                c.releases,
                count(c.analytic),
                count(c.differences),
                c.strongest.map_or("absent".into(), |(a, f)| format!("{a} ({})", num(Some(f)))),
                c.labels.map_or("absent".into(), |(e, r)| format!("{e}/{r}")),
                num(c.s),
                num(c.s_rms),
                num(c.r),
                num(c.exposed),
                num(c.exposed_max),
                num(c.isolated),
                num(c.m6.get(1).and_then(|x| x.1)),
                num(c.m6.get(1).and_then(|x| x.2)),
                noised.join(" | ")
            );
        }
    }
    // Absent attacks, grouped by attack and reason (the optimisation attack is not run here).
    let mut absent: Vec<(String, String, Vec<String>)> = Vec::new();
    for c in &s.cells {
        for (a, r) in c.absent.iter().filter(|(a, _)| a != "optimisation") {
            match absent.iter_mut().find(|x| &x.0 == a && &x.1 == r) {
                Some(x) if !x.2.contains(&c.model.to_string()) => x.2.push(c.model.to_string()),
                Some(_) => {}
                None => absent.push((a.clone(), r.clone(), vec![c.model.to_string()])),
            }
        }
    }
    for (a, r, models) in &absent {
        out!(w, "\n{a} is absent on {} at every batch size: {r}.", and_list(models));
    }

    // Which number caught which attack.
    let m0 = p.multipliers.first().copied().unwrap_or(0.0);
    out!(w, "\n### Which number caught which attack\n");
    out!(w, "Each cell: the number's value at that batch size (M4, M1 and M5 of fc0; M6 of the layer, fc0 or fc1, where it is largest), **flagged** when it meets the reading rule of its column: {}. (M5 at multiplier {m0}.)\n", checks().iter().map(|(name, rule, _)| format!("{name}: {rule}")).collect::<Vec<_>>().join("; "));
    out!(w, "| attack | n | {} |", checks().iter().map(|c| c.0).collect::<Vec<_>>().join(" | "));
    out!(w, "|---|---|{}", "---|".repeat(checks().len()));
    for model in &MODELS[1..] {
        for &n in &p.batch_sizes {
            let (Some(c), Some(h)) = (cell(s, model, n), cell(s, "honest", n)) else { continue };
            let cells: Vec<String> = checks()
                .iter()
                .map(|(_, _, check)| match check(c, h, m0) {
                    None => "–".into(),
                    Some((true, v)) => format!("**flagged** {v}"),
                    Some((false, v)) => v,
                })
                .collect();
            out!(w, "| {model} | {n} | {} |", cells.join(" | "));
        }
    }
    out!(w, "\nThe honest model, read by the columns that do not compare with it (M6 and M5): {}.", {
        let mut parts = Vec::new();
        for (name, _, check) in checks().into_iter().filter(|c| c.0.starts_with("M6") || c.0.starts_with("M5")) {
            let flagged: Vec<String> = p.batch_sizes.iter().filter(|&&n| cell(s, "honest", n).is_some_and(|h| check(h, h, m0).is_some_and(|x| x.0))).map(|n| n.to_string()).collect();
            if !flagged.is_empty() {
                parts.push(format!("{name} flags it at n = {}", and_list(&flagged)));
            }
        }
        if parts.is_empty() { "none flags it at any batch size".to_string() } else { parts.join("; ") }
    });
    out!(w);
    for line in findings(s, m0) {
        out!(w, "- {line}");
    }
}

/// The batch sizes at which `check` flags `model`, and the values.
fn flagged(s: &MaliciousStudy, model: &str, check: Check, m0: f64) -> (Vec<usize>, Vec<String>) {
    let mut at = Vec::new();
    let mut values = Vec::new();
    for &n in &s.plan.batch_sizes {
        if let (Some(c), Some(h)) = (cell(s, model, n), cell(s, "honest", n)) {
            if let Some((f, v)) = check(c, h, m0) {
                values.push(format!("{v} at n = {n}"));
                if f {
                    at.push(n);
                }
            }
        }
    }
    (at, values)
}

/// The plain sentences: per attack, what the suite recovered, which numbers flagged it and
/// which did not; then M6's misses, M1's ranking, and the noise.
pub(super) fn findings(s: &MaliciousStudy, m0: f64) -> Vec<String> {
    let mut lines = Vec::new();
    let all = s.plan.batch_sizes.len();
    for model in &MODELS[1..] {
        let recovered: Vec<String> = s
            .plan
            .batch_sizes
            .iter()
            .filter_map(|&n| {
                let (c, h) = (cell(s, model, n)?, cell(s, "honest", n)?);
                Some(format!("{}/{} at n = {n} ({}; honest {}/{})", strongest_count(c)?, c.samples(), c.strongest?.0, strongest_count(h).unwrap_or(0), h.samples()))
            })
            .collect();
        let mut caught = Vec::new();
        let mut missed = Vec::new();
        for (name, _, check) in checks().iter().skip(1) {
            let (at, values) = flagged(s, model, *check, m0);
            let sizes: Vec<String> = at.iter().map(|n| n.to_string()).collect();
            if at.len() == all {
                caught.push(format!("{name} at every batch size ({})", values.join(", ")));
            } else if !at.is_empty() {
                caught.push(format!("{name} at n = {} only ({})", and_list(&sizes), values.join(", ")));
            } else {
                missed.push(format!("{name} ({})", values.join(", ")));
            }
        }
        lines.push(format!(
            "**{model}** ({}): the attack suite recovers {}. Flagged by {}. Not flagged by {}.",
            describe(model),
            and_list(&recovered),
            if caught.is_empty() { "no number".to_string() } else { caught.join("; ") },
            if missed.is_empty() { "none".to_string() } else { missed.join("; ") }
        ));
    }
    // What the client sees without any metric: the model's accuracy.
    if let Some(honest) = s.accuracy.iter().find(|(m, _)| m == "honest").map(|x| x.1) {
        type Accuracy<'a> = Vec<&'a (String, f64)>;
        let (low, kept): (Accuracy, Accuracy) = s.accuracy.iter().filter(|(m, _)| m != "honest").partition(|(_, a)| *a < honest - 0.2);
        let show = |v: &[&(String, f64)]| v.iter().map(|(m, a)| format!("{m} {}", pct(*a))).collect::<Vec<_>>();
        if !low.is_empty() {
            lines.push(format!(
                "**Accuracy**: on the held-out split {} classify far below the honest model ({}): a client that checks the model it is sent before training on it would see that; {}.",
                and_list(&show(&low)),
                pct(honest),
                if kept.is_empty() { "no malicious model keeps the honest accuracy".to_string() } else { format!("{} keeps it within 20 points", and_list(&show(&kept))) }
            ));
        }
    }
    // M6's misses: an attack that recovers a quarter of the batch while exposed_fraction stays at or below 0.5.
    for model in &MODELS[1..] {
        let misses: Vec<String> = s
            .plan
            .batch_sizes
            .iter()
            .filter_map(|&n| {
                let c = cell(s, model, n)?;
                let (attack, f) = c.strongest?;
                let (layer, e) = most(c, false)?;
                let reading = if (e - f).abs() <= 0.1 { "M6 measures that exposure, but it is under the 0.5 rule".to_string() } else if e > M6_RULES[1] { "M6 sees a part of it, above the 0.1 rule".to_string() } else { "M6 does not see it".to_string() };
                (f >= 0.25 && e <= M6_RULES[0]).then(|| format!("n = {n}: {attack} recovers {} of the batch from fc0 while the most exposed layer ({layer}) has exposed_fraction {} ({reading})", pct(f), num(Some(e))))
            })
            .collect();
        if misses.is_empty() {
            continue;
        }
        let why = if *model == "imprint" {
            " The imprint layer's units are each moved by every sample brighter than their threshold, so no unit is dominated by one sample; what gives a sample back is the difference of two units, which M6 does not look at (METRICS.md, M6: what it does not see)."
        } else {
            ""
        };
        lines.push(format!("**What M6 misses**: {model}: {}.{why}", misses.join("; ")));
    }
    // Fishing exposes few samples but concentrates the gradient.
    let fishing: Vec<String> = s
        .plan
        .batch_sizes
        .iter()
        .filter_map(|&n| {
            let c = cell(s, "fishing", n)?;
            let one = cell(s, "fishing-one", n).map(|o| {
                let layers: Vec<String> = o.m6.iter().map(|(l, e, i)| format!("{l} exposed {} / isolated_share {}", num(*e), num(*i))).collect();
                format!(" (one fished sample in the batch: {})", layers.join(", "))
            });
            let layers: Vec<String> = c.m6.iter().map(|(l, e, i)| format!("{l} exposed {} / isolated_share {}", num(*e), num(*i))).collect();
            Some(format!("n = {n} (1/n = {:.3}): {}{}", 1.0 / n as f64, layers.join(", "), one.unwrap_or_default()))
        })
        .collect();
    if !fishing.is_empty() {
        lines.push(format!(
            "**Fishing and the two M6 numbers**: {}. exposed_fraction counts samples, so a release that gives back a few samples of n scores a few / n and stays under a 0.5 rule however completely those samples are exposed; isolated_share measures how much of the release comes from single-sample units. The fishing model leaves the honest fc0 in place; what it changes is fc1, where its confident classes leave a few samples alone on an output unit. On a batch that holds one sample of the fished class, that sample's gradient is the release: isolated_share reads it in both layers while exposed_fraction counts one sample of n.",
            fishing.join("; ")
        ));
    }
    // M1's ranking of each malicious model against the honest one.
    let ranks: Vec<String> = MODELS[1..]
        .iter()
        .map(|model| {
            let r: Vec<String> = s
                .plan
                .batch_sizes
                .iter()
                .filter_map(|&n| {
                    let (c, h) = (cell(s, model, n)?, cell(s, "honest", n)?);
                    Some(format!("{:.2}x at n = {n}", c.s? / h.s?))
                })
                .collect();
            format!("{model} {}", r.join(", "))
        })
        .collect();
    lines.push(format!("**M1 against the honest model** (S_l of the malicious fc0 over the honest fc0's): {}. M1 measures how much the release moves with the inputs, averaged over the batch; a ratio below 1 is a malicious model M1 ranks as leaking less than the honest one.", ranks.join("; ")));
    // Noise.
    lines.push(format!(
        "**M5 reads a noised release**: released without noise, fc0 has no bound (+inf, METRICS.md M5) on every model here, malicious or not, so M5 does not tell them apart; its column above is the bound of fc0 released through `noise(clip_norm = {}, multiplier = {m0})`, the defence a user of the honest model might run, and beside it what the attacks recover from that very release.",
        num(Some(s.clip))
    ));
    for (k, &m) in s.plan.multipliers.iter().enumerate() {
        let rows: Vec<String> = MODELS
            .iter()
            .flat_map(|model| s.plan.batch_sizes.iter().filter_map(move |&n| cell(s, model, n)))
            .filter_map(|c| {
                let x = c.noised.get(k).filter(|x| x.multiplier == m)?;
                Some(format!("{} n = {}: {}/{} (bound {}, attack {} bits/dim{})", c.model, c.n, x.recovered, c.samples(), num(x.bound), num(Some(x.attack_bits)), if x.bound.is_some_and(|b| x.attack_bits > b) { ", **above the bound**" } else { "" }))
            })
            .collect();
        let above = s.cells.iter().filter(|c| c.noised.get(k).is_some_and(|x| x.bound.is_some_and(|b| x.attack_bits > b))).count();
        let hit: Vec<&Cell> = s.cells.iter().filter(|c| c.noised.get(k).is_some_and(|x| x.recovered > 0)).collect();
        let under: Vec<String> = hit.iter().filter_map(|c| c.noised.get(k)).filter_map(|x| x.bound_psnr).filter(|p| *p < RECOVERED_DB).map(|p| format!("{p:.1} dB")).collect();
        let hit_line = if hit.is_empty() {
            "No sample was recovered at 30 dB from any noised release.".to_string()
        } else if under.is_empty() {
            format!("In the {} cells where some sample was recovered at 30 dB, the bound's floor allowed the average sample 30 dB or more.", hit.len())
        } else {
            format!("In {} of the {} cells where some sample was recovered at 30 dB, the bound's floor for the average sample was under 30 dB ({}): the bound is on the average sample, and a few samples recovered well are within it.", under.len(), hit.len(), under.join(", "))
        };
        lines.push(format!(
            "**Noise multiplier {m}** (std {} on every fc0 entry): the analytic attacks on the noised release recover {}. {hit_line} The attack's error (bits/dim against v) exceeds what the M5 bound allows in {above} of {} cells{}.",
            num(Some(m * s.clip)),
            rows.join("; "),
            s.cells.len(),
            if above > 0 { " (the bound is for an attacker with a Gaussian prior who must choose, for the average sample; the oracle matching lets the attack pick the best of its candidates with the truth known, which no estimator in the bound can)" } else { "" }
        ));
    }
    lines
}

/// The aggregation-revisited section.
pub(super) fn render_aggregation(w: &mut String, models: &[AggModel], plan: &AggregationPlan, cmd: &str) {
    if models.is_empty() {
        return;
    }
    out!(w, "\n## Aggregation revisited: what the attacks recover against the batch size\n");
    out!(
        w,
        "Honest models, each trained {HONEST_STEPS} Adam steps of 64 (lr 1e-3) from its seeded initialisation: the digits MLP of the section above (PyTorch's initialisation); the same MLP with tch's default initialisation (weights uniform in +-sqrt(6/fan_in) instead of +-1/sqrt(fan_in): gradguard's own `nn::linear`); the digits CNN (gradguard::models::DigitsCnn: conv1, conv2, fc1, fc2, tch's initialisation, as `gradguard demo` trains it); and an MLP on a data set that is not digits: synthetic tabular data (2000 samples of 32 correlated features in (-1, 1), x = tanh(mu_y + L z + 0.3 e), 4 classes; MLP 32-128-4, PyTorch's initialisation; the last 400 samples held out). At each batch size n in {:?}, the attack suite (analytic attacks, no optimisation) on consecutive releases of n from the start of the training split ({} samples / n releases, at least {} and at most {}), its strongest attack on the first layer (the layer on the model input); and M6 (tau {}) of every layer on the same releases.\n",
        plan.batch_sizes, plan.samples, plan.min_releases, plan.max_releases, plan.tau
    );
    out!(w, "Figure (`{cmd}` writes it): ![aggregation revisited](validation/{AGGREGATION_FIGURE})\n");
    out!(w, "| model | n | releases | recovered_fraction (strongest attack, layer) | M6 exposed_fraction per layer | M6 isolated_share per layer |");
    out!(w, "|---|---|---|---|---|---|");
    for m in models {
        for p in &m.points {
            out!(
                w,
                "| {} | {} | {} | {} | {} | {} |",
                m.model,
                p.n,
                p.releases,
                match &p.recovered {
                    Ok((attack, f)) => format!("{} ({attack}, {})", num(Some(*f)), p.m6.first().map_or("", |x| x.0.as_str())),
                    Err(_) => format!("absent on {}{}", p.m6.first().map_or("", |x| x.0.as_str()), p.others.iter().map(|(l, f)| format!("; {l} (by shape): {}", num(Some(*f)))).collect::<String>()),
                },
                p.m6.iter().map(|(l, e, _)| format!("{l} {}", num(*e))).collect::<Vec<_>>().join(", "),
                p.m6.iter().map(|(l, _, i)| format!("{l} {}", num(*i))).collect::<Vec<_>>().join(", ")
            );
        }
    }
    out!(w);
    for m in models {
        let (Some(first), Some(last)) = (m.points.first(), m.points.last()) else { continue };
        let first_layer = first.m6.first().map(|x| x.0.clone()).unwrap_or_default();
        let exposed = |p: &super::aggregation::AggPoint| p.m6.first().and_then(|x| x.1);
        let curve: Vec<String> = m.points.iter().map(|p| format!("{} at n = {}", num(exposed(p)), p.n)).collect();
        match (&first.recovered, &last.recovered) {
            (Ok(a), Ok(b)) => {
                let curve_r: Vec<String> = m.points.iter().filter_map(|p| p.recovered.as_ref().ok().map(|r| format!("{} at n = {}", num(Some(r.1)), p.n))).collect();
                let half = m.points.iter().find(|p| p.recovered.as_ref().is_ok_and(|r| r.1 < 0.5)).map(|p| p.n);
                out!(
                    w,
                    "- {}: the strongest analytic attack on {first_layer} recovers a fraction {} of the batch at n = {} and {} at n = {} ({}){}; M6 exposed_fraction of {first_layer}: {}.",
                    m.model,
                    num(Some(a.1)),
                    first.n,
                    num(Some(b.1)),
                    last.n,
                    curve_r.join(", "),
                    half.map_or(String::new(), |n| format!("; below half the batch from n = {n}")),
                    curve.join(", ")
                );
            }
            (Err(reason), _) | (_, Err(reason)) => {
                let others: Vec<String> = m.points.iter().flat_map(|p| p.others.iter().map(move |(l, f)| (l.clone(), *f))).fold(Vec::<(String, f64)>::new(), |mut acc, (l, f)| {
                    match acc.iter_mut().find(|x| x.0 == l) {
                        Some(x) => x.1 = x.1.max(f),
                        None => acc.push((l, f)),
                    }
                    acc
                }).into_iter().map(|(l, f)| format!("{l}, whose input width happens to equal the model input's, is attacked by shape and recovers at most {}", num(Some(f)))).collect();
                out!(
                    w,
                    "- {}: **the analytic suite does not apply to the first layer** ({reason}){}. The optimisation attack (not run here) is what applies to such a model. What M6 sees instead, exposed_fraction of {first_layer}: {}; of the most exposed layer: {}.",
                    m.model,
                    if others.is_empty() { String::new() } else { format!("; {}", others.join("; ")) },
                    curve.join(", "),
                    m.points.iter().map(|p| {
                        let best = p.m6.iter().filter_map(|x| Some((x.0.clone(), x.1?))).max_by(|a, b| a.1.total_cmp(&b.1));
                        best.map_or("–".into(), |(l, v)| format!("{} ({l}) at n = {}", num(Some(v)), p.n))
                    }).collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
}

/// The M6-rule section.
pub(super) fn render_fpr(w: &mut String, runs: &[FprRun], plan: &AggregationPlan, cmd: &str) {
    if runs.is_empty() {
        return;
    }
    let [th, low] = M6_RULES;
    let rate = |r: &FprRun, t: f64| pct(r.blocked(t, None) as f64 / r.measured().max(1) as f64);
    out!(w, "\n## The M6 rule on honest training: false positives\n");
    out!(
        w,
        "The rule: block a release when some layer's M6 exposed_fraction (tau {}) is above {th}; beside it the stricter {low} of the federated refusal test's policy. Each honest model (the digits MLP and the tabular MLP with PyTorch's initialisation, the digits CNN with tch's, as `gradguard demo` builds it) is trained from its seeded initialisation for a demo-length run ({} Adam steps, lr 1e-3, the training split read in turn as `gradguard demo` reads it) at batch sizes {} (the demo's is 64), and M6 of every layer is measured on the release of every {}th step (step 0 included), at the parameters that step releases. The share of measured releases a rule would block is its false-positive rate on honest training.\n",
        plan.tau,
        plan.fpr_steps,
        and_list(&plan.fpr_batches.iter().map(|b| b.to_string()).collect::<Vec<_>>()),
        plan.fpr_every
    );
    out!(w, "Figure (`{cmd}` writes it; each point is the largest exposed_fraction measured in {FPR_WINDOW} steps): ![M6 on honest runs](validation/{FPR_FIGURE})\n");
    out!(w, "| model | batch | releases measured | blocked at > {th} | blocked at > {low} | per layer: largest exposed_fraction / mean / releases above {th} / above {low} | accuracy at the end (held out) |");
    out!(w, "|---|---|---|---|---|---|---|");
    for r in runs {
        let layers: Vec<String> = (0..r.layers.len())
            .map(|l| {
                let (max, mean) = r.layer_stats(l);
                format!("{} {} / {} / {} / {}", r.layers[l], num(max), num(mean), r.blocked(th, Some(l)), r.blocked(low, Some(l)))
            })
            .collect();
        out!(
            w,
            "| {} | {} | {} | {} ({}) | {} ({}) | {} | {} |",
            r.model,
            r.batch,
            r.measured(),
            r.blocked(th, None),
            rate(r, th),
            r.blocked(low, None),
            rate(r, low),
            layers.join("; "),
            pct(r.accuracy)
        );
    }
    out!(w);
    for t in M6_RULES {
        let rates: Vec<String> = runs.iter().map(|r| format!("{} at batch {} {}", r.model, r.batch, rate(r, t))).collect();
        let one: Vec<String> = plan.fpr_batches.iter().filter(|&&b| 1.0 / b as f64 > t).map(|b| format!("at batch {b} one exposed sample is already {:.3}", 1.0 / *b as f64)).collect();
        out!(
            w,
            "False-positive rate of the rule at > {t} (share of the measured releases of an honest run it would block): {}.{}\n",
            rates.join(", "),
            if one.is_empty() { String::new() } else { format!(" ({}, above the threshold: the rule then blocks every release in which a single sample dominates a single unit.)", one.join("; ")) }
        );
    }
    let fishing_rule: Vec<String> = runs
        .iter()
        .map(|r| format!("{} at batch {} {} (largest isolated_share {})", r.model, r.batch, pct(r.blocked_isolated(ISOLATED_RULE) as f64 / r.measured().max(1) as f64), num(r.max_isolated())))
        .collect();
    out!(
        w,
        "The fishing rule, isolated_share > {ISOLATED_RULE} on some layer (`federated/tests/test_refusal.py`'s `concentration`; it refuses fishing-one above at every batch size), on the same releases: {}.\n",
        fishing_rule.join(", ")
    );
    for r in runs {
        let blocked: Vec<usize> = r.series.iter().filter(|(_, e)| e.iter().any(|v| v.is_some_and(|v| v > th))).map(|(s, _)| *s).collect();
        if let (Some(a), Some(b)) = (blocked.first(), blocked.last()) {
            out!(w, "- {} at batch {}: releases blocked at > {th} from step {a} to step {b}.", r.model, r.batch);
        }
    }
}

/// The aggregation figure: recovered fraction, and M6 of the first layer and of the most
/// exposed layer, against n (log).
pub(super) fn aggregation_figure(path: &Path, models: &[AggModel], tau: f64) -> Result<()> {
    let recovered: Vec<(String, Vec<(f64, f64)>)> = models
        .iter()
        .filter(|m| m.points.iter().any(|p| p.recovered.is_ok()))
        .map(|m| (m.model.clone(), m.points.iter().filter_map(|p| p.recovered.as_ref().ok().map(|r| (p.n as f64, r.1))).collect()))
        .collect();
    let first = |m: &AggModel| -> (String, Vec<(f64, f64)>) {
        let layer = m.points.first().and_then(|p| p.m6.first()).map(|x| x.0.clone()).unwrap_or_default();
        (format!("{} {layer}", m.model), m.points.iter().filter_map(|p| Some((p.n as f64, p.m6.first()?.1?))).collect())
    };
    let most = |m: &AggModel| -> (String, Vec<(f64, f64)>) {
        (m.model.clone(), m.points.iter().filter_map(|p| p.m6.iter().filter_map(|x| x.1).fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v)))).map(|v| (p.n as f64, v))).collect())
    };
    let share = |m: &AggModel| -> (String, Vec<(f64, f64)>) {
        let layer = m.points.first().and_then(|p| p.m6.first()).map(|x| x.0.clone()).unwrap_or_default();
        (format!("{} {layer}", m.model), m.points.iter().filter_map(|p| Some((p.n as f64, p.m6.first()?.2?))).collect())
    };
    let panels = vec![
        Panel { title: "M4: recovered_fraction (strongest analytic attack)".into(), log_y: false, series: recovered },
        Panel { title: format!("M6 exposed_fraction, first layer (tau {tau})"), log_y: false, series: models.iter().map(first).collect() },
        Panel { title: "M6 exposed_fraction, most exposed layer".into(), log_y: false, series: models.iter().map(most).collect() },
        Panel { title: "M6 isolated_share, first layer".into(), log_y: false, series: models.iter().map(share).collect() },
    ];
    line_panels_svg(path, "Honest models: what the attacks recover and what M6 sees against the batch size", "batch size n (log)", &panels, true)
}

/// The M6-rule figure: exposed_fraction of every layer against the training step, one panel
/// per model, with the rule's threshold.
pub(super) fn fpr_figure(path: &Path, runs: &[FprRun]) -> Result<()> {
    let panels: Vec<Panel> = runs
        .iter()
        .map(|r| {
            // The largest value in each window of FPR_WINDOW steps (what the rule acts on), at the window's start.
            let windowed = |l: usize| -> Vec<(f64, f64)> {
                let mut points: Vec<(f64, f64)> = Vec::new();
                for (s, e) in &r.series {
                    let Some(v) = e.get(l).copied().flatten() else { continue };
                    let start = (s / FPR_WINDOW * FPR_WINDOW) as f64;
                    match points.last_mut() {
                        Some(p) if p.0 == start => p.1 = p.1.max(v),
                        _ => points.push((start, v)),
                    }
                }
                points
            };
            let mut series: Vec<(String, Vec<(f64, f64)>)> = (0..r.layers.len()).map(|l| (r.layers[l].clone(), windowed(l))).collect();
            for t in M6_RULES {
                series.push((format!("rule: > {t}"), vec![(0.0, t), (r.steps as f64, t)]));
            }
            Panel { title: format!("{}, batch {}: largest exposed_fraction per {FPR_WINDOW} steps", r.model, r.batch), log_y: false, series }
        })
        .collect();
    line_panels_svg(path, "Honest demo-length runs: M6 exposed_fraction of every measured release", "training step", &panels, false)
}

/// Lines for "What held": which number flagged which malicious model, where aggregation brings
/// the analytic attack under half the batch, and the M6 rule's false-positive rates.
pub(super) fn summary(malicious: Option<&MaliciousStudy>, models: &[AggModel], runs: &[FprRun], plan: &AggregationPlan) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(s) = malicious {
        let m0 = s.plan.multipliers.first().copied().unwrap_or(0.0);
        let sizes: Vec<String> = s.plan.batch_sizes.iter().map(|n| n.to_string()).collect();
        let per_model: Vec<String> = MODELS[1..]
            .iter()
            .map(|model| {
                let recovered: Vec<String> = s.plan.batch_sizes.iter().filter_map(|&n| cell(s, model, n)?.strongest.map(|x| pct(x.1))).collect();
                let by: Vec<String> = checks()
                    .iter()
                    .skip(1)
                    .filter_map(|(name, _, check)| {
                        let (at, _) = flagged(s, model, *check, m0);
                        (!at.is_empty()).then(|| format!("{name} (n = {})", and_list(&at.iter().map(|n| n.to_string()).collect::<Vec<_>>())))
                    })
                    .collect();
                format!("{model}: the suite recovers {} of the batch; flagged by {}", recovered.join(" / "), if by.is_empty() { "no other number".to_string() } else { and_list(&by) })
            })
            .collect();
        lines.push(format!("Malicious server (digits MLP; M4, M1 and M5 of fc0, M6 of fc0 and fc1; n = {}): {}.", sizes.join(" / "), per_model.join("; ")));
    }
    if !models.is_empty() {
        let parts: Vec<String> = models
            .iter()
            .map(|m| {
                if m.points.iter().all(|p| p.recovered.is_err()) {
                    return format!("{}: the analytic suite does not apply (convolutional first layer)", m.model);
                }
                let half = m.points.iter().find(|p| p.recovered.as_ref().is_ok_and(|r| r.1 < 0.5)).map(|p| p.n);
                let last = m.points.last().and_then(|p| p.recovered.as_ref().ok().map(|r| (p.n, r.1)));
                format!(
                    "{}: {}{}",
                    m.model,
                    half.map_or("never under half the batch".to_string(), |n| format!("under half the batch from n = {n}")),
                    last.map_or(String::new(), |(n, f)| format!(", {} at n = {n}", num(Some(f))))
                )
            })
            .collect();
        lines.push(format!("Aggregation revisited (the analytic attack's recovered_fraction on honest models): {}.", parts.join("; ")));
    }
    if !runs.is_empty() {
        for t in M6_RULES {
            let rates: Vec<String> = runs.iter().map(|r| format!("{} at batch {}: {}", r.model, r.batch, pct(r.blocked(t, None) as f64 / r.measured().max(1) as f64))).collect();
            lines.push(format!("The M6 rule exposed_fraction > {t} on some layer, on demo-length ({} steps) honest runs, blocks: {}.", plan.fpr_steps, rates.join(", ")));
        }
    }
    lines
}
