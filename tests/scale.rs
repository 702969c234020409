//! Many resources on one worker and one database: every resource comes up Ready on the
//! default pool, PostgreSQL connections stay within the configured pools (not one per
//! resource), the admin API answers throughout, and a database that refuses is a condition,
//! not a log flood — with nothing acknowledged lost once it is back.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::counting::{CountingSink as Sink, delete_queues};
use common::*;
use serde_json::{Value, json};

/// `n` streams (`s0000`…), each with a store and its own exchange, and one subscription per
/// stream delivering to `sink`, in one manifest file. Subscription names carry a tag of the
/// run (their queue names are made from them): the tag, to delete the queues afterwards.
fn write_pipeline(m: &Manifests, n: usize, sink: &str) -> String {
    let tag = unique("sc");
    let mut text = String::new();
    for i in 0..n {
        let name = format!("s{i:04}");
        text.push_str(&stream_yaml(&name, &format!("weir.test.{tag}-{name}"), ""));
        text.push_str("---\n");
        text.push_str(&format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {tag}-{name}, namespace: test}}\n\
             spec:\n  stream: {name}\n  sink: {{uri: \"{sink}\"}}\n---\n"
        ));
    }
    m.write("pipeline.yaml", &text);
    tag
}

/// Answers of `/v1/status` while something runs: the slowest, and failures (no answer in
/// 5 s, or not 200).
#[derive(Default)]
struct AdminWatch {
    slowest: Duration,
    failures: Vec<String>,
    polls: u32,
}

