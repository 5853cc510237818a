//! The run report's overview from a real run: a short `gradguard demo` under the example
//! policy plus a rule that cannot be met (conv2's reconstruction bound with a clip-only ladder:
//! a release without noise has no bound), so conv2 blocks the release at every estimate. The
//! overview heatmap (plotters SVG) has one row per layer, marks the blocks in the marker row
//! and with an X on conv2's row only, at the steps the audit log blocked; every line chart's y
//! axis has distinct labels (a constant or all-zero series included).
#[path = "support/demo.rs"]
mod demo;

use demo::Demo;
use gradguard::guard::decide::Outcome;
use gradguard::guard::AuditLog;
use std::collections::BTreeSet;
use std::time::Duration;

const LAYERS: [&str; 4] = ["conv1", "conv2", "fc1", "fc2"];

/// A plotters SVG element's attribute.
fn attr(element: &str, name: &str) -> Option<String> {
    element.split(&format!(" {name}=\"")).nth(1).and_then(|s| s.split('"').next()).map(String::from)
}

fn num(element: &str, name: &str) -> f64 {
    attr(element, name).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric {name} in {element}"))
}

/// (y, anchor, text) of each `<text>` of an SVG.
fn texts(svg: &str) -> Vec<(f64, String, String)> {
    svg.split("<text ")
        .skip(1)
        .map(|t| {
            let (head, rest) = t.split_once('>').unwrap();
            let body = rest.split("</text>").next().unwrap().trim().to_string();
            (num(&format!(" {head}"), "y"), attr(&format!(" {head}"), "text-anchor").unwrap_or_default(), body)
        })
        .collect()
}

