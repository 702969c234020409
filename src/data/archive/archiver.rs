//! One archive run of one stream, and `deleteAfter`.
//!
//! A run holds a session advisory lock on a connection of its own for its whole length, so
//! one process archives a stream at a time, and the lock goes away with the connection if
//! the process dies. Each segment moves in one transaction on that connection: segment row,
//! index rows, and the deletion of exactly the hot rows it holds (any other count rolls the
//! transaction back). A `volume` segment's file is written, fsynced and renamed into place
//! before that transaction; a crash in between leaves a file no row names, which the next
//! run removes. So at every instant each event is readable exactly once: hot or archived.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{ConnectOptions as _, Connection as _, PgConnection};

use super::ArchiveError;
use super::format::{self, BuiltSegment};
use crate::audit::{self, ARCHIVER, Action};
use crate::data::event::StoredEvent;
use crate::data::store::Store;
use crate::topology::Key;

/// First key of the two-key advisory lock space used for archivers (relays use
/// `0x5745_4951`).
const ARCHIVE_LOCK_CLASS: i32 = 0x5745_4953;
/// Hot rows read per query while filling a segment: bounds a run's memory by page rather
/// than by the segment limit when events are large.
const PAGE: i64 = 2000;
/// A dictionary is retrained after this many segments used it: event shapes drift slowly,
/// and training costs about a second.
const RETRAIN_AFTER_SEGMENTS: i64 = 16;
/// Sample bytes a dictionary is trained on (zstd wants ~100× the dictionary's size).
const TRAINING_BYTES: usize = 8 << 20;

/// Test hook: `WEIR_ARCHIVE_FAULT` names a point at which the process aborts, to prove that a
/// crash there loses and doubles nothing.
const FAULT_ENV: &str = "WEIR_ARCHIVE_FAULT";

/// How one stream is archived (from its ArchivePolicy).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub archive_after: Duration,
    pub delete_after: Option<Duration>,
    pub segment_max_events: usize,
    pub segment_max_bytes: usize,
    pub level: i32,
    pub dictionary: bool,
    /// `None`: segments in the stream's database; else files under this directory.
    pub volume: Option<PathBuf>,
}

/// What one run did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub segments: u64,
    pub events: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// Eligible events left when the run stopped (it stops early only when asked to).
    pub remaining: u64,
    pub deleted_segments: u64,
    pub deleted_events: u64,
    pub seconds: f64,
}

/// Progress of a run: events archived so far of the eligible total.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

fn fault(point: &str) {
    if std::env::var(FAULT_ENV).is_ok_and(|v| v == point) {
        tracing::error!(point, "{FAULT_ENV}: aborting here");
        std::process::abort();
    }
}

/// A dedicated connection holding the stream's archive lock; dropping it releases the lock.
async fn lock(store: &Store, stream_id: i64) -> Result<PgConnection, ArchiveError> {
    let mut conn = store.pool().connect_options().connect().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, ($2 % 2147483647)::int4)")
        .bind(ARCHIVE_LOCK_CLASS)
        .bind(stream_id)
        .fetch_one(&mut conn)
        .await?;
    if !got {
        let _ = conn.close().await;
        return Err(ArchiveError::Busy);
    }
    Ok(conn)
}

