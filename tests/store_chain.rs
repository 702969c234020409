//! Chained appends against the real PostgreSQL: batches decided on top of batches that are
//! still committing, from one or two writers with three batches in flight each (as one or
//! two worker processes' batchers would), keep positions gap-free and in commit order, subject versions
//! gap-free, `expectedversion` exact and dedup exact; a batch that fails takes nothing that
//! was chained on it down with it.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinSet;
use weir::data::event::{CloudEvent, Data, ExtValue};
use weir::data::store::{AppendChain, AppendInput, AppendPath, Conflict, RequestOutcome, Store};
use weir::topology::CompressionPlan;

fn event(id: &str, subject: &str, expected: Option<i64>) -> CloudEvent {
    let mut extensions = BTreeMap::new();
    if let Some(v) = expected {
        extensions.insert("expectedversion".to_string(), ExtValue::Integer(v));
    }
    CloudEvent {
        id: id.to_string(),
        source: "/chain".into(),
        ty: "order.created".into(),
        datacontenttype: Some("application/json".into()),
        dataschema: None,
        subject: Some(subject.to_string()),
        time: None,
        extensions,
        data: Some(Data::Json(Bytes::from(format!("{{\"id\":\"{id}\"}}")))),
    }
}

async fn store() -> (Store, i64, sqlx::PgPool) {
    let url = fresh_database().await;
    // Six batches in flight need six connections; the rest is headroom.
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .unwrap();
    let store = Store::new(pool.clone());
    store.migrate().await.unwrap();
    let stream = store.ensure_stream("chain", "orders").await.unwrap();
    (store, stream, pool)
}

fn compression() -> CompressionPlan {
    CompressionPlan {
        min_bytes: usize::MAX,
        ..Default::default()
    }
}

/// One answered event: its id, whether it was the original, where it went.
type Answer = (String, bool, i64, Option<i64>);
/// A stored event: position, id, subject, version, recorded time.
type Row = (
    i64,
    String,
    Option<String>,
    Option<i64>,
    chrono::DateTime<chrono::Utc>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chained_appends_of_one_writer_keep_positions_versions_and_dedup_exact() {
    let paths = run_writers(1).await;
    // The run exercised what it is about.
    assert!(
        paths.contains(&AppendPath::Chained),
        "no batch was chained: {paths:?}"
    );
}

/// Two writers break each other's chains all the time: most batches are decided again under
/// the lock, and every answer must still be exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chained_appends_from_two_writers_keep_positions_versions_and_dedup_exact() {
    let paths = run_writers(2).await;
    assert!(
        paths.contains(&AppendPath::Locked),
        "no guard failed: {paths:?}"
    );
}

