//! Axis ranges and tick labels for the run page's charts: a range that always has room (a
//! constant series gets +-10% around its value, an all-zero or empty one [0, 1]), ticks at
//! round steps (1, 2, 2.5 or 5 times a power of ten), and labels with as many digits as it
//! takes for each to differ from the next. Non-finite values are left out.

/// A chart axis: the range drawn and its ticks, each with its label.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub ticks: Vec<f64>,
    pub labels: Vec<String>,
}

/// The axis of `values` (non-finite ones skipped), with at most `max_ticks` ticks (at least 2).
pub(crate) fn axis(values: impl IntoIterator<Item = f64>, max_ticks: usize) -> Axis {
    let (lo, hi) = values.into_iter().filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    axis_between(lo, hi, max_ticks, 0.0)
}

/// The axis of the steps `first ..= last`: whole-number ticks.
pub(crate) fn step_axis(first: u64, last: u64, max_ticks: usize) -> Axis {
    let (lo, hi) = (first as f64, last.max(first + 1) as f64);
    axis_between(lo, hi, max_ticks, 1.0)
}

/// The axis over `[lo, hi]` (infinite bounds: nothing to show), ticks at least `min_step` apart.
fn axis_between(mut lo: f64, mut hi: f64, max_ticks: usize, min_step: f64) -> Axis {
    let max_ticks = max_ticks.max(2);
    if !(lo.is_finite() && hi.is_finite()) {
        (lo, hi) = (0.0, 1.0);
    }
    let magnitude = lo.abs().max(hi.abs());
    // Constant, or varying below what a double can tick (a relative 1e-12): +-10% around it.
    if hi - lo <= magnitude * 1e-12 {
        if magnitude == 0.0 {
            (lo, hi) = (0.0, 1.0);
        } else {
            (lo, hi) = (lo - 0.1 * magnitude, hi + 0.1 * magnitude);
        }
    }
    let mut step = nice_at_least(((hi - lo) / (max_ticks - 1) as f64).max(min_step));
    let (first, last) = loop {
        // (A bound a rounding error off a tick counts as on it.)
        let (first, last) = ((lo / step + 1e-9).floor(), (hi / step - 1e-9).ceil());
        if last - first < max_ticks as f64 {
            break (first, last);
        }
        step = nice_at_least(step * 1.000_001);
    };
    let ticks: Vec<f64> = (0..=(last - first) as i64).map(|k| clean((first + k as f64) * step)).collect();
    let labels = labels(&ticks, step);
    Axis { lo: ticks[0], hi: *ticks.last().unwrap_or(&hi), ticks, labels }
}

/// The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `raw` (> 0).
fn nice_at_least(raw: f64) -> f64 {
    let raw = if raw > 0.0 && raw.is_finite() { raw } else { 1.0 };
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * power).find(|s| *s >= raw * (1.0 - 1e-12)).unwrap_or(10.0 * power)
}

/// `v` without a negative zero.
fn clean(v: f64) -> f64 {
    if v == 0.0 { 0.0 } else { v }
}

/// Labels for ticks `step` apart: fixed-point for ordinary magnitudes, scientific for very
/// large or small ones, with the fewest digits that keep every label within a hundredth of a
/// step of its tick (so no two labels are equal).
fn labels(ticks: &[f64], step: f64) -> Vec<String> {
    let largest = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    let scientific = largest >= 1e5 || (largest > 0.0 && largest < 1e-3);
    let close = |text: &str, t: f64| text.parse::<f64>().is_ok_and(|p| (p - t).abs() <= step * 0.01);
    for digits in 0..=17usize {
        let out: Vec<String> = ticks.iter().map(|&t| format_tick(t, digits, scientific)).collect();
        if out.iter().zip(ticks).all(|(s, &t)| close(s, t)) {
            return out;
        }
    }
    ticks.iter().map(|t| format!("{t:e}")).collect()
}

fn format_tick(t: f64, digits: usize, scientific: bool) -> String {
    if t == 0.0 {
        "0".into()
    } else if scientific {
        format!("{t:.digits$e}")
    } else {
        format!("{t:.digits$}")
    }
}

