//! The scenarios and their baselines.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use sqlx::Connection as _;

use super::load::{self, payload};
use super::pipeline::{Pipeline, with_database};
use super::report::{Measurement, Report, Versions};
use super::{BenchArgs, BenchError};

/// Batch-1 variants send at most this many events: one transaction per event in the
/// baseline makes larger runs take minutes without changing the ratio.
const SINGLE_EVENT_CAP: usize = 50_000;
/// Connections of the raw append baseline. Weir's appends to one stream commit one at a time
/// (the counter-row lock that makes positions gap-free and commit-ordered), so the matching
/// baseline writes on one connection; a second baseline on two connections, committing
/// independently (what gap-free positions rule out), is reported beside it as
/// `baseline_parallel`.
const BASELINE_CONNECTIONS: usize = 1;
const PARALLEL_BASELINE_CONNECTIONS: usize = 2;
/// Unconfirmed messages the raw publisher keeps in flight.
pub(super) const PUBLISH_WINDOW: usize = 200;

/// Events and concurrency of a run with `batch` events per request: single-event runs are
/// capped at [`SINGLE_EVENT_CAP`] events and need at least 64 requests in flight to load the
/// worker at all.
pub(super) fn batch_load(args: &BenchArgs, batch: usize) -> (usize, usize) {
    if batch == 1 {
        (args.events.min(SINGLE_EVENT_CAP), args.concurrency.max(64))
    } else {
        (args.events, args.concurrency)
    }
}

pub(super) fn stream_yaml(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  \
         broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, queueType: quorum}}\n{extra}"
    )
}

