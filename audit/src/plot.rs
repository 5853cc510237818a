//! SVG plots (plotters, SVG backend: text is SVG <text>, readable in any SVG viewer): per-layer
//! bars of every metric, and grids of line plots for the validation study's sweeps.
use crate::error::{AuditError, Result};
use crate::report::LayerRow;
use std::path::Path;

const PALETTE: [plotters::style::RGBColor; 8] = [
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(255, 127, 14),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(148, 103, 189),
    plotters::style::RGBColor(140, 86, 75),
    plotters::style::RGBColor(227, 119, 194),
    plotters::style::RGBColor(127, 127, 127),
];

fn plot_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> AuditError + '_ {
    move |e| AuditError::Plot { path: path.to_path_buf(), why: e.to_string() }
}

/// Draws one panel per metric, one bar per layer in model order; an absent value is marked
/// "absent".
pub fn bar_panels_svg(path: &Path, title: &str, rows: &[LayerRow]) -> Result<()> {
    use plotters::prelude::*;
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    let metrics: Vec<(&str, Vec<Option<f64>>)> = match rows.first() {
        None => vec![],
        Some(first) => first.plotted().iter().enumerate().map(|(k, (name, _))| (*name, rows.iter().map(|r| r.plotted()[k].1).collect())).collect(),
    };
    let cols = 3;
    let panel_rows = metrics.len().div_ceil(cols).max(1);
    let err = plot_err(path);
    let root = SVGBackend::new(path, (1200, 60 + 300 * panel_rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(&err)?;
    let panels = root.split_evenly((panel_rows, cols));
    let n = names.len();
    for (panel, (metric, values)) in panels.iter().zip(&metrics) {
        let finite: Vec<f64> = values.iter().flatten().copied().filter(|v| v.is_finite()).collect();
        let lo = finite.iter().copied().fold(0.0f64, f64::min);
        let hi = finite.iter().copied().fold(0.0f64, f64::max);
        let (lo, hi) = if hi - lo > 0.0 { (lo - 0.05 * (hi - lo).abs() * (lo < 0.0) as i32 as f64, hi * 1.12 + 1e-300) } else { (0.0, 1.0) };
        let mut chart = ChartBuilder::on(panel)
            .caption(*metric, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), lo..hi)
            .map_err(&err)?;
        let names_ref = &names;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.max(1))
            .x_label_formatter(&|v: &f64| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names_ref.len() {
                    names_ref[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v: &f64| short(*v))
            .light_line_style(WHITE)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(&err)?;
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(v) if v.is_finite() => {
                    let color = PALETTE[i % PALETTE.len()];
                    chart
                        .draw_series(std::iter::once(Rectangle::new([(i as f64 - 0.35, 0.0), (i as f64 + 0.35, *v)], color.filled())))
                        .map_err(&err)?;
                    chart
                        .draw_series(std::iter::once(Text::new(short(*v), (i as f64 - 0.3, v.max(0.0) + 0.04 * (hi - lo)), ("sans-serif", 11))))
                        .map_err(&err)?;
                }
                _ => {
                    chart
                        .draw_series(std::iter::once(Text::new("absent", (i as f64 - 0.25, lo + 0.05 * (hi - lo)), ("sans-serif", 12).into_font().color(&RED))))
                        .map_err(&err)?;
                }
            }
        }
    }
    root.present().map_err(&err)?;
    Ok(())
}

/// A compact number for axis and bar labels.
fn short(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e4 || v.abs() < 1e-2 {
        format!("{v:.1e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// One panel of a [`line_panels_svg`] figure.
#[derive(Clone, Debug)]
pub struct Panel {
    /// The panel's caption.
    pub title: String,
    /// A logarithmic y axis.
    pub log_y: bool,
    /// One line per series: (legend label, points).
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Draws a grid of line plots sharing an x axis (log when `log_x`); non-positive values are
/// dropped from a log axis, non-finite ones always.
pub fn line_panels_svg(path: &Path, title: &str, x_label: &str, panels: &[Panel], log_x: bool) -> Result<()> {
    use plotters::prelude::*;
    let err = plot_err(path);
    let cols = 3usize.min(panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let root = SVGBackend::new(path, (420 * cols as u32, 60 + 340 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(&err)?;
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(panels) {
        let log_y = panel.log_y;
        let keep = |(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0) && (!log_y || *y > 0.0);
        let series: Vec<(String, Vec<(f64, f64)>)> = panel.series.iter().map(|(l, p)| (l.clone(), p.iter().copied().filter(keep).collect())).collect();
        let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
        let (mut x0, mut x1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
        let (mut y0, mut y1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| (a.min(*y), b.max(*y)));
        if !x0.is_finite() {
            (x0, x1, y0, y1) = (1.0, 2.0, 1.0, 2.0);
        }
        if x1 <= x0 {
            x1 = x0 * 2.0 + 1.0;
        }
        if log_y {
            if y1 <= y0 {
                y1 = y0 * 10.0;
            }
            y0 /= 1.5;
            y1 *= 1.5;
        } else {
            let pad = if y1 > y0 { 0.08 * (y1 - y0) } else { 0.5 * y0.abs().max(1e-3) };
            y0 = if y0 >= 0.0 && y0 - pad < 0.0 { 0.0 } else { y0 - pad };
            y1 += pad;
        }
        let mut builder = ChartBuilder::on(area);
        builder.caption(&panel.title, ("sans-serif", 15)).margin(10).x_label_area_size(38).y_label_area_size(62);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .x_label_formatter(&|v| short(*v))
                    .y_label_formatter(&|v| short(*v))
                    .light_line_style(WHITE)
                    .label_style(("sans-serif", 11))
                    .draw()
                    .map_err(&err)?;
                for (k, (label, points)) in series.iter().enumerate() {
                    let color = PALETTE[k % PALETTE.len()];
                    chart
                        .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                        .map_err(&err)?
                        .label(label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
                    chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(&err)?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 11))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(&err)?;
            }};
        }
        // On a log x axis, ticks at the data's own x values (plotters' default log ticks crowd).
        let mut ticks: Vec<f64> = all.iter().map(|p| p.0).collect();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        match (log_x, log_y) {
            (false, false) => draw!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(&err)?),
            (true, false) => draw!(builder.build_cartesian_2d((x0 / 1.1..x1 * 1.1).log_scale().with_key_points(ticks), y0..y1).map_err(&err)?),
            (false, true) => draw!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(&err)?),
            (true, true) => draw!(builder.build_cartesian_2d((x0 / 1.1..x1 * 1.1).log_scale().with_key_points(ticks), (y0..y1).log_scale()).map_err(&err)?),
        }
    }
    root.present().map_err(&err)?;
    Ok(())
}
