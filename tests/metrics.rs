//! Performance monitoring: after a mixed workload (stored and broker-only publishes, a
//! rejected event, cached reads, a trace, a delivered and a dead-lettered subscription) the
//! `/metrics` scrape passes `promtool check metrics`, holds every metric the Grafana dashboard
//! and the chart's alerting rules query, and warns when the pools exceed the server's `max_connections`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn subscription_yaml(name: &str, sink: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}, namespace: test}}\n\
         spec:\n  stream: mix\n  sink: {{uri: \"{sink}\"}}\n  startFrom: earliest\n  delivery: {{retry: 0}}\n"
    )
}

/// Every `weir_*` / `process_*` metric name a dashboard query uses.
fn dashboard_metrics(dashboard: &Value) -> BTreeSet<String> {
    let mut queries = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            queries.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"].as_str() {
            queries.push(q.to_string());
        }
    }
    let mut names = BTreeSet::new();
    for q in &queries {
        for token in q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if token.starts_with("weir_") || token.starts_with("process_") {
                names.insert(token.to_string());
            }
        }
    }
    names
}

/// Every `weir_*` / `process_*` metric name the chart's alerting rules use.
fn rule_metrics(rules: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let expr = rule["expr"].as_str().unwrap();
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            {
                if token.starts_with("weir_") || token.starts_with("process_") {
                    names.insert(token.to_string());
                }
            }
        }
    }
    names
}

/// Names of the samples in a scrape (`name{...} v` or `name v`).
fn scraped(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_pass_promtool_and_cover_the_dashboard_after_a_mixed_workload() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "mix.yaml",
        &stream_yaml("mix", &unique("weir.test.mx."), ""),
    );
    m.write(
        "fast.yaml",
        &broker_only_yaml("fast", &unique("weir.test.mxf.")),
    );
    m.write(
        "cache.yaml",
        "apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: mix-cache, namespace: test}\n\
         spec: {streamNames: [mix], strategy: LFU, maxItems: 2}\n",
    );
    m.write(
        "archive.yaml",
        "apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {name: mix-archive, namespace: test}\n\
         spec: {streamNames: [mix], archiveAfter: 1s, schedule: 1s}\n",
    );
    m.write(
        "ok.yaml",
        &subscription_yaml("ok-sub", &status_sink(200).await),
    );
    m.write(
        "bad.yaml",
        &subscription_yaml("bad-sub", &status_sink(400).await),
    );
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "mix").await;
    w.wait_ready("test", "fast").await;
    let c = common::http();
    let url = w.events_url("test", "mix");
    for i in 0..20 {
        let r = c
            .post(&url)
            .json(
                &json!({"type": "t", "id": format!("m{i}"), "subject": format!("s{}", i % 4),
                          "correlationId": "c1", "data": {"i": i}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let r = c
        .post(&url)
        .json(&json!({"type": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    for i in 0..5 {
        let r = c
            .post(w.events_url("test", "fast"))
            .json(&json!({"type": "t", "id": format!("f{i}"), "data": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    for s in ["s0", "s1", "s2", "s0", "s0"] {
        let r = c
            .get(format!(
                "{}/v1/namespaces/test/streams/mix/subjects/{s}/events",
                w.url
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        c.get(format!("{url}?from=1&limit=5"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{url}/3")).send().await.unwrap().status(),
        200
    );
    let r = c
        .get(format!(
            "{}/v1/namespaces/test/correlations/c1/events",
            w.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Deliveries and a dead letter happen in the background.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string("charts/weir/dashboards/weir.json").unwrap())
            .unwrap();
    let mut wanted = dashboard_metrics(&dashboard);
    assert!(wanted.len() >= 20, "{wanted:?}");
    let rules: Value = weir::yaml::from_str(
        &std::fs::read_to_string("charts/weir/rules/weir.rules.yaml").unwrap(),
    )
    .unwrap();
    let alerting = rule_metrics(&rules);
    assert!(alerting.len() >= 7, "{alerting:?}");
    wanted.extend(alerting);
    // Values that show the workload, not just names. Deliveries, the dead letter and the
    // archive run happen in the background on their own schedules, so the scrape is retried
    // until every one of them has shown up (or the deadline passes) instead of being read once:
    // a single read raced the archiver's first tick under a loaded full-suite run.
    let workload = [
        r#"weir_deadletters_total{"#,
        r#"weir_cache_requests_total{namespace="test",policy="mix-cache",result="hit"}"#,
        r#"weir_db_pool_up{pool="#,
        r#"weir_archive_runs_total{namespace="test",outcome="ok",stream="mix"}"#,
        r#"weir_db_acquire_duration_seconds_count"#,
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = w.metrics().await;
        let have = scraped(&text);
        let missing: Vec<_> = wanted.iter().filter(|n| !have.contains(*n)).collect();
        let absent: Vec<_> = workload.iter().filter(|s| !text.contains(**s)).collect();
        if missing.is_empty() && absent.is_empty() {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard or the alerting rules query metrics missing from /metrics: {missing:?}; \
             workload samples absent: {absent:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(!text.contains("postgres://"), "no URL in labels");

    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    {
        use std::io::Write as _;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_larger_than_max_connections_are_warned_about() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "big.yaml",
        &stream_yaml("big", &unique("weir.test.big."), "").replace(
            "store: {urlSecretRef: {name: pg, key: url}}",
            "store: {urlSecretRef: {name: pg, key: url}, pool: {size: 1, maxConnections: 5000}}",
        ),
    );
    let w = Weir::start(m.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !w.log_text().contains("more than its max_connections") {
        assert!(
            Instant::now() < deadline,
            "no warning; log:\n{}",
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        w.log_text().contains("5000 connections"),
        "{}",
        w.log_text()
    );
}