pub(super) async fn versions(pg_url: &str) -> Versions {
    let pg = async {
        let mut c = sqlx::PgConnection::connect(pg_url).await.ok()?;
        sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(&mut c)
            .await
            .ok()
    }
    .await;
    let rabbit = std::process::Command::new("rabbitmqctl")
        .args(["-q", "version"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty());
    Versions {
        weir: env!("CARGO_PKG_VERSION").to_string(),
        postgresql: pg.unwrap_or_else(|| "unknown".into()),
        rabbitmq: rabbit.unwrap_or_else(|| "unknown".into()),
    }
}

/// A scratch database with Weir's schema, for the raw baselines. Dropped by the caller.
async fn scratch_db(pg_url: &str) -> Result<(String, String), BenchError> {
    let name = format!("weir_bench_raw_{:x}", rand::random::<u32>());
    let mut admin = sqlx::PgConnection::connect(pg_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let url = with_database(pg_url, &name);
    let pool = sqlx::PgPool::connect(&url).await?;
    crate::data::store::Store::new(pool.clone())
        .migrate()
        .await
        .map_err(|e| BenchError::Pipeline(e.to_string()))?;
    pool.close().await;
    Ok((url, name))
}

async fn drop_db(pg_url: &str, name: &str) -> Result<(), BenchError> {
    let mut admin = sqlx::PgConnection::connect(pg_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    Ok(())
}

/// The raw append baseline: the same rows Weir writes (same table definition, 512-byte JSON
/// payloads), `txn` rows per transaction with one `UNNEST` insert, on `connections`
/// connections, default `synchronous_commit` like Weir.
async fn raw_append(
    db_url: &str,
    events: usize,
    txn: usize,
    connections: usize,
    payload_bytes: usize,
) -> Result<Measurement, BenchError> {
    let mut setup = sqlx::PgConnection::connect(db_url).await?;
    sqlx::query("CREATE TABLE bench_raw (LIKE weir_events INCLUDING ALL)")
        .execute(&mut setup)
        .await?;
    let data = serde_json::to_vec(&payload(payload_bytes, 0)).unwrap_or_default();
    let txns = events.div_ceil(txn.max(1));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = vec![];
    for _ in 0..connections {
        let (next, data, url) = (next.clone(), data.clone(), db_url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut c = sqlx::PgConnection::connect(&url).await?;
            loop {
                let t = next.fetch_add(1, Ordering::Relaxed);
                if t >= txns {
                    return Ok::<_, sqlx::Error>(());
                }
                let n = txn.min(events - t * txn);
                let base = (t * txn) as i64;
                let pos: Vec<i64> = (1..=n as i64).map(|i| base + i).collect();
                let ids: Vec<String> = pos.iter().map(|p| format!("raw-{p}")).collect();
                let subjects: Vec<String> = pos.iter().map(|p| format!("order-{}", p % 1000)).collect();
                let datas: Vec<Vec<u8>> = (0..n).map(|_| data.clone()).collect();
                let mut tx = c.begin().await?;
                sqlx::query(
                    "INSERT INTO bench_raw (stream_id, position, id, source, type, subject, version,
                         datacontenttype, data_kind, data, recorded_at)
                     SELECT 1, u.p, u.id, '/bench', 'order.created', u.s, 1, 'application/json', 1, u.d, now()
                     FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bytea[]) AS u(p, id, s, d)",
                )
                .bind(&pos)
                .bind(&ids)
                .bind(&subjects)
                .bind(&datas)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| BenchError::Pipeline(e.to_string()))??;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Measurement::rate_only(
        &format!("raw unnest append ({txn}/txn, {connections} conns)"),
        events,
        secs,
    ))
}

/// The schema baseline: what Weir's three tables cost by themselves. In a database migrated
/// with Weir's schema, one statement per transaction of `txn` rows moves the stream's head
/// (the counter row that keeps positions gap-free) and inserts the rows into `weir_events`
/// (with its four indexes), their dedup keys into `weir_event_ids` and each subject's new
/// version into `weir_subjects`: the writes of Weir's append, on one connection (appends to
/// one stream commit one at a time), without the lookups, the decision, the notifications
/// and the HTTP side.
async fn raw_append_schema(
    db_url: &str,
    events: usize,
    txn: usize,
    payload_bytes: usize,
) -> Result<Measurement, BenchError> {
    let pool = sqlx::PgPool::connect(db_url).await?;
    let store = crate::data::store::Store::new(pool.clone());
    let stream_id = store
        .ensure_stream("bench", "raw")
        .await
        .map_err(|e| BenchError::Pipeline(e.to_string()))?;
    pool.close().await;
    let mut c = sqlx::PgConnection::connect(db_url).await?;
    let data = serde_json::to_vec(&payload(payload_bytes, 0)).unwrap_or_default();
    let txn = txn.max(1);
    let started = Instant::now();
    let mut versions: std::collections::HashMap<String, i64> = Default::default();
    for t in 0..events.div_ceil(txn) {
        let n = txn.min(events - t * txn);
        let base = (t * txn) as i64;
        let pos: Vec<i64> = (1..=n as i64).map(|i| base + i).collect();
        let ids: Vec<String> = pos.iter().map(|p| format!("raw-{p}")).collect();
        let subjects: Vec<String> = pos.iter().map(|p| format!("order-{}", p % 1000)).collect();
        let event_versions: Vec<i64> = subjects
            .iter()
            .map(|s| {
                let v = versions.entry(s.clone()).or_insert(0);
                *v += 1;
                *v
            })
            .collect();
        // A subject's last version in the batch (one row per subject for ON CONFLICT).
        let mut last: std::collections::BTreeMap<&str, i64> = Default::default();
        for (s, v) in subjects.iter().zip(&event_versions) {
            last.insert(s.as_str(), *v);
        }
        let (subj, subj_v): (Vec<&str>, Vec<i64>) = last.into_iter().unzip();
        let datas: Vec<Vec<u8>> = (0..n).map(|_| data.clone()).collect();
        let mut tx = c.begin().await?;
        sqlx::query(
            "WITH h AS (
               UPDATE weir_streams SET head = $7,
                   head_time = GREATEST(clock_timestamp(), head_time)
               WHERE stream_id = $1 RETURNING head_time AS ts
             ),
             ev AS (
               INSERT INTO weir_events (stream_id, position, id, source, type, subject, version,
                   datacontenttype, data_kind, data, recorded_at)
               SELECT $1, u.p, u.id, '/bench', 'order.created', u.s, u.v, 'application/json',
                   1, u.d, h.ts
               FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::bytea[])
                   AS u(p, id, s, v, d), h
             ),
             ids AS (
               INSERT INTO weir_event_ids (stream_id, source, id, position, version)
               SELECT $1, '/bench', u.id, u.p, u.v
               FROM UNNEST($3::text[], $2::bigint[], $5::bigint[]) AS u(id, p, v), h
             )
             INSERT INTO weir_subjects (stream_id, subject, version)
             SELECT $1, u.s, u.v FROM UNNEST($8::text[], $9::bigint[]) AS u(s, v), h
             ON CONFLICT (stream_id, subject) DO UPDATE SET version = EXCLUDED.version",
        )
        .bind(stream_id)
        .bind(&pos)
        .bind(&ids)
        .bind(&subjects)
        .bind(&event_versions)
        .bind(&datas)
        .bind(base + n as i64)
        .bind(&subj)
        .bind(&subj_v)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Measurement::rate_only(
        &format!("raw three-table append ({txn}/txn)"),
        events,
        secs,
    ))
}

