//! The overview at the top of the run page: a heatmap, one row per layer and one column per
//! step (or per bin of steps, at most [`MAX_COLUMNS`] columns), coloured by the largest
//! metric / threshold ratio over the rules that cover the layer, with the blocked and refused
//! releases marked. Drawn with plotters (SVG backend: text is SVG `<text>`, no font needed).
//!
//! A layer's ratio at a step is that of the values in force then: the latest logged value of
//! each metric a rule holds the layer to (a checkpoint's estimate, a decision's measured
//! value) over the rule's latest threshold (act_above). A bin shows the largest ratio of its
//! steps.
use super::axis::{short, step_axis};
use super::series::{LayerHistory, RunHistory};
use gradguard_guard::decide::Outcome;
use plotters::prelude::*;
use std::collections::BTreeMap;

/// The most columns the heatmap draws; a longer run is binned.
pub(crate) const MAX_COLUMNS: u64 = 200;
/// The top of the colour scale: ratios at or above it share its colour.
pub(crate) const SCALE_TOP: f64 = 2.0;

/// One row of the heatmap.
#[derive(Debug)]
pub(crate) struct Row {
    pub name: String,
    /// The metrics a rule holds this layer to (empty: no rule covers it).
    pub metrics: Vec<String>,
    /// The largest ratio per column; None where no value or no threshold is known yet.
    pub cells: Vec<Option<f64>>,
    /// Columns with a block or refusal of this layer.
    pub refused: Vec<bool>,
}

/// What the heatmap shows.
#[derive(Debug)]
pub(crate) struct Overview {
    pub first_step: u64,
    pub last_step: u64,
    /// Steps per column.
    pub bin: u64,
    pub rows: Vec<Row>,
    /// Columns with any block or refusal (of a layer or of the whole release).
    pub refused: Vec<bool>,
    /// (step, what) of every block and refusal, in step order.
    pub refusals: Vec<(u64, String)>,
}

impl Overview {
    pub(crate) fn columns(&self) -> usize {
        self.refused.len()
    }

    /// The column of `step` (clamped to the run).
    fn column(&self, step: u64) -> usize {
        ((step.clamp(self.first_step, self.last_step) - self.first_step) / self.bin) as usize
    }

    /// The steps column `c` covers.
    pub(crate) fn steps(&self, c: usize) -> (u64, u64) {
        let from = self.first_step + c as u64 * self.bin;
        (from, (from + self.bin - 1).min(self.last_step))
    }
}

/// `value` relative to `threshold`: None where it says nothing (NaN, no usable threshold).
fn ratio(value: f64, threshold: f64) -> Option<f64> {
    if value.is_nan() || !(threshold.is_finite() && threshold >= 0.0) {
        return None;
    }
    if threshold == 0.0 {
        return Some(if value > 0.0 { f64::INFINITY } else { 0.0 });
    }
    Some(value / threshold)
}

/// The layer's ratio from each step where it changes on: (step, ratio in force from then).
/// `policy_from(step)` is where the policy in force at `step` took effect: a threshold first
/// logged at a checkpoint held since then.
fn ratio_changes(h: &LayerHistory, policy_from: impl Fn(u64) -> u64) -> Vec<(u64, Option<f64>)> {
    // (step, metric, is a threshold, value)
    let mut events: Vec<(u64, &str, bool, f64)> = Vec::new();
    for (m, points) in &h.thresholds {
        if let Some(&(s, t)) = points.first() {
            events.push((policy_from(s).min(s), m.as_str(), true, t));
        }
        events.extend(points.iter().map(|&(s, t)| (s, m.as_str(), true, t)));
    }
    for (m, points) in h.metrics.iter().filter(|(m, _)| h.thresholds.contains_key(*m)) {
        events.extend(points.iter().map(|&(s, v)| (s, m.as_str(), false, v)));
    }
    for d in &h.decisions {
        if let (Some(m), Some(v)) = (d.metric.as_deref().filter(|m| h.thresholds.contains_key(*m)), d.value) {
            events.push((d.step, m, false, v));
        }
    }
    events.sort_by_key(|e| e.0);
    let mut in_force: BTreeMap<&str, (Option<f64>, Option<f64>)> = BTreeMap::new();
    let mut out: Vec<(u64, Option<f64>)> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let step = events[i].0;
        // A step's values: the largest of those logged at it.
        let mut fresh: BTreeMap<&str, f64> = BTreeMap::new();
        while i < events.len() && events[i].0 == step {
            let (_, m, is_threshold, v) = events[i];
            if is_threshold {
                in_force.entry(m).or_default().1 = Some(v);
            } else if !v.is_nan() {
                let e = fresh.entry(m).or_insert(v);
                *e = e.max(v);
            }
            i += 1;
        }
        for (m, v) in fresh {
            in_force.entry(m).or_default().0 = Some(v);
        }
        let r = in_force.values().filter_map(|&(v, t)| ratio(v?, t?)).fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))));
        if out.last().is_none_or(|last| last.1 != r) {
            out.push((step, r));
        }
    }
    out
}

