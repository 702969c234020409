//! Building the topology from manifests: defaults, environment overrides, Secret and ConfigMap
//! resolution, and every kind of problem, each reported with its resource and field path.

use std::collections::BTreeMap;
use std::time::Duration;

mod common;

use weir::data::plane::observe::spec_condition;
use weir::topology::*;
use weir::topology::{Built, Reason, build};

use common::index_from_yaml as index;

fn defaults() -> Defaults {
    Defaults {
        default_database_url: Some("postgres://postgres@db:5432/weir".into()),
        ..Defaults::default()
    }
}

/// The problems of one resource as `path: message` lines.
fn problems(built: &Built, kind: Kind, ns: &str, name: &str) -> Vec<String> {
    built
        .report(kind, &Key::new(ns, name))
        .unwrap_or_else(|| panic!("no report for {kind} {ns}/{name}"))
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Asserts that `kind ns/name` has a problem at `path` with `reason` whose message contains
/// `needle`.
#[track_caller]
fn assert_problem(built: &Built, kind: Kind, name: &str, path: &str, reason: Reason, needle: &str) {
    let report = built
        .report(kind, &Key::new("shop", name))
        .unwrap_or_else(|| panic!("no report for {kind} shop/{name}"));
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.path == path && p.reason == reason && p.message.contains(needle)),
        "{kind} shop/{name}: expected {reason:?} at {path} containing {needle:?}, got {:#?}",
        report.problems
    );
}

const BASE: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: rabbitmq, namespace: shop}
stringData:
  url: "amqp://guest:guest@127.0.0.1:5672/%2f\n"
---
apiVersion: v1
kind: Secret
metadata: {name: pg, namespace: shop}
stringData:
  url: "postgres://a@pg-0:5432/events, postgres://a@pg-1:5432/events"
  replica: "postgres://a@pg-r:5432/events"
---
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: orders, namespace: shop, generation: 3, labels: {tier: business}}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}}
  store: {}
"#;

#[test]
fn defaults_fill_every_unset_field() {
    let yaml = format!(
        "{BASE}---\n{}",
        r#"
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: notify, namespace: shop, generation: 2}
spec:
  stream: orders
  sink: {uri: "http://notifier.shop.svc:8080/hooks"}
---
apiVersion: weir.dev/v1alpha1
kind: ArchivePolicy
metadata: {name: archive, namespace: shop}
spec:
  streamNames: [orders]
---
apiVersion: weir.dev/v1alpha1
kind: CachePolicy
metadata: {name: cache, namespace: shop}
spec:
  streams: {matchLabels: {tier: business}}
"#
    );
    let built = build(&index(&yaml), &defaults());
    assert!(built.is_valid(), "{:#?}", built.reports);
    assert_eq!(built.reports.len(), 4);

    let s = &built.topology.streams[&Key::new("shop", "orders")];
    assert_eq!(s.generation, 3);
    assert_eq!(s.labels.get("tier").map(String::as_str), Some("business"));
    assert_eq!(
        s.broker.url, "amqp://guest:guest@127.0.0.1:5672/%2f",
        "trimmed"
    );
    assert_eq!(s.broker.exchange, "weir.shop.orders");
    assert_eq!(s.broker.queue_type, QueueType::Quorum);
    let store = s
        .store
        .as_ref()
        .expect("store: {} means the default database");
    assert_eq!(store.urls, ["postgres://postgres@db:5432/weir"]);
    assert_eq!(store.read_urls, None);
    assert_eq!(store.pool, PoolPlan::default());
    assert_eq!(s.batching, BatchingPlan::default());
    assert_eq!(s.batching.max_events, 50);
    assert_eq!(s.batching.max_delay, Duration::from_millis(5));
    assert_eq!(s.validation, ValidationPlan::default());
    assert_eq!(s.compression, CompressionPlan::default());
    assert_eq!(s.deletion_policy, DeletionPolicy::Retain);

    let sub = &built.topology.subscriptions[&Key::new("shop", "notify")];
    assert_eq!(sub.generation, 2);
    assert_eq!(sub.streams, vec![Key::new("shop", "orders")]);
    assert!(!sub.multi);
    assert!(sub.filters.is_empty());
    assert_eq!(sub.sink.url, "http://notifier.shop.svc:8080/hooks");
    assert_eq!(sub.sink.format, SinkFormat::Binary);
    assert_eq!(sub.sink.auth_token, None);
    assert_eq!(sub.delivery, DeliveryPlan::default());
    assert_eq!(sub.delivery.retry, 5);
    assert_eq!(sub.delivery.backoff_max, Duration::from_secs(300));
    assert_eq!(sub.start_from, StartFrom::Latest);
    assert_eq!(sub.ordering, OrderingPlan::None);
    assert_eq!(sub.consumers, 4);
    assert_eq!(sub.rate_limit, None);
    assert_eq!(sub.reply, None);
    assert_eq!(sub.deletion_policy, DeletionPolicy::Delete);

    let ap = &built.topology.archive_policies[&Key::new("shop", "archive")];
    assert_eq!(ap.streams, [Key::new("shop", "orders")]);
    assert_eq!(ap.archive_after, Duration::from_secs(90 * 86_400));
    assert_eq!(ap.delete_after, None);
    assert_eq!(ap.schedule, Duration::from_secs(3600));
    assert_eq!(ap.segment_max_events, 100_000);
    assert_eq!(ap.segment_max_bytes, 64 << 20);
    assert_eq!(ap.compression_level, 6);
    assert!(ap.dictionary);
    assert_eq!(ap.destination, ArchiveDestinationPlan::Store);

    let cp = &built.topology.cache_policies[&Key::new("shop", "cache")];
    assert_eq!(cp.streams, [Key::new("shop", "orders")]);
    assert_eq!(cp.strategy, CacheStrategy::Lru);
    assert_eq!(cp.max_items, 1000);
    assert_eq!(cp.max_bytes, None);
    assert_eq!(cp.ttl, Duration::from_secs(300));

    for r in &built.reports {
        assert_eq!(spec_condition(r), None, "{:?}", r.key);
    }
}

