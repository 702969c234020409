//! The delivery scenarios, measured at a sink inside this process ([`Sink`]):
//!
//! - `e2e`: HTTP publish → store → relay → subscription queue → HTTP POST to the sink, at
//!   fixed offered rates. Latency is the sink's arrival time minus the publish time the event
//!   carries. Baseline: a raw lapin publisher → quorum queue → consumer → HTTP POST loop in
//!   this process (no store, no validation), at the same rates.
//! - `replay`: events stored before a Subscription with `startFrom: earliest` is created;
//!   the time until the sink has them all. Baseline: one raw `SELECT` of the same rows in
//!   position order feeding the same HTTP POST loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::broker::{bind_queue, c_await, delete_exchange, publish_event};
use super::load::{self, payload};
use super::pipeline::{Database, Pipeline};
use super::report::{Measurement, Report, Versions};
use super::scenarios::{PUBLISH_WINDOW, stream_yaml, versions};
use super::sink::{self, Arrivals, RawEvent, Sink};
use super::{BenchArgs, BenchError};

/// Deliveries in flight at once, for Weir (the Subscription's `consumers`, which is also its
/// prefetch) and for the raw loops alike, so both sides get the same concurrency. 16 in
/// flight sustain 20k events/s as long as a POST to the local sink takes under 0.8 ms; more
/// would mostly add contention on a 2-core machine.
pub(super) const DELIVERY_CONSUMERS: usize = 16;
/// Stop waiting for deliveries after this long without a new one (the counts then show what
/// is missing).
pub(super) const STALL: Duration = Duration::from_secs(30);
/// The offered rates of the e2e sweep; `None` is as fast as possible.
const E2E_RATES: [Option<u64>; 4] = [Some(1_000), Some(5_000), Some(20_000), None];
/// e2e runs send one event per request by default, and like the batch-1 ingest variants
/// measure at most this many events per offered rate: larger runs take minutes without
/// changing the picture.
const E2E_EVENT_CAP: usize = 50_000;
/// Publishers for one-event requests: enough that a slow answer does not hold back the
/// offered rate (as in `ingest`).
const SINGLE_EVENT_CLIENTS: usize = 64;
/// Warm-up events before the first measurement of each side.
const WARM_UP: usize = 500;
/// Rows the replay baseline keeps buffered between its `SELECT` and the POST loop: a page,
/// like Weir's catch-up (500), so the reader never runs far ahead of the sink.
pub(super) const REPLAY_BUFFER: usize = 500;

fn broker_err(e: lapin::Error) -> BenchError {
    BenchError::Broker(e.to_string())
}

/// The Subscription delivering the bench stream to the sink. Retries are short so a hiccup
/// does not stall a run for long; none are expected from the local sink.
pub(super) fn subscription_yaml(name: &str, sink_url: &str, start_from: &str) -> String {
    subscription_yaml_with(name, sink_url, start_from, DELIVERY_CONSUMERS)
}

/// [`subscription_yaml`] with `consumers` deliveries in flight (0: scaled to zero).
pub(super) fn subscription_yaml_with(
    name: &str,
    sink_url: &str,
    start_from: &str,
    consumers: usize,
) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}, namespace: bench}}\n\
         spec:\n  stream: orders\n  sink: {{uri: \"{sink_url}\"}}\n  startFrom: {start_from}\n  \
         consumers: {consumers}\n  \
         delivery: {{timeout: 10s, retry: 10, backoffDelay: 100ms, backoffMax: 2s}}\n"
    )
}

/// A stored stream `orders` publishing to `exchange`.
pub(super) fn stored_stream_yaml(exchange: &str) -> String {
    stream_on(exchange, "  store: {urlSecretRef: {name: pg, key: url}}\n")
}

/// A broker-only stream `orders` publishing to `exchange`.
pub(super) fn broker_stream_yaml(exchange: &str) -> String {
    stream_on(exchange, "")
}

fn stream_on(exchange: &str, extra: &str) -> String {
    stream_yaml("orders", extra).replace(
        "queueType: quorum}",
        &format!("queueType: quorum, exchange: {exchange}}}"),
    )
}

