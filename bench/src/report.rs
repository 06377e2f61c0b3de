//! The run's results: JSON file, final table, `.hgrm` files, SVG plot, and
//! the side-by-side comparison of two JSON files.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde_json::Value;

use crate::latency::{Latency, Summary};

/// One second of a p2p run, merged over workers.
#[derive(Clone, Debug, Default)]
pub struct Second {
    pub second: u64,
    pub delivered: u64,
    pub deliver: Latency,
}

pub fn summary_json(s: &Summary) -> Value {
    serde_json::to_value(s).expect("summaries serialize")
}

pub fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

pub fn write_hgrm(dir: &Path, histograms: &[(&str, &Latency)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, latency) in histograms {
        if latency.count() == 0 {
            continue;
        }
        let path = dir.join(format!("{name}.hgrm"));
        std::fs::write(&path, latency.hgrm())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn lookup<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut v = value;
    for key in path {
        v = v.get(key)?;
    }
    Some(v)
}

fn number(value: &Value, path: &[&str]) -> Option<f64> {
    lookup(value, path)?.as_f64()
}

/// Whether the flag at `path` is set.
fn flag(value: &Value, path: &[&str]) -> bool {
    lookup(value, path).and_then(Value::as_bool) == Some(true)
}

/// The flags that say a result measured the harness, not (only) the server.
const HARNESS_BOUND_FLAGS: &[&[&str]] = &[&["cpu", "harness_bound"], &["rate_max_harness_bound"]];

/// The rows of the final table: label and JSON path.
const ROWS: &[(&str, &[&str])] = &[
    ("connections", &["connections"]),
    ("duration s", &["duration_s"]),
    ("sessions/s", &["rates", "sessions_per_s"]),
    ("offered msg/s", &["rates", "offered_msgs_per_s"]),
    ("sent msg/s", &["rates", "sent_msgs_per_s"]),
    ("delivered msg/s", &["rates", "delivered_msgs_per_s"]),
    (
        "fan-out deliveries/s",
        &["rates", "fanout_deliveries_per_s"],
    ),
    (
        "deliveries/s per core",
        &["rates", "deliveries_per_server_core_s"],
    ),
    ("missing deliveries", &["messages", "missing"]),
    ("drain msg/s", &["rates", "drain_msgs_per_s"]),
    ("harness CPU (busiest)", &["cpu", "harness_busiest_cores"]),
    ("harness CPU (sum)", &["cpu", "harness_sum_cores"]),
    ("harness-bound", HARNESS_BOUND_FLAGS[0]),
    ("rate max harness-bound", HARNESS_BOUND_FLAGS[1]),
    ("server CPU cores", &["cpu", "server_cores"]),
    ("server CPU us/msg", &["cpu", "server_us_per_msg"]),
    (
        "server CPU us/group msg",
        &["cpu", "server_us_per_group_msg"],
    ),
    ("server RSS bytes", &["server", "rss_bytes"]),
    ("server RSS B/conn", &["server", "rss_bytes_per_conn"]),
    ("server PSS B/conn", &["server", "pss_bytes_per_conn"]),
    ("sockstat B/conn", &["kernel", "sockstat_bytes_per_conn"]),
    ("slab B/conn", &["kernel", "slab_bytes_per_conn"]),
    ("ack p50 us", &["latency_us", "ack", "p50"]),
    ("ack p99 us", &["latency_us", "ack", "p99"]),
    ("deliver p50 us", &["latency_us", "deliver", "p50"]),
    ("deliver p99 us", &["latency_us", "deliver", "p99"]),
    ("deliver p99.9 us", &["latency_us", "deliver", "p999"]),
    ("deliver max us", &["latency_us", "deliver", "max"]),
    ("receipt p50 us", &["latency_us", "receipt", "p50"]),
    ("receipt p99 us", &["latency_us", "receipt", "p99"]),
    ("harness lag p99 us", &["latency_us", "send_lag", "p99"]),
    ("harness lag max us", &["latency_us", "send_lag", "max"]),
    ("reconnect p99 us", &["latency_us", "reconnect", "p99"]),
];

fn cell(value: &Value, path: &[&str]) -> String {
    if let Some(set) = lookup(value, path).and_then(Value::as_bool) {
        return if set { "yes" } else { "no" }.to_string();
    }
    match number(value, path) {
        Some(x) if x.fract() == 0.0 => format!("{}", x as i64),
        Some(x) if x.abs() < 10.0 => format!("{x:.3}"),
        Some(x) => format!("{x:.1}"),
        None => "-".to_string(),
    }
}

/// The final table of one run.
pub fn table(value: &Value) -> String {
    let mut out = format!(
        "{} against {}\n",
        value["scenario"].as_str().unwrap_or("?"),
        value["target"].as_str().unwrap_or("?")
    );
    for (label, path) in ROWS {
        let mut text = cell(value, path);
        let empty_receipt = path.contains(&"receipt") && text == "0";
        if HARNESS_BOUND_FLAGS.contains(path) && flag(value, path) {
            text.push_str(" *");
        }
        if text != "-" && !empty_receipt {
            out.push_str(&format!("  {label:<22} {text:>14}\n"));
        }
    }
    if HARNESS_BOUND_FLAGS.iter().any(|path| flag(value, path)) {
        out.push_str(&format!(
            "  * a harness thread was at least {:.0} % of a core busy: the rates are the \
             harness's limit as much as the server's (a lower bound of the server's)\n",
            crate::cpu::HARNESS_BOUND_CORES * 100.0
        ));
    }
    out
}

/// Two runs side by side (e.g. Switchboard and mosquitto).
pub fn compare(a: &Value, b: &Value) -> String {
    let name = |v: &Value| {
        format!(
            "{} {}",
            v["scenario"].as_str().unwrap_or("?"),
            v["target"].as_str().unwrap_or("?")
        )
    };
    let (na, nb) = (name(a), name(b));
    let width = na.len().max(nb.len()).max(14);
    let mut out = format!("{:<22} {na:>width$} {nb:>width$}   ratio\n", "");
    for (label, path) in ROWS {
        let shown = |v: &Value| {
            let text = cell(v, path);
            if path.contains(&"receipt") && text == "0" {
                "-".to_string()
            } else {
                text
            }
        };
        let (x, y) = (shown(a), shown(b));
        if x == "-" && y == "-" {
            continue;
        }
        let ratio = match (number(a, path), number(b, path)) {
            (Some(x), Some(y)) if y != 0.0 && x != 0.0 => format!("{:.2}", x / y),
            _ => "-".to_string(),
        };
        out.push_str(&format!("{label:<22} {x:>width$} {y:>width$}   {ratio}\n"));
    }
    out
}

/// Delivered rate and deliver latency percentiles per second, as SVG.
pub fn plot(path: &Path, title: &str, seconds: &[Second]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (960, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(360);
    let x_max = seconds.iter().map(|s| s.second + 1).max().unwrap_or(1);
    let rate_max = seconds
        .iter()
        .map(|s| s.delivered)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut chart = ChartBuilder::on(&upper)
        .caption(
            format!("{title}: delivered messages per second"),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0u64..x_max, 0f64..rate_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("second")
        .y_desc("msg/s")
        .draw()?;
    chart.draw_series(LineSeries::new(
        seconds.iter().map(|s| (s.second, s.delivered as f64)),
        &BLUE,
    ))?;
    let latency_max = seconds
        .iter()
        .map(|s| s.deliver.summary().p99)
        .max()
        .unwrap_or(1)
        .max(1) as f64
        / 1000.0;
    let mut chart = ChartBuilder::on(&lower)
        .caption(
            "deliver latency from scheduled send (ms)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0u64..x_max, 0f64..latency_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("second")
        .y_desc("ms")
        .draw()?;
    for (label, color, quantile) in [("p50", GREEN, 0.5), ("p90", BLUE, 0.9), ("p99", RED, 0.99)] {
        chart
            .draw_series(LineSeries::new(
                seconds.iter().filter(|s| s.deliver.count() > 0).map(|s| {
                    (
                        s.second,
                        s.deliver.histogram.value_at_quantile(quantile) as f64 / 1000.0,
                    )
                }),
                &color,
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

/// One offered rate's deliver latency, for [`curve`].
#[derive(Clone, Debug, PartialEq)]
pub struct CurvePoint {
    pub rate: f64,
    /// Microseconds; `None` where the report did not record it.
    pub p50_us: Option<f64>,
    pub p99_us: f64,
    /// The harness's busiest thread was at least 0.90 busy at this rate.
    pub harness_bound: bool,
}

/// The points a JSON report holds: every step of a `--rate max` search
/// (`search`), or else the run's one offered rate. Sorted by rate.
pub fn curve_points(report: &Value) -> Vec<CurvePoint> {
    let mut points: Vec<CurvePoint> = match report["search"].as_array() {
        Some(steps) => steps
            .iter()
            .filter_map(|step| {
                Some(CurvePoint {
                    rate: step["rate"].as_f64()?,
                    p50_us: step["deliver_p50_us"].as_f64(),
                    p99_us: step["deliver_p99_us"].as_f64()?,
                    harness_bound: step["cpu"]["harness_bound"] == true,
                })
            })
            .collect(),
        None => (|| {
            let deliver = &report["latency_us"]["deliver"];
            Some(CurvePoint {
                rate: report["rates"]["offered_msgs_per_s"].as_f64()?,
                p50_us: deliver["p50"].as_f64(),
                p99_us: deliver["p99"].as_f64()?,
                harness_bound: report["cpu"]["harness_bound"] == true,
            })
        })()
        .into_iter()
        .collect(),
    };
    points.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    points
}

/// The points of each series as text, one line per point.
pub fn curve_table(series: &[(String, Vec<CurvePoint>)]) -> String {
    let mut out = format!(
        "{:<24} {:>10} {:>12} {:>12}\n",
        "series", "msg/s", "p50 ms", "p99 ms"
    );
    for (label, points) in series {
        for p in points {
            let p50 = p
                .p50_us
                .map_or("-".to_string(), |v| format!("{:.2}", v / 1000.0));
            out.push_str(&format!(
                "{label:<24} {:>10.0} {p50:>12} {:>12.2}  {}\n",
                p.rate,
                p.p99_us / 1000.0,
                if p.harness_bound { "yes" } else { "no" }
            ));
        }
    }
    out
}

/// The runs of one rate in a series: lowest, median and highest value.
#[derive(Debug, PartialEq)]
struct Spread {
    rate: f64,
    low: f64,
    median: f64,
    high: f64,
}

/// `value` of `points` (sorted by rate) gathered per rate; points without
/// a value are left out.
fn spread_by_rate(
    points: &[CurvePoint],
    value: impl Fn(&CurvePoint) -> Option<f64>,
) -> Vec<Spread> {
    let mut spreads = Vec::new();
    let mut rest = points;
    while let Some(first) = rest.first() {
        let same = rest.iter().take_while(|p| p.rate == first.rate).count();
        let mut values: Vec<f64> = rest[..same].iter().filter_map(&value).collect();
        rest = &rest[same..];
        values.sort_by(f64::total_cmp);
        let (Some(&low), Some(&high)) = (values.first(), values.last()) else {
            continue;
        };
        let n = values.len();
        let median = (values[(n - 1) / 2] + values[n / 2]) / 2.0;
        spreads.push(Spread {
            rate: first.rate,
            low,
            median,
            high,
        });
    }
    spreads
}

/// Deliver p50 (thin) and p99 (thick) against offered rate, one colour per
/// series, latency on a log scale, as SVG. Where a series measured a rate
/// more than once the line goes through the runs' median, and a vertical
/// stroke spans the lowest to the highest run.
pub fn curve(path: &Path, series: &[(String, Vec<CurvePoint>)]) -> anyhow::Result<()> {
    let all = || series.iter().flat_map(|(_, points)| points.iter());
    anyhow::ensure!(all().next().is_some(), "no points to draw");
    let rate_max = all().map(|p| p.rate).fold(1.0, f64::max);
    let latency_ms = |us: f64| (us / 1000.0).max(0.01);
    let ms_max = all().map(|p| latency_ms(p.p99_us)).fold(0.01, f64::max);
    let ms_min = all()
        .flat_map(|p| [p.p50_us, Some(p.p99_us)].into_iter().flatten())
        .map(latency_ms)
        .fold(ms_max, f64::min);
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "deliver latency against offered rate (p50 thin, p99 thick)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            0f64..rate_max * 1.05,
            (ms_min * 0.8..ms_max * 1.25).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("offered msg/s")
        .y_desc("ms")
        .x_label_formatter(&|rate| format!("{rate:.0}"))
        .y_label_formatter(&|ms| format!("{ms}"))
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (label, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let p99: fn(&CurvePoint) -> Option<f64> = |p| Some(p.p99_us);
        let p50: fn(&CurvePoint) -> Option<f64> = |p| p.p50_us;
        for (name, width, value) in [("p99", 3, p99), ("p50", 1, p50)] {
            let spreads = spread_by_rate(points, |p| value(p).map(latency_ms));
            let style = color.stroke_width(width);
            chart
                .draw_series(LineSeries::new(
                    spreads.iter().map(|s| (s.rate, s.median)),
                    style,
                ))?
                .label(format!("{label} {name}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(
                spreads
                    .iter()
                    .filter(|s| s.high > s.low)
                    .map(|s| PathElement::new(vec![(s.rate, s.low), (s.rate, s.high)], style)),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compare_shows_both_runs_and_ratio() {
        let a = json!({"scenario": "p2p", "target": "switchboard://x", "rates": {"delivered_msgs_per_s": 200.0}});
        let b = json!({"scenario": "p2p", "target": "mqtt://y", "rates": {"delivered_msgs_per_s": 100.0}});
        let text = compare(&a, &b);
        assert!(text.contains("delivered msg/s"));
        assert!(text.contains("2.00"), "{text}");
    }

    fn p2p_with_cpu(harness_bound: bool) -> Value {
        json!({"scenario": "p2p", "target": "switchboard://x",
            "rates": {"delivered_msgs_per_s": 20000.0},
            "cpu": {"span_s": 5.0, "harness_busiest_cores": if harness_bound { 0.97 } else { 0.42 },
                "harness_sum_cores": 1.1, "server_cores": 0.8, "server_us_per_msg": 40.25,
                "harness_bound": harness_bound}})
    }

    /// The value of the table row `label`, if the row is there.
    fn row<'a>(text: &'a str, label: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|line| line.trim_start().strip_prefix(label))
            .filter(|rest| rest.starts_with(' '))
            .map(str::trim)
    }

    #[test]
    fn table_shows_cpu_rows() {
        let text = table(&p2p_with_cpu(false));
        assert_eq!(row(&text, "harness CPU (busiest)"), Some("0.420"), "{text}");
        assert_eq!(row(&text, "harness CPU (sum)"), Some("1.100"), "{text}");
        assert_eq!(row(&text, "harness-bound"), Some("no"), "{text}");
        assert_eq!(row(&text, "server CPU cores"), Some("0.800"), "{text}");
        assert_eq!(row(&text, "server CPU us/msg"), Some("40.2"), "{text}");
        assert!(!text.contains('*'), "{text}");
    }

    #[test]
    fn table_marks_a_harness_bound_step() {
        let text = table(&p2p_with_cpu(true));
        assert_eq!(row(&text, "harness-bound"), Some("yes *"), "{text}");
        assert!(
            text.contains("* a harness thread was at least 90 %"),
            "{text}"
        );
        assert_eq!(row(&text, "rate max harness-bound"), None, "{text}");
    }

    #[test]
    fn table_marks_a_search_stopped_by_the_harness() {
        let mut value = p2p_with_cpu(false);
        value["rate_max_harness_bound"] = json!(true);
        let text = table(&value);
        assert_eq!(
            row(&text, "rate max harness-bound"),
            Some("yes *"),
            "{text}"
        );
        assert!(text.contains("lower bound of the server's"), "{text}");
    }

    #[test]
    fn compare_shows_cpu_rows_of_both_runs() {
        let mut b = p2p_with_cpu(true);
        b["target"] = json!("mqtt://y");
        b["cpu"]["server_us_per_msg"] = json!(20.125);
        let text = compare(&p2p_with_cpu(false), &b);
        assert!(text.contains("server CPU us/msg"), "{text}");
        assert!(text.contains("2.00"), "{text}");
        let bound = text
            .lines()
            .find(|l| l.starts_with("harness-bound"))
            .unwrap();
        assert!(bound.contains("no") && bound.contains("yes"), "{text}");
    }

    #[test]
    fn table_shows_group_rows() {
        let value = json!({"scenario": "group", "target": "switchboard://x",
            "rates": {"offered_msgs_per_s": 100.0, "sent_msgs_per_s": 100.0,
                "delivered_msgs_per_s": null, "fanout_deliveries_per_s": 700.0,
                "deliveries_per_server_core_s": 3500.0},
            "messages": {"missing": 0},
            "cpu": {"server_us_per_msg": 285.7, "server_us_per_group_msg": 2000.0}});
        let text = table(&value);
        assert_eq!(row(&text, "sent msg/s"), Some("100"), "{text}");
        assert_eq!(row(&text, "fan-out deliveries/s"), Some("700"), "{text}");
        assert_eq!(row(&text, "deliveries/s per core"), Some("3500"), "{text}");
        assert_eq!(row(&text, "missing deliveries"), Some("0"), "{text}");
        assert_eq!(
            row(&text, "server CPU us/group msg"),
            Some("2000"),
            "{text}"
        );
        assert_eq!(row(&text, "delivered msg/s"), None, "{text}");
    }

    #[test]
    fn curve_reads_a_search_and_a_single_rate_and_draws_both() {
        let search = json!({"search": [
            {"rate": 8000.0, "deliver_p50_us": 900.0, "deliver_p99_us": 12000.0,
                "cpu": {"harness_bound": true}},
            {"rate": 4000.0, "deliver_p50_us": 700.0, "deliver_p99_us": 2000.0},
            {"rate": 6000.0, "deliver_p99_us": 5000.0},
            {"rate": 7000.0}
        ]});
        let points = curve_points(&search);
        let rates: Vec<f64> = points.iter().map(|p| p.rate).collect();
        assert_eq!(
            rates,
            [4000.0, 6000.0, 8000.0],
            "a step without a p99 is left out"
        );
        assert_eq!(points[1].p50_us, None);
        let single = json!({"rates": {"offered_msgs_per_s": 10000.0},
            "latency_us": {"deliver": {"p50": 150, "p99": 2500}}});
        assert_eq!(
            curve_points(&single),
            [CurvePoint {
                rate: 10000.0,
                p50_us: Some(150.0),
                p99_us: 2500.0,
                harness_bound: false
            }]
        );
        let series = vec![
            ("Switchboard".to_string(), points),
            ("mosquitto".to_string(), curve_points(&single)),
        ];
        let text = curve_table(&series);
        assert!(
            text.contains("Switchboard                    6000            -         5.00  no"),
            "{text}"
        );
        assert!(
            text.contains("Switchboard                    8000         0.90        12.00  yes"),
            "{text}"
        );
        assert!(
            text.contains("mosquitto                     10000         0.15         2.50  no"),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        curve(&path, &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("Switchboard p99") && svg.contains("mosquitto p50"));
        assert!(curve(&path, &[("empty".into(), vec![])]).is_err());
    }

    #[test]
    fn spreads_gather_the_runs_of_each_rate() {
        let point = |rate, p50_us, p99_us| CurvePoint {
            rate,
            p50_us,
            p99_us,
            harness_bound: false,
        };
        let points = [
            point(1000.0, Some(1.0), 10.0),
            point(1000.0, None, 30.0),
            point(1000.0, Some(3.0), 20.0),
            point(2000.0, None, 5.0),
        ];
        let spread = |rate, low, median, high| Spread {
            rate,
            low,
            median,
            high,
        };
        assert_eq!(
            spread_by_rate(&points, |p| Some(p.p99_us)),
            [
                spread(1000.0, 10.0, 20.0, 30.0),
                spread(2000.0, 5.0, 5.0, 5.0)
            ]
        );
        assert_eq!(
            spread_by_rate(&points, |p| p.p50_us),
            [spread(1000.0, 1.0, 2.0, 3.0)],
            "an even count's median is the mean of the middle two; a rate without values is left out"
        );
    }

    #[test]
    fn plot_writes_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        let mut second = Second {
            second: 0,
            delivered: 10,
            ..Default::default()
        };
        second.deliver.record(0, 500_000);
        plot(
            &path,
            "t",
            &[
                second.clone(),
                Second {
                    second: 1,
                    ..second
                },
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
    }
}