#[test]
fn env_overrides_defaults_and_spec_overrides_env() {
    let env: BTreeMap<&str, &str> = [
        ("EVENT_BATCH_SIZE", "200"),
        ("EVENT_BATCH_TIMEOUT", "20"),
        ("EVENT_ARCHIVE_THRESHOLD", "30"),
        ("CACHE_TTL", "60"),
        ("CACHE_MAX_ITEMS", "5000"),
        ("DB_HOST", "pg.weir-system.svc"),
        ("DB_USERNAME", "weir"),
        ("DB_PASSWORD", "s3cr:t"),
        ("DB_DATABASE", "events"),
    ]
    .into();
    let defaults = Defaults::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap();
    let yaml = format!(
        "{BASE}---\n{}",
        r#"
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: payments, namespace: shop}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}}
  store: {urlSecretRef: {name: pg, key: url}}
  batching: {maxEvents: 10, maxDelay: 1ms}
---
apiVersion: weir.dev/v1alpha1
kind: ArchivePolicy
metadata: {name: from-env, namespace: shop}
spec: {streamNames: [orders]}
---
apiVersion: weir.dev/v1alpha1
kind: ArchivePolicy
metadata: {name: from-spec, namespace: shop}
spec: {streamNames: [payments], archiveAfter: 7d}
---
apiVersion: weir.dev/v1alpha1
kind: CachePolicy
metadata: {name: from-env, namespace: shop}
spec: {streamNames: [orders]}
---
apiVersion: weir.dev/v1alpha1
kind: CachePolicy
metadata: {name: from-spec, namespace: shop}
spec: {streamNames: [payments], ttl: 10s, maxItems: 7, strategy: LFU, maxBytes: 1MiB}
"#
    );
    let built = build(&index(&yaml), &defaults);
    assert!(built.is_valid(), "{:#?}", built.reports);
    let t = &built.topology;

    let orders = &t.streams[&Key::new("shop", "orders")];
    assert_eq!(orders.batching.max_events, 200);
    assert_eq!(orders.batching.max_delay, Duration::from_millis(20));
    assert_eq!(
        orders.store.as_ref().unwrap().urls,
        ["postgres://weir:s3cr%3At@pg.weir-system.svc:5432/events"]
    );
    let payments = &t.streams[&Key::new("shop", "payments")];
    assert_eq!(payments.batching.max_events, 10);
    assert_eq!(payments.batching.max_delay, Duration::from_millis(1));
    assert_eq!(
        payments.store.as_ref().unwrap().urls,
        [
            "postgres://a@pg-0:5432/events",
            "postgres://a@pg-1:5432/events"
        ],
        "a store with its own Secret ignores the default database"
    );

    assert_eq!(
        t.archive_policies[&Key::new("shop", "from-env")].archive_after,
        Duration::from_secs(30 * 86_400)
    );
    assert_eq!(
        t.archive_policies[&Key::new("shop", "from-spec")].archive_after,
        Duration::from_secs(7 * 86_400)
    );
    let env_cache = &t.cache_policies[&Key::new("shop", "from-env")];
    assert_eq!(
        (env_cache.ttl, env_cache.max_items),
        (Duration::from_secs(60), 5000)
    );
    let spec_cache = &t.cache_policies[&Key::new("shop", "from-spec")];
    assert_eq!(
        (spec_cache.ttl, spec_cache.max_items),
        (Duration::from_secs(10), 7)
    );
    assert_eq!(spec_cache.strategy, CacheStrategy::Lfu);
    assert_eq!(spec_cache.max_bytes, Some(1 << 20));
}

