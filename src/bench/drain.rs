//! The `drain` scenario: live delivery alone, with no ingest, store or relay on the CPU while
//! it is measured. Events published to a broker-only stream wait in a Subscription's queue
//! while it is scaled to zero (`consumers: 0`); then it is scaled to the measured number of
//! deliveries in flight and the sink times the drain. The baseline drains as many messages,
//! published with the same headers and body, from a quorum queue with the raw consumer:
//! prefetch = the same number in flight, one POST task per message, ack after the 2xx.
//!
//! Both rates are taken from the first arrival to the last, so neither side's start-up (the
//! folder watch and the consumer's opening for Weir, `basic.consume` for the baseline) counts.

use std::time::Instant;

use lapin::options::QueueDeleteOptions;
use tokio_util::sync::CancellationToken;

use super::broker::{bench_channel, bind_queue, delete_exchange, raw_publish};
use super::delivery::{
    STALL, broker_stream_yaml, consume_and_post, from_arrivals, subscription_yaml_with,
};
use super::load::{self, LoadSpec};
use super::pipeline::{Database, Pipeline};
use super::report::{Measurement, Report};
use super::scenarios::versions;
use super::sink::Sink;
use super::{BenchArgs, BenchError};

/// Deliveries in flight at least (the Subscription's `consumers`, the raw consumer's
/// prefetch): the delivery target is stated for 64.
const DRAIN_CONSUMERS: usize = 64;
/// Events per request while filling Weir's queue, and requests in flight: the fastest way in
/// (the filling is not measured).
const FILL_BATCH: usize = 100;
const FILL_CLIENTS: usize = 8;

pub async fn drain(args: &BenchArgs) -> Result<Vec<Report>, BenchError> {
    super::own_pipeline(
        args,
        "drain creates its own subscription and needs its own pipeline",
    )?;
    let inflight = args.concurrency.max(DRAIN_CONSUMERS);
    let events = args.events;
    let versions = versions(&args.pg_url).await;
    let sink = Sink::start().await?;
    let db = Database::create(&args.pg_url).await?;
    let suffix = db.suffix.clone();
    let exchange = format!("weir.bench.drain-{suffix}");
    let pipe = Pipeline::start_on(db, &args.pg_url, &args.amqp_url, |_| {
        broker_stream_yaml(&exchange)
    })
    .await?;
    let sub = format!("drain-{suffix}");
    let result = async {
        pipe.wait_ready(&["orders"]).await?;
        let weir = weir_side(args, &pipe, &sink, &sub, events, inflight).await?;
        let raw = raw_side(args, &sink, &suffix, events, inflight).await?;
        Ok::<_, BenchError>(vec![Report::new(
            "drain",
            format!(
                "events={events} in-flight={inflight} payload={}B",
                args.payload
            ),
            weir,
            raw,
            versions,
        )])
    }
    .await;
    super::delivery::stop_pipeline(pipe, &sub).await?;
    delete_exchange(&args.amqp_url, &exchange).await;
    result
}

/// Weir's side: the subscription created scaled to zero, its queue filled through the
/// broker-only stream, then scaled up and drained.
async fn weir_side(
    args: &BenchArgs,
    pipe: &Pipeline,
    sink: &Sink,
    sub: &str,
    events: usize,
    inflight: usize,
) -> Result<Measurement, BenchError> {
    pipe.write_manifest(
        "subscription.yaml",
        &subscription_yaml_with(sub, &sink.url, "latest", 0),
    )?;
    pipe.wait_ready(&[sub]).await?;
    let label = format!("d{sub}");
    eprintln!("drain: filling {sub}'s queue with {events} events");
    let filled = load::publish(&LoadSpec {
        show_progress: true,
        ..LoadSpec::new(
            &pipe.events_url("orders"),
            &label,
            events,
            FILL_BATCH,
            FILL_CLIENTS,
            args.payload,
        )
    })
    .await?;
    if filled.errors > 0 {
        return Err(BenchError::Pipeline(format!(
            "{} of {events} events were refused while filling the queue",
            filled.errors
        )));
    }
    eprintln!("drain: weir, {inflight} in flight");
    sink.begin(&format!("{label}-"))?;
    let asked = Instant::now();
    pipe.write_manifest(
        "subscription.yaml",
        &subscription_yaml_with(sub, &sink.url, "latest", inflight),
    )?;
    sink.wait_for(filled.events, STALL).await;
    let a = sink.take()?;
    let mut m = from_arrivals(
        &format!("weir subscription (consumers {inflight})"),
        &a,
        a.first.unwrap_or(asked),
        filled.events,
        None,
        None,
        0,
    );
    // From the manifest's write to the first arrival: the folder watch, the runner's restart
    // from zero and the consumer's opening.
    m.first_delivery_ms = a
        .first
        .map(|f| f.saturating_duration_since(asked).as_secs_f64() * 1e3);
    Ok(m)
}

/// The baseline: a quorum queue filled with the raw publisher, drained by the raw consumer.
async fn raw_side(
    args: &BenchArgs,
    sink: &Sink,
    suffix: &str,
    events: usize,
    inflight: usize,
) -> Result<Measurement, BenchError> {
    let (conn, ch) = bench_channel(&args.amqp_url).await?;
    let b = |e: lapin::Error| BenchError::Broker(e.to_string());
    let (exchange, queue) = (
        format!("weir.bench.drain-raw-{suffix}"),
        format!("weir.bench.drain-raw-{suffix}"),
    );
    bind_queue(&ch, &exchange, &queue).await?;
    let label = format!("r{suffix}");
    eprintln!("drain: filling the raw queue with {events} messages");
    // On a channel of its own: confirm mode stays with the channel.
    let publish_ch = conn.create_channel().await.map_err(b)?;
    raw_publish(&publish_ch, &exchange, &label, events, args.payload).await?;
    let _ = publish_ch.close(200, "OK".into()).await;
    eprintln!("drain: raw consumer, {inflight} in flight");
    sink.begin(&format!("{label}-"))?;
    let cancel = CancellationToken::new();
    let consumer = tokio::spawn(consume_and_post(
        conn.create_channel().await.map_err(b)?,
        queue.clone(),
        sink.url.clone(),
        inflight,
        cancel.clone(),
    ));
    sink.wait_for(events, STALL).await;
    cancel.cancel();
    consumer
        .await
        .map_err(|e| BenchError::Pipeline(e.to_string()))??;
    let a = sink.take()?;
    let m = from_arrivals(
        &format!("raw consume→POST (prefetch {inflight})"),
        &a,
        a.first.unwrap_or_else(Instant::now),
        events,
        None,
        None,
        0,
    );
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = ch.close(200, "OK".into()).await;
    let _ = conn.close(200, "OK".into()).await;
    Ok(m)
}