#[test]
fn the_overview_of_a_run_with_blocks_has_a_row_per_layer_and_marks_the_blocks() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("run-report-overview-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    let text = include_str!("../examples/policy.toml").replace("estimate_every = 10", "estimate_every = 5").replace("budget_share = 0.2", "budget_share = 1.0")
        + "\n[[rule]]\nname = \"conv2-bound\"\nmetric = \"reconstruction_bound_bits\"\nlayers = [\"conv2\"]\nact_above = 0.05\nrelax_below = 0.01\nladder = [{ action = \"clip\", max_norm = 1.0 }]\n";
    std::fs::write(&policy, text).unwrap();
    let out = dir.join("run");
    let mut run = Demo::start(&out, 60, &["--checkpoint-every", "20", "--policy", policy.to_str().unwrap()]);
    let line = run.wait_line("run report: ", Duration::from_secs(300));
    let path = std::path::PathBuf::from(line.trim().trim_start_matches("run report: "));
    let _ = run.child.wait();
    let html = std::fs::read_to_string(&path).unwrap();

    // What the log says: the steps with a block, and which layers blocked.
    let records = AuditLog::read_chain(out.join("audit.jsonl")).unwrap();
    let blocked: Vec<_> = records.iter().filter(|r| r.outcome == Outcome::Blocked).collect();
    assert!(!blocked.is_empty(), "the policy blocks: {records:#?}");
    let blocked_steps: BTreeSet<u64> = blocked.iter().map(|r| r.step).collect();
    let blocked_layers: BTreeSet<&str> = blocked.iter().map(|r| r.layer.as_str()).collect();
    assert_eq!(blocked_layers, BTreeSet::from(["conv2"]));

    // The overview comes first, with one row per layer and the blocked steps.
    let section = html.split("<section class=\"overview\"").nth(1).expect("an overview section");
    assert!(html.find("<section class=\"overview\"") < html.find("<section class=\"layer\""), "the overview opens the page");
    assert!(section.starts_with(" data-rows=\"4\""), "{}", &section[..200]);
    let listed: BTreeSet<u64> = attr(section, "data-refused-steps").unwrap().split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(listed, blocked_steps);
    let svg = section.split("<svg class=\"overview-map\"").nth(1).expect("the overview's SVG").split("</svg>").next().unwrap();

    // Row labels: one per layer (distinct heights) and the marker row above them.
    let texts = texts(svg);
    let label_y = |name: &str| -> f64 {
        let found: Vec<f64> = texts.iter().filter(|(_, anchor, body)| anchor == "end" && (body == name || body.starts_with(&format!("{name} ("))) ).map(|t| t.0).collect();
        assert_eq!(found.len(), 1, "one label {name}: {texts:?}");
        found[0]
    };
    let rows: Vec<f64> = LAYERS.iter().map(|l| label_y(l)).collect();
    let marker = label_y("blocked / refused");
    assert!(rows.windows(2).all(|w| w[1] > w[0]), "layers in model order, top to bottom: {rows:?}");
    assert!(marker < rows[0], "the marker row is on top");
    let half_row = (rows[1] - rows[0]) / 2.0;

    // Every layer row has coloured cells across it.
    let rects: Vec<(f64, f64, f64, f64, String)> = svg
        .split("<rect ")
        .skip(1)
        .map(|r| {
            let r = format!(" {}", r.split("/>").next().unwrap());
            (num(&r, "x"), num(&r, "y"), num(&r, "width"), num(&r, "height"), attr(&r, "fill").unwrap())
        })
        .collect();
    for (layer, y) in LAYERS.iter().zip(&rows) {
        let cells: Vec<_> = rects.iter().filter(|r| r.1 <= *y && *y <= r.1 + r.3 && r.3 < 2.0 * half_row && r.4 != "#FFFFFF").collect();
        assert!(!cells.is_empty(), "no cell on {layer}'s row");
    }
    // The marker row: one black cell per blocked step (60 steps: a column each).
    let marks = rects.iter().filter(|r| r.1 <= marker && marker <= r.1 + r.3 && r.4 == "#000000").count();
    assert_eq!(marks, blocked_steps.len(), "{rects:?}");
    // The X marks (two black strokes each) on conv2's row only, one per blocked step.
    let mut crosses = std::collections::BTreeMap::<usize, usize>::new();
    for p in svg.split("<polyline ").skip(1).map(|p| format!(" {}", p.split("/>").next().unwrap())) {
        if attr(&p, "stroke").as_deref() != Some("#000000") || attr(&p, "stroke-width").as_deref() != Some("2") {
            continue;
        }
        let ys: Vec<f64> = attr(&p, "points").unwrap().split_whitespace().map(|xy| xy.split(',').nth(1).unwrap().parse().unwrap()).collect();
        let mid = (ys[0] + ys[ys.len() - 1]) / 2.0;
        if let Some(row) = rows.iter().position(|y| (mid - y).abs() < half_row) {
            *crosses.entry(row).or_default() += 1;
        }
    }
    assert_eq!(crosses, [(1usize, 2 * blocked_steps.len())].into(), "X marks per row (conv2 is row 1)");
    assert!(svg.contains("1 = threshold"), "the colour scale marks the threshold");

    // The line charts: distinct y labels on every axis, never the +-5e-10 of an all-zero series.
    let charts: Vec<&str> = html.split("<svg class=\"chart\"").skip(1).map(|c| c.split("</svg>").next().unwrap()).collect();
    assert!(charts.len() >= 4 * 2, "{} charts", charts.len());
    for chart in &charts {
        let title = attr(chart, "aria-label").unwrap();
        let labels: Vec<String> = chart.split("text-anchor=\"end\">").skip(1).map(|s| s.split('<').next().unwrap().to_string()).collect();
        let unique: BTreeSet<&String> = labels.iter().collect();
        assert!(labels.len() >= 2 && unique.len() == labels.len(), "{title}: y labels {labels:?}");
        assert!(labels.iter().all(|l| !l.contains("e-10")), "{title}: {labels:?}");
    }
    // fc1's level never moves (no rule fires): an all-zero series drawn on [0, 1].
    let fc1_level = charts.iter().find(|c| c.contains("aria-label=\"fc1 protection level\"")).expect("fc1's level chart");
    let labels: Vec<&str> = fc1_level.split("text-anchor=\"end\">").skip(1).map(|s| s.split('<').next().unwrap()).collect();
    assert_eq!((labels.first(), labels.last()), (Some(&"0"), Some(&"1.00")), "{labels:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
