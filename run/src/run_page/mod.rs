//! The run page: a run's `report.json` and audit log as one self-contained HTML file (inline
//! SVG and CSS, no script, no external asset), what `gradguard report DIR` writes and the demo
//! and `gradguard train` write at their end. First an overview: a layers x steps heatmap of
//! each layer's largest metric / threshold ratio, blocks and refusals marked ([`overview`]).
//! Then per layer: each metric over the steps with its threshold, the protection level over
//! time, the decisions marked; then the decisions as a table, the chain's check, and the rest
//! of the last report (any extra per-layer or run-wide values it carries are listed as they
//! are).
mod axis;
mod overview;
mod series;
mod svg;

use crate::error::Result;
use gradguard_models::ModelError;
use gradguard_guard::{AuditLog, decide::{verify_chain, Outcome}};
use serde_json::Value;
use series::{colour, history, LayerHistory, RunHistory};
use std::fmt::Write;
use std::path::Path;
use svg::{chart, esc, Line, Mark, PALETTE};

/// Renders the run in `dir`: its `audit.jsonl` chain and, when there is one, its
/// `report.json` (a demo's report or a training report).
pub fn render_dir(dir: &Path) -> Result<String> {
    // A run killed before its end has no report.json: its log alone still draws.
    let report_path = dir.join("report.json");
    let report: Value = match std::fs::read_to_string(&report_path) {
        Ok(text) => serde_json::from_str(&text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
        Err(e) => return Err(ModelError::Io { action: "reading the run's report", path: report_path, source: e }.into()),
    };
    let log = dir.join("audit.jsonl");
    let records = AuditLog::read_chain(&log).map_err(gradguard_guard::GuardError::from)?;
    let chain = verify_chain(&log).map_err(gradguard_guard::GuardError::from)?;
    let chain_text = match (&chain.broken, &chain.head) {
        (Some(b), _) => format!("BROKEN: {b}"),
        (None, Some(h)) => format!("{} records verified, head {h}", chain.records),
        (None, None) => "empty".into(),
    };
    Ok(render(&report, &records, &chain_text, &log.display().to_string()))
}

/// The last guard report inside `report` (a demo's report is one; a training report holds it
/// as `last_report`).
fn last_report(report: &Value) -> &Value {
    report.get("last_report").filter(|v| !v.is_null()).unwrap_or(report)
}

/// The page for a report (JSON) and the records of its audit log.
pub fn render(report: &Value, records: &[gradguard_guard::decide::DecisionRecord], chain: &str, log_name: &str) -> String {
    let last = last_report(report);
    let layer_values: Vec<&Value> = last.get("layers").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
    let names: Vec<String> = layer_values.iter().filter_map(|l| l.get("name").and_then(Value::as_str).map(String::from)).collect();
    let run = history(records, &names);
    let mut out = String::new();
    let _ = write!(out, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\"><title>gradguard run report</title><style>{CSS}</style></head><body>");
    let _ = write!(out, "<h1>gradguard run report</h1>");
    summary(&mut out, &run, last, chain, log_name);
    overview_section(&mut out, &run);
    for h in &run.layers {
        layer_section(&mut out, h, &run);
    }
    decisions_table(&mut out, &run);
    extras(&mut out, report, &layer_values);
    out.push_str("</body></html>\n");
    out
}

fn summary(out: &mut String, run: &RunHistory, last: &Value, chain: &str, log_name: &str) {
    let steps = last.get("step").and_then(Value::as_u64).map_or(run.last_step, |s| s.max(run.last_step));
    let _ = write!(out, "<table class=\"summary\">");
    let mut row = |k: &str, v: String| {
        let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    };
    row("steps", format!("{} (last step {steps})", steps + 1));
    row("layers", run.layers.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", "));
    row("policy", run.policy_hash.clone().unwrap_or_else(|| "-".into()));
    row("audit log", format!("{log_name} ({} run(s) in the chain; this page shows the last that ran)", run.runs.max(1)));
    row("chain", chain.to_string());
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for h in &run.layers {
        *counts.entry("released".into()).or_default() += h.released;
        *counts.entry("protected".into()).or_default() += h.protected;
        *counts.entry("withheld".into()).or_default() += h.withheld;
        for d in &h.decisions {
            *counts.entry(d.outcome.to_string()).or_default() += 1;
        }
    }
    for d in &run.global {
        *counts.entry(d.outcome.to_string()).or_default() += 1;
    }
    counts.retain(|_, n| *n > 0);
    row("decisions (layer x step)", counts.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", "));
    out.push_str("</table>");
}

