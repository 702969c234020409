//! Reads: one event, a page in position order, and a subject's events (time travel).

use chrono::{DateTime, Utc};

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
        row.as_ref().map(decode_row).transpose()
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
        rows.iter().map(decode_row).collect()
    }

    /// A subject's events in version order, optionally only up to `version` and/or only those
    /// recorded at or before `as_of` (the aggregate's state at a past point).
    pub async fn read_subject(
        &self,
        stream_id: i64,
        subject: &str,
        version: Option<i64>,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM weir_events
             WHERE stream_id = $1 AND subject = $2
               AND ($3::bigint IS NULL OR version <= $3)
               AND ($4::timestamptz IS NULL OR recorded_at <= $4)
             ORDER BY version"
        ))
        .bind(stream_id)
        .bind(subject)
        .bind(version)
        .bind(as_of)
        .fetch_all(&mut *self.acquire().await?)
        .await?;
        rows.iter().map(decode_row).collect()
    }
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
        rows.iter()
            .map(|r| {
                let name: String = sqlx::Row::try_get(r, "stream_name")?;
                Ok((name, decode_row(r)?))
            })
            .collect()
    }
}
