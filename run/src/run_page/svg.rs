//! Small inline-SVG line charts for the run page: series over steps, a threshold drawn as a
//! dashed step line, markers with a tooltip. Written by hand rather than with plotters (which
//! draws the overview): each series keeps its `data-series` name and each decision its
//! `<title>` tooltip, which plotters' SVG backend cannot write.
use super::axis::{axis, step_axis};
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
/// The plot's height (the frame), whatever the title and legend take above it.
const PLOT_H: f64 = 122.0;
const RIGHT: f64 = 12.0;
const BOTTOM: f64 = 26.0;
/// Pixels per character of the title (12px, bold) and of the ticks and legend (10px).
const TITLE_CHAR: f64 = 7.0;
const SMALL_CHAR: f64 = 6.0;
const LINE: f64 = 14.0;

/// Escapes text for HTML/SVG content and attributes.
pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `text` in lines of at most `width` pixels at `per_char` pixels a character, broken at
/// spaces where it can be (a longer word is cut).
fn wrap(text: &str, width: f64, per_char: f64) -> Vec<String> {
    let max = ((width / per_char).floor() as usize).max(8);
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let mut word: Vec<char> = word.chars().collect();
        while line.is_empty() && word.len() > max {
            lines.push(word.drain(..max).collect());
        }
        let word: String = word.into_iter().collect();
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > max {
            lines.push(std::mem::take(&mut line));
        }
        if word.chars().count() > max {
            let mut chars: Vec<char> = word.chars().collect();
            while chars.len() > max {
                lines.push(chars.drain(..max).collect());
            }
            line = chars.into_iter().collect();
            continue;
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// One chart: `title`, x over the steps `first_step ..= last_step`, the lines and the marks.
/// The title wraps and the legend flows onto as many lines as they need; the y axis has room
/// for its longest label.
pub(crate) fn chart(title: &str, first_step: u64, last_step: u64, lines: &[Line], marks: &[Mark]) -> String {
    let values = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).chain(marks.iter().filter_map(|m| m.value));
    let ya = axis(values, 5);
    let xa = step_axis(first_step, last_step, 6);
    let left = (ya.labels.iter().map(|l| l.chars().count()).max().unwrap_or(1) as f64 * SMALL_CHAR + 12.0).max(36.0);
    // The header: the title's lines, then the legend's entries (those with points) flowing.
    let title_lines = wrap(title, W - 8.0, TITLE_CHAR);
    let mut legend: Vec<(f64, f64, &Line)> = Vec::new();
    let mut y_text = LINE * (title_lines.len() as f64 + 1.0);
    let mut x_text = 4.0;
    for l in lines.iter().filter(|l| !l.points.is_empty()) {
        let w = 18.0 + SMALL_CHAR * l.name.chars().count() as f64;
        if x_text > 4.0 && x_text + w > W - RIGHT {
            (x_text, y_text) = (4.0, y_text + LINE - 2.0);
        }
        legend.push((x_text, y_text, l));
        x_text += w + 10.0;
    }
    let top = if legend.is_empty() { LINE * title_lines.len() as f64 + 8.0 } else { y_text + 8.0 };
    let h = top + PLOT_H + BOTTOM;
    let (lo, hi) = (ya.lo, ya.hi);
    let (xlo, xhi) = (xa.lo, xa.hi);
    let x = |s: u64| left + ((s as f64 - xlo) / (xhi - xlo)) * (W - left - RIGHT);
    let y = |v: f64| top + (1.0 - (v - lo) / (hi - lo)) * PLOT_H;
    let mut out = String::new();
    let _ = write!(out, r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {h}" width="{W}" height="{h}" role="img" aria-label="{t}">"#, t = esc(title));
    for (i, t) in title_lines.iter().enumerate() {
        let _ = write!(out, r#"<text x="4" y="{}" class="title">{}</text>"#, LINE * (i as f64 + 1.0) - 2.0, esc(t));
    }
    let (x0, x1, y0, y1) = (left, W - RIGHT, top, top + PLOT_H);
    let _ = write!(out, r#"<rect x="{x0}" y="{y0}" width="{}" height="{}" class="frame"/>"#, x1 - x0, y1 - y0);
    for (v, label) in ya.ticks.iter().zip(&ya.labels) {
        let _ = write!(out, r#"<line x1="{:.1}" y1="{yv:.1}" x2="{x0:.1}" y2="{yv:.1}" class="tick-mark"/><text x="{}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#, x0 - 3.0, left - 5.0, y(*v) + 3.0, esc(label), yv = y(*v));
    }
    for (v, label) in xa.ticks.iter().zip(&xa.labels) {
        let xv = left + ((v - xlo) / (xhi - xlo)) * (W - left - RIGHT);
        let _ = write!(out, r#"<line x1="{xv:.1}" y1="{y1:.1}" x2="{xv:.1}" y2="{:.1}" class="tick-mark"/><text x="{xv:.1}" y="{}" class="tick" text-anchor="middle">{}</text>"#, y1 + 3.0, h - 10.0, esc(label));
    }
    for m in marks {
        let cx = x(m.step);
        let _ = write!(out, r#"<line x1="{cx:.1}" y1="{y0}" x2="{cx:.1}" y2="{y1}" stroke="{c}" class="mark-line"/>"#, c = m.colour);
        let cy = m.value.filter(|v| v.is_finite()).map_or(y1, y);
        let _ = write!(out, r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="3.5" fill="{c}" class="mark"><title>{t}</title></circle>"#, c = m.colour, t = esc(&m.text));
    }
    for (lx, ly, l) in &legend {
        let dash = if l.step_line { r#" stroke-dasharray="5 3""# } else { "" };
        let _ = write!(out, r#"<line x1="{lx:.1}" y1="{sy:.1}" x2="{:.1}" y2="{sy:.1}" stroke="{c}" stroke-width="2"{dash}/><text x="{:.1}" y="{ly:.1}" class="legend" fill="{c}">{n}</text>"#, lx + 14.0, lx + 18.0, sy = ly - 3.5, c = l.colour, n = esc(l.name));
    }
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
            let _ = write!(pts, "{:.1},{py:.1}", x(last_step));
        }
        let dash = if l.step_line { r#" stroke-dasharray="5 3""# } else { "" };
        let _ = write!(out, r#"<polyline class="series" data-series="{n}" points="{p}" fill="none" stroke="{c}" stroke-width="1.6"{dash}/>"#, n = esc(l.name), p = pts.trim_end(), c = l.colour);
        if l.points.len() == 1 {
            let (s, v) = l.points[0];
            if v.is_finite() {
                let _ = write!(out, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{c}"/>"#, x(s), y(v), c = l.colour);
            }
        }
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_wrap_instead_of_running_off() {
        assert_eq!(wrap("conv1 sensitivity", 200.0, 7.0), ["conv1 sensitivity"]);
        let long = "encoder.layers.11.self_attention.output_projection reconstruction_bound_bits";
        let lines = wrap(long, 300.0, 7.0);
        assert!(lines.len() > 1 && lines.iter().all(|l| l.chars().count() <= 42), "{lines:?}");
        assert_eq!(lines.concat().replace(' ', ""), long.replace(' ', ""), "nothing lost");
        assert_eq!(wrap("", 100.0, 7.0), [""]);
    }

    /// The y tick labels of a chart, top to bottom as written.
    fn y_labels(svg: &str) -> Vec<String> {
        svg.split("text-anchor=\"end\">").skip(1).map(|s| s.split('<').next().unwrap().to_string()).collect()
    }

    #[test]
    fn constant_and_zero_series_get_labelled_axes() {
        let constant = [(0, 0.05), (10, 0.05), (20, 0.05)];
        let zero = [(0, 0.0), (20, 0.0)];
        let svg = chart("t", 0, 20, &[Line { name: "c", points: &constant, colour: "#000", step_line: true }], &[]);
        let labels = y_labels(&svg);
        assert!(labels.len() >= 3, "{labels:?}");
        let mut unique = labels.clone();
        unique.dedup();
        assert_eq!(unique.len(), labels.len(), "{labels:?}");
        let svg = chart("t", 0, 20, &[Line { name: "z", points: &zero, colour: "#000", step_line: true }], &[]);
        let labels = y_labels(&svg);
        assert_eq!((labels.first().map(String::as_str), labels.last().map(String::as_str)), (Some("0"), Some("1.00")), "{labels:?}");
        assert!(!svg.contains("e-10"));
        // A run of one step: x labels 0 and 1, not 0 0 0.
        let svg = chart("t", 0, 0, &[Line { name: "z", points: &zero[..1], colour: "#000", step_line: false }], &[]);
        assert!(svg.contains(">0</text>") && svg.contains(">1</text>"));
    }

    #[test]
    fn a_long_title_and_legend_stay_inside_the_chart() {
        let p = [(0, 1.0), (5, 2.0)];
        let title = "a.very.long.layer.name.of.a.transformer.block reconstruction_bound_bits";
        let lines = [Line { name: "reconstruction_bound_bits", points: &p, colour: "#000", step_line: false }, Line { name: "reconstruction_bound_bits threshold", points: &p, colour: "#000", step_line: true }];
        let svg = chart(title, 0, 5, &lines, &[]);
        for text in svg.split("<text ").skip(1) {
            let x: f64 = text.split("x=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
            let body = text.split('>').nth(1).unwrap().split('<').next().unwrap();
            let per = if text.contains("class=\"title\"") { TITLE_CHAR } else { SMALL_CHAR };
            let (from, to) = if text.contains("text-anchor=\"end\"") { (x - per * body.len() as f64, x) } else if text.contains("middle") { (x - per * body.len() as f64 / 2.0, x + per * body.len() as f64 / 2.0) } else { (x, x + per * body.len() as f64) };
            assert!(from >= 0.0 && to <= W, "{body:?} runs from {from} to {to}");
        }
    }
}