/// The overview: the heatmap (plotters) and its caption, what each rule holds each layer to
/// and where the blocks and refusals were.
fn overview_section(out: &mut String, run: &RunHistory) {
    let o = overview::overview(run);
    let blocked_steps: Vec<String> = o.refusals.iter().map(|r| r.0).collect::<std::collections::BTreeSet<u64>>().into_iter().map(|s| s.to_string()).collect();
    let _ = write!(
        out,
        "<section class=\"overview\" data-rows=\"{}\" data-columns=\"{}\" data-steps-per-column=\"{}\" data-refused-steps=\"{}\"><h2>Overview</h2>",
        o.rows.len(),
        o.columns(),
        o.bin,
        blocked_steps.join(" ")
    );
    match overview::svg(&o, 1140) {
        Ok(svg) => out.push_str(&svg.replacen("<svg ", "<svg class=\"overview-map\" role=\"img\" aria-label=\"overview: metric / threshold per layer and step\" ", 1)),
        Err(e) => {
            let _ = write!(out, "<p class=\"error\">the overview could not be drawn: {}</p>", esc(&e));
        }
    }
    let bins = if o.bin > 1 { format!("Each column covers {} steps and shows the largest ratio among them.", o.bin) } else { "Each column is one step.".to_string() };
    let _ = write!(
        out,
        "<p class=\"caption\">Each row is a layer, each column a step of this run ({} to {}). A cell's colour is the layer's <b>largest</b> metric / threshold ratio over the rules that cover it (the threshold is the rule's act_above), for the values in force at that step: the latest the log holds of each metric, an estimate (sensitivity and subspace separation are measured on the layer's gradient before its protection, the reconstruction bound on its release) or a decision's value (measured on the release it judged), the larger when both are of the same step. Blue is below the threshold, orange to red at and above it (1 = the threshold; {} and above share the darkest red): a protected layer can show red while its releases pass, its protection is what keeps them under (the layer's charts and the decisions say what the guard did). {bins} The top row marks the steps with a blocked or refused release; an X marks a layer whose own check blocked.</p>",
        o.first_step,
        o.last_step,
        axis::short(overview::SCALE_TOP)
    );
    let rules: Vec<String> = run
        .layers
        .iter()
        .filter(|h| !h.thresholds.is_empty())
        .map(|h| {
            let checks: Vec<String> = h.thresholds.iter().map(|(m, t)| format!("{m} \u{2264} {}", t.last().map_or("?".to_string(), |p| axis::short(p.1)))).collect();
            format!("<b>{}</b>: {}", esc(&h.name), esc(&checks.join(", ")))
        })
        .collect();
    if !rules.is_empty() {
        let _ = write!(out, "<p class=\"caption\">Rules (the last thresholds): {}.</p>", rules.join("; "));
    }
    if let Some(first) = o.refusals.first() {
        let steps: Vec<&str> = blocked_steps.iter().take(40).map(String::as_str).collect();
        let more = if blocked_steps.len() > steps.len() { format!(" and {} more", blocked_steps.len() - steps.len()) } else { String::new() };
        let _ = write!(
            out,
            "<p class=\"caption refusals\">Blocked or refused at step(s) {}{more} ({} record(s), each in the decisions table below); the first: {}.</p>",
            steps.join(", "),
            o.refusals.len(),
            esc(&first.1)
        );
    }
    out.push_str("</section>");
}

fn marks_for(h: &LayerHistory, run: &RunHistory, metric: Option<&str>) -> Vec<Mark> {
    let mut marks: Vec<Mark> = h
        .decisions
        .iter()
        .map(|d| Mark { step: d.step, value: if d.metric.as_deref() == metric { d.value } else { None }, colour: colour(d.outcome), text: d.text.clone() })
        .collect();
    marks.extend(run.global.iter().map(|d| Mark { step: d.step, value: None, colour: colour(d.outcome), text: d.text.clone() }));
    marks
}

