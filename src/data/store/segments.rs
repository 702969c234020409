//! The archive's rows: what an archive run reads and writes on its locked session (hot rows
//! before the cutoff, dictionaries, segment and index rows, the hot-row deletion,
//! `deleteAfter`), the totals status shows and what `weir archive verify` reads. The order of
//! these statements, and the transactions around them, stay with the archiver: the crash-safe
//! move is its sequence; the statements are here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Connection as _, PgConnection};

use super::codec::{decode_row, event_columns};
use super::{Store, StoreError};
use crate::data::archive::format::{BlockEntry, BuiltSegment};
use crate::data::event::StoredEvent;

/// First key of the two-key advisory lock space used for archivers (relays use
/// `0x5745_4951`).
const ARCHIVE_LOCK_CLASS: i32 = 0x5745_4953;

/// Takes the stream's archive lock on `conn` if no other session holds it.
pub async fn try_archive_lock(conn: &mut PgConnection, stream_id: i64) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1, ($2 % 2147483647)::int4)")
            .bind(ARCHIVE_LOCK_CLASS)
            .bind(stream_id)
            .fetch_one(conn)
            .await?,
    )
}

/// The database's `now()` less `archive_after`: events recorded before it are eligible.
pub async fn archive_cutoff(
    conn: &mut PgConnection,
    archive_after: Duration,
) -> Result<DateTime<Utc>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT now() - make_interval(secs => $1)")
            .bind(archive_after.as_secs_f64())
            .fetch_one(conn)
            .await?,
    )
}

/// How many hot events of the stream were recorded before `cutoff`.
pub async fn count_hot_before(
    conn: &mut PgConnection,
    stream_id: i64,
    cutoff: DateTime<Utc>,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM weir_events WHERE stream_id = $1 AND recorded_at < $2",
    )
    .bind(stream_id)
    .bind(cutoff)
    .fetch_one(conn)
    .await?)
}

/// Up to `limit` hot events from position `from` on, recorded before `cutoff`, in order.
pub async fn hot_page_before(
    conn: &mut PgConnection,
    stream_id: i64,
    from: i64,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        event_columns!(),
        " FROM weir_events WHERE stream_id = $1 AND position >= $2 AND recorded_at < $3
         ORDER BY position LIMIT $4"
    ))
    .bind(stream_id)
    .bind(from)
    .bind(cutoff)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(decode_row).collect()
}

/// The stream's newest dictionary: its id, its bytes and how many segments use it.
pub async fn latest_dictionary(
    conn: &mut PgConnection,
    stream_id: i64,
) -> Result<Option<(i32, Vec<u8>, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT d.dict_id, d.dict,
                (SELECT count(*) FROM weir_archive_segments s
                 WHERE s.stream_id = d.stream_id AND s.dict_id = d.dict_id)
         FROM weir_archive_dictionaries d WHERE d.stream_id = $1
         ORDER BY d.dict_id DESC LIMIT 1",
    )
    .bind(stream_id)
    .fetch_optional(conn)
    .await?)
}

/// Records a newly trained dictionary (`samples`: events it was trained on).
pub async fn insert_dictionary(
    conn: &mut PgConnection,
    stream_id: i64,
    dict_id: i32,
    dict: &[u8],
    samples: i32,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO weir_archive_dictionaries (stream_id, dict_id, dict, samples)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(stream_id)
    .bind(dict_id)
    .bind(dict)
    .bind(samples)
    .execute(conn)
    .await?;
    Ok(())
}

/// The files the stream's segment rows name (volume destinations).
pub async fn segment_files(
    conn: &mut PgConnection,
    stream_id: i64,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT file_path FROM weir_archive_segments
         WHERE stream_id = $1 AND file_path IS NOT NULL",
    )
    .bind(stream_id)
    .fetch_all(conn)
    .await?)
}

