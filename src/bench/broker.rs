//! The `broker` and `relay` scenarios: HTTP publish to a broker-only stream against a raw
//! lapin publisher, and the relay of stored events against the same publisher.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use super::load::{self, payload};
use super::pipeline::{Database, Pipeline};
use super::report::{Measurement, Report};
use super::scenarios::{PUBLISH_WINDOW, batch_load, stream_yaml, versions};
use super::{BenchArgs, BenchError};

/// Declares a quorum queue bound to `exchange` so published messages are routed and kept,
/// as in production.
pub(super) async fn bind_queue(
    ch: &lapin::Channel,
    exchange: &str,
    queue: &str,
) -> Result<(), BenchError> {
    let b = |e: lapin::Error| BenchError::Broker(e.to_string());
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(b)?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(b)?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(b)?;
    Ok(())
}

/// The raw publisher baseline: one lapin channel with confirms, `PUBLISH_WINDOW` messages
/// unconfirmed at most, persistent and mandatory, the same body and headers Weir sends; the
/// ids are `{label}-{i}`.
pub(super) async fn raw_publish(
    ch: &lapin::Channel,
    exchange: &str,
    label: &str,
    events: usize,
    payload_bytes: usize,
) -> Result<Measurement, BenchError> {
    let b = |e: lapin::Error| BenchError::Broker(e.to_string());
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(b)?;
    let body = serde_json::to_vec(&payload(payload_bytes, 0)).unwrap_or_default();
    let mut window = VecDeque::with_capacity(PUBLISH_WINDOW);
    let started = Instant::now();
    for i in 0..events {
        if window.len() >= PUBLISH_WINDOW
            && let Some(c) = window.pop_front()
        {
            let _: lapin::Confirmation = c_await(c).await?;
        }
        let headers = [
            ("cloudEvents:id", format!("{label}-{i}")),
            ("cloudEvents:source", "/bench".into()),
            ("cloudEvents:type", "order.created".into()),
            ("cloudEvents:specversion", "1.0".into()),
            ("cloudEvents:subject", format!("order-{}", i % 1000)),
        ];
        let confirm = publish_event(ch, exchange, &body, headers)
            .await
            .map_err(b)?;
        window.push_back(confirm);
    }
    while let Some(c) = window.pop_front() {
        c_await(c).await?;
    }
    Ok(Measurement::rate_only(
        &format!("raw lapin publisher (window {PUBLISH_WINDOW})"),
        events,
        started.elapsed().as_secs_f64(),
    ))
}

/// A connection and a channel to the benchmark's broker. The connection is returned too: a
/// channel lives only as long as its connection.
pub(super) async fn bench_channel(
    amqp_url: &str,
) -> Result<(lapin::Connection, lapin::Channel), BenchError> {
    let b = |e: lapin::Error| BenchError::Broker(e.to_string());
    let conn = crate::data::broker::connect(amqp_url, "weir-bench")
        .await
        .map_err(|e| BenchError::Broker(e.to_string()))?;
    let ch = conn.create_channel().await.map_err(b)?;
    Ok((conn, ch))
}

