//! `gradguard validate --quick` end to end: the study's smoke run writes VALIDATION.md with the
//! M5 bound-against-attack section (every cell, the figure), M3's error bars, and the
//! malicious-server, aggregation-revisited and M6-rule sections (one run, shared by the tests).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Runs `gradguard validate --quick` once; its folder and VALIDATION.md.
fn quick_study() -> &'static (PathBuf, String) {
    static STUDY: OnceLock<(PathBuf, String)> = OnceLock::new();
    STUDY.get_or_init(|| {
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("validate_cli");
        let _ = std::fs::remove_dir_all(&out_dir);
        let out = Command::new(env!("CARGO_BIN_EXE_gradguard")).args(["validate", "--quick", "--out"]).arg(&out_dir).output().expect("the gradguard binary runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let md = std::fs::read_to_string(out_dir.join("VALIDATION.md")).unwrap();
        (out_dir, md)
    })
}

/// The bound column of the bound-vs-attack table: (model, multiplier, layer) -> bound or None.
fn bound_rows(md: &str) -> Vec<(String, f64, String, Option<f64>)> {
    let section = md.split("## M5: the reconstruction bound against the attack").nth(1).expect("the M5 section");
    section
        .lines()
        .filter(|l| l.starts_with("| cnn |") || l.starts_with("| mlp |"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let bound = cells[6].split(" ± ").next().and_then(|b| b.parse::<f64>().ok());
            (cells[1].to_string(), cells[2].parse::<f64>().unwrap(), cells[3].to_string(), bound)
        })
        .collect()
}

#[test]
fn the_quick_study_tests_the_bound_and_shows_m3_error_bars() {
    let (out_dir, md) = quick_study();
    let rows = bound_rows(md);
    // Quick grid: multipliers 0, 0.01 and 1 on the CNN's 4 layers and the MLP's 3.
    assert_eq!(rows.len(), 3 * 4 + 3 * 3, "{rows:?}");
    let line = |model: &str, m: f64, layer: &str| rows.iter().find(|r| r.0 == model && r.1 == m && r.2 == layer).unwrap_or_else(|| panic!("{model} {m} {layer}")).3;
    for (model, layers) in [("cnn", &["conv1", "conv2", "fc1", "fc2"][..]), ("mlp", &["fc0", "fc1", "fc2"][..])] {
        for &layer in layers {
            assert_eq!(line(model, 0.0, layer), None, "{model} {layer}: no noise, no bound");
            let (weak, strong) = (line(model, 0.01, layer).unwrap(), line(model, 1.0, layer).unwrap());
            // dFIL scales as 1 / multiplier^2 at a fixed clip: 100x more noise, a far smaller bound.
            assert!(weak > 0.5 && strong < 0.05 && strong > 0.0, "{model} {layer}: bound {weak} at 0.01, {strong} at 1");
        }
    }
    assert!(md.contains("+inf (no noise, no bound)"));
    assert!(md.contains("**Cells where the attack beats the bound:**"));
    assert!(md.contains("**How loose the bound is:**"));
    assert!(md.contains("- M5 (noised single-sample releases, 2 models): the M4 attack beat the bound in "), "the summary in What held");
    // M3 with its standard error in the findings, and the claim read against the error bars.
    assert!(md.contains("*The same, with M3's error bars*"));
    let findings = md.split("## The paper's findings, checked here").nth(1).unwrap().split("## Per-layer numbers").next().unwrap();
    let rows: Vec<&str> = findings.lines().filter(|l| l.starts_with("| cnn | step") || l.starts_with("| mlp | step")).collect();
    assert_eq!(rows.len(), 4, "{findings}");
    assert!(rows.iter().all(|l| l.matches(" ± ").count() == 2), "{findings}");
    let svg = std::fs::read_to_string(out_dir.join("validation").join("bound_vs_attack.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("attack = bound") && svg.contains("conv1") && svg.contains("fc0"));
}

/// The malicious-server table's row of `model` at batch `n`, split into cells.
fn malicious_row<'a>(md: &'a str, model: &str, n: usize) -> Vec<&'a str> {
    let section = md.split("## Malicious server: which number catches which attack").nth(1).expect("the malicious-server section");
    let table = section.split("### Which number caught which attack").next().unwrap();
    let line = table.lines().find(|l| l.starts_with(&format!("| {model} | {n} |"))).unwrap_or_else(|| panic!("no row for {model} at n = {n}"));
    line.split('|').map(str::trim).collect()
}

/// "a/b" as (a, b).
fn count(cell: &str) -> (f64, f64) {
    let (a, b) = cell.split_once('/').unwrap_or_else(|| panic!("not a count: {cell}"));
    (a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn the_quick_study_shows_which_number_catches_which_malicious_model() {
    let (out_dir, md) = quick_study();
    // Cells: 1 model, 2 n, 3 releases, 4 analytic, 5 differences, 6 strongest, 7 labels, 8 S_l,
    // 9 S_l^rms, 10 R_l, 11 M6 fc0 exposed (max), 12 fc0 isolated_share, 13 fc1 exposed, 14 fc1
    // isolated_share, 15.. M5 and the noised attack.
    let exposed = |row: &[&str]| -> f64 { row[11].split(' ').next().unwrap().parse().unwrap() };
    let (trap, honest, imprint) = (malicious_row(md, "trap", 32), malicious_row(md, "honest", 32), malicious_row(md, "imprint", 32));
    assert!(exposed(&trap) >= 0.5, "M6 flags the trap at batch 32: {trap:?}");
    assert!(exposed(&honest) <= 0.25, "M6 leaves the honest model at batch 32: {honest:?}");
    let (got, of) = count(trap[4]);
    assert!(got >= 0.7 * of, "the analytic attack gives back most of the trap batch: {trap:?}");
    let (got, of) = count(imprint[5]);
    assert!(got >= 0.5 * of && exposed(&imprint) < 0.25, "imprint: the differences attack recovers what M6 does not see: {imprint:?}");
    for model in ["honest", "trap", "fishing", "imprint", "fishing-one"] {
        malicious_row(md, model, 8);
    }
    // Fishing on batches that hold one fished sample: that sample's gradient is the release,
    // which isolated_share reads (fc0's in cell 12, fc1's in 14) and the honest model's does not.
    let isolated = |row: &[&str]| -> f64 { row[12].parse::<f64>().unwrap().max(row[14].parse().unwrap()) };
    let one = malicious_row(md, "fishing-one", 32);
    assert!(isolated(&one) >= 0.9 && isolated(&honest) < 0.5, "fishing-one {one:?}, honest {honest:?}");
    assert!(md.contains("**What M6 misses**: imprint"), "the sentence on what M6 misses");
    assert!(md.contains("## Aggregation revisited: what the attacks recover against the batch size"));
    assert!(md.contains("digits CNN: **the analytic suite does not apply to the first layer**"));
    assert!(md.contains("## The M6 rule on honest training: false positives"));
    assert!(md.contains("False-positive rate of the rule"));
    for figure in ["aggregation_recovered.svg", "m6_rule_honest_runs.svg"] {
        let svg = std::fs::read_to_string(out_dir.join("validation").join(figure)).unwrap();
        assert!(svg.contains("<svg") && svg.contains("tabular MLP"), "{figure}");
        assert!(md.contains(&format!("(validation/{figure})")), "{figure} is shown");
    }
}