/// What the sink saw of one run, as a measurement. The rate is distinct deliveries over the
/// time from the start of publishing (or of the replay) to the last arrival.
pub(super) fn from_arrivals(
    name: &str,
    a: &Arrivals,
    started: Instant,
    published: usize,
    backlog: Option<usize>,
    offered_rate: Option<u64>,
    errors: usize,
) -> Measurement {
    let seconds = a
        .last
        .map_or(0.0, |l| l.saturating_duration_since(started).as_secs_f64());
    let q = |q: f64| (!a.latency.is_empty()).then(|| a.latency.value_at_quantile(q) as f64 / 1e3);
    Measurement {
        name: name.to_string(),
        events_per_s: a.delivered as f64 / seconds.max(1e-9),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        offered_rate,
        events: a.delivered,
        seconds,
        errors,
        hit_ratio: None,
        published: Some(published),
        backlog,
        duplicates: Some(a.duplicates),
        first_delivery_ms: a
            .first
            .map(|f| f.saturating_duration_since(started).as_secs_f64() * 1e3),
        publish_p50_ms: None,
        publish_p99_ms: None,
        after_commit_p50_ms: None,
        after_commit_p99_ms: None,
    }
}

fn rate_tag(rate: Option<u64>) -> String {
    rate.map_or("max".into(), |r| r.to_string())
}

/// Removes the subscription (so Weir deletes its queues) and stops the pipeline.
pub(super) async fn stop_pipeline(pipe: Pipeline, sub: &str) -> Result<(), BenchError> {
    if pipe.remove_manifest("subscription.yaml").is_ok()
        && !pipe.wait_gone(sub, Duration::from_secs(15)).await
    {
        eprintln!("warning: subscription {sub} was not removed in 15 s; its queues may remain");
    }
    pipe.stop().await
}

pub async fn e2e(args: &BenchArgs) -> Result<Vec<Report>, BenchError> {
    super::own_pipeline(
        args,
        "e2e creates its own subscription and needs its own pipeline",
    )?;
    let versions = versions(&args.pg_url).await;
    let sink = Sink::start().await?;
    eprintln!(
        "starting a weir pipeline (stream with a store, subscription to {})…",
        sink.url
    );
    let db = Database::create(&args.pg_url).await?;
    let suffix = db.suffix.clone();
    let exchange = format!("weir.bench.e2e-{suffix}");
    // Subscription queues are named after namespace, stream and subscription: a per-run
    // name keeps concurrent benchmark runs from sharing one.
    let sub = format!("to-sink-{suffix}");
    let pipe = Pipeline::start_on(db, &args.pg_url, &args.amqp_url, |_| {
        stored_stream_yaml(&exchange)
    })
    .await?;
    let result = async {
        // Added once the stream is ready, when the folder watch is surely running.
        pipe.wait_ready(&["orders"]).await?;
        pipe.write_manifest(
            "subscription.yaml",
            &subscription_yaml(&sub, &sink.url, "latest"),
        )?;
        pipe.wait_ready(&[&sub]).await?;
        e2e_runs(args, &sink, &pipe, &suffix, &versions).await
    }
    .await;
    stop_pipeline(pipe, &sub).await?;
    delete_exchange(&args.amqp_url, &exchange).await;
    result
}

