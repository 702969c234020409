//! The `replay` scenario: events stored before a Subscription with `startFrom: earliest` is
//! created, timed until the sink has them all, against one raw `SELECT` of the same rows
//! feeding the same POST loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use sqlx::Row as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::broker::{delete_exchange, store_events};
use super::delivery::{
    DELIVERY_CONSUMERS, REPLAY_BUFFER, STALL, from_arrivals, stop_pipeline, stored_stream_yaml,
    subscription_yaml,
};
use super::pipeline::{Database, Pipeline};
use super::report::Report;
use super::scenarios::versions;
use super::sink::{self, RawEvent, Sink};
use super::{BenchArgs, BenchError};

pub async fn replay(args: &BenchArgs) -> Result<Vec<Report>, BenchError> {
    super::own_pipeline(
        args,
        "replay stores its own events and needs its own pipeline",
    )?;
    let versions = versions(&args.pg_url).await;
    let sink = Sink::start().await?;
    // Store the events before weir runs, straight through the store.
    let db = Database::create(&args.pg_url).await?;
    let suffix = db.suffix.clone();
    let exchange = format!("weir.bench.replay-{suffix}");
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let store = crate::data::store::Store::new(pool.clone());
    let pe = |e: crate::data::store::StoreError| BenchError::Pipeline(e.to_string());
    store.migrate().await.map_err(pe)?;
    let stream_id = store.ensure_stream("bench", "orders").await.map_err(pe)?;
    let prefix = format!("p{suffix}");
    store_events(&store, stream_id, args.events, args.payload, &prefix).await?;
    eprintln!("starting weir; waiting for its relay to publish the stored events…");
    let pipe = Pipeline::start_on(db, &args.pg_url, &args.amqp_url, |_| {
        stored_stream_yaml(&exchange)
    })
    .await?;
    let sub = format!("replay-{suffix}");
    let result = async {
        pipe.wait_ready(&["orders"]).await?;
        // The relay's catch-up (to an exchange no queue is bound to yet) is not part of the
        // replay: wait for it to finish before the subscription exists.
        wait_relayed(&pool, stream_id, args.events).await?;
        eprintln!("replay: weir subscription with startFrom: earliest");
        sink.begin(&format!("{prefix}-"))?;
        // Timed from the manifest write, so it includes the folder watch's debounce
        // (300 ms) and the subscription's provisioning; that favours the baseline.
        let started = Instant::now();
        pipe.write_manifest(
            "subscription.yaml",
            &subscription_yaml(&sub, &sink.url, "earliest"),
        )?;
        sink.wait_for(args.events, STALL).await;
        let a = sink.take()?;
        let weir = from_arrivals(
            "weir subscription (startFrom earliest)",
            &a,
            started,
            args.events,
            None,
            None,
            0,
        );
        eprintln!("replay: raw SELECT → POST loop");
        sink.begin(&format!("{prefix}-"))?;
        let started = Instant::now();
        let errors = raw_replay(&pool, stream_id, &sink.url).await?;
        sink.wait_for(args.events, STALL).await;
        let a = sink.take()?;
        let baseline = from_arrivals(
            &format!("raw SELECT→POST ({DELIVERY_CONSUMERS} in flight)"),
            &a,
            started,
            args.events,
            None,
            None,
            errors,
        );
        Ok::<_, BenchError>(vec![Report::new(
            "replay",
            format!("events={} payload={}B", args.events, args.payload),
            weir,
            baseline,
            versions,
        )])
    }
    .await;
    pool.close().await;
    stop_pipeline(pipe, &sub).await?;
    delete_exchange(&args.amqp_url, &exchange).await;
    result
}

/// Waits until the relay's checkpoint reaches `events`.
pub(super) async fn wait_relayed(
    pool: &sqlx::PgPool,
    stream_id: i64,
    events: usize,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let cp: Option<i64> =
            sqlx::query_scalar("SELECT position FROM weir_relay_checkpoints WHERE stream_id = $1")
                .bind(stream_id)
                .fetch_optional(pool)
                .await?;
        if cp.unwrap_or(0) as usize >= events {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Pipeline(
                "the relay did not catch up in 10 minutes".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The replay baseline: one `SELECT` of the stream's rows in position order, streamed, each
/// row POSTed in binary mode with [`DELIVERY_CONSUMERS`] in flight. Returns the failed POSTs
/// (each is tried once: a local sink that answers 200 should fail none).
pub(super) async fn raw_replay(
    pool: &sqlx::PgPool,
    stream_id: i64,
    url: &str,
) -> Result<usize, BenchError> {
    let client = sink::raw_client(DELIVERY_CONSUMERS)?;
    let limit = Arc::new(Semaphore::new(DELIVERY_CONSUMERS));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<RawEvent>(REPLAY_BUFFER);
    let pool = pool.clone();
    let reader = tokio::spawn(async move {
        let mut rows = sqlx::query(
            "SELECT position, id, source, type, subject, data FROM weir_events
             WHERE stream_id = $1 ORDER BY position",
        )
        .bind(stream_id)
        .fetch(&pool);
        while let Some(row) = rows.next().await {
            let row = row?;
            let mut headers = vec![("ce-specversion".to_string(), "1.0".to_string())];
            for (h, col) in [
                ("ce-id", "id"),
                ("ce-source", "source"),
                ("ce-type", "type"),
            ] {
                headers.push((h.to_string(), row.try_get::<String, _>(col)?));
            }
            if let Some(s) = row.try_get::<Option<String>, _>("subject")? {
                headers.push(("ce-subject".into(), s));
            }
            headers.push((
                "ce-weirposition".into(),
                row.try_get::<i64, _>("position")?.to_string(),
            ));
            // The bytes as stored: payloads under the store's compression threshold (4 KiB,
            // so the default 512-byte events) are the event's data as published.
            let body = row
                .try_get::<Option<Vec<u8>>, _>("data")?
                .unwrap_or_default();
            let ev = RawEvent {
                headers,
                body: body.into(),
            };
            if tx.send(ev).await.is_err() {
                break;
            }
        }
        Ok::<_, sqlx::Error>(())
    });
    let mut tasks = JoinSet::new();
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while let Some(ev) = rx.recv().await {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let (client, url, failed) = (client.clone(), url.to_string(), failed.clone());
        tasks.spawn(async move {
            if !sink::raw_post(&client, &url, &ev).await {
                failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
        });
        // Reap finished tasks so the set stays as small as the concurrency.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    reader
        .await
        .map_err(|e| BenchError::Pipeline(e.to_string()))??;
    Ok(failed.load(std::sync::atomic::Ordering::Relaxed))
}
