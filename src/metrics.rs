//! Prometheus metrics (prefix `weir_`, base units, bounded labels: namespace, stream,
//! subscription, outcome, code — never ids or URLs).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric Weir exports, registered on one registry per process (tests create their own).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub ingest_requests: IntCounterVec,
    pub ingest_events: IntCounterVec,
    pub ingest_rejected: IntCounterVec,
    pub ingest_request_duration: HistogramVec,
    pub batch_events: HistogramVec,
    pub store_append_duration: HistogramVec,
    pub store_append_retries: IntCounterVec,
    pub store_appends: IntCounterVec,
    pub relay_lag: IntGaugeVec,
    pub relay_events: IntCounterVec,
    pub broker_publish: IntCounterVec,
    pub compression_bytes: IntCounterVec,
    pub stream_head: IntGaugeVec,
    pub db_connections: IntGaugeVec,
    pub db_waiting: IntGaugeVec,
    pub db_acquire_duration: Histogram,
    pub delivery_attempts: IntCounterVec,
    pub delivery_duration: HistogramVec,
    pub deliveries: IntCounterVec,
    pub delivery_retries: IntCounterVec,
    pub deadletters: IntCounterVec,
    pub subscription_backlog: IntGaugeVec,
    pub subscription_inflight: IntGaugeVec,
    pub cache_requests: IntCounterVec,
    pub cache_evictions: IntCounterVec,
    pub cache_entries: IntGaugeVec,
    pub db_acquire_timeouts: IntCounterVec,
    pub db_pool_up: IntGaugeVec,
    pub db_replica_lag: prometheus::GaugeVec,
    pub archive_events: IntCounterVec,
    pub archive_bytes: IntCounterVec,
    pub archive_runs: IntCounterVec,
    pub archive_run_duration: HistogramVec,
    pub archive_deleted_events: IntCounterVec,
    pub followers: IntGaugeVec,
    pub follow_ends: IntCounterVec,
    pub topology_sync_duration: HistogramVec,
    pub topology_plans: IntCounterVec,
}

/// Latency buckets from 0.5 ms to 10 s: ingest answers in milliseconds when healthy and the
/// tail matters up to the request deadline.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    // Registration fails only for a duplicate name, a programming error caught by every test.
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], b: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(b.to_vec()), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    h
}

impl Metrics {
    /// Records the time one phase of a topology sync took (`weir_topology_sync_seconds`).
    pub fn observe_sync(&self, phase: &str, took: std::time::Duration) {
        self.topology_sync_duration
            .with_label_values(&[phase])
            .observe(took.as_secs_f64());
    }

    /// Counts what a topology build planned and reused.
    pub fn count_plans(&self, counts: crate::topology::BuildCounts) {
        let c = &self.topology_plans;
        c.with_label_values(&["planned"])
            .inc_by(counts.planned as u64);
        c.with_label_values(&["reused"])
            .inc_by(counts.reused as u64);
    }

