//! Many resources through the operator: N EventStreams (store + broker) and N Subscriptions
//! applied with the real `kubectl` to the in-repo test API server, one `weir operator`
//! running them with the real RabbitMQ and PostgreSQL.
//!
//! It shows that every object becomes `Ready=True` for its generation, that an event published
//! to every stream is delivered once through every subscription, that one more pair applied
//! while N exist becomes Ready, and that the reconciles did not each rebuild the topology: a
//! reconcile whose inputs (objects' specs, labels and deletion state, referenced Secrets,
//! leadership) are those of the last clean apply builds nothing
//! (`weir_operator_syncs_total{outcome="unchanged"}`). Without that, N objects reconciled
//! after a start would build and apply the whole topology N times.
//!
//! The suite runs N = 60 (`WEIR_OPERATOR_SCALE` changes it); the 1,000 run is
//! `cargo test --test operator_scale -- --ignored`, its figures in BENCHMARKS.md.

mod apiserver;
mod common;

use std::time::{Duration, Instant};

use apiserver::TestApiServer;
use common::counting::{CountingSink, delete_queues};
use common::*;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::json;

/// The pair `i` of run `tag`: stream `s{i}` (its exchange the namespace's default for it) and
/// subscription `{tag}-s{i}`.
fn pair(ns: &str, tag: &str, i: usize, sink: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: s{i:04}, namespace: {ns}}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}\n  \
         store: {{urlSecretRef: {{name: pg, key: url}}}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {tag}-s{i:04}, namespace: {ns}}}\n\
         spec:\n  stream: s{i:04}\n  sink: {{uri: \"{sink}\"}}\n---\n"
    )
}

fn api(server: &TestApiServer, ns: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("weir.dev", "v1alpha1", kind),
        plural,
    );
    Api::namespaced_with(server.client(), ns, &ar)
}