#[test]
fn secrets_and_config_maps_are_resolved() {
    let yaml = format!(
        "{BASE}---\n{}",
        r#"
apiVersion: v1
kind: Secret
metadata: {name: sink-token, namespace: shop}
stringData: {token: "abc123\n"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: schemas, namespace: shop}
data:
  paid.json: '{"type": "object", "required": ["amount"]}'
  refunded.yaml: |
    type: object
    properties:
      amount: {type: number}
---
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: payments, namespace: shop}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}, exchange: weir.shop.payments-x, queueType: classic}
  store:
    urlSecretRef: {name: pg, key: url}
    readUrlSecretRef: {name: pg, key: replica}
    pool: {size: 1, maxConnections: 3, idleTimeout: 1m, connectTimeout: 2s}
  validation:
    requiredExtensions: [correlationid]
    allowUnknownTypes: false
    schemas:
      - {type: payment.paid, schemaFrom: {configMapKeyRef: {name: schemas, key: paid.json}}}
      - {type: payment.refunded, dataschema: v2, schemaFrom: {configMapKeyRef: {name: schemas, key: refunded.yaml}}}
      - {type: payment.failed, schema: {type: object}}
  compression: {minBytes: 1KiB, level: 9}
  deletionPolicy: Delete
---
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: ledger, namespace: shop}
spec:
  stream: payments
  sink:
    ref: {name: ledger, port: 9000, path: /events}
    format: structured
    authSecretRef: {name: sink-token, key: token}
  delivery:
    deadLetterSink: {stream: orders}
    backoffPolicy: linear
  startFrom: "2024-05-01T00:00:00Z"
  ordering: perKey
  partitionKey: orderid
  partitions: 1
  consumers: 8
  rateLimit: {eventsPerSecond: 100}
  reply: {stream: orders}
  deletionPolicy: Retain
"#
    );
    let built = build(&index(&yaml), &defaults());
    assert!(built.is_valid(), "{:#?}", built.reports);
    let p = &built.topology.streams[&Key::new("shop", "payments")];
    assert_eq!(p.broker.exchange, "weir.shop.payments-x");
    assert_eq!(p.broker.queue_type, QueueType::Classic);
    let store = p.store.as_ref().unwrap();
    assert_eq!(store.urls.len(), 2);
    assert_eq!(
        store.read_urls.as_deref(),
        Some(&["postgres://a@pg-r:5432/events".to_string()][..])
    );
    assert_eq!(
        store.pool,
        PoolPlan {
            size: 1,
            max_connections: 3,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2)
        }
    );
    assert_eq!(p.validation.required_extensions, ["correlationid"]);
    assert!(!p.validation.allow_unknown_types);
    let schemas: Vec<(&str, Option<&str>, &serde_json::Value)> = p
        .validation
        .schemas
        .iter()
        .map(|s| (s.event_type.as_str(), s.dataschema.as_deref(), &s.schema))
        .collect();
    assert_eq!(
        schemas,
        [
            (
                "payment.paid",
                None,
                &serde_json::json!({"type": "object", "required": ["amount"]})
            ),
            (
                "payment.refunded",
                Some("v2"),
                &serde_json::json!({"type": "object", "properties": {"amount": {"type": "number"}}})
            ),
            (
                "payment.failed",
                None,
                &serde_json::json!({"type": "object"})
            ),
        ]
    );
    assert_eq!(
        p.compression,
        CompressionPlan {
            min_bytes: 1024,
            level: 9
        }
    );
    assert_eq!(p.deletion_policy, DeletionPolicy::Delete);

    let sub = &built.topology.subscriptions[&Key::new("shop", "ledger")];
    assert_eq!(sub.sink.url, "http://ledger.shop.svc:9000/events");
    assert_eq!(sub.sink.format, SinkFormat::Structured);
    assert_eq!(sub.sink.auth_token.as_deref(), Some("abc123"));
    assert_eq!(
        sub.delivery.dead_letter,
        Some(DeadLetterPlan::Stream(Key::new("shop", "orders")))
    );
    assert_eq!(sub.delivery.backoff_policy, BackoffPolicy::Linear);
    assert!(
        matches!(sub.start_from, StartFrom::Time(t) if t.to_rfc3339() == "2024-05-01T00:00:00+00:00")
    );
    assert_eq!(
        sub.ordering,
        OrderingPlan::PerKey {
            partition_key: "orderid".into(),
            partitions: 1
        }
    );
    assert_eq!(sub.consumers, 8);
    assert_eq!(sub.rate_limit, Some(100));
    assert_eq!(sub.reply, Some(Key::new("shop", "orders")));
    assert_eq!(sub.deletion_policy, DeletionPolicy::Retain);
}