    pub fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = r.register(Box::new(pc));
        }
        let ns = &["namespace", "stream"];
        Metrics {
            ingest_requests: counter(
                &r,
                "weir_ingest_requests_total",
                "Publish requests by HTTP status code.",
                &["namespace", "stream", "code"],
            ),
            ingest_events: counter(
                &r,
                "weir_ingest_events_total",
                "Published events by outcome (accepted, duplicate, rejected).",
                &["namespace", "stream", "outcome"],
            ),
            ingest_rejected: counter(
                &r,
                "weir_ingest_rejected_total",
                "Events refused by an ingest limit before they were stored, by reason \
                 (rate_limited: over spec.ingest.rateLimit; over_burst: a request of more \
                 events than its burst).",
                &["namespace", "stream", "reason"],
            ),
            ingest_request_duration: histogram(
                &r,
                "weir_ingest_request_duration_seconds",
                "Publish request latency, from the first byte read to the answer.",
                ns,
                LATENCY_BUCKETS,
            ),
            batch_events: histogram(
                &r,
                "weir_batch_events",
                "Events per store transaction (group commit).",
                ns,
                BATCH_BUCKETS,
            ),
            store_append_duration: histogram(
                &r,
                "weir_store_append_duration_seconds",
                "Duration of one append transaction.",
                ns,
                LATENCY_BUCKETS,
            ),
            store_append_retries: counter(
                &r,
                "weir_store_append_retries_total",
                "Append transactions retried after a transient database error.",
                ns,
            ),
            store_appends: counter(
                &r,
                "weir_store_appends_total",
                "Append statements by how the batch was decided: direct (on a fresh read), \
                 chained (on top of batches still committing), locked (decided again under the \
                 stream's lock after its guard failed), read (nothing to write).",
                &["namespace", "stream", "path"],
            ),
            relay_lag: gauge(
                &r,
                "weir_relay_lag_events",
                "Stored events not yet confirmed by the broker (head minus relay checkpoint).",
                ns,
            ),
            relay_events: counter(
                &r,
                "weir_relay_events_total",
                "Events the relay published to the stream exchange, by routing outcome.",
                &["namespace", "stream", "outcome"],
            ),
            broker_publish: counter(
                &r,
                "weir_broker_publish_total",
                "Broker-only publishes by outcome (routed, unroutable, failed).",
                &["namespace", "stream", "outcome"],
            ),
            compression_bytes: counter(
                &r,
                "weir_store_payload_bytes_total",
                "Payload bytes written to the store, raw and as stored (after compression).",
                &["namespace", "stream", "kind"],
            ),
            stream_head: gauge(
                &r,
                "weir_stream_head_position",
                "Last stored position of the stream, as seen by this process.",
                ns,
            ),
            db_connections: gauge(
                &r,
                "weir_db_connections",
                "Database connections by state (active, idle).",
                &["pool", "state"],
            ),
            db_waiting: gauge(
                &r,
                "weir_db_waiting",
                "Tasks waiting for a database connection.",
                &["pool"],
            ),
            db_acquire_duration: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "weir_db_acquire_duration_seconds",
                        "Time to acquire a database connection.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .unwrap_or_else(|e| panic!("metric: {e}"));
                r.register(Box::new(h.clone()))
                    .unwrap_or_else(|e| panic!("register: {e}"));
                h
            },
            delivery_attempts: counter(
                &r,
                "weir_delivery_attempts_total",
                "Delivery attempts by outcome (success, 4xx, 5xx, timeout, error).",
                &["namespace", "subscription", "outcome"],
            ),
            delivery_duration: histogram(
                &r,
                "weir_delivery_duration_seconds",
                "Duration of one delivery attempt, until the sink's answer.",
                &["namespace", "subscription"],
                LATENCY_BUCKETS,
            ),
            deliveries: counter(
                &r,
                "weir_deliveries_total",
                "Events settled by outcome (delivered, deadlettered, filtered, duplicate, unbound).",
                &["namespace", "subscription", "outcome"],
            ),
            delivery_retries: counter(
                &r,
                "weir_delivery_retries_total",
                "Retries scheduled after a failed attempt.",
                &["namespace", "subscription"],
            ),
            deadletters: counter(
                &r,
                "weir_deadletters_total",
                "Events moved to the dead-letter queue.",
                &["namespace", "subscription"],
            ),
            subscription_backlog: gauge(
                &r,
                "weir_subscription_backlog_messages",
                "Messages waiting in the subscription's queues plus deliveries in flight (sampled).",
                &["namespace", "subscription"],
            ),
            subscription_inflight: gauge(
                &r,
                "weir_subscription_inflight",
                "Delivery attempts in flight in this worker.",
                &["namespace", "subscription"],
            ),
            cache_requests: counter(
                &r,
                "weir_cache_requests_total",
                "Read-cache lookups by result (hit, miss), per CachePolicy.",
                &["namespace", "policy", "result"],
            ),
            cache_evictions: counter(
                &r,
                "weir_cache_evictions_total",
                "Entries evicted from a read cache (full or expired; not invalidations).",
                &["namespace", "policy"],
            ),
            cache_entries: gauge(
                &r,
                "weir_cache_entries",
                "Entries held in a read cache (sampled at scrape).",
                &["namespace", "policy"],
            ),
            db_acquire_timeouts: counter(
                &r,
                "weir_db_acquire_timeouts_total",
                "Connection acquisitions that gave up after the pool's connectTimeout.",
                &["pool"],
            ),
            db_pool_up: gauge(
                &r,
                "weir_db_pool_up",
                "1 if the pool's last health check got a connection and ran a query, else 0.",
                &["pool"],
            ),
            db_replica_lag: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "weir_db_replica_lag_seconds",
                        "Age of the last transaction a standby replayed (0 on a primary), sampled by the pool health check.",
                    ),
                    &["pool"],
                )
                .unwrap_or_else(|e| panic!("metric: {e}"));
                r.register(Box::new(g.clone()))
                    .unwrap_or_else(|e| panic!("register: {e}"));
                g
            },
            archive_events: counter(
                &r,
                "weir_archive_events_total",
                "Events moved from the hot table into archive segments.",
                ns,
            ),
            archive_bytes: counter(
                &r,
                "weir_archive_bytes_total",
                "Bytes archived: raw (events' records) and stored (segments, compressed).",
                &["namespace", "stream", "kind"],
            ),
            archive_runs: counter(
                &r,
                "weir_archive_runs_total",
                "Archive runs by outcome (ok, busy: another process held the stream, error).",
                &["namespace", "stream", "outcome"],
            ),
            archive_run_duration: histogram(
                &r,
                "weir_archive_run_duration_seconds",
                "Duration of an archive run that did its work.",
                ns,
                &[
                    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                ],
            ),
            archive_deleted_events: counter(
                &r,
                "weir_archive_deleted_events_total",
                "Archived events deleted by deleteAfter.",
                ns,
            ),
            followers: gauge(
                &r,
                "weir_followers",
                "Live followers (follow=true, Server-Sent Events) being served.",
                ns,
            ),
            follow_ends: counter(
                &r,
                "weir_follow_ends_total",
                "Live follows ended by the worker, by reason: stalled (the client stopped \
                 reading), shutdown, error (the store could not be read).",
                &["namespace", "stream", "reason"],
            ),
            topology_sync_duration: histogram(
                &r,
                "weir_topology_sync_seconds",
                "Time a topology change spends in Weir before its streams and subscriptions \
                 start or stop, by phase: load (standalone: reading and parsing the \
                 folder), index (operator: the watched objects and their Secrets into one \
                 index), build (validating and planning), apply (moving the data plane to the plan, starts included).",
                &["phase"],
                &[
                    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
                    1.0, 5.0,
                ],
            ),
            topology_plans: counter(
                &r,
                "weir_topology_plans_total",
                "EventStreams and Subscriptions a topology build planned (planned) or took \
                 unchanged from the previous build (reused).",
                &["outcome"],
            ),
            registry: r,
        }
    }

    /// Creates a stream's error series at zero, so that dashboards and alerts see 0 rather
    /// than no data before the first error.
    pub fn init_stream(&self, namespace: &str, stream: &str) {
        let l = [namespace, stream];
        self.store_append_retries.with_label_values(&l);
        for path in ["read", "direct", "chained", "locked"] {
            self.store_appends
                .with_label_values(&[namespace, stream, path]);
        }
        for outcome in ["accepted", "duplicate", "rejected"] {
            self.ingest_events
                .with_label_values(&[namespace, stream, outcome]);
        }
        self.ingest_rejected
            .with_label_values(&[namespace, stream, "rate_limited"]);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
