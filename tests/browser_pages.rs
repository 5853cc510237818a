//! The live page (`/` of a running demo's exporter) and the run report (`report.html`, which
//! the demo writes and prints) in a real headless Chromium (Debian's `chromium`, installed by
//! scripts/install-test-deps.sh): each renders every layer's name and plotted series of
//! several points and its overview (the live page's canvas painted, the report's heatmap with
//! a row per layer), and logs nothing to the console (no error, no failed load).
#[path = "support/demo.rs"]
mod demo;

use demo::Demo;
use std::process::Command;
use std::time::Duration;

const LAYERS: [&str; 4] = ["conv1", "conv2", "fc1", "fc2"];

/// Chromium's DOM of `url` after the page's scripts ran, and the console lines it logged.
/// The virtual-time budget lets the live page poll `/report` many times (each poll waits for
/// its real fetch), so its charts get points from several steps.
fn dump_dom(url: &str) -> (String, Vec<String>) {
    let profile = std::env::temp_dir().join(format!("gradguard-chromium-{}", std::process::id()));
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=300000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium (scripts/install-test-deps.sh installs Debian's chromium)");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(out.status.success(), "chromium failed on {url}: {}", String::from_utf8_lossy(&out.stderr));
    let console = String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains(":CONSOLE")).map(String::from).collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

/// Every layer has a section, and some polyline of `series` has at least `min_points`.
fn check_page(what: &str, dom: &str, console: &[String], series: &str, min_points: usize) {
    assert!(console.is_empty(), "{what}: console output {console:#?}");
    for layer in LAYERS {
        assert!(dom.contains(&format!("data-layer=\"{layer}\"")), "{what}: no section for {layer}");
        assert!(dom.contains(&format!("<h2>{layer}</h2>")), "{what}: {layer}'s name is not shown");
    }
    let most = dom
        .split("<polyline")
        .skip(1)
        .filter(|p| p.contains("class=\"series\"") && p.contains(&format!("data-series=\"{series}\"")))
        .filter_map(|p| p.split("points=\"").nth(1).and_then(|s| s.split('"').next()))
        .map(|pts| pts.split_whitespace().filter(|xy| xy.split(',').all(|c| c.parse::<f64>().is_ok_and(f64::is_finite))).count())
        .max()
        .unwrap_or(0);
    assert!(most >= min_points, "{what}: the {series} series has {most} finite points, wanted {min_points}");
}

#[test]
fn the_live_page_and_the_run_report_render_in_headless_chromium() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("browser-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    {
        let mut live = Demo::start(&dir.join("live"), 100_000, &["--checkpoint-every", "20"]);
        let addr = live.live_addr();
        // Past a few estimates (every 10 steps in the example policy).
        live.wait_steps(addr, 40, Duration::from_secs(180));
        let (dom, console) = dump_dom(&format!("http://{addr}/"));
        // The gradient norm is new at every step; the estimates only every 10 steps.
        check_page("live page", &dom, &console, "gradient_norm", 3);
        check_page("live page", &dom, &console, "sensitivity", 1);
        assert!(dom.contains("steps inspected"), "the status line shows the run");
        // The overview canvas: a row per layer, several polled steps, and cells coloured by a
        // ratio (conv1 and the fc layers have rules; the page counts the pixels it painted).
        let canvas = dom.split("<canvas id=\"overview\"").nth(1).expect("the overview canvas").split('>').next().unwrap().to_string();
        let data = |name: &str| -> u64 {
            let v = canvas.split(&format!(" data-{name}=\"")).nth(1).and_then(|s| s.split('"').next()).unwrap_or_else(|| panic!("no data-{name} in {canvas}"));
            v.parse().unwrap()
        };
        assert_eq!(data("rows"), LAYERS.len() as u64, "{canvas}");
        assert!(data("columns") >= 2, "{canvas}");
        assert!(data("painted") > 0, "nothing coloured on the overview: {canvas}");
    }
    // A finished run: the demo writes the report and prints where. Estimates every 5 steps
    // with the whole budget, so that each checkpoint has a new one to draw.
    let policy = dir.join("policy.toml");
    let text = include_str!("../examples/policy.toml").replace("estimate_every = 10", "estimate_every = 5").replace("budget_share = 0.2", "budget_share = 1.0");
    std::fs::write(&policy, text).unwrap();
    let mut done = Demo::start(&dir.join("done"), 120, &["--checkpoint-every", "20", "--policy", policy.to_str().unwrap()]);
    let line = done.wait_line("run report: ", Duration::from_secs(300));
    let path = std::path::PathBuf::from(line.trim().trim_start_matches("run report: "));
    assert!(path.is_file(), "{line}");
    let html = std::fs::read_to_string(&path).unwrap();
    // Self-contained: no script, and the only URL is the SVG namespace.
    assert!(!html.contains("<script"), "the report needs no script");
    assert_eq!(html.matches("://").count(), html.matches("http://www.w3.org/2000/svg").count(), "no external URL");
    let (dom, console) = dump_dom(&format!("file://{}", path.display()));
    check_page("run report", &dom, &console, "sensitivity", 4);
    // The overview opens the report: the heatmap's SVG with a label per layer.
    let overview = dom.split("<section class=\"overview\" data-rows=\"4\"").nth(1).expect("the overview, a row per layer").split("</section>").next().unwrap();
    assert!(overview.contains("<svg class=\"overview-map\""), "the heatmap is drawn");
    for layer in LAYERS {
        // (A layer no rule covers is labelled "LAYER (no rule)".)
        let labelled = [format!("{layer}\n</text>"), format!("{layer} (no rule)\n</text>")].iter().any(|l| overview.contains(&format!(">\n{l}")));
        assert!(labelled, "no row label for {layer}");
    }
    assert!(dom.contains("records verified"), "the report shows the chain's check");
}
