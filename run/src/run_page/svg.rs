//! Small inline-SVG line charts for the run page: series over steps, a threshold drawn as a
//! dashed step line, markers with a tooltip. No plotting library: the page must be one
//! self-contained file, and these charts are a few polylines.
use std::fmt::Write;

/// Colours of the series, in order.
pub(crate) const PALETTE: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"];

/// One line of a chart.
pub(crate) struct Line<'a> {
    /// Legend text; also the `data-series` attribute.
    pub name: &'a str,
    /// (step, value), in step order.
    pub points: &'a [(u64, f64)],
    pub colour: &'a str,
    /// Dashed, and drawn as steps (a threshold, a level).
    pub step_line: bool,
}

/// A marker on the x axis: a decision.
pub(crate) struct Mark {
    pub step: u64,
    /// Where on the y axis (None: on the x axis).
    pub value: Option<f64>,
    pub colour: &'static str,
    /// The tooltip.
    pub text: String,
}

const W: f64 = 560.0;
const H: f64 = 170.0;
const LEFT: f64 = 62.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 22.0;
const BOTTOM: f64 = 26.0;

/// Escapes text for HTML/SVG content and attributes.
pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.abs() < 0.01 {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// One chart: `title`, x from 0 to `last_step`, the lines and the marks.
pub(crate) fn chart(title: &str, last_step: u64, lines: &[Line], marks: &[Mark]) -> String {
    let values: Vec<f64> = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).chain(marks.iter().filter_map(|m| m.value)).filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo <= 0.0 {
        (lo, hi) = (lo - 0.5 * lo.abs().max(1e-9), hi + 0.5 * hi.abs().max(1e-9));
    }
    let pad = (hi - lo) * 0.08;
    let (lo, hi) = (lo - pad, hi + pad);
    let xmax = last_step.max(1) as f64;
    let x = |s: u64| LEFT + (s as f64 / xmax) * (W - LEFT - RIGHT);
    let y = |v: f64| TOP + (1.0 - (v - lo) / (hi - lo)) * (H - TOP - BOTTOM);
    let mut out = String::new();
    let _ = write!(out, r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}">"#, t = esc(title));
    let _ = write!(out, r#"<text x="{LEFT}" y="14" class="title">{}</text>"#, esc(title));
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    let _ = write!(out, r#"<rect x="{x0}" y="{y0}" width="{}" height="{}" class="frame"/>"#, x1 - x0, y1 - y0);
    for v in [lo + pad, (lo + hi) / 2.0, hi - pad] {
        let _ = write!(out, r#"<text x="{}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#, LEFT - 4.0, y(v) + 3.0, fmt_num(v));
    }
    for s in [0, last_step / 2, last_step] {
        let _ = write!(out, r#"<text x="{:.1}" y="{}" class="tick" text-anchor="middle">{s}</text>"#, x(s), H - 10.0);
    }
    for m in marks {
        let cx = x(m.step);
        let _ = write!(out, r#"<line x1="{cx:.1}" y1="{y0}" x2="{cx:.1}" y2="{y1}" stroke="{c}" class="mark-line"/>"#, c = m.colour);
        let cy = m.value.filter(|v| v.is_finite()).map_or(y1, y);
        let _ = write!(out, r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="3.5" fill="{c}" class="mark"><title>{t}</title></circle>"#, c = m.colour, t = esc(&m.text));
    }
    let mut legend_x = LEFT + 12.0 + 7.0 * title.len() as f64;
    for l in lines {
        if l.points.is_empty() {
            continue;
        }
        let mut pts = String::new();
        let mut prev: Option<(f64, f64)> = None;
        for &(s, v) in l.points.iter().filter(|p| p.1.is_finite()) {
            if let (true, Some((_, py))) = (l.step_line, prev) {
                let _ = write!(pts, "{:.1},{py:.1} ", x(s));
            }
            let _ = write!(pts, "{:.1},{:.1} ", x(s), y(v));
            prev = Some((x(s), y(v)));
        }
        if let (true, Some((_, py))) = (l.step_line, prev) {
            let _ = write!(pts, "{x1:.1},{py:.1}");
        }
        let dash = if l.step_line { r#" stroke-dasharray="5 3""# } else { "" };
        let _ = write!(out, r#"<polyline class="series" data-series="{n}" points="{p}" fill="none" stroke="{c}" stroke-width="1.6"{dash}/>"#, n = esc(l.name), p = pts.trim_end(), c = l.colour);
        if l.points.len() == 1 {
            let (s, v) = l.points[0];
            let _ = write!(out, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{c}"/>"#, x(s), y(v), c = l.colour);
        }
        let _ = write!(out, r#"<text x="{legend_x:.1}" y="14" class="legend" fill="{c}">{n}</text>"#, c = l.colour, n = esc(l.name));
        legend_x += 9.0 + 6.5 * l.name.len() as f64;
    }
    out.push_str("</svg>");
    out
}
