//! `weir archive verify`: every segment of a stream read back and checked (body checksum,
//! index, each block's checksum and events, counts, position continuity between segments and
//! with the hot table), each problem named by segment and byte offset.

use serde::Serialize;

use super::ArchiveError;
use super::archiver::Progress;
use super::format;
use crate::data::store::Store;

/// What `verify` found for one stream.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
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
    let (segments, deleted_to) = store.segment_records(stream_id).await?;
    let mut r = VerifyReport {
        deleted_to,
        ..Default::default()
    };
    let total = segments.len() as u64;
    let mut expected = deleted_to + 1;
    for (n, seg) in segments.iter().enumerate() {
        let (first, last, count) = (seg.first_position, seg.last_position, seg.event_count);
        let (index, checksum, dict_id, file) =
            (&seg.index, seg.checksum, seg.dict_id, &seg.file_path);
        let name = match file {
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
                if body_index != *index {
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
        for b in index {
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
    let hot = store.hot_continuity(stream_id, expected).await?;
    let (hot_from, overlap, head) = (hot.hot_from, hot.overlap, hot.head);
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
        None => store
            .segment_body(stream_id, first)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "segment body missing".to_string()),
    }
}