#[test]
fn missing_references_are_reported_with_their_reason() {
    let yaml = r#"
apiVersion: v1
kind: Secret
metadata: {name: rabbitmq, namespace: shop}
stringData: {uri: "amqp://localhost"}
---
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: orders, namespace: shop}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}}
  store: {urlSecretRef: {name: pg, key: url}}
  validation:
    schemas:
      - {type: order.created, schemaFrom: {configMapKeyRef: {name: nope, key: a.json}}}
  ingest: {auth: {mode: Tokens, tokensSecretRef: {name: publishers}}}
---
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: notify, namespace: shop}
spec:
  stream: order
  sink: {uri: "http://n/", authSecretRef: {name: rabbitmq, key: token}}
  delivery: {deadLetterSink: {stream: dead}}
  reply: {stream: replies}
---
apiVersion: weir.dev/v1alpha1
kind: ArchivePolicy
metadata: {name: archive, namespace: shop}
spec: {streamNames: [orders, invoices]}
"#;
    let built = build(&index(yaml), &defaults());
    use Kind::*;
    use Reason::*;
    assert_problem(
        &built,
        EventStream,
        "orders",
        "spec.broker.urlSecretRef",
        SecretNotFound,
        "Secret shop/rabbitmq has no key \"url\"",
    );
    assert_problem(
        &built,
        EventStream,
        "orders",
        "spec.store.urlSecretRef",
        SecretNotFound,
        "Secret shop/pg not found",
    );
    assert_problem(
        &built,
        EventStream,
        "orders",
        "spec.validation.schemas[0].schemaFrom",
        ConfigMapNotFound,
        "ConfigMap shop/nope not found",
    );
    assert_problem(
        &built,
        EventStream,
        "orders",
        "spec.ingest.auth.tokensSecretRef",
        SecretNotFound,
        "Secret shop/publishers not found",
    );
    assert_problem(
        &built,
        Subscription,
        "notify",
        "spec.stream",
        StreamNotFound,
        "EventStream shop/order not found",
    );
    assert_problem(
        &built,
        Subscription,
        "notify",
        "spec.sink.authSecretRef",
        SecretNotFound,
        "no key \"token\"",
    );
    assert_problem(
        &built,
        Subscription,
        "notify",
        "spec.delivery.deadLetterSink.stream",
        StreamNotFound,
        "shop/dead",
    );
    assert_problem(
        &built,
        Subscription,
        "notify",
        "spec.reply.stream",
        StreamNotFound,
        "shop/replies",
    );
    assert_problem(
        &built,
        ArchivePolicy,
        "archive",
        "spec.streamNames[1]",
        StreamNotFound,
        "shop/invoices",
    );
    assert!(built.topology.streams.is_empty());
    assert!(built.topology.subscriptions.is_empty());
    assert!(built.topology.archive_policies.is_empty());
    // Every problem of a resource is listed, not just the first.
    assert_eq!(problems(&built, EventStream, "shop", "orders").len(), 4);
    assert_eq!(problems(&built, Subscription, "shop", "notify").len(), 4);

    let ready = spec_condition(
        built
            .report(Subscription, &Key::new("shop", "notify"))
            .unwrap(),
    )
    .expect("an invalid resource is not ready");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "StreamNotFound");
    assert!(
        ready
            .message
            .starts_with("spec.stream: EventStream shop/order not found; "),
        "{}",
        ready.message
    );
}

#[test]
fn invalid_values_name_field_and_value() {
    let yaml = r#"
apiVersion: v1
kind: Secret
metadata: {name: rabbitmq, namespace: shop}
stringData: {url: "http://guest:hunter2@localhost", pg: "mysql://root:hunter2@db"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: schemas, namespace: shop}
data: {bad.json: "{not json: [", worse.json: '{"type": "objekt"}'}
---
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: orders, namespace: shop}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}, exchange: amq.orders}
  store:
    urlSecretRef: {name: rabbitmq, key: pg}
    pool: {size: 20, maxConnections: 10, connectTimeout: 0s}
  batching: {maxEvents: 0, maxBytes: 1 MiB, maxDelay: 5 sec}
  validation:
    maxEventBytes: "0"
    requiredExtensions: [CorrelationId]
    schemas:
      - {type: a, schemaFrom: {configMapKeyRef: {name: schemas, key: bad.json}}}
      - {type: b, schemaFrom: {configMapKeyRef: {name: schemas, key: worse.json}}}
      - {type: c, schema: {type: 12}}
      - {type: d}
      - {type: c, schema: {type: object}}
  compression: {level: 30}
  pii: {fields: [customer/email]}