fn layer_section(out: &mut String, h: &LayerHistory, run: &RunHistory) {
    let _ = write!(out, "<section class=\"layer\" data-layer=\"{n}\"><h2>{n}</h2><div class=\"charts\">", n = esc(&h.name));
    for (i, (metric, points)) in h.metrics.iter().enumerate() {
        let mut lines = vec![Line { name: metric, points, colour: PALETTE[i % PALETTE.len()], step_line: false }];
        let threshold_name = format!("{metric} threshold");
        if let Some(t) = h.thresholds.get(metric) {
            lines.push(Line { name: &threshold_name, points: t, colour: "#d62728", step_line: true });
        }
        out.push_str(&chart(&format!("{} {metric}", h.name), run.first_step, run.last_step, &lines, &marks_for(h, run, Some(metric))));
    }
    let levels = [Line { name: "protection level", points: &h.levels, colour: "#444444", step_line: true }];
    out.push_str(&chart(&format!("{} protection level", h.name), run.first_step, run.last_step, &levels, &marks_for(h, run, None)));
    let _ = write!(out, "</div><p class=\"counts\">unchanged releases: {} released, {} protected, {} withheld; {} decision(s) logged</p></section>", h.released, h.protected, h.withheld, h.decisions.len());
}

fn decisions_table(out: &mut String, run: &RunHistory) {
    let mut all: Vec<(&str, &series::Decision)> = run.layers.iter().flat_map(|h| h.decisions.iter().map(move |d| (h.name.as_str(), d))).chain(run.global.iter().map(|d| ("*", d))).collect();
    all.sort_by_key(|(_, d)| d.step);
    let _ = write!(out, "<h2>Decisions</h2><table class=\"decisions\"><tr><th>step</th><th>layer</th><th>outcome</th><th>what</th></tr>");
    for (layer, d) in all.iter().filter(|(_, d)| !matches!(d.outcome, Outcome::Released | Outcome::Protected)).take(500) {
        let _ = write!(out, "<tr><td>{}</td><td>{}</td><td style=\"color:{}\">{}</td><td>{}</td></tr>", d.step, esc(layer), colour(d.outcome), d.outcome, esc(&d.text));
    }
    out.push_str("</table>");
}

