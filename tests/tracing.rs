//! Distributed tracing against the real services: W3C Trace Context carried from the publisher
//! through the store and RabbitMQ to the sink, and the spans `weir run` exports over OTLP/HTTP
//! to a receiver inside the test (protobuf, decoded with `opentelemetry-proto`).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use serde_json::{Value, json};

/// The publisher's trace and span.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PUBLISHER_SPAN: &str = "00f067aa0ba902b7";

/// One span as the receiver got it.
#[derive(Clone, Debug)]
struct Exported {
    name: String,
    trace: String,
    span: String,
    /// Empty for a root span.
    parent: String,
    kind: i32,
    attributes: BTreeMap<String, String>,
    service: String,
}

type Spans = Arc<Mutex<Vec<Exported>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`. Its
/// base URL (what `OTEL_EXPORTER_OTLP_ENDPOINT` names) and what it received.
async fn otlp_receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let got = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |h: http::HeaderMap, body: bytes::Bytes| {
            let got = got.clone();
            async move {
                assert_eq!(h["content-type"], "application/x-protobuf");
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP export");
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .map(|kv| text(&kv.value))
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        got.lock().unwrap().push(Exported {
                            name: span.name,
                            trace: hex(&span.trace_id),
                            span: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                            kind: span.kind,
                            attributes: span
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), text(&kv.value)))
                                .collect(),
                            service: service.clone(),
                        });
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, spans)
}

type Received = Arc<Mutex<Vec<http::HeaderMap>>>;

/// A sink keeping the headers of every POST and answering 200 with a reply (binary mode,
/// id `reply-<id>`, no trace context of its own).
async fn recording_sink() -> (String, Received) {
    let received: Received = Arc::default();
    let got = received.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |h: http::HeaderMap| {
            let got = got.clone();
            async move {
                let id = format!("reply-{}", h["ce-id"].to_str().unwrap());
                got.lock().unwrap().push(h);
                (
                    [
                        ("ce-specversion", "1.0".to_string()),
                        ("ce-id", id),
                        ("ce-source", "/sink".to_string()),
                        ("ce-type", "order.replied".to_string()),
                        ("content-type", "application/json".to_string()),
                    ],
                    "{}",
                )
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, received)
}

/// The headers the sink got with the event `id` (binary mode: `ce-id`).
async fn delivered(received: &Received, id: &str, weir: &Weir) -> http::HeaderMap {
    eventually(
        60,
        &format!("event {id} delivered to the sink"),
        || weir.log_text(),
        || async {
            received
                .lock()
                .unwrap()
                .iter()
                .find(|h| h.get("ce-id").is_some_and(|v| v == id))
                .cloned()
        },
    )
    .await
}

fn header(h: &http::HeaderMap, name: &str) -> String {
    h.get(name)
        .unwrap_or_else(|| panic!("no {name} header in {h:?}"))
        .to_str()
        .unwrap()
        .to_string()
}

/// `(trace id, parent id, flags)` of a `traceparent`, checked to be version 00 and lower-case
/// hex of the right lengths.
fn fields(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00", "{traceparent}");
    for (p, len) in parts[1..].iter().zip([32, 16, 2]) {
        assert_eq!(p.len(), len, "{traceparent}");
        assert!(
            p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{traceparent}"
        );
    }
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn subscription_yaml(name: &str, sink: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}, namespace: test}}\n\
         spec:\n  stream: orders\n  sink: {{uri: \"{sink}\"}}\n  reply: {{stream: replies}}\n"
    )
}

fn event(id: &str) -> String {
    json!({"specversion": "1.0", "id": id, "source": "/tracing-test", "type": "order.created",
           "data": {"n": 1}})
    .to_string()
}

async fn publish(weir: &Weir, body: String, headers: &[(&str, &str)]) -> Value {
    publish_to(weir, "orders", 201, body, headers).await
}

async fn publish_to(
    weir: &Weir,
    stream: &str,
    want: u16,
    body: String,
    headers: &[(&str, &str)],
) -> Value {
    let mut req = http()
        .post(weir.events_url("test", stream))
        .header("content-type", "application/cloudevents+json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.body(body).send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or_default();
    assert_eq!(status, want, "{v}");
    v
}

/// The reply the sink gave to the event `id`, once appended to the stream `replies`.
async fn reply_of(weir: &Weir, id: &str) -> Value {
    let url = format!("{}?from=1&limit=1000", weir.events_url("test", "replies"));
    let want = format!("reply-{id}");
    eventually(
        60,
        &format!("the reply {want} stored"),
        || weir.log_text(),
        || async {
            let page: Value = http_get(&url).await.ok()?.json().await.ok()?;
            page.as_array()?.iter().find(|e| e["id"] == want).cloned()
        },
    )
    .await
}

/// The four spans of one event's journey, once all are exported.
async fn journey(spans: &Spans, trace: &str, weir: &Weir) -> BTreeMap<String, Exported> {
    eventually(
        60,
        &format!("ingest, commit, relay and delivery spans of trace {trace}"),
        || format!("spans: {:#?}\n{}", spans.lock().unwrap(), weir.log_text()),
        || async {
            let got: BTreeMap<String, Exported> = spans
                .lock()
                .unwrap()
                .iter()
                // The reply's commit and relay (stream `replies`) are in the trace too.
                .filter(|s| {
                    s.trace == trace
                        && s.attributes
                            .get("weir.stream")
                            .is_none_or(|st| st == "orders")
                })
                .map(|s| (s.name.clone(), s.clone()))
                .collect();
            ["weir.ingest", "weir.commit", "weir.relay", "weir.deliver"]
                .iter()
                .all(|n| got.contains_key(*n))
                .then_some(got)
        },
    )
    .await
}

struct Pipeline {
    weir: Weir,
    received: Received,
    sub: String,
    exchange: String,
    m: Manifests,
}

/// A stream with a store and a subscription delivering to a recording sink, run by one
/// `weir run` with `env`.
async fn pipeline(env: &[(&str, &str)]) -> Pipeline {
    let (sink, received) = recording_sink().await;
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let exchange = unique("weir.test.tracing.");
    m.write("stream.yaml", &stream_yaml("orders", &exchange, ""));
    m.write(
        "replies.yaml",
        &stream_yaml("replies", &unique("weir.test.tracing.replies."), ""),
    );
    let sub = unique("s");
    m.write("sub.yaml", &subscription_yaml(&sub, &sink));
    let mut weir = Weir::start_with(m.path(), env);
    weir.wait_ready("test", "orders").await;
    weir.wait_readable("test", "replies").await;
    wait_subscription(&weir, &sub).await;
    Pipeline {
        weir,
        received,
        sub,
        exchange,
        m,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_spans_publisher_weir_and_sink() {
    let (otlp, spans) = otlp_receiver().await;
    let p = pipeline(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp),
        ("OTEL_SERVICE_NAME", "weir-under-test"),
        // Export every 100 ms rather than every 5 s: the test waits less.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ])
    .await;
    let (conn, ch, queue) = bind_test_queue(&p.exchange).await;

    // 1. Published in the publisher's context (W3C headers).
    let publisher = format!("00-{TRACE}-{PUBLISHER_SPAN}-01");
    publish(
        &p.weir,
        event("traced"),
        &[("traceparent", &publisher), ("tracestate", "vendor=opaque")],
    )
    .await;
    let h = delivered(&p.received, "traced", &p.weir).await;
    // The sink's span is to be a child of the delivery attempt, in the publisher's trace; the
    // event itself carries the context it was published in, unchanged.
    let (trace, parent, flags) = fields(&header(&h, "traceparent"));
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_ne!(parent, PUBLISHER_SPAN);
    assert_eq!(header(&h, "tracestate"), "vendor=opaque");
    assert_eq!(header(&h, "ce-traceparent"), publisher);
    assert_eq!(header(&h, "ce-tracestate"), "vendor=opaque");

    let spans_of = journey(&spans, TRACE, &p.weir).await;
    for (name, kind) in [
        ("weir.ingest", SpanKind::Server),
        ("weir.commit", SpanKind::Internal),
        ("weir.relay", SpanKind::Producer),
        ("weir.deliver", SpanKind::Client),
    ] {
        let s = &spans_of[name];
        // Every span of the journey is a child of the context the event carries.
        assert_eq!(s.parent, PUBLISHER_SPAN, "{s:?}");
        assert_eq!(s.kind, kind as i32, "{s:?}");
        assert_eq!(s.service, "weir-under-test", "{s:?}");
        assert_eq!(s.attributes["weir.namespace"], "test", "{s:?}");
    }
    let deliver = &spans_of["weir.deliver"];
    assert_eq!(
        deliver.span, parent,
        "the sink's parent is the delivery span"
    );
    assert_eq!(deliver.attributes["weir.subscription"], p.sub);
    assert_eq!(deliver.attributes["weir.attempt"], "1");
    assert_eq!(deliver.attributes["http.response.status_code"], "200");
    let ingest = &spans_of["weir.ingest"];
    assert_eq!(ingest.attributes["weir.stream"], "orders");
    assert_eq!(ingest.attributes["http.response.status_code"], "201");
    assert_eq!(spans_of["weir.commit"].attributes["weir.events"], "1");
    // The sink's reply, appended to `replies` without a context of its own, continues the
    // trace as a child of the delivery, and its commit span says so.
    let reply = reply_of(&p.weir, "traced").await;
    assert_eq!(reply["traceparent"], format!("00-{TRACE}-{parent}-01"));
    eventually(
        60,
        "the reply's commit span under the delivery span",
        || format!("{:#?}", spans.lock().unwrap()),
        || async {
            spans
                .lock()
                .unwrap()
                .iter()
                .any(|s| {
                    s.name == "weir.commit"
                        && s.trace == TRACE
                        && s.parent == parent
                        && s.attributes["weir.stream"] == "replies"
                })
                .then_some(())
        },
    )
    .await;

    // The relayed AMQP message carries the event's context among its CloudEvents headers.
    let headers = drain_queue_headers(&ch, &queue, 1, Duration::from_secs(30)).await;
    assert_eq!(
        headers
            .first()
            .and_then(|h| h.get("cloudEvents:traceparent")),
        Some(&publisher),
        "{headers:?}"
    );
    close_amqp(conn).await;

    // 2. Published without a context: Weir starts the trace with its ingest span, and the
    // event carries that span's context to the store, the broker and the sink.
    let v = publish(&p.weir, event("fresh"), &[]).await;
    let position = v["results"][0]["position"].as_i64().unwrap();
    let h = delivered(&p.received, "fresh", &p.weir).await;
    let (fresh_trace, sink_parent, _) = fields(&header(&h, "traceparent"));
    assert_ne!(fresh_trace, TRACE);
    let (carried_trace, carried_parent, _) = fields(&header(&h, "ce-traceparent"));
    assert_eq!(carried_trace, fresh_trace);
    let spans_of = journey(&spans, &fresh_trace, &p.weir).await;
    let ingest = &spans_of["weir.ingest"];
    assert_eq!(
        ingest.parent, "",
        "Weir's ingest span is the root: {ingest:?}"
    );
    assert_eq!(ingest.span, carried_parent);
    for name in ["weir.commit", "weir.relay", "weir.deliver"] {
        assert_eq!(spans_of[name].parent, ingest.span, "{name}");
    }
    assert_eq!(spans_of["weir.deliver"].span, sink_parent);
    // The stored event carries it too.
    let stored: Value = http_get(format!(
        "{}/{position}",
        p.weir.events_url("test", "orders")
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(stored["traceparent"], header(&h, "ce-traceparent").as_str());

    // 3. A malformed traceparent is ignored (W3C): the request succeeds and starts a new
    // trace; so does a malformed attribute, which the request's valid header then replaces.
    let upper = format!("00-{}-{PUBLISHER_SPAN}-01", TRACE.to_uppercase());
    publish(&p.weir, event("malformed"), &[("traceparent", &upper)]).await;
    let h = delivered(&p.received, "malformed", &p.weir).await;
    let (t, _, _) = fields(&header(&h, "ce-traceparent"));
    assert_ne!(t, TRACE);
    let spans_of = journey(&spans, &t, &p.weir).await;
    assert_eq!(spans_of["weir.ingest"].parent, "");
    let mut bad_attribute: Value = serde_json::from_str(&event("bad-attribute")).unwrap();
    bad_attribute["traceparent"] = json!("00-xyz-01");
    bad_attribute["tracestate"] = json!("dropped=1");
    publish(
        &p.weir,
        bad_attribute.to_string(),
        &[("traceparent", &publisher)],
    )
    .await;
    let h = delivered(&p.received, "bad-attribute", &p.weir).await;
    assert_eq!(header(&h, "ce-traceparent"), publisher);
    assert!(h.get("ce-tracestate").is_none(), "{h:?}");

    // Only the journey's spans are exported, none of the libraries' (sqlx, hyper, lapin).
    let names: std::collections::BTreeSet<String> = spans
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(
        names,
        ["weir.commit", "weir.deliver", "weir.ingest", "weir.relay"]
            .map(String::from)
            .into(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_an_otlp_endpoint_nothing_is_exported_and_contexts_still_flow() {
    // Other OpenTelemetry settings alone do not turn export on.
    let p = pipeline(&[
        ("OTEL_SERVICE_NAME", "weir-not-exporting"),
        ("OTEL_TRACES_SAMPLER", "always_on"),
    ])
    .await;
    // No exporter: its HTTP client's runtime thread (`weir-otlp`) does not exist.
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", p.weir.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    assert!(!threads.is_empty());
    assert!(
        !threads.iter().any(|t| t.starts_with("weir-otlp")),
        "{threads:?}"
    );

    // Weir makes no span: the sink is sent the publisher's context as it came.
    let publisher = format!("00-{TRACE}-{PUBLISHER_SPAN}-01");
    publish(&p.weir, event("passed-on"), &[("traceparent", &publisher)]).await;
    let h = delivered(&p.received, "passed-on", &p.weir).await;
    assert_eq!(header(&h, "traceparent"), publisher);
    assert_eq!(header(&h, "ce-traceparent"), publisher);
    // The sink's reply continues that trace.
    assert_eq!(
        reply_of(&p.weir, "passed-on").await["traceparent"],
        publisher.as_str()
    );

    // Without one (or with a malformed one) an event still gets a new trace id, which reaches
    // the sink.
    for (id, headers) in [
        ("new-1", vec![]),
        ("new-2", vec![("traceparent", "00-not-a-trace-01")]),
    ] {
        publish(&p.weir, event(id), &headers).await;
        let h = delivered(&p.received, id, &p.weir).await;
        let (t, _, flags) = fields(&header(&h, "traceparent"));
        assert_ne!(t, TRACE);
        assert_eq!(flags, "01");
        assert_eq!(header(&h, "ce-traceparent"), header(&h, "traceparent"));
    }
    // A broker-only stream publishes the event with its context among the AMQP headers.
    let notes = unique("weir.test.tracing.notes.");
    p.m.write("notes.yaml", &broker_only_yaml("notes", &notes));
    let mut weir = p.weir;
    weir.wait_ready("test", "notes").await;
    let (conn, ch, queue) = bind_test_queue(&notes).await;
    publish_to(
        &weir,
        "notes",
        202,
        event("note"),
        &[("traceparent", &publisher), ("tracestate", "a=1")],
    )
    .await;
    let headers = drain_queue_headers(&ch, &queue, 1, Duration::from_secs(30)).await;
    let h = headers.first().expect("the published message");
    assert_eq!(h.get("cloudEvents:traceparent"), Some(&publisher), "{h:?}");
    assert_eq!(
        h.get("cloudEvents:tracestate").map(String::as_str),
        Some("a=1")
    );
    close_amqp(conn).await;
    assert!(!weir.log_text().contains("ERROR"), "{}", weir.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_that_is_away_drops_spans_not_events() {
    // Nothing listens on that port.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let p = pipeline(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
    ])
    .await;
    for id in ["away-1", "away-2"] {
        publish(&p.weir, event(id), &[]).await;
        let h = delivered(&p.received, id, &p.weir).await;
        fields(&header(&h, "traceparent"));
    }
    // Said once, not once per export.
    let said = eventually(
        60,
        "the failing export in the log",
        || p.weir.log_text(),
        || async {
            let log = p.weir.log_text();
            log.contains("span export failing").then_some(log)
        },
    )
    .await;
    assert_eq!(said.matches("span export failing").count(), 1, "{said}");
}

#[tokio::test]
async fn an_otlp_protocol_weir_cannot_send_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(weir_binary())
        .args(["run", "-f"])
        .arg(dir.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\"") && err.contains("http/protobuf"),
        "{err}"
    );
}