async fn e2e_runs(
    args: &BenchArgs,
    sink: &Sink,
    pipe: &Pipeline,
    suffix: &str,
    versions: &Versions,
) -> Result<Vec<Report>, BenchError> {
    let url = pipe.events_url("orders");
    let batch = args.batch.unwrap_or(1).max(1);
    let (events, concurrency) = if batch == 1 {
        (
            args.events.min(E2E_EVENT_CAP),
            args.concurrency.max(SINGLE_EVENT_CLIENTS),
        )
    } else {
        (args.events, args.concurrency)
    };
    let rates = args
        .rate
        .map_or_else(|| E2E_RATES.to_vec(), |r| vec![Some(r)]);

    eprintln!("e2e: warm-up");
    let label = format!("w{suffix}");
    sink.begin(&format!("{label}-"))?;
    let w = load::publish(&load::LoadSpec {
        stamp: true,
        ..load::LoadSpec::new(&url, &label, WARM_UP, batch, concurrency, args.payload)
    })
    .await?;
    sink.wait_for(w.events, STALL).await;

    // The raw loop's own exchange and quorum queue (the subscription's queue type).
    let conn = crate::data::broker::connect(&args.amqp_url, "weir-bench")
        .await
        .map_err(|e| BenchError::Broker(e.to_string()))?;
    let setup = conn.create_channel().await.map_err(broker_err)?;
    let raw_exchange = format!("weir.bench.e2e-raw-{suffix}");
    let raw_queue = format!("weir-bench-e2e-raw-{suffix}");
    bind_queue(&setup, &raw_exchange, &raw_queue).await?;
    let raw = RawLoop {
        conn: &conn,
        exchange: &raw_exchange,
        queue: &raw_queue,
        sink,
        payload_bytes: args.payload,
    };
    eprintln!("e2e: raw loop warm-up");
    raw.run(&format!("rw{suffix}"), WARM_UP, None, None).await?;

    let mut reports = vec![];
    let result = async {
        for rate in rates {
            let tag = rate_tag(rate);
            eprintln!("e2e rate={tag} batch={batch} concurrency={concurrency}: weir");
            let label = format!("m{suffix}-{tag}");
            sink.begin(&format!("{label}-"))?;
            let started = Instant::now();
            let r = load::publish(&load::LoadSpec {
                rate,
                max_duration: args.duration,
                show_progress: true,
                stamp: true,
                ..load::LoadSpec::new(&url, &label, events, batch, concurrency, args.payload)
            })
            .await?;
            // Accepted (201) means stored; the backlog is what the sink still lacks then.
            let backlog = r.events.saturating_sub(sink.delivered());
            sink.wait_for(r.events, STALL).await;
            let a = sink.take()?;
            let mut weir = from_arrivals(
                &format!("weir (HTTP→store→sink, {concurrency} clients)"),
                &a,
                started,
                r.events,
                Some(backlog),
                rate,
                r.errors,
            );
            let request_ms = |q: f64| Some(r.latency.value_at_quantile(q) as f64 / 1e3);
            weir.publish_p50_ms = request_ms(0.5);
            weir.publish_p99_ms = request_ms(0.99);
            // Live events only: in a replay or a drain the events waited before the
            // measurement, and their age is not a latency.
            let after_commit = |q: f64| {
                (!a.after_commit.is_empty())
                    .then(|| a.after_commit.value_at_quantile(q) as f64 / 1e3)
            };
            weir.after_commit_p50_ms = after_commit(0.5);
            weir.after_commit_p99_ms = after_commit(0.99);
            eprintln!("e2e rate={tag}: raw lapin → consume → POST loop");
            // The same number of events as Weir accepted, at the same offered rate.
            let baseline = raw
                .run(
                    &format!("r{suffix}-{tag}"),
                    r.events.max(1),
                    rate,
                    args.duration,
                )
                .await?;
            reports.push(Report::new(
                "e2e",
                format!(
                    "rate={tag} batch={batch} c={concurrency} payload={}B",
                    args.payload
                ),
                weir,
                baseline,
                versions.clone(),
            ));
        }
        Ok::<_, BenchError>(())
    }
    .await;
    let _ = setup
        .queue_delete(raw_queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = setup
        .exchange_delete(
            raw_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    result.map(|()| reports)
}

/// The e2e baseline: a lapin publisher with confirms (window [`PUBLISH_WINDOW`]) into a
/// quorum queue, and in the same process a consumer POSTing each message to the sink with
/// [`DELIVERY_CONSUMERS`] in flight, acking after the 2xx.
struct RawLoop<'a> {
    conn: &'a lapin::Connection,
    exchange: &'a str,
    queue: &'a str,
    sink: &'a Sink,
    payload_bytes: usize,
}

impl RawLoop<'_> {
    async fn run(
        &self,
        label: &str,
        events: usize,
        rate: Option<u64>,
        max_duration: Option<Duration>,
    ) -> Result<Measurement, BenchError> {
        self.sink.begin(&format!("{label}-"))?;
        let cancel = CancellationToken::new();
        let consumer = tokio::spawn(consume_and_post(
            self.conn.create_channel().await.map_err(broker_err)?,
            self.queue.to_string(),
            self.sink.url.clone(),
            DELIVERY_CONSUMERS,
            cancel.clone(),
        ));
        let ch = self.conn.create_channel().await.map_err(broker_err)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker_err)?;
        let body = serde_json::to_vec(&payload(self.payload_bytes, 0)).unwrap_or_default();
        let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r.max(1) as f64));
        let started = Instant::now();
        let deadline = max_duration.map(|d| started + d);
        let mut window = std::collections::VecDeque::with_capacity(PUBLISH_WINDOW);
        let (mut published, mut errors) = (0usize, 0usize);
        let mut last_print = Instant::now();
        for i in 0..events {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            // Open-loop pacing, like the HTTP load: message i is due at i × interval.
            let due = interval.map(|iv| started + iv.mul_f64(i as f64));
            if let Some(due) = due {
                tokio::time::sleep_until(due.into()).await;
            }
            if window.len() >= PUBLISH_WINDOW
                && let Some(c) = window.pop_front()
            {
                match c_await(c).await? {
                    lapin::Confirmation::Ack(_) => published += 1,
                    _ => errors += 1,
                }
            }
            let sent = sink::stamp_of(due.unwrap_or_else(Instant::now));
            let headers = [
                ("cloudEvents:specversion", "1.0".to_string()),
                ("cloudEvents:id", format!("{label}-{i}")),
                ("cloudEvents:source", "/bench".into()),
                ("cloudEvents:type", "order.created".into()),
                ("cloudEvents:subject", format!("order-{}", i % 1000)),
                ("cloudEvents:benchsent", sent.to_string()),
            ];
            let confirm = publish_event(&ch, self.exchange, &body, headers)
                .await
                .map_err(broker_err)?;
            window.push_back(confirm);
            if last_print.elapsed() > Duration::from_millis(500) {
                eprint!("\r  {i}/{events} published   ");
                last_print = Instant::now();
            }
        }
        while let Some(c) = window.pop_front() {
            match c_await(c).await? {
                lapin::Confirmation::Ack(_) => published += 1,
                _ => errors += 1,
            }
        }
        let backlog = published.saturating_sub(self.sink.delivered());
        self.sink.wait_for(published, STALL).await;
        cancel.cancel();
        consumer
            .await
            .map_err(|e| BenchError::Pipeline(e.to_string()))??;
        let _ = ch.close(200, "OK".into()).await;
        let a = self.sink.take()?;
        Ok(from_arrivals(
            &format!("raw lapin→consume→POST ({DELIVERY_CONSUMERS} in flight)"),
            &a,
            started,
            published,
            Some(backlog),
            rate,
            errors,
        ))
    }
}

