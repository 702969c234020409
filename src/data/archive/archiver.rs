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
use sqlx::{ConnectOptions as _, Connection as _, PgConnection};

use super::ArchiveError;
use super::format::{self, BuiltSegment};
use crate::audit::{self, ARCHIVER, Action};
use crate::data::event::StoredEvent;
use crate::data::store::{Store, segments};
use crate::topology::Key;

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
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
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
    if !segments::try_archive_lock(&mut conn, stream_id).await? {
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
    let cutoff = segments::archive_cutoff(conn, settings.archive_after).await?;
    let eligible = segments::count_hot_before(conn, stream_id, cutoff).await?;
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
    segments::mark_archive_run(conn, stream_id).await?;
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
        let page = segments::hot_page_before(conn, stream_id, next, cutoff, want).await?;
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
    let latest = segments::latest_dictionary(conn, stream_id).await?;
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
    segments::insert_dictionary(conn, stream_id, id, &dict, events.len() as i32).await?;
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
    let known = segments::segment_files(conn, stream_id).await?;
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
    segments::insert_segment(&mut tx, stream_id, seg, dict_id, file.as_deref()).await?;
    fault("before-hot-delete");
    // Two statements, so that a crash between them (the "mid-delete" fault) is a real case.
    let mid = seg.first_position + (seg.last_position - seg.first_position) / 2;
    let mut deleted = 0u64;
    for (from, to) in [(seg.first_position, mid), (mid + 1, seg.last_position)] {
        if from > to {
            continue;
        }
        deleted += segments::delete_hot_range(&mut tx, stream_id, from, to).await?;
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
    let gone = segments::delete_expired_segments(conn, stream_id, after).await?;
    if gone.is_empty() {
        return Ok((0, 0));
    }
    store.archive.forget_stream(stream_id);
    let mut events = 0u64;
    for g in &gone {
        events += g.event_count as u64;
        if let Some(path) = &g.file_path
            && let Err(e) = tokio::fs::remove_file(path).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path, error = %e, "removing an expired segment file");
        }
        // The audit record (one per removal, by the caller) has the totals; the segments are
        // in `weir_archive_audit`.
        tracing::info!(
            stream = %key,
            first_position = g.first_position,
            last_position = g.last_position,
            events = g.event_count,
            file = g.file_path.as_deref().unwrap_or("(store)"),
            "deleteAfter: archived segment deleted"
        );
    }
    Ok((gone.len() as u64, events))
}