/// Deletes an exchange a run declared; best effort (the run's result matters more).
pub(super) async fn delete_exchange(amqp_url: &str, exchange: &str) {
    if let Ok((_conn, ch)) = bench_channel(amqp_url).await {
        let _ = ch
            .exchange_delete(
                exchange.into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

/// Publishes one `order.created` JSON event as the raw baselines do: persistent, mandatory,
/// its CloudEvents attributes in `cloudEvents:` headers. The confirm is left to the caller's
/// window.
pub(super) async fn publish_event<const N: usize>(
    ch: &lapin::Channel,
    exchange: &str,
    body: &[u8],
    headers: [(&str, String); N],
) -> Result<lapin::PublisherConfirm, lapin::Error> {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(table);
    ch.basic_publish(
        exchange.into(),
        "order.created".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        body,
        props,
    )
    .await
}

pub(super) async fn c_await(c: lapin::PublisherConfirm) -> Result<lapin::Confirmation, BenchError> {
    c.await.map_err(|e| BenchError::Broker(e.to_string()))
}

pub async fn broker(args: &BenchArgs) -> Result<Vec<Report>, BenchError> {
    let versions = versions(&args.pg_url).await;
    eprintln!("starting a weir pipeline…");
    let pipe = Pipeline::start(&args.pg_url, &args.amqp_url, |s| {
        format!(
            "{}  deletionPolicy: Delete\n",
            stream_yaml("fanout", "").replace(
                "queueType: quorum}",
                &format!("queueType: quorum, exchange: weir.bench.fanout-{s}}}")
            )
        )
    })
    .await?;
    pipe.wait_ready(&["fanout"]).await?;
    let exchange = format!("weir.bench.fanout-{}", pipe.suffix);
    let (conn, ch) = bench_channel(&args.amqp_url).await?;
    let queue = format!("weir-bench-{}", pipe.suffix);
    bind_queue(&ch, &exchange, &queue).await?;
    let url = pipe.events_url("fanout");
    let batches = args.batch.map_or_else(|| vec![1, 100], |b| vec![b]);
    let mut reports = vec![];
    for batch in batches {
        let (events, concurrency) = batch_load(args, batch);
        load::publish(&load::LoadSpec::new(
            &url,
            &format!("w{}", pipe.suffix),
            (events / 20).clamp(100, 5_000),
            batch,
            concurrency,
            args.payload,
        ))
        .await?;
        eprintln!("broker batch={batch}: weir");
        let r = load::publish(&load::LoadSpec {
            rate: args.rate,
            max_duration: args.duration,
            show_progress: true,
            ..load::LoadSpec::new(
                &url,
                &format!("m{}-{batch}", pipe.suffix),
                events,
                batch,
                concurrency,
                args.payload,
            )
        })
        .await?;
        let weir = Measurement::from_load(
            &format!("weir (HTTP, {concurrency} clients)"),
            &r,
            args.rate,
        );
        eprintln!("broker batch={batch}: raw publisher");
        let raw_ch = conn
            .create_channel()
            .await
            .map_err(|e| BenchError::Broker(e.to_string()))?;
        let baseline =
            raw_publish(&raw_ch, &exchange, "raw", r.events.max(1), args.payload).await?;
        reports.push(Report::new(
            "broker",
            format!("batch={batch} c={concurrency} payload={}B", args.payload),
            weir,
            baseline,
            versions.clone(),
        ));
    }
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    pipe.stop().await?;
    Ok(reports)
}

/// Appends `events` events straight through the store, 1000 per transaction, with ids
/// `{id_prefix}-{i}`, showing progress.
pub(super) async fn store_events(
    store: &crate::data::store::Store,
    stream_id: i64,
    events: usize,
    payload_bytes: usize,
    id_prefix: &str,
) -> Result<(), BenchError> {
    let pe = |e: crate::data::store::StoreError| BenchError::Pipeline(e.to_string());
    eprintln!("storing {events} events…");
    let data =
        bytes::Bytes::from(serde_json::to_vec(&payload(payload_bytes, 0)).unwrap_or_default());
    let compression = crate::topology::CompressionPlan::default();
    let mut last_print = Instant::now();
    for start in (0..events).step_by(1000) {
        let batch: Vec<_> = (start..events.min(start + 1000))
            .map(|i| crate::data::event::CloudEvent {
                id: format!("{id_prefix}-{i}"),
                source: "/bench".into(),
                ty: "order.created".into(),
                datacontenttype: Some("application/json".into()),
                dataschema: None,
                subject: Some(format!("order-{}", i % 1000)),
                time: None,
                extensions: Default::default(),
                data: Some(crate::data::event::Data::Json(data.clone())),
            })
            .collect();
        store
            .append(
                stream_id,
                &[crate::data::store::AppendInput { events: &batch }],
                &compression,
            )
            .await
            .map_err(pe)?;
        if last_print.elapsed() > Duration::from_millis(500) {
            eprint!("\r  stored {}/{events}   ", start + batch.len());
            last_print = Instant::now();
        }
    }
    eprintln!("\r  stored {events}/{events}   ");
    Ok(())
}

pub async fn relay(args: &BenchArgs) -> Result<Vec<Report>, BenchError> {
    let versions = versions(&args.pg_url).await;
    // Store the events first, straight through the store, before any weir runs; then start
    // weir and time how long its relay takes to publish them all.
    let db = Database::create(&args.pg_url).await?;
    let exchange = format!("weir.bench.relay-{}", db.suffix);
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let store = crate::data::store::Store::new(pool.clone());
    let pe = |e: crate::data::store::StoreError| BenchError::Pipeline(e.to_string());
    store.migrate().await.map_err(pe)?;
    let stream_id = store.ensure_stream("bench", "orders").await.map_err(pe)?;
    store_events(&store, stream_id, args.events, args.payload, "relay").await?;
    let (conn, ch) = bench_channel(&args.amqp_url).await?;
    let queue = format!("weir-bench-relay-{}", db.suffix);
    bind_queue(&ch, &exchange, &queue).await?;
    eprintln!("starting weir; timing its relay…");
    let started = Instant::now();
    let pipe = Pipeline::start_on(db, &args.pg_url, &args.amqp_url, |_| {
        stream_yaml("orders", "  store: {urlSecretRef: {name: pg, key: url}}\n").replace(
            "queueType: quorum}",
            &format!("queueType: quorum, exchange: {exchange}}}"),
        )
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_print = Instant::now();
    // The rate runs from the first checkpoint the relay writes to the last, as the raw
    // publisher's runs from its first publish to its last confirm: Weir's start-up (process,
    // migrations, connections, the relay's lock) is not relaying. The events the first
    // checkpoint covers are left out of the count with its time.
    let mut first: Option<(Instant, i64)> = None;
    loop {
        let cp: i64 =
            sqlx::query_scalar("SELECT position FROM weir_relay_checkpoints WHERE stream_id = $1")
                .bind(stream_id)
                .fetch_optional(&pool)
                .await?
                .unwrap_or(0);
        if first.is_none() && cp > 0 {
            first = Some((Instant::now(), cp));
        }
        if cp as usize >= args.events {
            break;
        }
        if last_print.elapsed() > Duration::from_millis(500) {
            eprint!("\r  relayed {cp}/{}   ", args.events);
            last_print = Instant::now();
        }
        if Instant::now() > deadline {
            return Err(BenchError::Pipeline(
                "the relay did not catch up in 10 minutes".into(),
            ));
        }
        // 5 ms: a small error on runs of seconds, and one primary-key read each.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = started.elapsed();
    let (relayed, counted) = match first {
        // Seen before the end: from there on.
        Some((at, cp)) if (cp as usize) < args.events => (at.elapsed(), args.events - cp as usize),
        // All done at the first look (a tiny run): start-up included, favouring the baseline.
        _ => (total, args.events),
    };
    eprintln!(
        "\r  relayed {} events in {total:?} after start; {counted} of them in {relayed:?}",
        args.events
    );
    let weir = Measurement::rate_only(
        "weir relay (store → exchange)",
        counted,
        relayed.as_secs_f64(),
    );
    let raw_ch = conn
        .create_channel()
        .await
        .map_err(|e| BenchError::Broker(e.to_string()))?;
    let baseline = raw_publish(&raw_ch, &exchange, "raw", args.events, args.payload).await?;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    pool.close().await;
    pipe.stop().await?;
    Ok(vec![Report::new(
        "relay",
        format!("events={} payload={}B", args.events, args.payload),
        weir,
        baseline,
        versions,
    )])
}
