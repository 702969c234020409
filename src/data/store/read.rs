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
        .fetch_optional(&self.pool)
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
        .fetch_all(&self.pool)
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
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_row).collect()
    }
}