/// Everything else the report carries, listed generically: each layer's values at the last
/// step, and any run-wide section other than the layers (a ledger, say).
fn extras(out: &mut String, report: &Value, layers: &[&Value]) {
    let _ = write!(out, "<h2>Last report</h2><table class=\"extras\">");
    for l in layers {
        let name = l.get("name").and_then(Value::as_str).unwrap_or("?");
        let mut leaves = Vec::new();
        flatten("", l, &mut leaves);
        let text = leaves.iter().filter(|(k, _)| k != "name").map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join("; ");
        let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(name), esc(&text));
    }
    let known = ["layers", "last_report", "step", "batch_size", "seed", "estimated", "estimate_seconds", "release", "health"];
    for source in [report, last_report(report)] {
        if let Some(map) = source.as_object() {
            for (k, v) in map.iter().filter(|(k, v)| !known.contains(&k.as_str()) && (v.is_object() || v.is_array())) {
                let mut leaves = Vec::new();
                flatten("", v, &mut leaves);
                let text = leaves.iter().take(200).map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join("; ");
                let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&text));
            }
        }
        if std::ptr::eq(source, last_report(report)) {
            break;
        }
    }
    out.push_str("</table>");
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        Value::Array(a) if a.len() <= 16 => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::Array(a) => out.push((prefix.to_string(), format!("[{} items]", a.len()))),
        Value::Null => {}
        Value::Number(n) => out.push((prefix.to_string(), n.as_f64().map_or(n.to_string(), |f| format!("{f:.6}").trim_end_matches('0').trim_end_matches('.').to_string()))),
        other => out.push((prefix.to_string(), other.to_string().trim_matches('"').to_string())),
    }
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1800px}\
h1{font-size:1.4em}h2{font-size:1.15em;margin:1.2em 0 .4em}\
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}\
th{background:#f6f6f6}.charts{display:flex;flex-wrap:wrap;gap:8px}\
.chart{background:#fff;border:1px solid #eee}.chart .title{font-size:12px;font-weight:600}\
.chart .tick{font-size:10px;fill:#555}.chart .tick-mark{stroke:#999}.chart .legend{font-size:10px}.chart .frame{fill:none;stroke:#ccc}\
.chart .mark-line{stroke-width:.6;opacity:.45}.counts{color:#555;margin:.2em 0 1em}\
.overview-map{display:block;max-width:100%;height:auto}.caption{color:#444;max-width:1140px;margin:.3em 0}.error{color:#b00}\
.extras td{font-family:ui-monospace,monospace;font-size:12px}";

#[cfg(test)]
mod tests {
    use super::*;
    use gradguard_guard::decide::{Checkpoint, DecisionRecord, LayerTally};

    fn tally(layer: &str, step: u64, value: f64, level: usize) -> LayerTally {
        LayerTally {
            layer: layer.into(),
            released: 9,
            protected: 1,
            level,
            estimate_step: Some(step),
            metrics: [("sensitivity".to_string(), value)].into(),
            thresholds: [("sensitivity".to_string(), 0.5)].into(),
            ..LayerTally::default()
        }
    }

    fn checkpoint(to: u64, values: [f64; 2]) -> DecisionRecord {
        let mut r = DecisionRecord::event(to, Outcome::Checkpoint, "p", None);
        r.checkpoint = Some(Checkpoint { from_step: to - 9, to_step: to, layers: vec![tally("a<b", to, values[0], 1), tally("fc", to, values[1], 0)] });
        r
    }

    #[test]
    fn the_last_run_that_ran_is_drawn_per_layer_with_thresholds_and_decisions() {
        let mut escalated = DecisionRecord::event(12, Outcome::Escalated, "p", None);
        (escalated.layer, escalated.metric, escalated.value, escalated.threshold, escalated.level) = ("a<b".into(), Some("sensitivity".into()), Some(0.7), Some(0.5), 1);
        let records = vec![
            DecisionRecord::event(0, Outcome::Started, "old", None),
            checkpoint(9, [9.0, 9.0]),
            DecisionRecord::event(9, Outcome::Closed, "old", None),
            DecisionRecord::event(0, Outcome::Started, "p", None),
            checkpoint(9, [0.1, 0.2]),
            escalated,
            DecisionRecord::event(15, Outcome::Blocked, "p", Some("stale estimate".into())),
            checkpoint(19, [0.3, 0.4]),
            checkpoint(29, [0.2, 0.1]),
            DecisionRecord::event(29, Outcome::Closed, "p", None),
            // A later run with no step does not hide the one before.
            DecisionRecord::event(0, Outcome::Started, "p", None),
            DecisionRecord::event(0, Outcome::Closed, "p", None),
        ];
        let html = render(&Value::Null, &records, "3 records verified", "audit.jsonl");
        assert!(html.contains("data-layer=\"a&lt;b\"") && html.contains("<h2>a&lt;b</h2>") && !html.contains("<h2>a<b"), "names are escaped");
        assert!(html.contains("data-layer=\"fc\""));
        assert!(html.contains("3 run(s) in the chain"));
        // Three checkpoints of this run, not the old run's value 9.
        let series: Vec<&str> = html.split("data-series=\"sensitivity\" points=\"").skip(1).map(|s| s.split('"').next().unwrap()).collect();
        assert_eq!(series.len(), 2, "one sensitivity chart per layer");
        assert!(series.iter().all(|p| p.split_whitespace().count() == 3), "{series:?}");
        assert!(html.contains("data-series=\"sensitivity threshold\""));
        assert!(html.contains("step 12 a&lt;b: escalated"), "the decision is marked and listed");
        assert!(html.contains("1 blocked, 1 escalated, 6 protected, 54 released"), "this run's counts only");
        // The overview first: a row per layer, the block at step 15 marked.
        let overview = html.find("<section class=\"overview\" data-rows=\"2\" data-columns=\"30\" data-steps-per-column=\"1\" data-refused-steps=\"15\">");
        assert!(overview.is_some() && overview < html.find("<section class=\"layer\""), "{html}");
        assert!(html.contains("<svg class=\"overview-map\""));
        assert!(html.contains("Blocked or refused at step(s) 15 "));
        assert!(!html.contains("<script"));
    }
}