pub async fn ingest(args: &BenchArgs) -> Result<Vec<Report>, BenchError> {
    let versions = versions(&args.pg_url).await;
    let pipe = match &args.url {
        Some(_) => None,
        None => {
            eprintln!("starting a weir pipeline…");
            let p = Pipeline::start(&args.pg_url, &args.amqp_url, |_| {
                stream_yaml(
                    "orders",
                    "  store: {urlSecretRef: {name: pg, key: url}}\n  batching: {maxEvents: 1000}\n",
                )
            })
            .await?;
            p.wait_ready(&["orders"]).await?;
            Some(p)
        }
    };
    let url = match (&args.url, &pipe) {
        (Some(u), _) => format!(
            "{}/v1/namespaces/shop/streams/orders/events",
            u.trim_end_matches('/')
        ),
        (None, Some(p)) => p.events_url("orders"),
        (None, None) => unreachable!("a pipeline is started when no --url is given"),
    };
    let batches = args.batch.map_or_else(|| vec![1, 100], |b| vec![b]);
    let rates = rates(args);
    let mut reports = vec![];
    let run_id = format!("{:x}", rand::random::<u32>());
    for batch in batches {
        let (events, concurrency) = batch_load(args, batch);
        eprintln!("ingest batch={batch}: warm-up");
        load::publish(&load::LoadSpec::new(
            &url,
            &format!("w{run_id}-{batch}"),
            (events / 20).clamp(100, 5_000),
            batch,
            concurrency,
            args.payload,
        ))
        .await?;
        for rate in &rates {
            eprintln!(
                "ingest batch={batch} concurrency={concurrency} rate={}: weir",
                rate.map_or("max".into(), |r| r.to_string())
            );
            let before = batch_stats(pipe.as_ref()).await;
            let r = load::publish(&load::LoadSpec {
                rate: *rate,
                max_duration: args.duration,
                show_progress: true,
                ..load::LoadSpec::new(
                    &url,
                    &format!("m{run_id}-{batch}-{}", rate.unwrap_or(0)),
                    events,
                    batch,
                    concurrency,
                    args.payload,
                )
            })
            .await?;
            let after = batch_stats(pipe.as_ref()).await;
            // The baseline writes the same rows in transactions of the size Weir actually
            // used (its group commit merges requests), on as many connections as Weir
            // writes with; without a pipeline of our own, the request size.
            let txn = match (before, after) {
                (Some((s0, c0)), Some((s1, c1))) if c1 > c0 => {
                    ((s1 - s0) / (c1 - c0)).round().max(1.0) as usize
                }
                _ => batch,
            };
            let weir =
                Measurement::from_load(&format!("weir (HTTP, {concurrency} clients)"), &r, *rate);
            eprintln!("ingest batch={batch}: raw baseline ({txn} rows per transaction)");
            let mut baselines = vec![];
            for conns in [BASELINE_CONNECTIONS, PARALLEL_BASELINE_CONNECTIONS] {
                let (db, name) = scratch_db(&args.pg_url).await?;
                let b = raw_append(&db, r.events.max(1), txn, conns, args.payload).await;
                drop_db(&args.pg_url, &name).await?;
                baselines.push(b?);
            }
            let parallel = baselines.pop();
            let baseline = baselines
                .pop()
                .ok_or_else(|| BenchError::Pipeline("no baseline".into()))?;
            eprintln!("ingest batch={batch}: raw three-table append");
            let (db, name) = scratch_db(&args.pg_url).await?;
            let schema = raw_append_schema(&db, r.events.max(1), txn, args.payload).await;
            drop_db(&args.pg_url, &name).await?;
            let schema = schema?;
            let mut report = Report::new(
                "ingest",
                format!("batch={batch} c={concurrency} payload={}B", args.payload),
                weir,
                baseline,
                versions.clone(),
            );
            report.baseline_parallel = parallel;
            report.ratio_schema = Some(report.weir.events_per_s / schema.events_per_s.max(1e-9));
            report.baseline_schema = Some(schema);
            reports.push(report);
        }
    }
    if let Some(p) = pipe {
        p.stop().await?;
    }
    Ok(reports)
}

/// `(sum, count)` of the pipeline's `weir_batch_events` histogram (events per transaction).
async fn batch_stats(pipe: Option<&Pipeline>) -> Option<(f64, f64)> {
    let text = pipe?.metrics_text().await?;
    let get = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    Some((
        get("weir_batch_events_sum")?,
        get("weir_batch_events_count")?,
    ))
}

/// The offered rates to measure: `--rate`, or a sweep when a plot is asked for.
fn rates(args: &BenchArgs) -> Vec<Option<u64>> {
    match (args.rate, &args.plot) {
        (Some(r), _) => vec![Some(r)],
        (None, Some(_)) => vec![Some(1_000), Some(5_000), Some(20_000), None],
        (None, None) => vec![None],
    }
}