/// Archives what is eligible (at most `max_segments` segments when given), then applies
/// `deleteAfter`.
pub async fn run_once(
    store: &Store,
    stream_id: i64,
    key: &Key,
    settings: &Settings,
    max_segments: Option<usize>,
    progress: Progress<'_>,
) -> Result<RunReport, ArchiveError> {
    let started = Instant::now();
    // Runs of one database take turns (see `ARCHIVE_SLOTS`): N policies due in the same
    // minute open at most that many connections, not N.
    let _slot = store.archive_slot().await;
    let mut conn = lock(store, stream_id).await?;
    let result = run_locked(
        &mut conn,
        store,
        stream_id,
        key,
        settings,
        max_segments,
        progress,
    )
    .await;
    // Closing the session releases the lock (also when the run failed half-way).
    let _ = conn.close().await;
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn run_locked(
    conn: &mut PgConnection,
    store: &Store,
    stream_id: i64,
    key: &Key,
    settings: &Settings,
    max_segments: Option<usize>,
    progress: Progress<'_>,
) -> Result<RunReport, ArchiveError> {
    let mut report = RunReport::default();
    if let Some(dir) = &settings.volume {
        remove_orphans(conn, stream_id, &stream_dir(dir, key)).await?;
    }
    let cutoff: DateTime<Utc> = sqlx::query_scalar("SELECT now() - make_interval(secs => $1)")
        .bind(settings.archive_after.as_secs_f64())
        .fetch_one(&mut *conn)
        .await?;
    let eligible: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_events WHERE stream_id = $1 AND recorded_at < $2",
    )
    .bind(stream_id)
    .bind(cutoff)
    .fetch_one(&mut *conn)
    .await?;
    let eligible = eligible.max(0) as u64;
    progress(0, eligible);
    loop {
        if max_segments.is_some_and(|m| report.segments as usize >= m) {
            break;
        }
        let events = eligible_events(conn, stream_id, cutoff, settings).await?;
        if events.is_empty() {
            break;
        }
        let dict = if settings.dictionary {
            dictionary_for(conn, stream_id, &events).await?
        } else {
            None
        };
        let level = settings.level;
        let dict_bytes = dict.as_ref().map(|(_, d)| d.clone());
        let seg = tokio::task::spawn_blocking(move || {
            format::build_segment(&events, level, dict_bytes.as_deref())
        })
        .await
        .map_err(|e| ArchiveError::Encode(format!("segment builder: {e}")))??;
        let file = match &settings.volume {
            Some(dir) => Some(write_file(&stream_dir(dir, key), &seg).await?),
            None => None,
        };
        fault("after-segment-write");
        move_segment(conn, stream_id, &seg, dict.map(|(id, _)| id), file).await?;
        report.segments += 1;
        report.events += seg.event_count as u64;
        report.raw_bytes += seg.raw_bytes;
        report.stored_bytes += seg.body.len() as u64;
        progress(report.events, eligible);
    }
    report.remaining = eligible.saturating_sub(report.events);
    if let Some(after) = settings.delete_after {
        // One audit record per removal that happened or failed (none when nothing expired).
        let target = key.to_string();
        match delete_expired(conn, store, stream_id, key, after).await {
            Ok((segments, events)) => {
                if segments > 0 {
                    audit::record(ARCHIVER, Action::ArchiveDeleteAfter, &target, Ok(events));
                }
                report.deleted_segments = segments;
                report.deleted_events = events;
            }
            Err(e) => {
                let msg = e.to_string();
                audit::record(ARCHIVER, Action::ArchiveDeleteAfter, &target, Err(&msg));
                return Err(e);
            }
        }
    }
    sqlx::query(
        "INSERT INTO weir_archive_state (stream_id, last_run) VALUES ($1, now())
         ON CONFLICT (stream_id) DO UPDATE SET last_run = now()",
    )
    .bind(stream_id)
    .execute(&mut *conn)
    .await?;
    Ok(report)
}