"#;
    let built = build(&index(yaml), &defaults());
    let got = problems(&built, Kind::EventStream, "shop", "orders");
    let expect = [
        "spec.broker.urlSecretRef: Secret shop/rabbitmq key \"url\" is not an amqp:// or amqps:// URL",
        "spec.broker.exchange: exchange \"amq.orders\": names starting with \"amq.\" are reserved by RabbitMQ",
        "spec.store.urlSecretRef: Secret shop/rabbitmq key \"pg\": URL 1 of 1 is not a postgres:// URL",
        "spec.store.pool: size (20) must not exceed maxConnections (10)",
        "spec.store.pool.connectTimeout: must be greater than zero",
        "spec.batching.maxEvents: must be at least 1",
        "spec.batching.maxBytes: invalid size \"1 MiB\": expected",
        "spec.batching.maxDelay: invalid duration \"5 sec\": expected an integer and a unit (ms, s, m, h, d), e.g. \"250ms\" or \"90d\"",
        "spec.validation.requiredExtensions[0]: \"CorrelationId\" is not a CloudEvents attribute name",
        "spec.validation.schemas[0].schemaFrom: ConfigMap shop/schemas key \"bad.json\" is neither JSON nor YAML",
        "spec.validation.schemas[1].schemaFrom: invalid JSON Schema",
        "spec.validation.schemas[2].schema: invalid JSON Schema",
        "spec.validation.schemas[3]: exactly one of schema or schemaFrom must be set",
        "spec.validation.schemas[4]: a second schema for type \"c\"",
        "spec.validation.maxEventBytes: must be greater than zero",
        "spec.compression.level: zstd level 30 is outside 1..=22",
        "spec.pii.fields[0]: \"customer/email\" is not a JSON pointer",
        "spec.pii.keySecretRef: required when fields are listed",
    ];
    for e in expect {
        assert!(
            got.iter().any(|g| g.starts_with(e)),
            "missing {e:?} in {got:#?}"
        );
    }
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    assert!(
        got.iter().all(|g| !g.contains("hunter2")),
        "Secret values must never appear in problems: {got:#?}"
    );
}

#[test]
fn subscription_problems() {
    let yaml = format!(
        "{BASE}---\n{}",
        r#"
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: clicks, namespace: shop}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}}
---
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: replay-clicks, namespace: shop}
spec:
  stream: clicks
  startFrom: earliest
  sink: {uri: "http://x/"}
---
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: bad, namespace: shop}
spec:
  stream: orders
  filters:
    - prefix: {type: order.}
    - any:
        - exact: {Region: eu}
        - suffix: {type: .created}
  sink: {uri: "http://x/", ref: {name: y}}
  delivery:
    timeout: 0s
    backoffDelay: 10m
    deadLetterSink: {uri: "ftp://dead/", stream: orders}
  startFrom: yesterday
  partitionKey: Subject
---
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: bad-ref, namespace: shop}
spec:
  stream: orders
  sink: {ref: {kind: Deployment, name: Notifier, path: hooks}}
  delivery: {deadLetterSink: {uri: "not a url"}}
"#
    );
    let built = build(&index(&yaml), &defaults());
    use Kind::Subscription;
    use Reason::InvalidSpec;
    assert_problem(
        &built,
        Subscription,
        "replay-clicks",
        "spec.startFrom",
        InvalidSpec,
        "EventStream shop/clicks has no store",
    );
    assert_eq!(
        problems(&built, Subscription, "shop", "replay-clicks").len(),
        1
    );

    assert_problem(
        &built,
        Subscription,
        "bad",
        "spec.filters[1].any[0].exact",
        InvalidSpec,
        "\"Region\" must be lowercase",
    );
    assert_problem(
        &built,
        Subscription,
        "bad",
        "spec.sink",
        InvalidSpec,
        "exactly one of uri or ref",
    );
    assert_problem(
        &built,
        Subscription,
        "bad",
        "spec.delivery.timeout",
        InvalidSpec,
        "greater than zero",
    );
    assert_problem(
        &built,
        Subscription,
        "bad",
        "spec.delivery.backoffDelay",
        InvalidSpec,
        "exceeds backoffMax",
    );
    assert_problem(
        &built,
        Subscription,
        "bad",
        "spec.delivery.deadLetterSink",
        InvalidSpec,
        "exactly one of uri, ref or stream",
    );
    assert_problem(
        &built,
        Subscription,
        "bad",
        "spec.startFrom",
        InvalidSpec,
        "invalid startFrom \"yesterday\"",
    );
    assert_problem(
        &built,
        Subscription,
        "bad",
        "spec.partitionKey",
        InvalidSpec,
        "\"Subject\"",
    );
    assert_eq!(problems(&built, Subscription, "shop", "bad").len(), 7);

    assert_problem(
        &built,
        Subscription,
        "bad-ref",
        "spec.sink.ref.kind",
        InvalidSpec,
        "only Service",
    );
    assert_problem(
        &built,
        Subscription,
        "bad-ref",
        "spec.sink.ref.name",
        InvalidSpec,
        "\"Notifier\"",
    );
    assert_problem(
        &built,
        Subscription,
        "bad-ref",
        "spec.sink.ref.path",
        InvalidSpec,
        "\"hooks\"",
    );
    assert_problem(
        &built,
        Subscription,
        "bad-ref",
        "spec.delivery.deadLetterSink.uri",
        InvalidSpec,
        "not an absolute http",
    );
    assert!(built.topology.subscriptions.is_empty());
}

