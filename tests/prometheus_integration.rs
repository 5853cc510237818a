//! The exporter against the real Prometheus and promtool (install them with
//! `scripts/install-test-deps.sh`; these tests FAIL, not skip, when they are missing).
//!
//! - `dashboard_json_is_well_formed`: unique panel ids, sane gridPos, every target on the
//!   `${datasource}` variable.
//! - `alert_rules_pass_promtool`: `promtool check rules alerts.yml`, `promtool test rules
//!   alerts_test.yml`, `promtool check config prometheus.yml`.
//! - `dashboards_and_alerts_return_series_from_a_live_prometheus`: runs
//!   `examples/exporter_demo` (built with `cargo build --release --example exporter_demo`)
//!   on a free loopback port, `promtool check metrics` on its `/metrics`, then a real
//!   `prometheus` scraping it every second with `alerts.yml` loaded. Once data is in, every
//!   PromQL expression of the dashboard (template variables substituted: `$job`/`$instance`
//!   -> `.+`, `$layer`/`$metric` -> `.*`, `$__rate_interval` -> `1m`, `$__range` -> `5m`,
//!   `label_values(sel, l)` -> `count by (l) (sel)`) must return at least one series through
//!   `/api/v1/query`. Alert expressions are evaluated with every comparison turned into a
//!   `bool` comparison (`a > b` -> `a > bool b`): it returns every matched series with 0/1
//!   instead of filtering, so "at least one series" checks that the selectors and the
//!   vector matching find real series without needing the alert to fire. Every loaded rule
//!   must also be healthy (evaluated without error), and a healthy run fires no alert.
//!
//! Every process started here is killed by pid when its guard drops (also on panic).
use gradguard::exporter::client::{get, percent_encode, HttpResponse};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const HTTP: Duration = Duration::from_secs(10);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard_path() -> PathBuf {
    repo().join("exporter/grafana/dashboards/gradguard.json")
}

/// A started process, killed (by pid) and reaped when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("stopped {} (pid {})", self.name, self.child.id());
    }
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("gradguard-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tool's path on PATH, or a failing test that says how to install it.
fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "`{name}` is not on PATH: these tests need a real Prometheus and promtool. \
             Run scripts/install-test-deps.sh (apt-get installs Debian's `prometheus` package, which ships both)."
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(require_tool("promtool"));
    cmd.args(args).current_dir(repo()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().expect("running promtool");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

// ---------------------------------------------------------------------------------------
// Dashboard structure

fn all_panels(panels: &[Value], out: &mut Vec<Value>) {
    for p in panels {
        out.push(p.clone());
        if let Some(inner) = p["panels"].as_array() {
            all_panels(inner, out);
        }
    }
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(dashboard_path()).expect("reading the dashboard JSON");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

fn uses_datasource_variable(ds: &Value) -> bool {
    match ds {
        Value::String(s) => s == "${datasource}" || s == "$datasource",
        Value::Object(o) => o.get("uid").and_then(Value::as_str).is_some_and(|u| u == "${datasource}" || u == "$datasource"),
        _ => false,
    }
}

#[test]
fn dashboard_json_is_well_formed() {
    let d = dashboard();
    let vars: Vec<&str> = d["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    for v in ["datasource", "job", "instance", "layer"] {
        assert!(vars.contains(&v), "template variable {v} missing (have {vars:?})");
    }
    let ds_var = d["templating"]["list"].as_array().unwrap().iter().find(|v| v["name"] == "datasource").unwrap();
    assert_eq!((ds_var["type"].as_str(), ds_var["query"].as_str()), (Some("datasource"), Some("prometheus")));

    let mut panels = Vec::new();
    all_panels(d["panels"].as_array().expect("panels"), &mut panels);
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    let mut ids = std::collections::HashSet::new();
    let mut targets = 0;
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("panel {title:?} has no numeric id"));
        assert!(ids.insert(id), "duplicate panel id {id} ({title:?})");
        let g = &p["gridPos"];
        let (x, y, w, h) = (g["x"].as_i64(), g["y"].as_i64(), g["w"].as_i64(), g["h"].as_i64());
        let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else { panic!("panel {title:?}: gridPos incomplete: {g}") };
        assert!(x >= 0 && y >= 0 && (1..=24).contains(&w) && h >= 1 && x + w <= 24, "panel {title:?}: bad gridPos {g}");
        if p["type"] == "row" {
            continue;
        }
        assert!(uses_datasource_variable(&p["datasource"]), "panel {title:?} does not use the datasource variable: {}", p["datasource"]);
        let ts = p["targets"].as_array().unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        assert!(!ts.is_empty(), "panel {title:?} has no targets");
        for t in ts {
            targets += 1;
            assert!(uses_datasource_variable(&t["datasource"]), "a target of {title:?} does not use the datasource variable: {t}");
            assert!(t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "a target of {title:?} has no expr");
        }
    }
    // No two panels overlap.
    let boxes: Vec<(i64, i64, i64, i64, &str)> = panels
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            (g["x"].as_i64().unwrap(), g["y"].as_i64().unwrap(), g["w"].as_i64().unwrap(), g["h"].as_i64().unwrap(), p["title"].as_str().unwrap_or("?"))
        })
        .collect();
    for (i, a) in boxes.iter().enumerate() {
        for b in &boxes[i + 1..] {
            let overlap = a.0 < b.0 + b.2 && b.0 < a.0 + a.2 && a.1 < b.1 + b.3 && b.1 < a.1 + a.3;
            assert!(!overlap, "panels {:?} and {:?} overlap", a.4, b.4);
        }
    }
    assert!(targets >= 15, "only {targets} targets");

    // The provisioning files load this folder's dashboards and the datasource the variable defaults to.
    let prov = |p: &str| std::fs::read_to_string(repo().join("exporter/grafana/provisioning").join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let ds = prov("datasources/prometheus.yaml");
    let default_uid = ds_var["current"]["value"].as_str().unwrap();
    assert!(ds.contains("type: prometheus") && ds.contains(&format!("uid: {default_uid}")), "datasource provisioning lacks uid {default_uid}");
    let dash = prov("dashboards/gradguard.yaml");
    assert!(dash.contains("type: file") && dash.contains("path:"), "dashboard provisioning is not a file provider");
}

