//! Reading archived events: the segment index in PostgreSQL says which block holds an event,
//! a subject's or a correlation id's events; one block is fetched (a `substring` of the row
//! or a positioned file read) and decompressed. Decoded blocks, segment metadata and
//! dictionaries are cached: segments never change once written (deleteAfter only removes
//! them, and the metadata cache's TTL bounds how long a removed one is still looked for).

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use sqlx::types::Json;

use super::{Store, StoreError};
use crate::data::archive::format::{BlockEntry, Dictionary, decompress_block};
use crate::data::event::StoredEvent;

/// What a reader needs to know of one segment.
#[derive(Debug)]
pub struct SegmentMeta {
    pub stream_id: i64,
    pub first_position: i64,
    pub last_position: i64,
    pub index: Vec<BlockEntry>,
    pub dict_id: Option<i32>,
    pub file_path: Option<String>,
}

impl SegmentMeta {
    pub fn name(&self) -> String {
        match &self.file_path {
            Some(p) => format!("{}-{} ({p})", self.first_position, self.last_position),
            None => format!("{}-{} (store)", self.first_position, self.last_position),
        }
    }
}

type BlockKey = (i64, i64, usize);

/// The caches of one database's archive readers.
pub struct ArchiveReader {
    segments: moka::sync::Cache<(i64, i64), Arc<SegmentMeta>>,
    dictionaries: moka::sync::Cache<(i64, i32), Arc<Dictionary>>,
    blocks: moka::sync::Cache<BlockKey, Arc<Vec<StoredEvent>>>,
}

impl std::fmt::Debug for ArchiveReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveReader").finish_non_exhaustive()
    }
}

/// Decoded blocks kept per database: 32 MiB of decoded events, weighed by the memory they
/// hold ([`block_weight`]), enough for catch-ups and hot subjects without growing a worker
/// much. Weighed by their text instead (256 bytes an event plus the payload), small events
/// held nearly four times what they were counted as: the cache grew a worker by ~120 MiB
/// before it evicted anything.
const BLOCK_CACHE_BYTES: u64 = 32 << 20;