#[test]
fn store_without_secret_needs_a_default_database() {
    let built = build(&index(BASE), &Defaults::default());
    assert_problem(
        &built,
        Kind::EventStream,
        "orders",
        "spec.store.urlSecretRef",
        Reason::InvalidSpec,
        "no default database",
    );
}

/// TLS this build cannot give is refused, never downgraded to plain text.
#[test]
fn tls_that_cannot_be_honoured_is_refused() {
    let yaml = r#"
apiVersion: v1
kind: Secret
metadata: {name: tls, namespace: shop}
stringData:
  amqp: "amqps://guest:secret@broker.example:5671/%2f"
  pg: "postgres://a@pg-0:5432/events?sslmode=allow"
---
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: orders, namespace: shop}
spec:
  broker: {urlSecretRef: {name: tls, key: amqp}}
  store: {urlSecretRef: {name: tls, key: pg}}
"#;
    let built = build(&index(yaml), &defaults());
    assert!(built.topology.streams.is_empty());
    assert_problem(
        &built,
        Kind::EventStream,
        "orders",
        "spec.store.urlSecretRef",
        Reason::InvalidSpec,
        "sslmode=allow is not supported",
    );
    let all = problems(&built, Kind::EventStream, "shop", "orders").join("\n");
    assert!(!all.contains("secret@"), "a message shows the URL: {all}");
    // amqps:// is TLS on rustls: the broker URL itself is fine.
    assert!(!all.contains("spec.broker"), "{all}");
}

/// TLS to PostgreSQL: verify-full with a CA is planned; settings that would be ignored (a CA
/// in the URL and in caSecretRef, a parameter in the wrong case, certificates with a mode
/// that may not encrypt) are refused, naming the field.
#[test]
fn store_tls_is_planned_and_ignored_settings_are_refused() {
    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBeTCCAR+gAwIBAgIUSk5S0pGhXq8t1O3+SHb2fWqgQx0wCgYIKoZIzj0EAwIw\n-----END CERTIFICATE-----";
    let stream = |url: &str, tls: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: db, namespace: shop}}\n\
             stringData: {{url: \"{url}\", ca: \"{}\"}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: shop}}\n\
             stringData: {{url: \"amqp://guest:guest@rabbitmq:5672/%2f\"}}\n---\n\
             apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: shop}}\n\
             spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}\n  \
             store: {{urlSecretRef: {{name: db, key: url}}, tls: {tls}}}\n",
            CA.replace('\n', "\\n")
        )
    };
    let ca_ref = "{caSecretRef: {name: db, key: ca}}";
    let built = build(
        &index(&stream(
            "postgres://a:pw@pg-0/events?sslmode=verify-full",
            ca_ref,
        )),
        &defaults(),
    );
    let plan = &built.topology.streams[&Key::new("shop", "orders")];
    let store = plan.store.as_ref().expect("a store");
    assert!(store.tls.ca_pem.is_some(), "{:?}", store.tls);

    for (url, tls, path, says) in [
        (
            "postgres://a@pg-0/events?sslmode=verify-full&sslrootcert=/ca.pem",
            ca_ref,
            "spec.store.tls.caSecretRef",
            "names sslrootcert too",
        ),
        (
            "postgres://a@pg-0/events?sslmode=prefer",
            ca_ref,
            "spec.store.tls",
            "may connect in plain text",
        ),
        (
            "postgres://a@pg-0/events?SSLMODE=verify-full",
            "{}",
            "spec.store.urlSecretRef",
            "lower case",
        ),
        (
            "postgres://a@pg-0/events?sslrootcert=/ca.pem",
            "{}",
            "spec.store.urlSecretRef",
            "ignored with sslmode=prefer",
        ),
    ] {
        let built = build(&index(&stream(url, tls)), &defaults());
        assert_problem(
            &built,
            Kind::EventStream,
            "orders",
            path,
            Reason::InvalidSpec,
            says,
        );
    }
}

#[test]
fn two_streams_cannot_share_an_exchange() {
    let yaml = format!(
        "{BASE}---\n{}",
        r#"
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: copy, namespace: shop}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}, exchange: weir.shop.orders}
"#
    );
    let built = build(&index(&yaml), &defaults());
    // Without creation times, namespace/name decides: "copy" < "orders".
    assert!(
        built
            .topology
            .streams
            .contains_key(&Key::new("shop", "copy"))
    );
    assert_problem(
        &built,
        Kind::EventStream,
        "orders",
        "spec.broker.exchange",
        Reason::InvalidSpec,
        "already used by EventStream shop/copy",
    );
}