/// `writers` writers with three batches in flight each append 60 rounds of two requests;
/// checks everything stored against every answer and returns how each batch went.
async fn run_writers(writers: usize) -> Vec<AppendPath> {
    let (store, stream, pool) = store().await;
    const ROUNDS: usize = 60;
    let mut tasks = JoinSet::new();
    for writer in 0..writers {
        let chain = Arc::new(AppendChain::default());
        for slot in 0..3 {
            let (store, chain) = (store.clone(), chain.clone());
            tasks.spawn(async move {
                let mut answers: Vec<Answer> = vec![];
                let mut paths = vec![];
                let mut account_version = None;
                for round in 0..ROUNDS {
                    let mut a: Vec<CloudEvent> = (0..10)
                        .map(|i| {
                            let id = format!("w{writer}-s{slot}-r{round}-{i}");
                            event(&id, &format!("order-{}", (i * 7 + round) % 40), None)
                        })
                        .collect();
                    // The same id from two slots of one writer in the same round: usually
                    // in flight at once, so one is decided on top of the other.
                    a.push(event(
                        &format!("shared-w{writer}-r{round}"),
                        "order-shared",
                        None,
                    ));
                    // A subject every slot of both writers appends to with an
                    // `expectedversion`: conflicts are expected, wrong versions are not.
                    let b = vec![event(
                        &format!("acct-w{writer}-s{slot}-r{round}"),
                        "account",
                        account_version,
                    )];
                    let requests = [AppendInput { events: &a }, AppendInput { events: &b }];
                    let (out, report) = store
                        .append_chained(stream, &requests, &compression(), &chain)
                        .await
                        .unwrap();
                    paths.push(report.path);
                    for (request, outcome) in [&a, &b].into_iter().zip(out) {
                        match outcome {
                            Ok(appended) => {
                                for (ev, ap) in request.iter().zip(appended) {
                                    answers.push((
                                        ev.id.clone(),
                                        !ap.duplicate,
                                        ap.position,
                                        ap.version,
                                    ));
                                    if ev.subject.as_deref() == Some("account") {
                                        account_version = ap.version;
                                    }
                                }
                            }
                            // Someone else moved the account on: take their version.
                            Err(Conflict::Version { actual, .. }) => account_version = Some(actual),
                            Err(other) => panic!("no publisher is authenticated here: {other:?}"),
                        }
                    }
                }
                (answers, paths)
            });
        }
    }
    let mut answers = vec![];
    let mut paths = vec![];
    while let Some(r) = tasks.join_next().await {
        let (a, p) = r.unwrap();
        answers.extend(a);
        paths.extend(p);
    }

    let rows: Vec<Row> = sqlx::query_as(
        "SELECT position, id, subject, version, recorded_at FROM weir_events
             WHERE stream_id = $1 ORDER BY position",
    )
    .bind(stream)
    .fetch_all(&pool)
    .await
    .unwrap();
    // Gap-free positions, recorded times never going back.
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.0, i as i64 + 1, "positions are not gap-free");
    }
    assert!(
        rows.windows(2).all(|w| w[0].4 <= w[1].4),
        "recorded_at went back"
    );
    // Every id stored once, where its original answer said.
    let stored: HashMap<&str, (i64, Option<i64>)> =
        rows.iter().map(|r| (r.1.as_str(), (r.0, r.3))).collect();
    assert_eq!(stored.len(), rows.len(), "an id was stored twice");
    let mut originals: HashMap<&str, usize> = HashMap::new();
    for (id, original, position, version) in &answers {
        assert_eq!(
            stored.get(id.as_str()),
            Some(&(*position, *version)),
            "{id} was answered at {position} (original: {original})"
        );
        if *original {
            *originals.entry(id).or_default() += 1;
        }
    }
    assert!(
        originals.values().all(|n| *n == 1),
        "an id was answered as new twice"
    );
    assert_eq!(
        originals.len(),
        rows.len(),
        "a stored event was never answered"
    );
    // Each subject's versions are 1..n in position order.
    let mut versions: HashMap<&str, i64> = HashMap::new();
    for row in &rows {
        let subject = row.2.as_deref().unwrap();
        let v = versions.entry(subject).or_default();
        *v += 1;
        assert_eq!(row.3, Some(*v), "version of {subject} at {}", row.0);
    }
    let (head,): (i64,) = sqlx::query_as("SELECT head FROM weir_streams WHERE stream_id = $1")
        .bind(stream)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(head, rows.len() as i64);
    // Each writer's shared id went in once per round.
    let shared = rows.iter().filter(|r| r.1.starts_with("shared-")).count();
    assert_eq!(shared, writers * ROUNDS);
    assert!(versions["account"] >= 1);
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_batch_does_not_take_the_batches_chained_on_it_down() {
    let (store, stream, pool) = store().await;
    let chain = Arc::new(AppendChain::default());
    let mut good = 0;
    let mut chained_on_failure = 0;
    for round in 0..40 {
        let mut tasks = JoinSet::new();
        for slot in 0..3 {
            let (store, chain) = (store.clone(), chain.clone());
            tasks.spawn(async move {
                let mut ev = event(&format!("e-{round}-{slot}"), &format!("order-{slot}"), None);
                // Slot 0's batch passes the lookup but PostgreSQL refuses its write (a NUL
                // byte in a text column only the write sends).
                if slot == 0 {
                    ev.ty = "bad\0type".into();
                }
                let events = vec![ev];
                let r = store
                    .append_chained(
                        stream,
                        &[AppendInput { events: &events }],
                        &compression(),
                        &chain,
                    )
                    .await;
                (slot, r.map(|(out, report)| (out, report.path)))
            });
        }
        while let Some(r) = tasks.join_next().await {
            let (slot, r) = r.unwrap();
            match (slot, r) {
                (0, r) => assert!(r.is_err(), "the NUL byte was stored"),
                (_, Ok((out, path))) => {
                    let outcome: &RequestOutcome = &out[0];
                    assert!(outcome.as_ref().is_ok_and(|a| !a[0].duplicate));
                    good += 1;
                    chained_on_failure += usize::from(path == AppendPath::Locked);
                }
                (_, Err(e)) => panic!("a good batch failed: {e}"),
            }
        }
    }
    let (count, max): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), max(position) FROM weir_events WHERE stream_id = $1")
            .bind(stream)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(good, 80);
    assert_eq!((count, max), (80, Some(80)), "positions are not gap-free");
    // Some good batch was decided on top of a failing one and had to be decided again.
    assert!(
        chained_on_failure > 0,
        "no batch was chained on a failing one"
    );
}