/// The overview of `run`.
pub(crate) fn overview(run: &RunHistory) -> Overview {
    let (first_step, last_step) = (run.first_step, run.last_step.max(run.first_step));
    let steps = last_step - first_step + 1;
    let bin = steps.div_ceil(MAX_COLUMNS).max(1);
    let columns = steps.div_ceil(bin) as usize;
    let mut o = Overview { first_step, last_step, bin, rows: Vec::new(), refused: vec![false; columns], refusals: Vec::new() };
    let loaded: Vec<u64> = run.global.iter().filter(|d| d.outcome == Outcome::PolicyLoaded).map(|d| d.step).collect();
    let policy_from = |step: u64| loaded.iter().copied().filter(|&l| l <= step).max().unwrap_or(first_step).max(first_step);
    for h in &run.layers {
        let changes = ratio_changes(h, policy_from);
        let mut cells = vec![None; columns];
        // The change in force at each column's first step, then those inside the column.
        let mut j = 0;
        let mut current: Option<f64> = None;
        for (c, cell) in cells.iter_mut().enumerate() {
            let (from, to) = o.steps(c);
            while j < changes.len() && changes[j].0 <= from {
                current = changes[j].1;
                j += 1;
            }
            let mut most = current;
            while j < changes.len() && changes[j].0 <= to {
                current = changes[j].1;
                most = match (most, current) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                j += 1;
            }
            *cell = most;
        }
        let mut refused = vec![false; columns];
        for d in h.decisions.iter().filter(|d| d.refusal) {
            let c = o.column(d.step);
            refused[c] = true;
            o.refused[c] = true;
            o.refusals.push((d.step, d.text.clone()));
        }
        o.rows.push(Row { name: h.name.clone(), metrics: h.thresholds.keys().cloned().collect(), cells, refused });
    }
    for d in run.global.iter().filter(|d| d.refusal) {
        let c = o.column(d.step);
        o.refused[c] = true;
        o.refusals.push((d.step, d.text.clone()));
    }
    o.refusals.sort_by_key(|r| r.0);
    o
}

/// The colour of a ratio: blues below the threshold (paler the further below), from orange to
/// deep red at and above it ([`SCALE_TOP`] and above the deepest).
pub(crate) fn ratio_colour(r: f64) -> RGBColor {
    fn mix(a: (f64, f64, f64), b: (f64, f64, f64), t: f64) -> RGBColor {
        let t = t.clamp(0.0, 1.0);
        let c = |x: f64, y: f64| (x + (y - x) * t).round() as u8;
        RGBColor(c(a.0, b.0), c(a.1, b.1), c(a.2, b.2))
    }
    const ZERO: (f64, f64, f64) = (239.0, 246.0, 252.0);
    const HALF: (f64, f64, f64) = (158.0, 202.0, 225.0);
    const BELOW: (f64, f64, f64) = (49.0, 130.0, 189.0);
    const AT: (f64, f64, f64) = (253.0, 174.0, 97.0);
    const TOP: (f64, f64, f64) = (165.0, 0.0, 38.0);
    if r.is_nan() || r <= 0.0 {
        mix(ZERO, ZERO, 0.0)
    } else if r < 0.5 {
        mix(ZERO, HALF, r / 0.5)
    } else if r < 1.0 {
        mix(HALF, BELOW, (r - 0.5) / 0.5)
    } else {
        mix(AT, TOP, (r - 1.0) / (SCALE_TOP - 1.0))
    }
}

