//! A small run of every `weir bench` scenario: it completes and reports sane, non-zero
//! numbers for Weir and its baseline. (Speed targets live in the benchmark, not here.)

mod common;

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = Command::new(common::weir_binary())
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "error")
        .output()
        .expect("run weir bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "weir bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ratio"), "a table is printed: {stdout}");
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn assert_sane(r: &serde_json::Value, scenario: &str, events: u64) {
    assert_eq!(r["scenario"], scenario);
    for side in ["weir", "baseline"] {
        let rate = r[side]["events_per_s"].as_f64().unwrap();
        assert!(rate > 0.0 && rate.is_finite(), "{side} rate {rate}");
        assert_eq!(
            r[side]["events"].as_u64(),
            Some(events),
            "{side} measured every event: {r}"
        );
    }
    let ratio = r["ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio.is_finite());
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(
        r["versions"]["postgresql"]
            .as_str()
            .unwrap()
            .starts_with(char::is_numeric)
    );
}

#[test]
fn ingest_broker_and_relay_scenarios_complete_with_sane_numbers() {
    let r = bench(&[
        "ingest",
        "--events",
        "400",
        "--batch",
        "50",
        "--concurrency",
        "4",
    ]);
    assert_sane(&r, "ingest", 400);
    let p50 = r["weir"]["p50_ms"].as_f64().unwrap();
    let p999 = r["weir"]["p999_ms"].as_f64().unwrap();
    assert!(p50 > 0.0 && p999 >= p50, "percentiles are ordered: {r}");
    // The schema's own cost: the three tables appended raw, every event, and Weir's ratio to it.
    assert_eq!(r["baseline_schema"]["events"].as_u64(), Some(400), "{r}");
    let schema_rate = r["baseline_schema"]["events_per_s"].as_f64().unwrap_or(0.0);
    assert!(schema_rate > 0.0 && schema_rate.is_finite(), "{r}");
    let ratio = r["ratio_schema"].as_f64().unwrap_or(0.0);
    assert!(ratio > 0.0 && ratio.is_finite(), "{r}");

    let r = bench(&[
        "broker",
        "--events",
        "400",
        "--batch",
        "50",
        "--concurrency",
        "4",
    ]);
    assert_sane(&r, "broker", 400);

    let r = bench(&["relay", "--events", "500"]);
    assert_sane(&r, "relay", 500);
}

#[test]
fn archive_scenario_reports_rates_and_ratios_on_the_committed_corpus() {
    let v = bench(&["archive", "--events", "3000"]);
    let reports = v.as_array().expect("one report per variant");
    assert_eq!(reports.len(), 4, "{v}");
    for r in reports {
        assert_sane(r, "archive", 3000);
        let d = &r["details"];
        let mb = d["raw_mb_per_s"].as_f64().unwrap();
        assert!(mb > 0.0 && mb.is_finite(), "{r}");
    }
    let ratio = |i: usize| reports[i]["details"]["compression_ratio"].as_f64().unwrap();
    // Realistic JSON compresses several times over, and the dictionary helps 64 KiB blocks.
    assert!(ratio(0) > 3.0, "with dictionary: {}", ratio(0));
    assert!(
        ratio(0) > ratio(1),
        "dictionary {} vs none {}",
        ratio(0),
        ratio(1)
    );
    assert!(
        (ratio(2) - ratio(0)).abs() / ratio(0) < 0.2,
        "run and in-memory build agree"
    );
}

#[test]
fn cache_scenario_reports_each_strategy_with_a_hit_ratio() {
    let v = bench(&[
        "cache",
        "--events",
        "3000",
        "--subjects",
        "200",
        "--cache-items",
        "40",
        "--concurrency",
        "4",
        "--payload",
        "128",
    ]);
    let reports = v.as_array().expect("one report per strategy");
    let strategies: Vec<&str> = reports
        .iter()
        .map(|r| r["variant"].as_str().unwrap().split(' ').next().unwrap())
        .collect();
    assert_eq!(strategies, ["LRU", "LFU", "FIFO", "TTL"]);
    for r in reports {
        assert_sane(r, "cache", 3000);
        assert_eq!(r["weir"]["errors"], 0, "{r}");
        assert!(
            r["baseline"]["name"]
                .as_str()
                .unwrap()
                .starts_with("no cache"),
            "{r}"
        );
        assert!(r["baseline"].get("hit_ratio").is_none(), "{r}");
        let hit = r["weir"]["hit_ratio"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&hit), "hit ratio {hit}: {r}");
        let (p50, p99) = (
            r["weir"]["p50_ms"].as_f64().unwrap(),
            r["weir"]["p99_ms"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p99 >= p50, "{r}");
    }
    // 40 of 200 subjects under Zipf(1) hold about 70 % of the reads: a recency or frequency
    // cache of that size hits well above chance (40/200 = 20 %).
    let hit = |i: usize| reports[i]["weir"]["hit_ratio"].as_f64().unwrap();
    assert!(hit(0) > 0.4, "LRU hit ratio {}", hit(0));
    assert!(hit(1) > 0.4, "LFU hit ratio {}", hit(1));
    // The same baseline (one no-cache run) stands beside every strategy.
    assert!(
        reports
            .iter()
            .all(|r| r["baseline"]["events_per_s"] == reports[0]["baseline"]["events_per_s"])
    );
}

/// Delivery scenarios: the sink got every published event, and latencies are ordered.
fn assert_delivered(r: &serde_json::Value, scenario: &str, events: u64) {
    assert_sane(r, scenario, events);
    for side in ["weir", "baseline"] {
        assert_eq!(
            r[side]["published"].as_u64(),
            Some(events),
            "{side} published every event: {r}"
        );
        assert_eq!(
            r[side]["events"], r[side]["published"],
            "{side}: every published event was delivered: {r}"
        );
    }
}

fn assert_percentiles_ordered(m: &serde_json::Value) {
    let p = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("{k} in {m}"));
    let (p50, p99, p999) = (p("p50_ms"), p("p99_ms"), p("p999_ms"));
    assert!(
        p50 > 0.0 && p50 <= p99 && p99 <= p999,
        "percentiles are ordered: {m}"
    );
}

#[test]
fn e2e_and_replay_scenarios_deliver_every_event() {
    // The full sweep of offered rates, small: one report per rate.
    let runs = bench(&["e2e", "--events", "300"]);
    let runs = runs.as_array().expect("one report per offered rate");
    let offered: Vec<_> = runs
        .iter()
        .map(|r| r["weir"]["offered_rate"].as_u64())
        .collect();
    assert_eq!(offered, [Some(1000), Some(5000), Some(20000), None]);
    for r in runs {
        assert_delivered(r, "e2e", 300);
        for side in ["weir", "baseline"] {
            assert_percentiles_ordered(&r[side]);
            assert!(r[side]["backlog"].as_u64().is_some(), "backlog: {r}");
        }
    }

    let r = bench(&["replay", "--events", "2000"]);
    assert_delivered(&r, "replay", 2000);

    // Live delivery alone: a queue filled while scaled to zero, drained by each side.
    let r = bench(&["drain", "--events", "2000"]);
    assert_delivered(&r, "drain", 2000);
    assert!(
        r["weir"]["first_delivery_ms"].as_f64().is_some(),
        "the time to the first delivery after scaling up: {r}"
    );

    // perKey delivery against unordered delivery of the same load.
    let r = bench(&["per-key", "--events", "500"]);
    assert_delivered(&r, "per-key", 500);
    for side in ["weir", "baseline"] {
        assert_percentiles_ordered(&r[side]);
    }
}

/// `scale` with 12 streams + 12 subscriptions on one database — more streams than a stream
/// pool's default 10 connections — beside 3 + 3, with short phases: every resource became
/// Ready (the bench fails, naming them, when one does not), the one added later too, and
/// every event published across the streams reached the sink.
#[test]
fn scale_scenario_brings_every_resource_up_and_delivers_every_event() {
    let r = bench(&[
        "scale",
        "--streams",
        "12",
        "--baseline-streams",
        "3",
        "--rate",
        "40",
        "--duration",
        "3s",
        "--idle",
        "2s",
        "--ready-timeout",
        "90s",
    ]);
    assert_eq!(r["scenario"], "scale");
    let d = &r["details"];
    for (side, n) in [("scale", 12), ("baseline", 3)] {
        let run = &d[side];
        assert_eq!(run["streams"], n, "{side}: {run}");
        assert_eq!(run["subscriptions"], n, "{side}: {run}");
        assert_eq!(run["resources"], 2 * n, "{side}: {run}");
        let num = |k: &str| {
            run[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{side}: {k} in {run}"))
        };
        assert!(num("ready_s") > 0.0, "{side}: {run}");
        assert!(num("one_more_ready_ms") > 0.0, "{side}: {run}");
        assert!(num("rss_idle_mb") > 1.0, "{side}: {run}");
        assert!(num("idle_cpu_percent") >= 0.0, "{side}: {run}");
        assert!(num("pg_sessions_idle") >= 1.0, "{side}: {run}");
        assert!(num("amqp_connections") >= 1.0, "{side}: {run}");
        // 40 ev/s for 3 s, every request answered 2xx and every event delivered once.
        assert_eq!(run["sent"], 120, "{side}: every publish accepted: {run}");
        assert_eq!(run["publish_errors"], 0, "{side}: {run}");
        assert_eq!(
            run["delivered"], run["sent"],
            "{side}: all delivered: {run}"
        );
        assert!(num("p99_ms") >= num("p50_ms"), "{side}: {run}");
    }
    for side in ["weir", "baseline"] {
        assert_eq!(r[side]["events"], 120, "{side}: {r}");
    }
}