/// Polls `/v1/status` and `/healthz` every 200 ms until `stop` is set.
fn watch_admin(
    admin: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<AdminWatch> {
    tokio::spawn(async move {
        let client = common::http_builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut w = AdminWatch::default();
        // The process may not listen yet: failures count from its first answer on.
        while client.get(format!("{admin}/healthz")).send().await.is_err() {
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            for path in ["/v1/status", "/healthz"] {
                let t = Instant::now();
                let r = client.get(format!("{admin}{path}")).send().await;
                let took = t.elapsed();
                w.polls += 1;
                w.slowest = w.slowest.max(took);
                match r {
                    Ok(r) if r.status() == 200 => {
                        // The whole body, as a client would read it.
                        let _ = r.bytes().await;
                    }
                    Ok(r) => w.failures.push(format!("{path}: {}", r.status())),
                    Err(e) => w.failures.push(format!("{path} after {took:?}: {e:?}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        w
    })
}

/// The resources `/v1/status` lists; none while the process is not listening yet.
async fn status(admin: &str) -> Vec<Value> {
    let client = common::http_builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let Ok(r) = client.get(format!("{admin}/v1/status")).send().await else {
        return Vec::new();
    };
    let v: Value = r.json().await.expect("status is JSON");
    v["resources"].as_array().cloned().unwrap_or_default()
}

/// Waits until `want` resources are Ready; on timeout, names those that are not and why.
async fn wait_all_ready(weir: &mut Weir, want: usize, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let rs = status(&weir.admin).await;
        let ready = rs.iter().filter(|r| r["ready"] == true).count();
        if ready == want && rs.len() == want {
            return started.elapsed();
        }
        if started.elapsed() > within {
            let not: Vec<String> = rs
                .iter()
                .filter(|r| r["ready"] != true)
                .take(10)
                .map(|r| format!("{}/{}: {}", r["kind"], r["name"], r["conditions"][0]))
                .collect();
            panic!(
                "{ready}/{want} resources Ready after {within:?} ({} listed; process {:?}, admin {}); \
                 not ready: {not:#?}\nlog tail:\n{}",
                rs.len(),
                weir.child.try_wait(),
                weir.admin,
                tail(&weir.log_text(), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Sessions of `role` (or on `db`) right now.
async fn sessions(admin: &sqlx::PgPool, db: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
        .bind(db)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Samples the sessions on `db` every 100 ms until `stop`; answers the most seen.
fn watch_sessions(
    admin: sqlx::PgPool,
    db: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let mut most = 0;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            most = most.max(sessions(&admin, &db).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        most
    })
}

/// Publishes one event to each of the first `n` streams, 16 at a time (a refused publish
/// waits for the request timeout); answers the ids acknowledged and the refusals.
async fn publish_each(weir: &Weir, n: usize, round: &str) -> (Vec<String>, Vec<String>) {
    use futures::StreamExt;
    let client = common::http();
    let answers: Vec<(String, Result<u16, String>)> = futures::stream::iter(0..n)
        .map(|i| {
            let (client, url) = (client.clone(), weir.events_url("test", &format!("s{i:04}")));
            let id = format!("{round}-{i}");
            async move {
                let r = client
                    .post(url)
                    .timeout(Duration::from_secs(15))
                    .json(&json!({"type": "scale.tick", "id": id, "data": {"i": i}}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .map_err(|e| e.to_string());
                (id, r)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for (id, r) in answers {
        match r {
            Ok(code) if (200..300).contains(&code) => acked.push(id),
            Ok(code) => refused.push(format!("{id}: {code}")),
            Err(e) => refused.push(format!("{id}: {e}")),
        }
    }
    (acked, refused)
}

async fn wait_delivered(sink: &Sink, ids: &[String], within: Duration, weir: &Weir) {
    let started = Instant::now();
    while sink.delivered(ids) < ids.len() {
        if started.elapsed() > within {
            let got = sink.got.lock().unwrap().clone();
            let missing: Vec<&String> = ids
                .iter()
                .filter(|i| !got.contains_key(*i))
                .take(10)
                .collect();
            panic!(
                "{} of {} delivered after {within:?}; missing e.g. {missing:?}\nlog tail:\n{}",
                sink.delivered(ids),
                ids.len(),
                tail(&weir.log_text(), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes what [`limited_database`] made.
async fn drop_limited(admin: &sqlx::PgPool, db: &str, role: &str) {
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(admin)
    .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
        .execute(admin)
        .await;
}

/// A database owned by a role of its own whose connections PostgreSQL limits to `limit`.
async fn limited_database(limit: u32) -> (String, String, String, sqlx::PgPool) {
    let admin = sqlx::PgPool::connect(&pg_admin_url()).await.unwrap();
    let role = unique("weir_t_role_");
    let db = unique("weir_t_");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT {limit}"
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {db} OWNER {role}"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let url = format!("postgres://{role}@127.0.0.1:5432/{db}");
    (url, role, db, admin)
}

/// A scale run that came up, published one event to each stream and saw each delivered.
struct Run {
    weir: Weir,
    tag: String,
    /// Time until every resource was Ready.
    took: Duration,
    /// Most sessions seen on the database meanwhile.
    most: i64,
    admin: AdminWatch,
    sink: Sink,
    acked: Vec<String>,
    _m: Manifests,
}

/// Starts a worker on `n` streams + `n` subscriptions of database `db`, waits until every
/// resource is Ready, publishes one event to each stream and waits for every delivery, while
/// the database's sessions and the admin API's answers are watched.
async fn up_publish_deliver(
    db_url: &str,
    db: &str,
    admin: &sqlx::PgPool,
    n: usize,
    env: &[(&str, &str)],
    ready_within: Duration,
) -> Run {
    let sink = Sink::start().await;
    let m = Manifests::new(db_url);
    let tag = write_pipeline(&m, n, &sink.url);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sessions_task = watch_sessions(admin.clone(), db.to_string(), stop.clone());
    let mut weir = Weir::start_with(m.path(), env);
    let admin_task = watch_admin(weir.admin.clone(), stop.clone());
    let took = wait_all_ready(&mut weir, 2 * n, ready_within).await;
    let (acked, refused) = publish_each(&weir, n, "a").await;
    assert!(refused.is_empty(), "publishes refused: {refused:?}");
    wait_delivered(&sink, &acked, Duration::from_secs(120), &weir).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    Run {
        most: sessions_task.await.unwrap(),
        admin: admin_task.await.unwrap(),
        weir,
        tag,
        took,
        sink,
        acked,
        _m: m,
    }
}

/// The default pool (`maxConnections` 10) and three times as many streams, each with a
/// subscription: every resource Ready, a publish to each stream answered 201 and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_times_the_default_pool_in_streams_all_ready_publish_and_deliver() {
    const N: usize = 30;
    let db_url = fresh_database().await;
    let db = db_url.rsplit('/').next().unwrap().to_string();
    let admin = sqlx::PgPool::connect(&pg_admin_url()).await.unwrap();
    let Run {
        weir,
        tag,
        took,
        most,
        admin: w,
        sink,
        acked,
        _m,
    } = up_publish_deliver(&db_url, &db, &admin, N, &[], Duration::from_secs(120)).await;
    eprintln!(
        "{N} streams + {N} subscriptions: Ready in {took:?}, at most {most} sessions, slowest admin answer {:?} of {}",
        w.slowest, w.polls
    );
    // The pool (10) + the notification and lock sessions (1 each).
    assert!(
        most <= 12,
        "{most} sessions on the database, more than the pools allow"
    );
    assert!(
        w.failures.is_empty(),
        "admin answers failed: {:?}",
        w.failures
    );
    assert!(sink.unexpected(&acked).is_empty());
    drop(weir);
    delete_queues(&tag).await;
}

/// 200 streams + 200 subscriptions on a database whose role PostgreSQL limits to the
/// connections the pools may open (10 + 2): nothing is refused, every resource comes up,
/// the admin API answers within a second throughout, and every stream's event is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_and_subscriptions_within_a_connection_limit() {
    const N: usize = 200;
    const LIMIT: u32 = 12;
    let (db_url, role, db, admin) = limited_database(LIMIT).await;
    let Run {
        weir,
        tag,
        took,
        most,
        admin: w,
        sink: _sink,
        acked: _acked,
        _m,
    } = up_publish_deliver(
        &db_url,
        &db,
        &admin,
        N,
        &[("RUST_LOG", "info")],
        Duration::from_secs(240),
    )
    .await;
    let log = weir.log_text();
    let rss = std::fs::read_to_string(format!("/proc/{}/status", weir.child.id()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "{N} streams + {N} subscriptions: Ready in {took:?}, at most {most} sessions (limit {LIMIT}), \
         slowest admin answer {:?} of {}, log {} lines, {rss}",
        w.slowest,
        w.polls,
        log.lines().count()
    );
    assert!(most <= i64::from(LIMIT), "{most} sessions");
    assert!(
        !log.contains("too many connections"),
        "a connection was refused:\n{}",
        tail(&log, 40)
    );
    assert!(
        w.failures.is_empty(),
        "admin answers failed: {:?}",
        w.failures
    );
    assert!(
        w.slowest < Duration::from_secs(1),
        "the admin API took {:?} to answer",
        w.slowest
    );
    drop(weir);
    delete_queues(&tag).await;
    drop_limited(&admin, &db, &role).await;
}

/// PostgreSQL refuses the worker's role for a while: streams go Ready=False with reason
/// StoreUnavailable, `/readyz` says not ready and why, publishes are refused (never a 2xx
/// that is not durable), the admin API keeps answering and the log stays short; once the
/// database takes connections again, every resource is Ready and every acknowledged event is
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_is_a_condition_not_a_log_flood() {
    const N: usize = 20;
    const LIMIT: u32 = 12;
    let (db_url, role, db, admin) = limited_database(LIMIT).await;
    let sink = Sink::start().await;
    let m = Manifests::new(&db_url);
    let tag = write_pipeline(&m, N, &sink.url);
    let mut weir = Weir::start_with(m.path(), &[("RUST_LOG", "info")]);
    wait_all_ready(&mut weir, 2 * N, Duration::from_secs(120)).await;
    let (mut acked, refused) = publish_each(&weir, N, "before").await;
    assert!(refused.is_empty(), "{refused:?}");
    wait_delivered(&sink, &acked, Duration::from_secs(60), &weir).await;

    // Refuse: no new session for the role, and its sessions ended.
    let lines_before = weir.log_text().lines().count();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {role} CONNECTION LIMIT 0"
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(&role)
        .execute(&admin)
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin_task = watch_admin(weir.admin.clone(), stop.clone());
    let outage = Instant::now();
    // Every stream says why it is not Ready.
    loop {
        let rs = status(&weir.admin).await;
        let down: Vec<&Value> = rs
            .iter()
            .filter(|r| {
                r["kind"] == "EventStream"
                    && r["ready"] == false
                    && r["conditions"][0]["reason"] == "StoreUnavailable"
            })
            .collect();
        if down.len() == N {
            let msg = down[0]["conditions"][0]["message"]
                .as_str()
                .unwrap_or_default();
            assert!(msg.starts_with("store: "), "{msg}");
            break;
        }
        assert!(
            outage.elapsed() < Duration::from_secs(30),
            "{} of {N} streams StoreUnavailable after 30 s: {:#?}",
            down.len(),
            rs.iter().find(|r| r["kind"] == "EventStream")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ready = common::http_get(format!("{}/readyz", weir.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body = ready.text().await.unwrap();
    assert!(body.contains("StoreUnavailable"), "{body}");
    // Publishes meanwhile are refused or, if one got through before the refusal took hold,
    // acknowledged — and then it must be delivered like the others.
    let (during, _refused) = publish_each(&weir, N, "during").await;
    acked.extend(during);
    // Sent but refused: may still arrive (a 503 whose commit happened after all), never
    // "unexpected".
    let sent_during: Vec<String> = (0..N).map(|i| format!("during-{i}")).collect();
    // Let the retries run a while: this is where a flood would be.
    tokio::time::sleep(Duration::from_secs(20)).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {role} CONNECTION LIMIT {LIMIT}"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let back = wait_all_ready(&mut weir, 2 * N, Duration::from_secs(90)).await;
    let lines = weir.log_text().lines().count() - lines_before;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let w = admin_task.await.unwrap();
    let (after, refused) = publish_each(&weir, N, "after").await;
    assert!(refused.is_empty(), "{refused:?}");
    acked.extend(after);
    wait_delivered(&sink, &acked, Duration::from_secs(90), &weir).await;
    eprintln!(
        "outage of {:?}: {lines} log lines, back Ready {back:?} after the database was, slowest admin answer {:?}",
        outage.elapsed(),
        w.slowest
    );
    // At most a few lines per resource for the whole outage and recovery (RUST_LOG=info).
    let bound = 4 * 2 * N + 20;
    assert!(
        lines <= bound,
        "{lines} log lines during the outage (bound {bound}):\n{}",
        tail(&weir.log_text(), 60)
    );
    assert!(
        w.failures.is_empty(),
        "admin answers failed: {:?}",
        w.failures
    );
    assert!(w.slowest < Duration::from_secs(1), "{:?}", w.slowest);
    let sent: Vec<String> = acked.iter().cloned().chain(sent_during).collect();
    assert!(
        sink.unexpected(&sent).is_empty(),
        "{:?}",
        sink.unexpected(&sent)
    );
    drop(weir);
    delete_queues(&tag).await;
    drop_limited(&admin, &db, &role).await;
}