/// The raw consumer: prefetch `inflight`, one POST task per message (as many in flight as
/// the prefetch), ack after a 2xx, requeue otherwise. Runs until `cancel`.
pub(super) async fn consume_and_post(
    ch: lapin::Channel,
    queue: String,
    url: String,
    inflight: usize,
    cancel: CancellationToken,
) -> Result<(), BenchError> {
    let inflight = inflight.clamp(1, u16::MAX.into());
    ch.basic_qos(inflight as u16, BasicQosOptions::default())
        .await
        .map_err(broker_err)?;
    let tag = format!("weir-bench-{:x}", rand::random::<u32>());
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker_err)?;
    let client = sink::raw_client(inflight)?;
    let limit = Arc::new(Semaphore::new(inflight));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            d = consumer.next() => match d {
                Some(Ok(d)) => {
                    let Ok(permit) = limit.clone().acquire_owned().await else { break };
                    let (client, url) = (client.clone(), url.clone());
                    tasks.spawn(async move {
                        let ev = raw_event_of(&d.properties, &d.data);
                        let _ = if sink::raw_post(&client, &url, &ev).await {
                            d.acker.ack(BasicAckOptions::default()).await
                        } else {
                            d.acker
                                .nack(BasicNackOptions { requeue: true, ..Default::default() })
                                .await
                        };
                        drop(permit);
                    });
                }
                Some(Err(e)) => return Err(broker_err(e)),
                None => break,
            }
        }
    }
    let _ = ch
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    while tasks.join_next().await.is_some() {}
    let _ = ch.close(200, "OK".into()).await;
    Ok(())
}

/// The `cloudEvents:` headers of a message as `ce-` HTTP headers, the body as is.
fn raw_event_of(props: &lapin::BasicProperties, body: &[u8]) -> RawEvent {
    let mut headers = vec![];
    if let Some(h) = props.headers() {
        for (k, v) in h {
            if let (Some(name), AMQPValue::LongString(s)) =
                (k.as_str().strip_prefix("cloudEvents:"), v)
            {
                headers.push((
                    format!("ce-{name}"),
                    String::from_utf8_lossy(s.as_bytes()).into_owned(),
                ));
            }
        }
    }
    RawEvent {
        headers,
        body: bytes::Bytes::copy_from_slice(body),
    }
}