/// The next segment's events: the oldest hot events recorded before `cutoff`, consecutive,
/// within the segment limits. Recorded times never go backwards within a stream, so the
/// eligible events are a prefix of the hot ones.
async fn eligible_events(
    conn: &mut PgConnection,
    stream_id: i64,
    cutoff: DateTime<Utc>,
    settings: &Settings,
) -> Result<Vec<StoredEvent>, ArchiveError> {
    let mut out: Vec<StoredEvent> = Vec::new();
    let mut bytes = 0usize;
    let mut next = 0i64;
    loop {
        let want = (settings.segment_max_events - out.len()).min(PAGE as usize) as i64;
        let page = store_page(conn, stream_id, next, cutoff, want).await?;
        let n = page.len() as i64;
        for ev in page {
            if out.last().is_some_and(|l| l.position + 1 != ev.position) {
                // Positions are gap-free and archived from the front: a gap means the rows
                // are changing under us; archive up to it and let the next run continue.
                return Ok(out);
            }
            bytes += approx_size(&ev);
            next = ev.position + 1;
            out.push(ev);
            if bytes >= settings.segment_max_bytes {
                return Ok(out);
            }
        }
        if n < want || out.len() >= settings.segment_max_events {
            return Ok(out);
        }
    }
}

async fn store_page(
    conn: &mut PgConnection,
    stream_id: i64,
    from: i64,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<StoredEvent>, ArchiveError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        crate::data::store::event_columns!(),
        " FROM weir_events WHERE stream_id = $1 AND position >= $2 AND recorded_at < $3
         ORDER BY position LIMIT $4"
    ))
    .bind(stream_id)
    .bind(from)
    .bind(cutoff)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .map(crate::data::store::decode_row)
        .collect::<Result<_, _>>()?)
}

fn approx_size(ev: &StoredEvent) -> usize {
    let e = &ev.event;
    96 + e.id.len()
        + e.source.len()
        + e.ty.len()
        + e.subject.as_ref().map_or(0, String::len)
        + e.extensions.len() * 24
        + e.data.as_ref().map_or(0, |d| d.bytes().len())
}