// ---------------------------------------------------------------------------------------
// Alert rules with promtool

#[test]
fn alert_rules_pass_promtool() {
    let (ok, out) = promtool(&["check", "rules", "exporter/prometheus/alerts.yml"], None);
    assert!(ok, "promtool check rules failed:\n{out}");
    let (ok, out) = promtool(&["test", "rules", "exporter/prometheus/alerts_test.yml"], None);
    assert!(ok, "promtool test rules failed:\n{out}");
    let (ok, out) = promtool(&["check", "config", "exporter/prometheus/prometheus.yml"], None);
    assert!(ok, "promtool check config failed:\n{out}");
}

// ---------------------------------------------------------------------------------------
// PromQL helpers

/// `a > b` -> `a > bool b` for every comparison outside label matchers, strings and ranges.
fn comparisons_to_bool(expr: &str) -> String {
    let b = expr.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(expr.len() + 16);
    let (mut depth, mut quote): (i32, Option<u8>) = (0, None);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            out.push(c);
            if c == b'\\' && i + 1 < b.len() {
                out.push(b[i + 1]);
                i += 2;
                continue;
            }
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' | b'\'' | b'`' => quote = Some(c),
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            _ => {}
        }
        let two = if i + 1 < b.len() { &expr[i..i + 2] } else { "" };
        let op = if depth == 0 && matches!(two, ">=" | "<=" | "==" | "!=") {
            Some(two)
        } else if depth == 0 && (c == b'>' || c == b'<') {
            Some(&expr[i..i + 1])
        } else {
            None
        };
        match op {
            Some(op) => {
                out.extend_from_slice(op.as_bytes());
                i += op.len();
                if !expr[i..].trim_start().starts_with("bool") {
                    out.extend_from_slice(b" bool");
                }
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("only ASCII operators were inserted")
}

#[test]
fn comparisons_become_bool_comparisons() {
    assert_eq!(comparisons_to_bool(r#"up{job="gradguard"} == 0"#), r#"up{job="gradguard"} == bool 0"#);
    assert_eq!(comparisons_to_bool(r#"a{x!="1"} > on(l) b"#), r#"a{x!="1"} > bool on(l) b"#);
    assert_eq!(comparisons_to_bool(r#"increase(c{o="b>"}[5m]) >= 1"#), r#"increase(c{o="b>"}[5m]) >= bool 1"#);
    assert_eq!(comparisons_to_bool("a > bool b"), "a > bool b");
}

fn substitute_variables(expr: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in [
        ("${__rate_interval}", "1m"),
        ("$__rate_interval", "1m"),
        ("${__interval}", "5s"),
        ("$__interval", "5s"),
        ("${__range}", "5m"),
        ("$__range", "5m"),
        ("${job}", ".+"),
        ("$job", ".+"),
        ("${instance}", ".+"),
        ("$instance", ".+"),
        ("${layer}", ".*"),
        ("$layer", ".*"),
        ("${metric}", ".*"),
        ("$metric", ".*"),
    ] {
        e = e.replace(var, value);
    }
    e
}

/// Grafana's `label_values(selector, label)` as PromQL: `count by (label) (selector)`.
fn label_values_to_promql(q: &str) -> Option<String> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some(format!("count by ({}) ({})", label.trim(), selector.trim()))
}

struct Prometheus {
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn api(&self, path_and_query: &str) -> Value {
        let r: HttpResponse = get(self.addr, path_and_query, HTTP).unwrap_or_else(|e| panic!("GET {path_and_query}: {e}\n{}", self.log_tail()));
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("GET {path_and_query}: status {} non-JSON body ({e}): {}", r.status, r.body))
    }

    /// (result count, error) of an instant query.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let v = self.api(&format!("/api/v1/query?query={}", percent_encode(promql)));
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        match v["data"]["resultType"].as_str() {
            Some("vector") | Some("matrix") => Ok(v["data"]["result"].as_array().cloned().unwrap_or_default()),
            Some(other) => Err(format!("result type {other}, not a vector")),
            None => Err(format!("no result type in {v}")),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("--- prometheus log (tail) ---\n{}", lines[lines.len().saturating_sub(30)..].join("\n"))
    }
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool, context: impl Fn() -> String) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}\n{}", context());
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Builds the example (a no-op when up to date) and returns its path.
fn example_binary() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--example", "exporter_demo"])
        .current_dir(repo())
        .status()
        .expect("running cargo build --release --example exporter_demo");
    assert!(status.success(), "cargo build --release --example exporter_demo failed");
    // This test runs from target/release/deps; examples live in target/release/examples.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("examples").join("exporter_demo");
    assert!(bin.is_file(), "{} missing after building it", bin.display());
    bin
}

/// Starts the demo on a free loopback port; returns the process and its metrics address.
fn start_demo(bin: &Path) -> (Proc, SocketAddr) {
    let mut child = Command::new(bin)
        .args(["--addr", "127.0.0.1:0", "--steps", "0", "--threads", "1", "--step-interval-ms", "20", "--estimate-every", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting exporter_demo");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc { name: "exporter_demo", child };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining stdout so the demo never blocks on a full pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("gradguard exporter listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("exporter_demo did not report its address within 60 s");
    (proc, addr.parse().expect("address line"))
}

fn start_prometheus(dir: &Path, target: SocketAddr) -> (Proc, Prometheus) {
    let prometheus_bin = require_tool("prometheus");
    let alerts = repo().join("exporter/prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {alerts:?}\nscrape_configs:\n  - job_name: gradguard\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    static_configs:\n      - targets: [\"{target}\"]\n",
        alerts = alerts.display().to_string()
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let port = free_port();
    let log = dir.join("prometheus.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new(prometheus_bin)
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("starting prometheus");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    (Proc { name: "prometheus", child }, Prometheus { addr, log })
}

#[test]
fn dashboards_and_alerts_return_series_from_a_live_prometheus() {
    require_tool("prometheus");
    require_tool("promtool");
    let dir = TempDir::new("prom");
    let (_demo, target) = start_demo(&example_binary());
    wait_for("the exporter's /healthz", Duration::from_secs(30), || get(target, "/healthz", HTTP).is_ok_and(|r| r.status == 200), String::new);

    // The served exposition passes promtool's parser and linter.
    let metrics = get(target, "/metrics", HTTP).expect("GET /metrics");
    assert_eq!(metrics.status, 200);
    let (ok, out) = promtool(&["check", "metrics"], Some(&metrics.body));
    assert!(ok && out.trim().is_empty(), "promtool check metrics on the served /metrics failed:\n{out}");

    let (_prom_proc, prom) = start_prometheus(&dir.0, target);
    wait_for(
        "prometheus to be ready",
        Duration::from_secs(60),
        || get(prom.addr, "/-/ready", HTTP).is_ok_and(|r| r.status == 200),
        || prom.log_tail(),
    );
    wait_for(
        "the gradguard target to be up",
        Duration::from_secs(60),
        || {
            let t = prom.api("/api/v1/targets?state=active");
            t["data"]["activeTargets"].as_array().is_some_and(|a| a.iter().any(|t| t["labels"]["job"] == "gradguard" && t["health"] == "up"))
        },
        || format!("{}\n{}", prom.api("/api/v1/targets"), prom.log_tail()),
    );
    // Enough samples for 1m rates, and some estimates in the histogram.
    wait_for(
        "ingested samples and estimates",
        Duration::from_secs(60),
        || {
            prom.query("count_over_time(gradguard_training_steps_total[1m]) >= 6").is_ok_and(|r| !r.is_empty())
                && prom.query("increase(gradguard_estimate_duration_seconds_count[1m]) > 0").is_ok_and(|r| !r.is_empty())
        },
        || prom.log_tail(),
    );

    let mut failures = Vec::new();
    let mut checked = 0;
    let d = dashboard();
    let mut panels = Vec::new();
    all_panels(d["panels"].as_array().unwrap(), &mut panels);
    let mut exprs: Vec<(String, String)> = Vec::new();
    for p in &panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                exprs.push((format!("panel {:?} target {}", p["title"].as_str().unwrap_or("?"), t["refId"]), e.to_string()));
            }
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        let q = v["query"]["query"].as_str().or(v["definition"].as_str());
        if let (Some("query"), Some(q)) = (v["type"].as_str(), q) {
            let promql = label_values_to_promql(q).unwrap_or_else(|| panic!("variable {}: unsupported query {q:?}", v["name"]));
            exprs.push((format!("variable {}", v["name"]), promql));
        }
    }
    for (what, expr) in &exprs {
        let promql = substitute_variables(expr);
        assert!(!promql.contains('$'), "{what}: unsubstituted variable in {promql:?}");
        checked += 1;
        match prom.query(&promql) {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => failures.push(format!("{what}: no series for {promql}")),
            Err(e) => failures.push(format!("{what}: query error for {promql}: {e}")),
        }
    }

    // Alert rules, as Prometheus loaded them from alerts.yml.
    let alerts_file = std::fs::read_to_string(repo().join("exporter/prometheus/alerts.yml")).unwrap();
    let declared = alerts_file.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    wait_for(
        "every rule to be evaluated",
        Duration::from_secs(30),
        || {
            let r = prom.api("/api/v1/rules?type=alert");
            let rules: Vec<Value> = r["data"]["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect();
            rules.len() == declared && rules.iter().all(|r| r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001")))
        },
        || format!("{}", prom.api("/api/v1/rules")),
    );
    let r = prom.api("/api/v1/rules?type=alert");
    let rules: Vec<Value> = r["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().cloned().unwrap()).collect();
    assert!(declared >= 4 && rules.len() == declared, "loaded {} alert rules, alerts.yml declares {declared}", rules.len());
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        if rule["health"] != "ok" {
            failures.push(format!("alert {name}: health {} ({})", rule["health"], rule["lastError"]));
        }
        let promql = comparisons_to_bool(rule["query"].as_str().unwrap());
        checked += 1;
        match prom.query(&promql) {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => failures.push(format!("alert {name}: no series for {promql}")),
            Err(e) => failures.push(format!("alert {name}: query error for {promql}: {e}")),
        }
    }
    // The demo runs the example policy, whose first-layer threshold the CNN crosses on purpose
    // (the guard then protects it): that alert may be pending. Nothing else may fire on a run
    // that releases finite gradients and keeps its estimates fresh.
    match prom.query("ALERTS{alertname!=\"GradguardLayerLeakageAboveThreshold\"}") {
        Ok(r) if r.is_empty() => {}
        Ok(r) => failures.push(format!("alerts active on a healthy run: {}", Value::Array(r))),
        Err(e) => failures.push(format!("ALERTS: {e}")),
    }

    assert!(failures.is_empty(), "{} of {checked} expressions failed:\n{}\n{}", failures.len(), failures.join("\n"), prom.log_tail());
    eprintln!("checked {checked} dashboard/variable/alert expressions against a live Prometheus");
}