/// Cells with no ratio (no rule covers the layer, or nothing logged yet).
pub(crate) const NO_DATA: RGBColor = RGBColor(214, 214, 214);
const REFUSAL: RGBColor = RGBColor(0, 0, 0);
/// The marker row's label.
pub(crate) const MARKER_ROW: &str = "blocked / refused";

/// plotters' font sizes are 1.24 times the px size it writes.
fn font(px: f64) -> (&'static str, f64) {
    ("sans-serif", px * 1.24)
}

/// The heatmap as an SVG element (plotters' SVG backend), `width` pixels wide.
pub(crate) fn svg(o: &Overview, width: u32) -> Result<String, String> {
    let n = o.rows.len();
    let row_h: u32 = if n <= 16 { 24 } else { (480 / n as u32).max(8) };
    let label_px = if row_h >= 16 { 12.0 } else { (row_h as f64 * 0.8).max(7.0) };
    let longest = o.rows.iter().map(|r| r.name.chars().count() + if r.metrics.is_empty() { 10 } else { 0 }).chain([MARKER_ROW.len()]).max().unwrap_or(8);
    let label_w = (longest as f64 * label_px * 0.62 + 14.0).ceil() as u32;
    let map_h = row_h * (n as u32 + 1) + row_h / 2 + 8 + 34;
    let scale_h = 58;
    let height = map_h + scale_h;
    let mut buf = String::new();
    {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let root = SVGBackend::with_string(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, bottom) = root.split_vertically(map_h);
        // Integer coordinates (plotters formats only those with chosen tick points): x in
        // steps, y in hundredths of a row. From the top: the marker row, half a row of space,
        // the layers in model order.
        const R: i64 = 100;
        let rows_y = (n as i64 + 1) * R + R / 2;
        let layer_y = |i: usize| (n as i64 - 1 - i as i64) * R;
        let x_end = (o.first_step + o.columns() as u64 * o.bin) as i64;
        let x = step_axis(o.first_step, x_end as u64, 11);
        let x_ticks: Vec<i64> = x.ticks.iter().map(|t| *t as i64).filter(|t| (o.first_step as i64..=x_end).contains(t)).collect();
        let labels: Vec<(i64, String)> = o
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| (layer_y(i) + R / 2, if r.metrics.is_empty() { format!("{} (no rule)", r.name) } else { r.name.clone() }))
            .chain([(rows_y - R / 2, MARKER_ROW.to_string())])
            .collect();
        let centres: Vec<i64> = labels.iter().map(|l| l.0).collect();
        let mut chart = ChartBuilder::on(&top)
            .margin_top(8)
            .margin_right(18)
            .x_label_area_size(34)
            .y_label_area_size(label_w)
            .build_cartesian_2d((o.first_step as i64..x_end).with_key_points(x_ticks), (0..rows_y).with_key_points(centres))
            .map_err(|e| err(&e))?;
        let y_label = |v: &i64| labels.iter().find(|(c, _)| c == v).map(|(_, l)| l.clone()).unwrap_or_default();
        let x_label = |v: &i64| v.to_string();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_label_formatter(&x_label)
            .y_label_formatter(&y_label)
            .x_desc(if o.bin > 1 { format!("step ({} steps per column, a column shows its largest ratio)", o.bin) } else { "step".to_string() })
            .label_style(font(label_px))
            .axis_desc_style(font(11.0))
            .draw()
            .map_err(|e| err(&e))?;
        let col_x = |c: usize| (o.first_step + c as u64 * o.bin) as i64;
        // Runs of equal colour as one rectangle each.
        let colour_of = |v: Option<f64>| v.map_or(NO_DATA, ratio_colour);
        let mut rects = Vec::new();
        for (i, r) in o.rows.iter().enumerate() {
            let (y0, y1) = (layer_y(i) + 4, layer_y(i) + R - 4);
            let mut c = 0;
            while c < r.cells.len() {
                let colour = colour_of(r.cells[c]);
                let mut e = c + 1;
                while e < r.cells.len() && colour_of(r.cells[e]) == colour {
                    e += 1;
                }
                rects.push(Rectangle::new([(col_x(c), y0), (col_x(e), y1)], colour.filled()));
                c = e;
            }
        }
        let (m0, m1) = (rows_y - R + 4, rows_y - 4);
        rects.push(Rectangle::new([(col_x(0), m0), (col_x(o.columns()), m1)], RGBColor(246, 246, 246).filled()));
        for (c, _) in o.refused.iter().enumerate().filter(|(_, b)| **b) {
            rects.push(Rectangle::new([(col_x(c), m0), (col_x(c + 1), m1)], REFUSAL.filled()));
        }
        chart.draw_series(rects).map_err(|e| err(&e))?;
        // An X over each refused layer's cell, about as wide as a row is high (a step is a
        // pixel or less on a long run).
        let px_per_step = (width as f64 - label_w as f64 - 18.0) / (x_end as f64 - o.first_step as f64).max(1.0);
        let half_w = ((0.36 * row_h as f64 / px_per_step).max(o.bin as f64 / 2.0)).round().max(1.0) as i64;
        let mut crosses = Vec::new();
        for (i, r) in o.rows.iter().enumerate() {
            for (c, _) in r.refused.iter().enumerate().filter(|(_, b)| **b) {
                let cx = col_x(c) + (o.bin as i64) / 2;
                let (y0, y1) = (layer_y(i) + 14, layer_y(i) + R - 14);
                for (a, b) in [((cx - half_w, y0), (cx + half_w, y1)), ((cx - half_w, y1), (cx + half_w, y0))] {
                    crosses.push(PathElement::new(vec![a, b], WHITE.stroke_width(4)));
                    crosses.push(PathElement::new(vec![a, b], REFUSAL.stroke_width(2)));
                }
            }
        }
        chart.draw_series(crosses).map_err(|e| err(&e))?;

        // The colour scale, 0 to SCALE_TOP with the threshold (1.0) marked, and the legend
        // (x in 1/TOP_X of the scale).
        const TOP_X: i64 = 400;
        let (scale_area, legend_area) = bottom.split_horizontally(label_w + 420);
        let mut scale = ChartBuilder::on(&scale_area)
            .margin_left(label_w)
            .margin_right(10)
            .margin_top(4)
            .x_label_area_size(30)
            .build_cartesian_2d((0..TOP_X).with_key_points(vec![0, TOP_X / 4, TOP_X / 2, 3 * TOP_X / 4, TOP_X]), 0..100)
            .map_err(|e| err(&e))?;
        let scale_label = |v: &i64| match *v {
            v if v == TOP_X / 2 => "1 = threshold".to_string(),
            TOP_X => format!("\u{2265} {}", short(SCALE_TOP)),
            v => short(v as f64 * SCALE_TOP / TOP_X as f64),
        };
        scale
            .configure_mesh()
            .disable_mesh()
            .disable_y_axis()
            .x_label_formatter(&scale_label)
            .x_desc("metric / threshold (largest over the layer's rules)")
            .label_style(font(11.0))
            .axis_desc_style(font(11.0))
            .draw()
            .map_err(|e| err(&e))?;
        let pieces = 100;
        scale
            .draw_series((0..pieces).map(|k| {
                let (a, b) = (TOP_X * k / pieces, TOP_X * (k + 1) / pieces);
                Rectangle::new([(a, 0), (b, 100)], ratio_colour((a + b) as f64 / 2.0 * SCALE_TOP / TOP_X as f64).filled())
            }))
            .map_err(|e| err(&e))?;
        scale.draw_series([PathElement::new(vec![(TOP_X / 2, -15), (TOP_X / 2, 115)], BLACK.stroke_width(2))]).map_err(|e| err(&e))?;
        let legend = legend_area.margin(6, 0, 10, 0);
        let text = |s: &str, at: (i32, i32)| Text::new(s.to_string(), at, font(11.0));
        legend.draw(&Rectangle::new([(0, 0), (16, 14)], NO_DATA.filled())).map_err(|e| err(&e))?;
        legend.draw(&text("no rule covers the layer, or nothing logged yet", (22, 2))).map_err(|e| err(&e))?;
        legend.draw(&Rectangle::new([(0, 22), (16, 36)], REFUSAL.filled())).map_err(|e| err(&e))?;
        legend.draw(&PathElement::new(vec![(30, 22), (44, 36)], REFUSAL.stroke_width(2))).map_err(|e| err(&e))?;
        legend.draw(&PathElement::new(vec![(30, 36), (44, 22)], REFUSAL.stroke_width(2))).map_err(|e| err(&e))?;
        legend.draw(&text("blocked or refused: the whole release (top row), the layer (X)", (50, 24))).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_page::series::Decision;

    fn layer(name: &str, metrics: &[(&str, &[(u64, f64)])], thresholds: &[(&str, &[(u64, f64)])]) -> LayerHistory {
        LayerHistory {
            name: name.into(),
            metrics: metrics.iter().map(|(m, p)| (m.to_string(), p.to_vec())).collect(),
            thresholds: thresholds.iter().map(|(m, p)| (m.to_string(), p.to_vec())).collect(),
            ..LayerHistory::default()
        }
    }

    fn decision(step: u64, outcome: Outcome, metric: Option<(&str, f64)>, reason: &str) -> Decision {
        Decision {
            step,
            outcome,
            metric: metric.map(|m| m.0.into()),
            value: metric.map(|m| m.1),
            refusal: outcome == Outcome::Blocked || reason.starts_with("refused"),
            text: format!("step {step}: {outcome} {reason}"),
        }
    }

    fn run(layers: Vec<LayerHistory>, global: Vec<Decision>, last_step: u64) -> RunHistory {
        RunHistory { layers, global, first_step: 0, last_step, runs: 1, policy_hash: None }
    }

    #[test]
    fn cells_hold_the_largest_ratio_in_force_and_bins_take_their_maximum() {
        let a = layer(
            "a",
            &[("sensitivity", &[(0, 0.05), (10, 0.2)]), ("subspace_separation", &[(0, 0.3)]), ("sensitivity_rms", &[(0, 99.0)])],
            &[("sensitivity", &[(0, 0.1)]), ("subspace_separation", &[(5, 1.0)])],
        );
        let b = layer("b", &[("sensitivity", &[(0, 1.0)])], &[]);
        let o = overview(&run(vec![a, b], vec![], 19));
        assert_eq!((o.bin, o.columns()), (1, 20));
        let cells = &o.rows[0].cells;
        // 0.05 / 0.1 until step 5, where subspace 0.3 / 1.0 joins (0.5 still the larger), 2.0
        // from step 10 on. sensitivity_rms has no rule: it does not count.
        assert_eq!(cells[0], Some(0.5));
        assert_eq!(cells[9], Some(0.5));
        assert_eq!(cells[10], Some(2.0));
        assert_eq!(cells[19], Some(2.0));
        assert_eq!(o.rows[0].metrics, ["sensitivity", "subspace_separation"]);
        assert!(o.rows[1].cells.iter().all(Option::is_none) && o.rows[1].metrics.is_empty(), "no rule, no ratio");

        // 1000 steps: 5 steps per column; a short spike shows in its column.
        let spike = layer("a", &[("sensitivity", &[(0, 0.01), (502, 0.5), (503, 0.01)])], &[("sensitivity", &[(0, 0.1)])]);
        let o = overview(&run(vec![spike], vec![], 999));
        assert_eq!((o.bin, o.columns()), (5, 200));
        assert_eq!(o.rows[0].cells[100], Some(5.0));
        assert!((o.rows[0].cells[99].unwrap() - 0.1).abs() < 1e-12 && (o.rows[0].cells[101].unwrap() - 0.1).abs() < 1e-12);
    }

    #[test]
    fn a_threshold_first_logged_at_a_checkpoint_holds_from_its_policy_on() {
        let a = layer("a", &[("sensitivity", &[(5, 0.05)])], &[("sensitivity", &[(19, 0.1)])]);
        let o = overview(&run(vec![a], vec![], 29));
        assert_eq!(o.rows[0].cells[4], None, "no value before the estimate of step 5");
        assert_eq!(o.rows[0].cells[5], Some(0.5));
        // A policy loaded at step 8: its threshold, first logged at 19, holds from 8 on.
        let b = layer("b", &[("sensitivity", &[(5, 0.05)])], &[("sensitivity", &[(19, 0.1)])]);
        let o = overview(&run(vec![b], vec![decision(8, Outcome::PolicyLoaded, None, "")], 29));
        assert_eq!((o.rows[0].cells[7], o.rows[0].cells[8]), (None, Some(0.5)));
    }

    #[test]
    fn decision_values_count_and_odd_values_are_handled() {
        let mut a = layer("a", &[], &[("sensitivity", &[(0, 0.1)]), ("reconstruction_bound_bits", &[(0, 0.0)])]);
        a.decisions.push(decision(3, Outcome::Escalated, Some(("sensitivity", 0.15)), ""));
        a.decisions.push(decision(6, Outcome::Protected, Some(("sensitivity", f64::NAN)), ""));
        a.decisions.push(decision(8, Outcome::Protected, Some(("reconstruction_bound_bits", f64::INFINITY)), ""));
        let o = overview(&run(vec![a], vec![], 9));
        let cells = &o.rows[0].cells;
        assert_eq!(cells[2], None, "no value before step 3");
        assert!((cells[3].unwrap() - 1.5).abs() < 1e-12);
        assert!((cells[7].unwrap() - 1.5).abs() < 1e-12, "a NaN does not replace the value in force");
        assert_eq!(cells[8], Some(f64::INFINITY), "above a zero threshold");
    }

    #[test]
    fn blocks_and_refusals_are_marked_where_they_happened() {
        let mut a = layer("a", &[("sensitivity", &[(0, 0.01)])], &[("sensitivity", &[(0, 0.1)])]);
        a.decisions.push(decision(7, Outcome::Blocked, Some(("sensitivity", 0.3)), "ladder exhausted"));
        a.decisions.push(decision(9, Outcome::Escalated, None, ""));
        let b = layer("b", &[], &[]);
        let global = vec![decision(4, Outcome::Blocked, None, "stale estimate"), decision(5, Outcome::PolicyRejected, None, "refused: bad file"), decision(6, Outcome::PolicyRejected, None, "not refused")];
        let o = overview(&run(vec![a, b], global, 11));
        let at = |v: &[bool]| v.iter().enumerate().filter(|(_, b)| **b).map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(at(&o.rows[0].refused), [7]);
        assert_eq!(at(&o.rows[1].refused), Vec::<usize>::new());
        assert_eq!(at(&o.refused), [4, 5, 7]);
        assert_eq!(o.refusals.iter().map(|r| r.0).collect::<Vec<_>>(), [4, 5, 7]);
    }

    #[test]
    fn the_svg_has_a_row_per_layer_the_marker_row_and_the_scale() {
        let mut a = layer("conv<1>", &[("sensitivity", &[(0, 0.05), (50, 0.12)])], &[("sensitivity", &[(0, 0.1)])]);
        a.decisions.push(decision(60, Outcome::Blocked, None, ""));
        let b = layer("fc", &[], &[]);
        let o = overview(&run(vec![a, b], vec![], 99));
        let svg = svg(&o, 1000).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">conv&lt;1&gt;<") || svg.contains(">\nconv&lt;1&gt;\n<"), "the layer's label, escaped");
        assert!(svg.contains("fc (no rule)"));
        assert!(svg.contains(MARKER_ROW));
        assert!(svg.contains("1 = threshold"));
        assert!(svg.contains("\u{2265} 2"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn colours_part_at_the_threshold() {
        assert_eq!(ratio_colour(-1.0), ratio_colour(0.0));
        assert_eq!(ratio_colour(5.0), ratio_colour(SCALE_TOP));
        assert_eq!(ratio_colour(f64::INFINITY), ratio_colour(SCALE_TOP));
        let (below, at) = (ratio_colour(0.999), ratio_colour(1.0));
        assert!(below.2 > below.0 && at.0 > at.2, "blue below, orange at: {below:?} {at:?}");
    }
}
