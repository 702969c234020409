//! Results: one [`Report`] per measured variant (Weir beside its baseline), a table for
//! people, JSON for scripts, an SVG plot of latency against offered rate.

use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::BenchError;
use super::load::LoadResult;

#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub name: String,
    pub events_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p999_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_rate: Option<u64>,
    pub events: usize,
    pub seconds: f64,
    pub errors: usize,
    /// Read-cache hits ÷ lookups during the measurement (the `cache` scenario's cached runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hit_ratio: Option<f64>,
    /// Delivery scenarios: events accepted from the publisher (`events` counts the distinct
    /// events the sink received).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<usize>,
    /// Delivery scenarios: events published but not yet delivered when publishing ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<usize>,
    /// Delivery scenarios: repeated deliveries of an event the sink already had.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<usize>,
    /// Delivery scenarios: from the start of publishing (or of the replay) to the sink's
    /// first arrival, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_delivery_ms: Option<f64>,
    /// e2e: the publishers' request latency (publish → 201, i.e. stored), the share of the
    /// end-to-end latency spent before the relay, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_p99_ms: Option<f64>,
    /// e2e: from each event's commit (its `weirrecordedtime`) to its arrival at the sink,
    /// the share after the store (relay, broker, delivery), in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_commit_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_commit_p99_ms: Option<f64>,
}

impl Measurement {
    pub fn from_load(name: &str, r: &LoadResult, offered_rate: Option<u64>) -> Measurement {
        let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Measurement {
            name: name.to_string(),
            events_per_s: r.events_per_s(),
            p50_ms: Some(q(&r.latency, 0.5)),
            p99_ms: Some(q(&r.latency, 0.99)),
            p999_ms: Some(q(&r.latency, 0.999)),
            offered_rate,
            events: r.events,
            seconds: r.elapsed.as_secs_f64(),
            errors: r.errors,
            hit_ratio: None,
            published: None,
            backlog: None,
            duplicates: None,
            first_delivery_ms: None,
            publish_p50_ms: None,
            publish_p99_ms: None,
            after_commit_p50_ms: None,
            after_commit_p99_ms: None,
        }
    }