/// The segment's row and its subject and correlation index rows. `file`: where the body was
/// written (`None`: the body goes into the row).
pub async fn insert_segment(
    conn: &mut PgConnection,
    stream_id: i64,
    seg: &BuiltSegment,
    dict_id: Option<i32>,
    file: Option<&str>,
) -> Result<(), StoreError> {
    let body = if file.is_none() {
        Some(seg.body.as_slice())
    } else {
        None
    };
    sqlx::query(
        "INSERT INTO weir_archive_segments
           (stream_id, first_position, last_position, event_count, raw_bytes, stored_bytes,
            block_count, dict_id, first_recorded, last_recorded, block_index, checksum,
            file_path, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(stream_id)
    .bind(seg.first_position)
    .bind(seg.last_position)
    .bind(seg.event_count)
    .bind(seg.raw_bytes as i64)
    .bind(seg.body.len() as i64)
    .bind(seg.index.len() as i32)
    .bind(dict_id)
    .bind(seg.first_recorded)
    .bind(seg.last_recorded)
    .bind(Json(&seg.index))
    .bind(i64::from(seg.checksum))
    .bind(file)
    .bind(body)
    .execute(&mut *conn)
    .await?;
    let (subjects, blocks): (Vec<&str>, Vec<i32>) =
        seg.subjects.iter().map(|(s, b)| (s.as_str(), *b)).unzip();
    sqlx::query(
        "INSERT INTO weir_archive_subjects (stream_id, subject, first_position, block)
         SELECT $1, s, $2, b FROM UNNEST($3::text[], $4::int4[]) AS t(s, b)",
    )
    .bind(stream_id)
    .bind(seg.first_position)
    .bind(&subjects)
    .bind(&blocks)
    .execute(&mut *conn)
    .await?;
    let (ids, blocks): (Vec<&str>, Vec<i32>) = seg
        .correlations
        .iter()
        .map(|(s, b)| (s.as_str(), *b))
        .unzip();
    sqlx::query(
        "INSERT INTO weir_archive_correlations (correlation_id, stream_id, first_position, block)
         SELECT c, $1, $2, b FROM UNNEST($3::text[], $4::int4[]) AS t(c, b)",
    )
    .bind(stream_id)
    .bind(seg.first_position)
    .bind(&ids)
    .bind(&blocks)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the hot rows `from..=to`; returns how many there were.
pub async fn delete_hot_range(
    conn: &mut PgConnection,
    stream_id: i64,
    from: i64,
    to: i64,
) -> Result<u64, StoreError> {
    Ok(
        sqlx::query("DELETE FROM weir_events WHERE stream_id = $1 AND position BETWEEN $2 AND $3")
            .bind(stream_id)
            .bind(from)
            .bind(to)
            .execute(conn)
            .await?
            .rows_affected(),
    )
}

/// Records that a run of the stream finished now.
pub async fn mark_archive_run(conn: &mut PgConnection, stream_id: i64) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO weir_archive_state (stream_id, last_run) VALUES ($1, now())
         ON CONFLICT (stream_id) DO UPDATE SET last_run = now()",
    )
    .bind(stream_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A segment `deleteAfter` removed.
#[derive(Clone, Debug)]
pub struct ExpiredSegment {
    pub first_position: i64,
    pub last_position: i64,
    pub event_count: i64,
    pub file_path: Option<String>,
}

/// Removes, in one transaction, the segments whose newest event is older than `after`, with
/// an audit row each, and raises the stream's `deleted_to`. Returns what it removed (the
/// caller removes their files).
pub async fn delete_expired_segments(
    conn: &mut PgConnection,
    stream_id: i64,
    after: Duration,
) -> Result<Vec<ExpiredSegment>, StoreError> {
    let mut tx = conn.begin().await?;
    let gone: Vec<(i64, i64, i64, Option<String>)> = sqlx::query_as(
        "DELETE FROM weir_archive_segments
         WHERE stream_id = $1 AND last_recorded < now() - make_interval(secs => $2)
         RETURNING first_position, last_position, event_count, file_path",
    )
    .bind(stream_id)
    .bind(after.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    if gone.is_empty() {
        tx.rollback().await?;
        return Ok(Vec::new());
    }
    for (first, last, count, file) in &gone {
        sqlx::query(
            "INSERT INTO weir_archive_audit
               (stream_id, action, first_position, last_position, event_count, file_path)
             VALUES ($1, 'deleteAfter', $2, $3, $4, $5)",
        )
        .bind(stream_id)
        .bind(first)
        .bind(last)
        .bind(count)
        .bind(file)
        .execute(&mut *tx)
        .await?;
    }
    let deleted_to = gone.iter().map(|g| g.1).max().unwrap_or(0);
    sqlx::query(
        "INSERT INTO weir_archive_state (stream_id, deleted_to) VALUES ($1, $2)
         ON CONFLICT (stream_id) DO UPDATE
         SET deleted_to = greatest(weir_archive_state.deleted_to, EXCLUDED.deleted_to)",
    )
    .bind(stream_id)
    .bind(deleted_to)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(gone
        .into_iter()
        .map(
            |(first_position, last_position, event_count, file_path)| ExpiredSegment {
                first_position,
                last_position,
                event_count,
                file_path,
            },
        )
        .collect())
}

/// A stream's archive totals.
#[derive(Clone, Copy, Debug, Default)]
pub struct ArchiveTotals {
    pub segments: i64,
    pub events: i64,
    pub raw_bytes: i64,
    pub stored_bytes: i64,
    pub last_run: Option<DateTime<Utc>>,
}

/// The totals with where the hot table starts and the stream's head.
#[derive(Clone, Copy, Debug, Default)]
pub struct ArchiveSummary {
    pub totals: ArchiveTotals,
    pub hot_from: Option<i64>,
    pub head: i64,
}

/// One segment row as `verify` checks it.
#[derive(Clone, Debug)]
pub struct SegmentRecord {
    pub first_position: i64,
    pub last_position: i64,
    pub event_count: i64,
    pub index: Vec<BlockEntry>,
    pub checksum: i64,
    pub dict_id: Option<i32>,
    pub file_path: Option<String>,
}

/// Where the hot table stands against the archive (see [`Store::hot_continuity`]).
#[derive(Clone, Copy, Debug)]
pub struct HotContinuity {
    /// First hot position, if any hot rows remain.
    pub hot_from: Option<i64>,
    /// Hot rows before the position the archive ends at.
    pub overlap: i64,
    pub head: i64,
}

type SegmentTuple = (
    i64,
    i64,
    i64,
    Json<Vec<BlockEntry>>,
    i64,
    Option<i32>,
    Option<String>,
);

impl Store {
    /// The stream's archive totals (segments, events, bytes, last run).
    pub async fn archive_totals(&self, stream_id: i64) -> Result<ArchiveTotals, StoreError> {
        let (events, raw_bytes, stored_bytes, last_run): (i64, i64, i64, Option<DateTime<Utc>>) =
            sqlx::query_as(
                "SELECT coalesce(sum(event_count), 0)::bigint,
                    coalesce(sum(raw_bytes), 0)::bigint, coalesce(sum(stored_bytes), 0)::bigint,
                    (SELECT last_run FROM weir_archive_state WHERE stream_id = $1)
             FROM weir_archive_segments WHERE stream_id = $1",
            )
            .bind(stream_id)
            .fetch_one(&mut *self.acquire().await?)
            .await?;
        Ok(ArchiveTotals {
            segments: 0,
            events,
            raw_bytes,
            stored_bytes,
            last_run,
        })
    }

    /// The totals (segment count included), the first hot position and the head.
    pub async fn archive_summary(&self, stream_id: i64) -> Result<ArchiveSummary, StoreError> {
        let (segments, events, raw_bytes, stored_bytes, last_run, hot_from, head): (
            i64,
            i64,
            i64,
            i64,
            Option<DateTime<Utc>>,
            Option<i64>,
            i64,
        ) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(event_count), 0)::bigint,
                    coalesce(sum(raw_bytes), 0)::bigint, coalesce(sum(stored_bytes), 0)::bigint,
                    (SELECT last_run FROM weir_archive_state WHERE stream_id = $1),
                    (SELECT min(position) FROM weir_events WHERE stream_id = $1),
                    (SELECT head FROM weir_streams WHERE stream_id = $1)
             FROM weir_archive_segments WHERE stream_id = $1",
        )
        .bind(stream_id)
        .fetch_one(&mut *self.acquire().await?)
        .await?;
        Ok(ArchiveSummary {
            totals: ArchiveTotals {
                segments,
                events,
                raw_bytes,
                stored_bytes,
                last_run,
            },
            hot_from,
            head,
        })
    }

    /// Every segment row of the stream in position order, and the position up to which
    /// `deleteAfter` removed segments (0 before any).
    pub async fn segment_records(
        &self,
        stream_id: i64,
    ) -> Result<(Vec<SegmentRecord>, i64), StoreError> {
        let mut conn = self.acquire().await?;
        let rows: Vec<SegmentTuple> = sqlx::query_as(
            "SELECT first_position, last_position, event_count, block_index, checksum, dict_id,
                file_path
         FROM weir_archive_segments WHERE stream_id = $1 ORDER BY first_position",
        )
        .bind(stream_id)
        .fetch_all(&mut *conn)
        .await?;
        let deleted_to: i64 =
            sqlx::query_scalar("SELECT deleted_to FROM weir_archive_state WHERE stream_id = $1")
                .bind(stream_id)
                .fetch_optional(&mut *conn)
                .await?
                .unwrap_or(0);
        let records = rows
            .into_iter()
            .map(
                |(
                    first_position,
                    last_position,
                    event_count,
                    index,
                    checksum,
                    dict_id,
                    file_path,
                )| {
                    SegmentRecord {
                        first_position,
                        last_position,
                        event_count,
                        index: index.0,
                        checksum,
                        dict_id,
                        file_path,
                    }
                },
            )
            .collect();
        Ok((records, deleted_to))
    }

    /// The first hot position, how many hot rows lie before `archived_to + 1` (`expected`),
    /// and the head: no position may be both archived and hot, none in neither.
    pub async fn hot_continuity(
        &self,
        stream_id: i64,
        expected: i64,
    ) -> Result<HotContinuity, StoreError> {
        let (hot_from, overlap, head): (Option<i64>, i64, i64) = sqlx::query_as(
            "SELECT (SELECT min(position) FROM weir_events WHERE stream_id = $1),
                (SELECT count(*) FROM weir_events WHERE stream_id = $1 AND position < $2),
                (SELECT head FROM weir_streams WHERE stream_id = $1)",
        )
        .bind(stream_id)
        .bind(expected)
        .fetch_one(&mut *self.acquire().await?)
        .await?;
        Ok(HotContinuity {
            hot_from,
            overlap,
            head,
        })
    }

    /// The body of a segment kept in the store (`None` for one whose body is a file).
    pub async fn segment_body(
        &self,
        stream_id: i64,
        first_position: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(sqlx::query_scalar::<_, Option<Vec<u8>>>(
            "SELECT body FROM weir_archive_segments WHERE stream_id = $1 AND first_position = $2",
        )
        .bind(stream_id)
        .bind(first_position)
        .fetch_one(&mut *self.acquire().await?)
        .await?)
    }
}