/// Whether `obj` reports `Ready=True` for its current generation.
fn ready(obj: &DynamicObject) -> bool {
    let status = &obj.data["status"];
    status["observedGeneration"].as_i64() == obj.metadata.generation
        && status["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Objects of both kinds, how many of them are Ready, and one that is not (name and status).
async fn count_ready(
    streams: &Api<DynamicObject>,
    subs: &Api<DynamicObject>,
) -> (usize, usize, String) {
    let mut total = 0;
    let mut ok = 0;
    let mut not_ready = String::new();
    for api in [streams, subs] {
        if let Ok(list) = api.list(&ListParams::default()).await {
            total += list.items.len();
            ok += list.items.iter().filter(|o| ready(o)).count();
            if let Some(o) = list.items.iter().find(|o| !ready(o))
                && not_ready.is_empty()
            {
                not_ready = format!(
                    "{} (generation {:?}): {}",
                    o.metadata.name.as_deref().unwrap_or_default(),
                    o.metadata.generation,
                    o.data["status"]
                );
            }
        }
    }
    (total, ok, not_ready)
}

/// Waits until `want` objects are Ready; the time it took.
async fn wait_ready(
    streams: &Api<DynamicObject>,
    subs: &Api<DynamicObject>,
    want: usize,
    within: Duration,
    op: &Operator,
) -> Duration {
    let started = Instant::now();
    loop {
        let (total, ok, not_ready) = count_ready(streams, subs).await;
        if total >= want && ok >= want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{ok} of {want} objects Ready after {within:?} ({total} listed); not Ready: \
             {not_ready}\noperator log tail:\n{}",
            tail(&op.log_text(), 40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The operator's `/metrics` text.
async fn metrics_text(op: &Operator) -> String {
    common::http_get(format!("{}/metrics", op.admin))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text")
}

/// `weir_operator_syncs_total{outcome}` from the operator's metrics.
async fn syncs(op: &Operator, outcome: &str) -> u64 {
    let text = metrics_text(op).await;
    let want = format!("weir_operator_syncs_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The sum of the samples of `name` whose labels contain `label` (`phase="build"`, say).
async fn metric_sum(op: &Operator, name: &str, label: &str) -> f64 {
    metrics_text(op)
        .await
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Per phase of the topology syncs: (seconds spent, syncs), and the plans made and reused.
async fn sync_costs(op: &Operator) -> Vec<f64> {
    let mut out = Vec::new();
    for phase in ["index", "build", "apply"] {
        let label = format!("phase=\"{phase}\"");
        out.push(metric_sum(op, "weir_topology_sync_seconds_sum", &label).await);
    }
    for outcome in ["planned", "reused"] {
        let label = format!("outcome=\"{outcome}\"");
        out.push(metric_sum(op, "weir_topology_plans_total", &label).await);
    }
    out
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn run(n: usize) {
    let server = TestApiServer::start().await;
    let ns = unique("opscale");
    let tag = unique("os");
    let db = fresh_database().await;
    let sink = CountingSink::start().await;
    server.apply_crds().await;
    let mut manifests = namespace_with_secrets(&ns, &db);
    for i in 0..n {
        manifests.push_str(&pair(&ns, &tag, i, &sink.url));
    }
    server.apply(&manifests).await;

    // A resync interval that stays out of the way: every object is requeued once per refresh.
    let op = Operator::start(
        server.kubeconfig(),
        "op-scale",
        &unique("weir-"),
        &["--refresh", "60s"],
    );
    let streams = api(&server, &ns, "EventStream", "eventstreams");
    let subs = api(&server, &ns, "Subscription", "subscriptions");
    let within = Duration::from_secs(120 + n as u64 / 2);
    let to_ready = wait_ready(&streams, &subs, 2 * n, within, &op).await;
    let applied = syncs(&op, "applied").await;
    let unchanged = syncs(&op, "unchanged").await;
    let rss = rss_kib(op.child.id());

    // One event into every stream, delivered once through every subscription.
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-e{i}")).collect();
    let client = common::http();
    for (i, id) in ids.iter().enumerate() {
        let event = json!({"specversion": "1.0", "id": id, "source": "/scale", "type": "t",
                           "data": {"i": i}});
        let url = format!("{}/v1/namespaces/{ns}/streams/s{i:04}/events", op.url);
        let mut tries = 0;
        loop {
            let r = client
                .post(&url)
                .header("content-type", "application/cloudevents+json")
                .body(event.to_string())
                .send()
                .await;
            if r.as_ref().is_ok_and(|r| r.status().is_success()) {
                break;
            }
            tries += 1;
            assert!(tries < 20, "publishing {id}: {r:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let started = Instant::now();
    while sink.delivered(&ids) < n {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} of {n} delivered\noperator log tail:\n{}",
            sink.delivered(&ids),
            tail(&op.log_text(), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sink.unexpected(&ids).is_empty(), "deliveries nobody sent");
    let duplicated = sink
        .got
        .lock()
        .unwrap()
        .values()
        .filter(|c| **c > 1)
        .count();

    // One more pair while N exist.
    let before = syncs(&op, "applied").await;
    let costs_before = sync_costs(&op).await;
    let t = Instant::now();
    server.apply(&pair(&ns, &tag, n, &sink.url)).await;
    let one_more = wait_ready(&streams, &subs, 2 * n + 2, Duration::from_secs(60), &op).await;
    let one_more_total = t.elapsed();
    let applied_for_one = syncs(&op, "applied").await - before;
    let costs: Vec<f64> = sync_costs(&op)
        .await
        .iter()
        .zip(&costs_before)
        .map(|(a, b)| a - b)
        .collect();
    let (index_ms, build_ms, apply_ms) = (costs[0] * 1e3, costs[1] * 1e3, costs[2] * 1e3);
    let (planned, reused) = (costs[3], costs[4]);

    eprintln!(
        "operator scale: {n} streams + {n} subscriptions\n\
         | measure | result |\n|---|---|\n\
         | time to Ready (from operator start) | {to_ready:.1?} |\n\
         | syncs that built and applied / found nothing changed | {applied} / {unchanged} |\n\
         | operator RSS when Ready | {:.1} MiB |\n\
         | one event per stream delivered | {n} / {n} ({duplicated} duplicated) |\n\
         | one more pair: kubectl apply → Ready | {one_more_total:.1?} (wait {one_more:.1?}) |\n\
         | syncs that built for that pair | {applied_for_one} |\n\
         | their index / build / apply | {index_ms:.2} / {build_ms:.2} / {apply_ms:.2} ms |\n\
         | plans they made / reused | {planned} / {reused} |",
        rss as f64 / 1024.0
    );
    // The builds for one more pair planned that pair, not the N already running (a build
    // that found the stream before its subscription plans each once).
    assert!(
        planned >= 2.0 && planned <= 2.0 * applied_for_one as f64,
        "{planned} plans made by {applied_for_one} builds for one more pair ({reused} reused)"
    );

    // The reconciles of N objects did not each build the topology: most found it unchanged.
    // (Applies happen for the start, the Lease, each object's first reconcile racing the
    // others' and each Secret read; never once per reconcile.)
    assert!(
        unchanged > applied,
        "{applied} syncs built and applied, {unchanged} found nothing changed: the reconciles \
         of {n} objects rebuilt the topology each time"
    );
    assert!(
        applied <= n as u64,
        "{applied} builds for {} objects: about one per object",
        2 * n
    );
    drop(op);
    delete_queues(&tag).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_resources_through_the_operator_become_ready_without_a_build_per_reconcile() {
    let n = std::env::var("WEIR_OPERATOR_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    run(n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "1,000 streams + 1,000 subscriptions: minutes; figures in BENCHMARKS.md"]
async fn a_thousand_streams_and_subscriptions_through_the_operator() {
    run(1000).await;
}
