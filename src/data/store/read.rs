//! Reads: one event, a page in position order, and a subject's events (time travel), hot
//! and archived alike.
//!
//! Archived events are read *after* the hot table, and the two results are merged by
//! position. Events only ever move from the hot table into a segment, in one transaction
//! that inserts the segment's index and deletes the rows, so an event missing from the hot
//! read was archived before it and is found by the archive read; an event moved between the
//! two reads is in both and is kept once. A read never misses an event and never repeats one.

use chrono::{DateTime, Utc};

use super::archived::SubjectWindow;
use super::codec::{decode_row, event_columns};
use super::{Store, StoreError};
use crate::data::event::StoredEvent;

impl Store {
    pub async fn read_one(
        &self,
        stream_id: i64,
        position: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM weir_events WHERE stream_id = $1 AND position = $2"
        ))
        .bind(stream_id)
        .bind(position)
        .fetch_optional(&mut *self.acquire().await?)
        .await?;
        match row.as_ref().map(decode_row).transpose()? {
            Some(ev) => Ok(Some(ev)),
            None => self.archived_one(stream_id, position).await,
        }
    }

    /// Events with `position >= from`, in position order, at most `limit`.
    pub async fn read_range(
        &self,
        stream_id: i64,
        from: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM weir_events WHERE stream_id = $1 AND position >= $2
             ORDER BY position LIMIT $3"
        ))
        .bind(stream_id)
        .bind(from)
        .bind(limit)
        .fetch_all(&mut *self.acquire().await?)
        .await?;
        let hot: Vec<StoredEvent> = rows.iter().map(decode_row).collect::<Result<_, _>>()?;
        // The archive can only hold positions before the first hot one.
        if hot.first().is_some_and(|e| e.position <= from.max(1)) {
            return Ok(hot);
        }
        let limit_n = usize::try_from(limit).unwrap_or(0);
        let archived = self.archived_range(stream_id, from, limit_n).await?;
        Ok(merge_by_position(archived, hot, limit_n))
    }

    /// At most `limit` of a subject's events with version `>= from`, in version order,
    /// optionally only up to `version` and/or only those recorded at or before `as_of` (the
    /// aggregate's state at a past point). One page: a caller reads the next from the last
    /// version + 1.
    pub async fn read_subject(
        &self,
        stream_id: i64,
        subject: &str,
        from: i64,
        limit: i64,
        version: Option<i64>,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM weir_events
             WHERE stream_id = $1 AND subject = $2 AND version >= $3
               AND ($4::bigint IS NULL OR version <= $4)
               AND ($5::timestamptz IS NULL OR recorded_at <= $5)
             ORDER BY version LIMIT $6"
        ))
        .bind(stream_id)
        .bind(subject)
        .bind(from)
        .bind(version)
        .bind(as_of)
        .bind(limit)
        .fetch_all(&mut *self.acquire().await?)
        .await?;
        let hot: Vec<StoredEvent> = rows.iter().map(decode_row).collect::<Result<_, _>>()?;
        // The archiver moves a stream's oldest positions first, and a subject's versions grow
        // with its positions, so its archived events are a prefix of its versions: when the hot
        // rows begin at `from`, no archived event is at `from` or after.
        if hot.first().is_some_and(|e| e.version == Some(from.max(1))) {
            return Ok(hot);
        }
        let limit = usize::try_from(limit).unwrap_or(0);
        let window = SubjectWindow {
            from,
            version,
            as_of,
        };
        let archived = self
            .archived_subject(stream_id, subject, &window, limit)
            .await?;
        Ok(merge_by_position(archived, hot, limit))
    }
}

/// Archived and hot events, in position order, each once, at most `limit`.
fn merge_by_position(
    archived: Vec<StoredEvent>,
    hot: Vec<StoredEvent>,
    limit: usize,
) -> Vec<StoredEvent> {
    if archived.is_empty() {
        let mut hot = hot;
        hot.truncate(limit);
        return hot;
    }
    let mut all = archived;
    all.extend(hot);
    all.sort_by_key(|e| e.position);
    all.dedup_by_key(|e| e.position);
    all.truncate(limit);
    all
}

impl Store {
    /// Events of the namespace's streams `streams` in this database that carry `correlationid`
    /// = `correlation_id`, in commit-time order, at most `limit`; each with its stream's name.
    pub async fn read_correlation(
        &self,
        namespace: &str,
        streams: &[String],
        correlation_id: &str,
        limit: i64,
    ) -> Result<Vec<(String, StoredEvent)>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT s.name AS stream_name, ",
            event_columns!(),
            " FROM weir_events e JOIN weir_streams s ON s.stream_id = e.stream_id
             WHERE e.correlation_id = $1 AND s.namespace = $2 AND s.name = ANY($3)
             ORDER BY e.recorded_at, e.stream_id, e.position LIMIT $4"
        ))
        .bind(correlation_id)
        .bind(namespace)
        .bind(streams)
        .bind(limit)
        .fetch_all(&mut *self.acquire().await?)
        .await?;
        let hot: Vec<(String, StoredEvent)> = rows
            .iter()
            .map(|r| {
                let name: String = sqlx::Row::try_get(r, "stream_name")?;
                Ok::<_, StoreError>((name, decode_row(r)?))
            })
            .collect::<Result<_, _>>()?;
        let archived = self
            .archived_correlation(namespace, streams, correlation_id)
            .await?;
        if archived.is_empty() {
            return Ok(hot);
        }
        let mut all = archived;
        all.extend(hot);
        all.sort_by(|a, b| {
            (a.1.recorded_time, &a.0, a.1.position).cmp(&(b.1.recorded_time, &b.0, b.1.position))
        });
        all.dedup_by(|a, b| a.0 == b.0 && a.1.position == b.1.position);
        all.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(all)
    }
}
