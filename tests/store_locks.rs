//! The lock session of a database (one per process): ownership across two "processes" (two
//! stores with pools of their own on one database), exclusivity within one process, takeover
//! when the holder's session dies, and checkpoint fencing of the holder that lost it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio_util::sync::CancellationToken;
use weir::data::store::Store;
use weir::data::store::locks::{KEEPALIVE, LOCK_POLL, LockKey};

async fn store(url: &str) -> Store {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("PostgreSQL must be running for integration tests");
    Store::new(pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_across_processes_and_a_takeover_when_its_session_dies() {
    let url = fresh_database().await;
    let (a, b) = (store(&url).await, store(&url).await);
    a.migrate().await.unwrap();
    let id = a.ensure_stream("test", "locks").await.unwrap();
    let key = LockKey::Pair(0x7e57, id as i32);
    let never = CancellationToken::new();

    // Process A takes it at once.
    let lease = tokio::time::timeout(
        Duration::from_secs(5),
        a.locks().acquire(key.clone(), &never),
    )
    .await
    .expect("a free key is granted at once")
    .expect("not cancelled");
    let (epoch, checkpoint) = lease.claim_relay(id).await.unwrap();
    assert_eq!((epoch, checkpoint), (1, 0));
    assert!(lease.write_checkpoint(id, epoch, 10).await.unwrap());

    // Within A, a second holder waits for the first one to let go: the session would grant it
    // again (advisory locks are re-entrant per session), the lock session must not.
    let again = {
        let (a, key, never) = (a.clone(), key.clone(), never.clone());
        tokio::spawn(async move { a.locks().acquire(key, &never).await })
    };
    // Process B waits too.
    let b_wait = {
        let (b, key, never) = (b.clone(), key.clone(), never.clone());
        tokio::spawn(async move { b.locks().acquire(key, &never).await })
    };
    tokio::time::sleep(LOCK_POLL * 3).await;
    assert!(!again.is_finished(), "a second holder in the same process");
    assert!(!b_wait.is_finished(), "a second owner across processes");

    // Dropping the lease hands the key to the holder waiting in A (it stays in the process).
    drop(lease);
    let second = tokio::time::timeout(Duration::from_secs(5), again)
        .await
        .expect("the waiting holder gets the key after a release")
        .unwrap()
        .expect("not cancelled");
    assert!(!b_wait.is_finished(), "B must not get a key A still holds");

    // A's session dies (as when the process is killed or the network cuts it).
    let admin = sqlx::PgPool::connect(&pg_admin_url()).await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objid = $1::oid AND classid = $2::oid",
    )
    .bind(id)
    .bind(0x7e57_i64)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(killed, vec![true], "one session held the key");
    let cut = Instant::now();
    // A learns it lost the key within a keepalive, before B can take over...
    tokio::time::timeout(KEEPALIVE * 3, second.lost().cancelled())
        .await
        .expect("the holder is told its lease is lost");
    // ...and B takes over within a lock poll or two.
    let b_lease = tokio::time::timeout(LOCK_POLL * 5, b_wait)
        .await
        .expect("B takes over after A's session died")
        .unwrap()
        .expect("not cancelled");
    eprintln!("takeover after {:?}", cut.elapsed());
    let (b_epoch, b_checkpoint) = b_lease.claim_relay(id).await.unwrap();
    assert_eq!(b_epoch, epoch + 1);
    assert_eq!(b_checkpoint, 10, "B starts from A's last checkpoint");
    // A's old holder cannot move the checkpoint any more, whatever it tries.
    assert!(
        !second
            .write_checkpoint(id, epoch, 99)
            .await
            .unwrap_or(false),
        "a lost lease must not write"
    );
    assert!(b_lease.write_checkpoint(id, b_epoch, 20).await.unwrap());
    let stored: i64 =
        sqlx::query_scalar("SELECT position FROM weir_relay_checkpoints WHERE stream_id = $1")
            .bind(id)
            .fetch_one(a.pool())
            .await
            .unwrap();
    assert_eq!(stored, 20);

    // A reconnected: it can wait for the key again, and gets it once B lets go.
    let a_wait = {
        let (a, key, never) = (a.clone(), key.clone(), never.clone());
        tokio::spawn(async move { a.locks().acquire(key, &never).await })
    };
    tokio::time::sleep(LOCK_POLL * 2).await;
    assert!(!a_wait.is_finished());
    drop(b_lease);
    let back = tokio::time::timeout(LOCK_POLL * 5, a_wait)
        .await
        .expect("A gets the key back after B released it")
        .unwrap()
        .expect("not cancelled");
    assert!(!back.lost().is_cancelled());
}

/// A thousand keys wanted at once are tried together (one query a round) and all granted;
/// a waiter that gives up leaves nothing held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_keys_on_one_session() {
    let url = fresh_database().await;
    let a = store(&url).await;
    let never = CancellationToken::new();
    let started = Instant::now();
    let mut waits = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (a, never) = (a.clone(), never.clone());
        waits.spawn(async move {
            a.locks()
                .acquire(LockKey::Named(format!("test/{i}")), &never)
                .await
        });
    }
    let mut leases = Vec::new();
    while let Some(l) = waits.join_next().await {
        leases.push(l.unwrap().expect("granted"));
    }
    eprintln!("1000 keys granted in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(10));
    let admin = sqlx::PgPool::connect(&pg_admin_url()).await.unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    let (sessions, locks): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT l.pid), count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid)
         WHERE l.locktype = 'advisory' AND s.datname = $1",
    )
    .bind(&db)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!((sessions, locks), (1, 1000), "every key on one session");

    // A waiter that gives up (cancelled) before the key is free never holds it.
    let cancel = CancellationToken::new();
    let wait = {
        let (a, cancel) = (a.clone(), cancel.clone());
        tokio::spawn(async move {
            a.locks()
                .acquire(LockKey::Named("test/0".into()), &cancel)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    cancel.cancel();
    assert!(wait.await.unwrap().is_none());
    drop(leases);
    // Released in the background: within a round or two.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid)
             WHERE l.locktype = 'advisory' AND s.datname = $1",
        )
        .bind(&db)
        .fetch_one(&admin)
        .await
        .unwrap();
        if held == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{held} locks still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