#[test]
fn policies() {
    let yaml = format!(
        "{BASE}---\n{}",
        r#"
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: clicks, namespace: shop, labels: {tier: business}}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}}
---
apiVersion: weir.dev/v1alpha1
kind: ArchivePolicy
metadata: {name: a-newer, namespace: shop, creationTimestamp: "2024-02-01T00:00:00Z"}
spec: {streamNames: [orders]}
---
apiVersion: weir.dev/v1alpha1
kind: ArchivePolicy
metadata: {name: z-older, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  streams: {matchLabels: {tier: business}}
  archiveAfter: 30d
  deleteAfter: 365d
  schedule: 15m
  segment: {maxEvents: 1000, maxBytes: 8MiB}
  compression: {level: 19, dictionary: false}
  destination: {volume: {path: /var/lib/weir/archive}}
---
apiVersion: weir.dev/v1alpha1
kind: ArchivePolicy
metadata: {name: bad, namespace: shop}
spec:
  streamNames: [clicks]
  streams: {matchLabels: {tier: business}}
  archiveAfter: 30d
  deleteAfter: 30d
  destination: {volume: {path: relative/dir}}
  segment: {maxEvents: 0}
---
apiVersion: weir.dev/v1alpha1
kind: ArchivePolicy
metadata: {name: broker-only, namespace: shop}
spec: {streamNames: [clicks], deleteAfter: 10d}
---
apiVersion: weir.dev/v1alpha1
kind: CachePolicy
metadata: {name: first, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {streamNames: [orders], strategy: TTL}
---
apiVersion: weir.dev/v1alpha1
kind: CachePolicy
metadata: {name: second, namespace: shop, creationTimestamp: "2024-03-01T00:00:00Z"}
spec: {streams: {}, maxItems: 0, ttl: 5 min}
"#
    );
    let built = build(&index(&yaml), &defaults());
    use Kind::{ArchivePolicy, CachePolicy};
    use Reason::*;

    // The older policy keeps the stream, although its name sorts later; the selector skipped
    // the broker-only stream `clicks` silently.
    let older = &built.topology.archive_policies[&Key::new("shop", "z-older")];
    assert_eq!(older.streams, [Key::new("shop", "orders")]);
    assert_eq!(older.archive_after, Duration::from_secs(30 * 86_400));
    assert_eq!(older.delete_after, Some(Duration::from_secs(365 * 86_400)));
    assert_eq!(older.schedule, Duration::from_secs(900));
    assert_eq!(
        (older.segment_max_events, older.segment_max_bytes),
        (1000, 8 << 20)
    );
    assert_eq!((older.compression_level, older.dictionary), (19, false));
    assert_eq!(
        older.destination,
        ArchiveDestinationPlan::Volume("/var/lib/weir/archive".into())
    );
    assert_problem(
        &built,
        ArchivePolicy,
        "a-newer",
        "spec.streamNames[0]",
        PolicyConflict,
        "already selected by ArchivePolicy shop/z-older",
    );
    assert_eq!(problems(&built, ArchivePolicy, "shop", "a-newer").len(), 1);

    assert_problem(
        &built,
        ArchivePolicy,
        "bad",
        "spec",
        InvalidSpec,
        "exactly one of streams or streamNames",
    );
    assert_problem(
        &built,
        ArchivePolicy,
        "bad",
        "spec.deleteAfter",
        InvalidSpec,
        "\"30d\" must exceed archiveAfter (30d)",
    );
    assert_problem(
        &built,
        ArchivePolicy,
        "bad",
        "spec.destination.volume.path",
        InvalidSpec,
        "absolute path",
    );
    assert_problem(
        &built,
        ArchivePolicy,
        "bad",
        "spec.segment.maxEvents",
        InvalidSpec,
        "at least 1",
    );
    assert_eq!(problems(&built, ArchivePolicy, "shop", "bad").len(), 4);
    // deleteAfter is compared with the default archiveAfter (90d) too.
    assert_problem(
        &built,
        ArchivePolicy,
        "broker-only",
        "spec.streamNames[0]",
        InvalidSpec,
        "EventStream shop/clicks has no store",
    );
    assert_problem(
        &built,
        ArchivePolicy,
        "broker-only",
        "spec.deleteAfter",
        InvalidSpec,
        "must exceed archiveAfter (90d)",
    );

    let first = &built.topology.cache_policies[&Key::new("shop", "first")];
    assert_eq!(first.strategy, CacheStrategy::Ttl);
    assert_problem(
        &built,
        CachePolicy,
        "second",
        "spec.streams",
        PolicyConflict,
        "already selected by CachePolicy shop/first",
    );
    assert_problem(
        &built,
        CachePolicy,
        "second",
        "spec.maxItems",
        InvalidSpec,
        "at least 1",
    );
    assert_problem(
        &built,
        CachePolicy,
        "second",
        "spec.ttl",
        InvalidSpec,
        "invalid duration \"5 min\"",
    );
    // An archive policy and a cache policy on one stream do not conflict.
    assert!(
        built.topology.cache_policies[&Key::new("shop", "first")]
            .streams
            .contains(&Key::new("shop", "orders"))
    );
}