/// A compact number for captions and scale labels: 4 significant digits, no trailing zeros.
pub(crate) fn short(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() { "NaN".into() } else if v > 0.0 { "+Inf".into() } else { "-Inf".into() };
    }
    if v == 0.0 {
        return "0".into();
    }
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        let text = format!("{v:.3e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        return format!("{}e{exponent}", trim(mantissa.to_string()));
    }
    let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
    trim(format!("{v:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distinct(a: &Axis) -> bool {
        let mut l = a.labels.clone();
        l.sort();
        l.dedup();
        l.len() == a.labels.len()
    }

    fn check(a: &Axis, values: &[f64]) {
        assert!(a.ticks.len() >= 2, "{a:?}");
        assert!(distinct(a), "labels repeat: {a:?}");
        assert!(a.lo < a.hi, "{a:?}");
        assert_eq!((a.ticks[0], *a.ticks.last().unwrap()), (a.lo, a.hi));
        let slack = (a.hi - a.lo) * 1e-9;
        for v in values.iter().filter(|v| v.is_finite()) {
            assert!(a.lo - slack <= *v && *v <= a.hi + slack, "{v} outside {a:?}");
        }
        for (t, l) in a.ticks.iter().zip(&a.labels) {
            let p: f64 = l.parse().unwrap();
            assert!((p - t).abs() <= (a.hi - a.lo) * 0.01, "label {l} for tick {t}");
        }
    }

    #[test]
    fn a_constant_series_gets_room_and_different_labels() {
        let a = axis([0.05, 0.05, 0.05], 5);
        check(&a, &[0.05]);
        assert!(a.lo >= 0.04 && a.hi <= 0.06, "about +-10%: {a:?}");
        assert_eq!(a.labels, ["0.0450", "0.0475", "0.0500", "0.0525", "0.0550"]);
        let b = axis([-3.0; 4], 4);
        check(&b, &[-3.0]);
        assert!(b.hi < 0.0 && b.lo >= -3.5, "{b:?}");
        let c = axis([1234567.0], 4);
        check(&c, &[1234567.0]);
        assert!(c.labels.iter().all(|l| l.contains('e')), "{c:?}");
    }

    #[test]
    fn an_all_zero_or_empty_series_is_drawn_on_zero_to_one() {
        for values in [&[0.0, 0.0, -0.0][..], &[], &[f64::NAN, f64::INFINITY, f64::NEG_INFINITY]] {
            let a = axis(values.iter().copied(), 5);
            check(&a, values);
            assert_eq!((a.lo, a.hi), (0.0, 1.0), "{values:?}");
            assert_eq!(a.labels.first().map(String::as_str), Some("0"));
            assert_eq!(a.labels.last().map(String::as_str), Some("1.00"));
        }
    }

    #[test]
    fn tiny_ranges_get_enough_digits() {
        let values = [0.05, 0.050_001, 0.050_002];
        let a = axis(values, 5);
        check(&a, &values);
        assert!(a.hi - a.lo < 1e-5, "the range follows the data: {a:?}");
        let values = [1.0, 1.0 + 1e-9];
        let a = axis(values, 4);
        check(&a, &values);
        let values = [3e-9, 4e-9];
        let a = axis(values, 5);
        check(&a, &values);
        assert!(a.labels.iter().all(|l| l == "0" || l.contains('e')), "{a:?}");
        // Below a relative 1e-12 a series is constant for the chart.
        let a = axis([1e6, 1e6 + 1e-9], 5);
        check(&a, &[1e6]);
    }

    #[test]
    fn negative_and_mixed_ranges_and_non_finite_values() {
        let values = [-0.08, 0.05, f64::NAN, f64::INFINITY];
        let a = axis(values, 5);
        check(&a, &values);
        assert!(a.ticks.contains(&0.0) && a.labels.contains(&"0".to_string()), "{a:?}");
        assert!(!a.labels.iter().any(|l| l == "-0" || l.starts_with("-0.0") && l.trim_start_matches(['-', '0', '.']).is_empty()), "{a:?}");
        let values = [-250.0, -120.0];
        let a = axis(values, 4);
        check(&a, &values);
        assert!(a.ticks.len() <= 4, "{a:?}");
    }

    #[test]
    fn tick_counts_stay_within_the_maximum_at_round_steps() {
        for (lo, hi) in [(0.0, 1.0), (0.013, 0.087), (-7.0, 1234.0), (0.1, 0.100_7), (2.0, 2.5)] {
            for max in 2..8 {
                let a = axis([lo, hi], max);
                check(&a, &[lo, hi]);
                assert!(a.ticks.len() <= max, "{lo} {hi} max {max}: {a:?}");
            }
        }
        let a = axis([0.0, 1.0], 5);
        assert_eq!(a.labels, ["0", "0.25", "0.50", "0.75", "1.00"]);
    }

    #[test]
    fn step_axes_tick_whole_steps() {
        let a = step_axis(0, 0, 5);
        assert_eq!((a.lo, a.hi), (0.0, 1.0));
        assert_eq!(a.labels, ["0", "1"]);
        let a = step_axis(0, 299, 6);
        assert!(a.ticks.iter().all(|t| t.fract() == 0.0) && a.hi >= 299.0 && a.ticks.len() <= 6, "{a:?}");
        assert!(a.labels.iter().all(|l| !l.contains('.')), "{a:?}");
        let a = step_axis(10, 13, 8);
        assert_eq!(a.labels, ["10", "11", "12", "13"]);
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(0.05), "0.05");
        assert_eq!(short(0.09), "0.09");
        assert_eq!(short(2.0), "2");
        assert_eq!(short(1200.0), "1200");
        assert_eq!(short(12.3456), "12.35");
        assert_eq!(short(f64::INFINITY), "+Inf");
        assert_eq!(short(1.5e-7), "1.5e-7");
        assert_eq!(short(-2.5e6), "-2.5e6");
        assert_eq!(short(0.0), "0");
    }
}