/// The dictionary the next segment uses: the stream's latest, or a new one trained on
/// `events` when there is none yet or the latest has served its share of segments.
async fn dictionary_for(
    conn: &mut PgConnection,
    stream_id: i64,
    events: &[StoredEvent],
) -> Result<Option<(i32, Vec<u8>)>, ArchiveError> {
    let latest: Option<(i32, Vec<u8>, i64)> = sqlx::query_as(
        "SELECT d.dict_id, d.dict,
                (SELECT count(*) FROM weir_archive_segments s
                 WHERE s.stream_id = d.stream_id AND s.dict_id = d.dict_id)
         FROM weir_archive_dictionaries d WHERE d.stream_id = $1
         ORDER BY d.dict_id DESC LIMIT 1",
    )
    .bind(stream_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((id, dict, uses)) = &latest
        && *uses < RETRAIN_AFTER_SEGMENTS
    {
        return Ok(Some((*id, dict.clone())));
    }
    let sample: Vec<StoredEvent> = events.to_vec();
    let trained =
        tokio::task::spawn_blocking(move || format::train_dictionary(&sample, TRAINING_BYTES))
            .await
            .map_err(|e| ArchiveError::Encode(format!("dictionary trainer: {e}")))?;
    let Some(dict) = trained else {
        // Too little to learn from: keep using the last one, if any.
        return Ok(latest.map(|(id, d, _)| (id, d)));
    };
    let id = latest.as_ref().map_or(1, |(id, _, _)| id + 1);
    sqlx::query(
        "INSERT INTO weir_archive_dictionaries (stream_id, dict_id, dict, samples)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(stream_id)
    .bind(id)
    .bind(&dict)
    .bind(events.len() as i32)
    .execute(&mut *conn)
    .await?;
    tracing::info!(
        stream_id,
        dict_id = id,
        bytes = dict.len(),
        "trained an archive dictionary"
    );
    Ok(Some((id, dict)))
}

/// `<volume>/<namespace>/<stream>`.
pub fn stream_dir(volume: &Path, key: &Key) -> PathBuf {
    volume.join(&key.namespace).join(&key.name)
}

fn file_name(first: i64, last: i64) -> String {
    format!("{first:020}-{last:020}.wseg")
}

/// Writes the segment file: to a temporary name, fsynced, renamed, directory fsynced.
async fn write_file(dir: &Path, seg: &BuiltSegment) -> Result<String, ArchiveError> {
    let dir = dir.to_path_buf();
    let name = file_name(seg.first_position, seg.last_position);
    let body = seg.body.clone();
    let path = dir.join(&name);
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!("{name}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()?;
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|e| ArchiveError::Encode(format!("file writer: {e}")))?
    .map_err(|source| ArchiveError::Volume {
        path: shown.clone(),
        source,
    })?;
    Ok(shown)
}

/// Segment files in the stream's directory that no segment row names: left by a run that
/// died between writing the file and committing its row.
async fn remove_orphans(
    conn: &mut PgConnection,
    stream_id: i64,
    dir: &Path,
) -> Result<(), ArchiveError> {
    let known: Vec<String> = sqlx::query_scalar(
        "SELECT file_path FROM weir_archive_segments
         WHERE stream_id = $1 AND file_path IS NOT NULL",
    )
    .bind(stream_id)
    .fetch_all(&mut *conn)
    .await?;
    let dir = dir.to_path_buf();
    let removed = tokio::task::spawn_blocking(move || {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return removed;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(".wseg") || name.ends_with(".wseg.tmp");
            if ours
                && !known.contains(&path.display().to_string())
                && std::fs::remove_file(&path).is_ok()
            {
                removed.push(path.display().to_string());
            }
        }
        removed
    })
    .await
    .unwrap_or_default();
    for path in removed {
        tracing::info!(
            path,
            "removed a segment file left by an interrupted archive run"
        );
    }
    Ok(())
}

/// The atomic move: segment row + index rows + deletion of exactly its hot rows.
async fn move_segment(
    conn: &mut PgConnection,
    stream_id: i64,
    seg: &BuiltSegment,
    dict_id: Option<i32>,
    file: Option<String>,
) -> Result<(), ArchiveError> {
    let mut tx = conn.begin().await?;
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
    .bind(&file)
    .bind(body)
    .execute(&mut *tx)
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
    .execute(&mut *tx)
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
    .execute(&mut *tx)
    .await?;
    fault("before-hot-delete");
    // Two statements, so that a crash between them (the "mid-delete" fault) is a real case.
    let mid = seg.first_position + (seg.last_position - seg.first_position) / 2;
    let mut deleted = 0u64;
    for (from, to) in [(seg.first_position, mid), (mid + 1, seg.last_position)] {
        if from > to {
            continue;
        }
        deleted += sqlx::query(
            "DELETE FROM weir_events WHERE stream_id = $1 AND position BETWEEN $2 AND $3",
        )
        .bind(stream_id)
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if from == seg.first_position {
            fault("mid-delete");
        }
    }
    if deleted != seg.event_count as u64 {
        tx.rollback().await?;
        return Err(ArchiveError::Moved {
            first: seg.first_position,
            last: seg.last_position,
            deleted,
        });
    }
    tx.commit().await?;
    Ok(())
}

/// Removes segments whose newest event is older than `after`, with an audit record each.
async fn delete_expired(
    conn: &mut PgConnection,
    store: &Store,
    stream_id: i64,
    key: &Key,
    after: Duration,
) -> Result<(u64, u64), ArchiveError> {
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
        return Ok((0, 0));
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
    store.archive.forget_stream(stream_id);
    let mut events = 0u64;
    for (first, last, count, file) in &gone {
        events += *count as u64;
        if let Some(path) = file
            && let Err(e) = tokio::fs::remove_file(path).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path, error = %e, "removing an expired segment file");
        }
        // The audit record (one per removal, by the caller) has the totals; the segments are
        // in `weir_archive_audit`.
        tracing::info!(
            stream = %key,
            first_position = first,
            last_position = last,
            events = count,
            file = file.as_deref().unwrap_or("(store)"),
            "deleteAfter: archived segment deleted"
        );
    }
    Ok((gone.len() as u64, events))
}
