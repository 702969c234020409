//! The `per-key` scenario: what per-key ordering costs. The same stored stream and load (one
//! event per request, 1,000 subjects) delivered to a local sink through an unordered
//! subscription (the baseline), then through an `ordering: perKey` one (the measured side:
//! the intake, the move to the lanes, one delivery at a time per lane), in one pipeline, one
//! after the other so that they do not share the machine.

use std::time::{Duration, Instant};

use super::broker::delete_exchange;
use super::delivery::{
    DELIVERY_CONSUMERS, STALL, from_arrivals, stored_stream_yaml, subscription_yaml,
};
use super::load::{self, LoadSpec};
use super::pipeline::{Database, Pipeline};
use super::report::{Measurement, Report};
use super::scenarios::versions;
use super::sink::Sink;
use super::{BenchArgs, BenchError};

/// Lanes of the perKey subscription: as many as the unordered one has deliveries in flight,
/// so that both may deliver [`DELIVERY_CONSUMERS`] events at once.
const PARTITIONS: usize = DELIVERY_CONSUMERS;
/// Events measured at most per side (as `e2e` caps its one-event requests).
const EVENT_CAP: usize = 50_000;
/// Publishers: enough that a slow answer does not hold back the load (as in `e2e`).
const CLIENTS: usize = 64;
/// Warm-up events before each side is measured.
const WARM_UP: usize = 500;

pub async fn per_key(args: &BenchArgs) -> Result<Vec<Report>, BenchError> {
    super::own_pipeline(
        args,
        "per-key creates its own subscriptions and needs its own pipeline",
    )?;
    let versions = versions(&args.pg_url).await;
    let sink = Sink::start().await?;
    let db = Database::create(&args.pg_url).await?;
    let suffix = db.suffix.clone();
    let exchange = format!("weir.bench.perkey-{suffix}");
    let pipe = Pipeline::start_on(db, &args.pg_url, &args.amqp_url, |_| {
        stored_stream_yaml(&exchange)
    })
    .await?;
    let result = async {
        pipe.wait_ready(&["orders"]).await?;
        let unordered = side(args, &sink, &pipe, &format!("none-{suffix}"), "").await?;
        let per_key = side(
            args,
            &sink,
            &pipe,
            &format!("perkey-{suffix}"),
            &format!("  ordering: perKey\n  partitions: {PARTITIONS}\n"),
        )
        .await?;
        Ok(vec![Report::new(
            "per-key",
            format!(
                "partitions={PARTITIONS} consumers={DELIVERY_CONSUMERS} keys=1000 payload={}B",
                args.payload
            ),
            per_key,
            unordered,
            versions.clone(),
        )])
    }
    .await;
    pipe.stop().await?;
    delete_exchange(&args.amqp_url, &exchange).await;
    result
}

/// One side: its subscription created, warmed up, measured, removed.
async fn side(
    args: &BenchArgs,
    sink: &Sink,
    pipe: &Pipeline,
    sub: &str,
    extra: &str,
) -> Result<Measurement, BenchError> {
    let url = pipe.events_url("orders");
    let events = args.events.min(EVENT_CAP);
    let concurrency = args.concurrency.max(CLIENTS);
    pipe.write_manifest(
        "subscription.yaml",
        &format!("{}{extra}", subscription_yaml(sub, &sink.url, "latest")),
    )?;
    pipe.wait_ready(&[sub]).await?;
    eprintln!("per-key: {sub}: warm-up");
    let label = format!("w{sub}");
    sink.begin(&format!("{label}-"))?;
    let w = load::publish(&LoadSpec {
        stamp: true,
        ..LoadSpec::new(&url, &label, WARM_UP, 1, concurrency, args.payload)
    })
    .await?;
    sink.wait_for(w.events, STALL).await;
    eprintln!("per-key: {sub}: {events} events");
    let label = format!("m{sub}");
    sink.begin(&format!("{label}-"))?;
    let started = Instant::now();
    let r = load::publish(&LoadSpec {
        rate: args.rate,
        max_duration: args.duration,
        show_progress: true,
        stamp: true,
        ..LoadSpec::new(&url, &label, events, 1, concurrency, args.payload)
    })
    .await?;
    let backlog = r.events.saturating_sub(sink.delivered());
    sink.wait_for(r.events, STALL).await;
    let a = sink.take()?;
    let name = if extra.is_empty() {
        "weir, ordering none"
    } else {
        "weir, ordering perKey"
    };
    let m = from_arrivals(
        name,
        &a,
        started,
        r.events,
        Some(backlog),
        args.rate,
        r.errors,
    );
    pipe.remove_manifest("subscription.yaml")?;
    if !pipe.wait_gone(sub, Duration::from_secs(15)).await {
        eprintln!("warning: subscription {sub} was not removed in 15 s; its queues may remain");
    }
    Ok(m)
}