    pub fn rate_only(name: &str, events: usize, seconds: f64) -> Measurement {
        Measurement {
            name: name.to_string(),
            events_per_s: events as f64 / seconds.max(1e-9),
            p50_ms: None,
            p99_ms: None,
            p999_ms: None,
            offered_rate: None,
            events,
            seconds,
            errors: 0,
            hit_ratio: None,
            published: None,
            backlog: None,
            duplicates: None,
            first_delivery_ms: None,
            publish_p50_ms: None,
            publish_p99_ms: None,
            after_commit_p50_ms: None,
            after_commit_p99_ms: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Versions {
    pub weir: String,
    pub postgresql: String,
    pub rabbitmq: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    /// The variant measured, e.g. `batch=100 concurrency=8 payload=512B`.
    pub variant: String,
    pub weir: Measurement,
    pub baseline: Measurement,
    /// A second baseline where one applies (ingest: the raw append on two connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_parallel: Option<Measurement>,
    /// ingest: the raw append of Weir's three tables with their indexes (the schema's own
    /// cost), and weir ÷ that.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_schema: Option<Measurement>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_schema: Option<f64>,
    /// weir ÷ baseline (events/s).
    pub ratio: f64,
    /// Scenario-specific figures (archive: MB/s of raw JSON, compression ratios).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    pub machine: Machine,
    pub versions: Versions,
}

impl Report {
    pub fn new(
        scenario: &str,
        variant: String,
        weir: Measurement,
        baseline: Measurement,
        versions: Versions,
    ) -> Report {
        Report {
            scenario: scenario.to_string(),
            variant,
            ratio: weir.events_per_s / baseline.events_per_s.max(1e-9),
            weir,
            baseline,
            baseline_parallel: None,
            baseline_schema: None,
            ratio_schema: None,
            details: None,
            machine: machine(),
            versions,
        }
    }
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or_else(|| "unknown".to_string(), |s| s.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

/// The human-readable table: each variant's Weir row beside its baseline row and the ratio.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    // Delivery scenarios add the backlog left when publishing ended.
    let backlog = reports.iter().any(|r| r.weir.backlog.is_some());
    // A hit-ratio column only where some measurement has one (the cache scenario).
    let hits = reports.iter().any(|r| r.weir.hit_ratio.is_some());
    out.push_str(&format!(
        "{:<44} {:<36} {:>12} {:>8} {:>8} {:>8} {:>7}{}{}\n",
        "scenario / variant",
        "system",
        "events/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "ratio",
        if backlog {
            format!(" {:>8}", "backlog")
        } else {
            String::new()
        },
        if hits { "  hit ratio" } else { "" }
    ));
    for r in reports {
        let head = format!("{} {}", r.scenario, r.variant);
        // The ratio column: weir ÷ the first baseline on Weir's row, weir ÷ the three-table
        // baseline on that baseline's row.
        let rows = [
            Some((&r.weir, Some(r.ratio))),
            Some((&r.baseline, None)),
            r.baseline_schema.as_ref().map(|m| (m, r.ratio_schema)),
            r.baseline_parallel.as_ref().map(|m| (m, None)),
        ];
        for (i, (m, ratio)) in rows.into_iter().flatten().enumerate() {
            out.push_str(&format!(
                "{:<44} {:<36} {:>12.0} {:>8} {:>8} {:>8} {:>7}{}{}\n",
                if i == 0 { head.as_str() } else { "" },
                m.name,
                m.events_per_s,
                ms(m.p50_ms),
                ms(m.p99_ms),
                ms(m.p999_ms),
                ratio.map(|x| format!("{x:.2}")).unwrap_or_default(),
                match (backlog, m.backlog) {
                    (true, Some(b)) => format!(" {b:>8}"),
                    (true, None) => format!(" {:>8}", "-"),
                    (false, _) => String::new(),
                },
                match (hits, m.hit_ratio) {
                    (false, _) => String::new(),
                    (true, Some(h)) => format!(" {h:>10.3}"),
                    (true, None) => format!(" {:>10}", "-"),
                },
            ));
            // e2e: the part of Weir's latency spent before the relay (publish → stored).
            if let (Some(p50), Some(p99)) = (m.publish_p50_ms, m.publish_p99_ms) {
                out.push_str(&format!(
                    "{:<44} {:<36} {:>12} {:>8.2} {:>8.2}\n",
                    "", "  of which publish → 201 (stored)", "", p50, p99
                ));
            }
            // e2e: the part after the commit.
            if let (Some(p50), Some(p99)) = (m.after_commit_p50_ms, m.after_commit_p99_ms) {
                out.push_str(&format!(
                    "{:<44} {:<36} {:>12} {:>8.2} {:>8.2}\n",
                    "", "  of which commit → sink", "", p50, p99
                ));
            }
        }
    }
    for r in reports {
        if r.scenario == "scale"
            && let Some(d) = &r.details
        {
            out.push_str(&super::scale::table(d));
        }
    }
    if let Some(r) = reports.first() {
        out.push_str(&format!(
            "machine: {} ({} cores, {} GiB) · PostgreSQL {} · RabbitMQ {} · weir {}\n",
            r.machine.cpu,
            r.machine.cores,
            r.machine.memory_gib,
            r.versions.postgresql,
            r.versions.rabbitmq,
            r.versions.weir
        ));
    }
    out
}

/// Latency percentiles (ms) of Weir's measurements against their offered rate (or the
/// achieved rate when the run was unpaced).
pub fn plot(reports: &[Report], path: &Path) -> Result<(), BenchError> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| BenchError::Plot(e.to_string());
    // (x, p50, p99, p999) of one side of every report that has percentiles.
    let side = |pick: fn(&Report) -> &Measurement| {
        let mut pts: Vec<(f64, f64, f64, f64)> = reports
            .iter()
            .filter_map(|r| {
                let m = pick(r);
                let x = m.offered_rate.map_or(m.events_per_s, |v| v as f64);
                Some((x, m.p50_ms?, m.p99_ms?, m.p999_ms?))
            })
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        pts
    };
    let points = side(|r| &r.weir);
    // Baselines with latencies of their own (e2e) are drawn beside Weir's.
    let base = side(|r| &r.baseline);
    if points.is_empty() {
        return Err(BenchError::Plot("no latency measurements to plot".into()));
    }
    let all = || points.iter().chain(base.iter());
    let max_x = all().map(|p| p.0).fold(1.0, f64::max) * 1.1;
    let max_y = all().map(|p| p.3).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "weir bench {}: latency vs offered rate",
        reports[0].scenario
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_x, 0f64..max_y)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("offered rate (events/s)")
        .y_desc(if reports[0].scenario == "e2e" {
            "end-to-end latency, publish to sink (ms)"
        } else {
            "request latency (ms)"
        })
        .draw()
        .map_err(|e| err(&e))?;
    type Point = (f64, f64, f64, f64);
    type Pick = fn(&Point) -> f64;
    let grey = RGBColor(150, 150, 150);
    let light_blue = RGBColor(120, 170, 230);
    let light_red = RGBColor(235, 140, 140);
    let series: [(&str, RGBColor, Pick, &[Point]); 6] = [
        ("weir p50", BLUE, |p| p.1, &points),
        ("weir p99", RED, |p| p.2, &points),
        ("weir p99.9", BLACK, |p| p.3, &points),
        ("baseline p50", light_blue, |p| p.1, &base),
        ("baseline p99", light_red, |p| p.2, &base),
        ("baseline p99.9", grey, |p| p.3, &base),
    ];
    for (label, color, f, points) in series {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.iter().map(|p| (p.0, f(p))), &color))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((p.0, f(p)), 3, color.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