#[test]
fn three_mistakes_in_three_resources_give_three_reports() {
    let yaml = format!(
        "{BASE}---\n{}",
        r#"
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: slow, namespace: shop}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}}
  batching: {maxDelay: 5 sec}
---
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: typo, namespace: shop}
spec:
  stream: order
  sink: {uri: "http://n/"}
---
apiVersion: weir.dev/v1alpha1
kind: CachePolicy
metadata: {name: cache, namespace: shop}
spec: {streamNames: [orders], ttl: 5 minutes}
---
apiVersion: v1
kind: Secret
metadata: {name: rabbitmq, namespace: other}
stringData: {url: "amqp://localhost"}
---
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: events, namespace: other}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}}
---
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: fine, namespace: other}
spec:
  stream: events
  sink: {uri: "http://n/"}
"#
    );
    let idx = index(&yaml);
    let built = build(&idx, &defaults());
    // One report per resource, valid ones included, in kind then key order.
    let order: Vec<String> = built
        .reports
        .iter()
        .map(|r| format!("{} {}", r.kind, r.key))
        .collect();
    assert_eq!(
        order,
        [
            "EventStream other/events",
            "EventStream shop/orders",
            "EventStream shop/slow",
            "Subscription other/fine",
            "Subscription shop/typo",
            "CachePolicy shop/cache",
        ]
    );
    let broken: Vec<(String, Vec<String>)> = built
        .reports
        .iter()
        .filter(|r| !r.is_valid())
        .map(|r| {
            (
                format!("{} {}", r.kind, r.key),
                r.problems.iter().map(|p| p.path.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        broken,
        [
            (
                "EventStream shop/slow".to_string(),
                vec!["spec.batching.maxDelay".to_string()]
            ),
            (
                "Subscription shop/typo".to_string(),
                vec!["spec.stream".to_string()]
            ),
            (
                "CachePolicy shop/cache".to_string(),
                vec!["spec.ttl".to_string()]
            ),
        ]
    );
    assert_eq!(
        problems(&built, Kind::EventStream, "shop", "slow"),
        [
            "spec.batching.maxDelay: invalid duration \"5 sec\": expected an integer and a unit (ms, s, m, h, d), e.g. \"250ms\" or \"90d\""
        ]
    );
    // The mistakes affect nothing else.
    assert_eq!(built.topology.streams.len(), 2);
    assert_eq!(built.topology.subscriptions.len(), 1);
    assert!(built.topology.cache_policies.is_empty());
}

/// `consumers: 0` is how `/scale` (KEDA) parks a subscription: valid in both modes (the same
/// build serves `weir run -f`, `weir validate` and the operator), kept as 0 in the plan, with
/// or without ordering and replay.
#[test]
fn consumers_zero_is_valid() {
    let yaml = format!(
        "{BASE}---\n{}",
        r#"
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: parked, namespace: shop}
spec:
  stream: orders
  sink: {uri: "http://notifier.shop.svc:8080/hooks"}
  consumers: 0
---
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: parked-ordered, namespace: shop}
spec:
  stream: orders
  sink: {uri: "http://notifier.shop.svc:8080/hooks"}
  ordering: perKey
  startFrom: earliest
  consumers: 0
"#
    );
    let built = build(&index(&yaml), &defaults());
    assert!(built.is_valid(), "{:#?}", built.reports);
    for name in ["parked", "parked-ordered"] {
        assert!(problems(&built, Kind::Subscription, "shop", name).is_empty());
        assert_eq!(
            built.topology.subscriptions[&Key::new("shop", name)].consumers,
            0
        );
    }
}

/// A label change keeps the stream running (labels only decide what selects it); a spec
/// change still restarts it.
#[test]
fn a_label_change_keeps_the_stream_running() {
    let yaml = |labels: &str, max_events: u32| {
        format!(
            "{BASE}---\napiVersion: weir.dev/v1alpha1\nkind: EventStream\n\
             metadata: {{name: orders, namespace: shop, labels: {{{labels}}}}}\nspec:\n  \
             broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}\n  \
             store: {{urlSecretRef: {{name: pg, key: url}}}}\n  \
             batching: {{maxEvents: {max_events}}}\n"
        )
    };
    let plan = |labels: &str, max_events: u32| {
        let built = build(&index(&yaml(labels, max_events)), &defaults());
        assert!(built.is_valid(), "{:#?}", built.reports);
        built.topology.streams[&Key::new("shop", "orders")].clone()
    };
    let gold = plan("tier: gold", 10);
    let lead = plan("tier: lead", 10);
    assert_ne!(gold.labels, lead.labels);
    assert!(gold.same_runtime(&lead));
    assert!(!gold.same_runtime(&plan("tier: gold", 20)));
}
