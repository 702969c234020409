//! `weir archive verify`: every segment of a stream read back and checked (body checksum,
//! index, each block's checksum and events, counts, position continuity between segments and
//! with the hot table), each problem named by segment and byte offset.

use serde::Serialize;
use sqlx::Row as _;
use sqlx::types::Json;

use super::ArchiveError;
use super::archiver::Progress;
use super::format::{self, BlockEntry};
use crate::data::store::Store;

/// What `verify` found for one stream.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub segments: u64,
    pub blocks: u64,
    pub events: u64,
    /// Positions up to this one were deleted by deleteAfter.
    pub deleted_to: i64,
    /// First hot position, if any hot rows remain.
    pub hot_from: Option<i64>,
    pub head: i64,
    /// Every problem, each naming the segment and byte offset where it was found.
    pub problems: Vec<String>,
}

/// Reads every segment of the stream: body checksum, index, every block's checksum and
/// events, counts, position continuity between segments and with the hot table.
pub async fn verify(
    store: &Store,
    stream_id: i64,
    progress: Progress<'_>,
) -> Result<VerifyReport, ArchiveError> {
    let mut conn = store.acquire().await.map_err(ArchiveError::Store)?;
    let segments = sqlx::query(
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
    drop(conn);
    let mut r = VerifyReport {
        deleted_to,
        ..Default::default()
    };
    let total = segments.len() as u64;
    let mut expected = deleted_to + 1;
    for (n, row) in segments.iter().enumerate() {
        let first: i64 = row.try_get("first_position")?;
        let last: i64 = row.try_get("last_position")?;
        let count: i64 = row.try_get("event_count")?;
        let index: Json<Vec<BlockEntry>> = row.try_get("block_index")?;
        let checksum: i64 = row.try_get("checksum")?;
        let dict_id: Option<i32> = row.try_get("dict_id")?;
        let file: Option<String> = row.try_get("file_path")?;
        let name = match &file {
            Some(p) => format!("segment {first}-{last} ({p})"),
            None => format!("segment {first}-{last} (store)"),
        };
        r.segments += 1;
        if first != expected {
            r.problems.push(format!(
                "{name}: starts at position {first}, expected {expected} (positions missing or doubled)"
            ));
        }
        if last - first + 1 != count {
            r.problems.push(format!(
                "{name}: {count} events recorded for {first}..={last}"
            ));
        }
        expected = last + 1;
        let body = match segment_body(store, stream_id, first, file.as_deref()).await {
            Ok(b) => b,
            Err(e) => {
                r.problems.push(format!("{name}: byte 0: {e}"));
                progress(n as u64 + 1, total);
                continue;
            }
        };
        match format::parse_body(&body) {
            Err((offset, msg)) => r.problems.push(format!("{name}: byte {offset}: {msg}")),
            Ok((body_index, body_checksum)) => {
                if i64::from(body_checksum) != checksum {
                    r.problems.push(format!(
                        "{name}: byte {}: checksum {body_checksum:08x} differs from the recorded {:08x}",
                        body.len() - format::TRAILER_LEN + 12,
                        checksum
                    ));
                }
                if body_index != index.0 {
                    r.problems.push(format!(
                        "{name}: the body's block index differs from the recorded one"
                    ));
                }
            }
        }
        let dict = match dict_id {
            Some(id) => match store.dictionary(stream_id, id).await {
                Ok(d) => Some(d),
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => {
                    r.problems.push(format!("{name}: {e}"));
                    progress(n as u64 + 1, total);
                    continue;
                }
            },
            None => None,
        };
        let mut next = first;
        let mut events = 0i64;
        for b in &index.0 {
            r.blocks += 1;
            if b.first_position != next {
                r.problems.push(format!(
                    "{name}: byte {}: block starts at position {}, expected {next}",
                    b.offset, b.first_position
                ));
            }
            next = b.last_position().saturating_add(1);
            let Some(frame) = b.frame(&body) else {
                r.problems.push(format!(
                    "{name}: byte {}: block runs past the end of the segment",
                    b.offset
                ));
                continue;
            };
            match format::decompress_block(frame, b, dict.as_deref()) {
                Ok(evs) => events += evs.len() as i64,
                Err(msg) => r.problems.push(format!("{name}: byte {}: {msg}", b.offset)),
            }
        }
        if next != last + 1 {
            r.problems.push(format!(
                "{name}: blocks end at position {}, segment at {last}",
                next - 1
            ));
        }
        r.events += events.max(0) as u64;
        progress(n as u64 + 1, total);
    }
    // Continuity with the hot table: no position both archived and hot, none in neither.
    let (hot_from, overlap, head): (Option<i64>, i64, i64) = sqlx::query_as(
        "SELECT (SELECT min(position) FROM weir_events WHERE stream_id = $1),
                (SELECT count(*) FROM weir_events WHERE stream_id = $1 AND position < $2),
                (SELECT head FROM weir_streams WHERE stream_id = $1)",
    )
    .bind(stream_id)
    .bind(expected)
    .fetch_one(&mut *store.acquire().await.map_err(ArchiveError::Store)?)
    .await?;
    r.hot_from = hot_from;
    r.head = head;
    if overlap > 0 {
        r.problems.push(format!(
            "{overlap} events before position {expected} are both archived and in the hot table"
        ));
    }
    match hot_from {
        Some(h) if h > expected => r.problems.push(format!(
            "positions {expected}..{} are neither archived nor hot",
            h - 1
        )),
        None if head >= expected => r.problems.push(format!(
            "positions {expected}..={head} are neither archived nor hot"
        )),
        _ => {}
    }
    Ok(r)
}

async fn segment_body(
    store: &Store,
    stream_id: i64,
    first: i64,
    file: Option<&str>,
) -> Result<Vec<u8>, String> {
    match file {
        Some(path) => tokio::fs::read(path)
            .await
            .map_err(|e| format!("reading {path}: {e}")),
        None => {
            let mut conn = store.acquire().await.map_err(|e| e.to_string())?;
            sqlx::query_scalar::<_, Option<Vec<u8>>>(
                "SELECT body FROM weir_archive_segments WHERE stream_id = $1 AND first_position = $2",
            )
            .bind(stream_id)
            .bind(first)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "segment body missing".to_string())
        }
    }
}
