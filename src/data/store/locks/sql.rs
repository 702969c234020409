//! The lock session's statements: advisory locks tried and released in one round trip each,
//! relay epochs claimed durably, checkpoints written for many relays at once.

use sqlx::{Connection, PgConnection};

use super::LockKey;

fn split(keys: &[LockKey]) -> (Vec<i32>, Vec<i32>, Vec<String>) {
    let (mut a, mut b, mut n) = (Vec::new(), Vec::new(), Vec::new());
    for k in keys {
        match k {
            LockKey::Pair(x, y) => {
                a.push(*x);
                b.push(*y);
            }
            LockKey::Named(s) => n.push(s.clone()),
        }
    }
    (a, b, n)
}

/// Tries every key in one round trip; answers those now held.
pub(super) async fn try_lock(
    conn: &mut PgConnection,
    keys: &[LockKey],
) -> Result<Vec<LockKey>, sqlx::Error> {
    let (a, b, n) = split(keys);
    let rows: Vec<(Option<i32>, Option<i32>, Option<String>)> = sqlx::query_as(
        "SELECT a, b, NULL::text FROM unnest($1::int4[], $2::int4[]) AS t(a, b)
           WHERE pg_try_advisory_lock(a, b)
         UNION ALL
         SELECT NULL, NULL, n FROM unnest($3::text[]) AS t(n)
           WHERE pg_try_advisory_lock(hashtextextended(n, 0))",
    )
    .bind(a)
    .bind(b)
    .bind(n)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| match r {
            (Some(a), Some(b), _) => Some(LockKey::Pair(a, b)),
            (_, _, Some(n)) => Some(LockKey::Named(n)),
            _ => None,
        })
        .collect())
}

pub(super) async fn unlock(conn: &mut PgConnection, keys: &[LockKey]) -> Result<(), sqlx::Error> {
    let (a, b, n) = split(keys);
    sqlx::query(
        "SELECT pg_advisory_unlock(a, b) FROM unnest($1::int4[], $2::int4[]) AS t(a, b)
         UNION ALL
         SELECT pg_advisory_unlock(hashtextextended(n, 0)) FROM unnest($3::text[]) AS t(n)",
    )
    .bind(a)
    .bind(b)
    .bind(n)
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the checkpoint of every relay whose epoch still matches; answers the streams moved.
pub(super) async fn write_checkpoints(
    conn: &mut PgConnection,
    ids: Vec<i64>,
    epochs: Vec<i64>,
    positions: Vec<i64>,
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE weir_relay_checkpoints c SET position = v.p, updated_at = now()
         FROM unnest($1::int8[], $2::int8[], $3::int8[]) AS v(id, e, p)
         WHERE c.stream_id = v.id AND c.epoch = v.e
         RETURNING c.stream_id",
    )
    .bind(ids)
    .bind(epochs)
    .bind(positions)
    .fetch_all(conn)
    .await
}

/// Bumps the epoch durably: a later owner must never get the same epoch back after a crash.
pub(super) async fn claim(
    conn: &mut PgConnection,
    stream_id: i64,
) -> Result<(i64, i64), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await?;
    let row: (i64, i64) = sqlx::query_as(
        "UPDATE weir_relay_checkpoints SET epoch = epoch + 1, updated_at = now()
         WHERE stream_id = $1 RETURNING epoch, position",
    )
    .bind(stream_id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}