/// What a cached block holds: its events ([`StoredEvent::footprint`]), the vector's spare
/// capacity and the entry itself (key, `Arc`, the cache's own bookkeeping, ~200 bytes).
pub fn block_weight(events: &[StoredEvent], capacity: usize) -> u32 {
    let bytes = 256
        + capacity.saturating_sub(events.len()) * std::mem::size_of::<StoredEvent>()
        + events.iter().map(StoredEvent::footprint).sum::<usize>();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Which of a subject's events a page takes: versions from `from`, up to `version`, recorded
/// up to `as_of`.
pub(crate) struct SubjectWindow {
    pub from: i64,
    pub version: Option<i64>,
    pub as_of: Option<chrono::DateTime<chrono::Utc>>,
}

impl SubjectWindow {
    /// `Some(true)` to take `e`, `Some(false)` to pass over it (before the window), `None` when
    /// it is past the window and so is every later event of the subject: versions and
    /// recorded times only grow along a subject's positions.
    fn takes(&self, e: &StoredEvent) -> Option<bool> {
        let past_version = |v: i64| e.version.is_some_and(|ev| ev > v);
        if self.version.is_some_and(past_version) || self.as_of.is_some_and(|t| e.recorded_time > t)
        {
            return None;
        }
        Some(e.version.is_some_and(|ev| ev >= self.from))
    }
}

impl Default for ArchiveReader {
    fn default() -> Self {
        ArchiveReader {
            // A segment's metadata is a few KiB (its block index); 4096 of them cover ~400M
            // events at the default segment size.
            segments: moka::sync::Cache::builder()
                .max_capacity(4096)
                .time_to_live(Duration::from_secs(600))
                .build(),
            // One dictionary per stream and version, 64 KiB each.
            dictionaries: moka::sync::Cache::builder().max_capacity(64).build(),
            blocks: moka::sync::Cache::builder()
                .max_capacity(BLOCK_CACHE_BYTES)
                .weigher(|_, v: &Arc<Vec<StoredEvent>>| block_weight(v, v.capacity()))
                .build(),
        }
    }
}

impl ArchiveReader {
    /// Forgets the cached metadata of a stream's segments (after deleteAfter removed some).
    pub fn forget_stream(&self, stream_id: i64) {
        let _ = self
            .segments
            .invalidate_entries_if(move |k, _| k.0 == stream_id);
        let _ = self
            .blocks
            .invalidate_entries_if(move |k, _| k.0 == stream_id);
    }
}

fn meta_from_row(row: &sqlx::postgres::PgRow) -> Result<SegmentMeta, StoreError> {
    let index: Json<Vec<BlockEntry>> = row.try_get("block_index")?;
    Ok(SegmentMeta {
        stream_id: row.try_get("stream_id")?,
        first_position: row.try_get("first_position")?,
        last_position: row.try_get("last_position")?,
        index: index.0,
        dict_id: row.try_get("dict_id")?,
        file_path: row.try_get("file_path")?,
    })
}

const META_COLUMNS: &str =
    "stream_id, first_position, last_position, block_index, dict_id, file_path";

impl Store {
    /// Segments of a stream whose last position is at least `from`, in order, at most `n`.
    async fn segments_from(
        &self,
        stream_id: i64,
        from: i64,
        n: i64,
    ) -> Result<Vec<Arc<SegmentMeta>>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {META_COLUMNS} FROM weir_archive_segments
             WHERE stream_id = $1 AND last_position >= $2 ORDER BY first_position LIMIT $3"
        )))
        .bind(stream_id)
        .bind(from)
        .bind(n)
        .fetch_all(&mut *self.acquire().await?)
        .await?;
        rows.iter()
            .map(|r| {
                let m = Arc::new(meta_from_row(r)?);
                self.archive
                    .segments
                    .insert((stream_id, m.first_position), m.clone());
                Ok(m)
            })
            .collect()
    }

    /// Metadata of one segment, by its first position.
    async fn segment(
        &self,
        stream_id: i64,
        first_position: i64,
    ) -> Result<Option<Arc<SegmentMeta>>, StoreError> {
        if let Some(m) = self.archive.segments.get(&(stream_id, first_position)) {
            return Ok(Some(m));
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {META_COLUMNS} FROM weir_archive_segments
             WHERE stream_id = $1 AND first_position = $2"
        )))
        .bind(stream_id)
        .bind(first_position)
        .fetch_optional(&mut *self.acquire().await?)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let m = Arc::new(meta_from_row(&row)?);
        self.archive
            .segments
            .insert((stream_id, first_position), m.clone());
        Ok(Some(m))
    }

    pub(crate) async fn dictionary(
        &self,
        stream_id: i64,
        dict_id: i32,
    ) -> Result<Arc<Dictionary>, StoreError> {
        if let Some(d) = self.archive.dictionaries.get(&(stream_id, dict_id)) {
            return Ok(d);
        }
        let bytes: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT dict FROM weir_archive_dictionaries WHERE stream_id = $1 AND dict_id = $2",
        )
        .bind(stream_id)
        .bind(dict_id)
        .fetch_optional(&mut *self.acquire().await?)
        .await?;
        let Some(bytes) = bytes else {
            return Err(StoreError::ArchiveCorrupt {
                segment: format!("stream {stream_id}"),
                offset: 0,
                message: format!("dictionary {dict_id} is missing"),
            });
        };
        let d = Arc::new(Dictionary::copy(&bytes));
        self.archive
            .dictionaries
            .insert((stream_id, dict_id), d.clone());
        Ok(d)
    }

    /// The compressed bytes of `len` bytes at `offset` of a segment.
    pub(crate) async fn segment_bytes(
        &self,
        meta: &SegmentMeta,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let corrupt = |message: String| StoreError::ArchiveCorrupt {
            segment: meta.name(),
            offset,
            message,
        };
        match &meta.file_path {
            Some(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt as _;
                    let f = std::fs::File::open(&path)?;
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, offset)?;
                    Ok::<_, std::io::Error>(buf)
                })
                .await
                .map_err(|e| corrupt(format!("reader task: {e}")))?
                .map_err(|e| corrupt(format!("reading the segment file: {e}")))
            }
            None => {
                let bytes: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT substring(body FROM $3::int4 FOR $4::int4) FROM weir_archive_segments
                     WHERE stream_id = $1 AND first_position = $2",
                )
                .bind(meta.stream_id)
                .bind(meta.first_position)
                // Segments are far below 2 GiB (64 MiB by default); the cast is checked.
                .bind(i32::try_from(offset + 1).map_err(|_| corrupt("offset over 2 GiB".into()))?)
                .bind(i32::try_from(len).map_err(|_| corrupt("block over 2 GiB".into()))?)
                .fetch_optional(&mut *self.acquire().await?)
                .await?;
                let bytes = bytes.ok_or_else(|| corrupt("segment row is gone".into()))?;
                if bytes.len() as u64 != len {
                    return Err(corrupt(format!(
                        "segment body is shorter than its index says ({} of {len} bytes)",
                        bytes.len()
                    )));
                }
                Ok(bytes)
            }
        }
    }

    /// The decoded events of one block.
    async fn block(
        &self,
        meta: &SegmentMeta,
        block: usize,
    ) -> Result<Arc<Vec<StoredEvent>>, StoreError> {
        let key = (meta.stream_id, meta.first_position, block);
        if let Some(b) = self.archive.blocks.get(&key) {
            return Ok(b);
        }
        let Some(entry) = meta.index.get(block) else {
            return Err(StoreError::ArchiveCorrupt {
                segment: meta.name(),
                offset: 0,
                message: format!("no block {block}"),
            });
        };
        let frame = self
            .segment_bytes(meta, entry.offset, u64::from(entry.len))
            .await?;
        let dict = match meta.dict_id {
            Some(id) => Some(self.dictionary(meta.stream_id, id).await?),
            None => None,
        };
        let mut events = decompress_block(&frame, entry, dict.as_deref()).map_err(|message| {
            StoreError::ArchiveCorrupt {
                segment: meta.name(),
                offset: entry.offset,
                message,
            }
        })?;
        // Decoding grows the vector by doubling: up to half of it would sit unused for as
        // long as the block is cached.
        events.shrink_to_fit();
        let events = Arc::new(events);
        self.archive.blocks.insert(key, events.clone());
        Ok(events)
    }

    /// Archived events with `position >= from`, in order, at most `limit`.
    pub(crate) async fn archived_range(
        &self,
        stream_id: i64,
        from: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = Vec::new();
        let mut next = from;
        while out.len() < limit {
            // A few segments per query: a page rarely spans more than two.
            let segments = self.segments_from(stream_id, next, 4).await?;
            if segments.is_empty() {
                break;
            }
            for seg in &segments {
                for (i, b) in seg.index.iter().enumerate() {
                    if b.last_position() < next || out.len() >= limit {
                        continue;
                    }
                    let events = self.block(seg, i).await?;
                    for e in events.iter().filter(|e| e.position >= next) {
                        if out.len() >= limit {
                            break;
                        }
                        out.push(e.clone());
                    }
                }
                next = seg.last_position + 1;
            }
        }
        Ok(out)
    }

    /// One archived event.
    pub(crate) async fn archived_one(
        &self,
        stream_id: i64,
        position: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let Some(seg) = self
            .segments_from(stream_id, position, 1)
            .await?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let Some(i) = seg.index.iter().position(|b| b.holds(position)) else {
            return Ok(None);
        };
        let events = self.block(&seg, i).await?;
        Ok(events.iter().find(|e| e.position == position).cloned())
    }

    /// At most `limit` archived events of a subject that `window` takes, in position order.
    /// Blocks are read in order and no further than the page needs: with few subjects every
    /// block holds each of them, and reading them all made a subject's first page cost the
    /// whole archive (every block decoded, cached and cloned, per read).
    pub(crate) async fn archived_subject(
        &self,
        stream_id: i64,
        subject: &str,
        window: &SubjectWindow,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let blocks: Vec<(i64, i32)> = sqlx::query_as(
            "SELECT first_position, block FROM weir_archive_subjects
             WHERE stream_id = $1 AND subject = $2 ORDER BY first_position, block",
        )
        .bind(stream_id)
        .bind(subject)
        .fetch_all(&mut *self.acquire().await?)
        .await?;
        let mut out = Vec::new();
        for (first, block) in blocks {
            let Some(seg) = self.segment(stream_id, first).await? else {
                continue;
            };
            let events = self.block(&seg, block as usize).await?;
            for e in events
                .iter()
                .filter(|e| e.event.subject.as_deref() == Some(subject))
            {
                if out.len() >= limit {
                    return Ok(out);
                }
                match window.takes(e) {
                    Some(true) => out.push(e.clone()),
                    Some(false) => {}
                    None => return Ok(out),
                }
            }
        }
        Ok(out)
    }

    /// Archived events of the namespace's streams `streams` carrying `correlation_id`, each
    /// with its stream's name.
    pub(crate) async fn archived_correlation(
        &self,
        namespace: &str,
        streams: &[String],
        correlation_id: &str,
    ) -> Result<Vec<(String, StoredEvent)>, StoreError> {
        let blocks = sqlx::query(
            "SELECT c.stream_id, s.name, c.first_position, c.block
             FROM weir_archive_correlations c JOIN weir_streams s ON s.stream_id = c.stream_id
             WHERE c.correlation_id = $1 AND s.namespace = $2 AND s.name = ANY($3)
             ORDER BY c.stream_id, c.first_position, c.block",
        )
        .bind(correlation_id)
        .bind(namespace)
        .bind(streams)
        .fetch_all(&mut *self.acquire().await?)
        .await?;
        let mut out = Vec::new();
        for row in blocks {
            let stream_id: i64 = row.try_get("stream_id")?;
            let name: String = row.try_get("name")?;
            let first: i64 = row.try_get("first_position")?;
            let block: i32 = row.try_get("block")?;
            let Some(seg) = self.segment(stream_id, first).await? else {
                continue;
            };
            let events = self.block(&seg, block as usize).await?;
            out.extend(
                events
                    .iter()
                    .filter(|e| e.event.correlation_id().as_deref() == Some(correlation_id))
                    .map(|e| (name.clone(), e.clone())),
            );
        }
        Ok(out)
    }

    /// The first position recorded at or after `t`, hot or archived. The hot table is asked
    /// first, as in every read (see `store::read`).
    pub async fn first_position_since(
        &self,
        stream_id: i64,
        t: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<i64>, StoreError> {
        let hot: Option<i64> = sqlx::query_scalar(
            "SELECT min(position) FROM weir_events WHERE stream_id = $1 AND recorded_at >= $2",
        )
        .bind(stream_id)
        .bind(t)
        .fetch_one(&mut *self.acquire().await?)
        .await?;
        // Recorded times never go backwards in a stream: the first segment that ends at or
        // after `t` holds the answer, if any segment does.
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {META_COLUMNS} FROM weir_archive_segments
             WHERE stream_id = $1 AND last_recorded >= $2 ORDER BY first_position LIMIT 1"
        )))
        .bind(stream_id)
        .bind(t)
        .fetch_optional(&mut *self.acquire().await?)
        .await?;
        let Some(row) = row else { return Ok(hot) };
        let seg = meta_from_row(&row)?;
        for i in 0..seg.index.len() {
            let events = self.block(&seg, i).await?;
            if let Some(e) = events.iter().find(|e| e.recorded_time >= t) {
                return Ok(Some(hot.map_or(e.position, |h| h.min(e.position))));
            }
        }
        Ok(hot)
    }
}
