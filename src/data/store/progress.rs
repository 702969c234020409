//! Where each subscription stands, in `weir_subscription_progress` (one row per
//! subscription): the next stored position its catch-up reads, the high-water mark once the
//! catch-up is over, and the last delivered position. A worker that dies mid-catch-up is
//! replaced by one that resumes from the recorded page.

use super::{Store, StoreError};

/// One subscription's row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The next stored position the catch-up reads.
    pub next_position: i64,
    /// Set when the catch-up is over: first-attempt messages at or below it were delivered by
    /// the catch-up already.
    pub caught_up_to: Option<i64>,
    /// The last delivered position (0 before any).
    pub position: i64,
    /// The stream the subscription read when the row was written.
    pub stream_id: i64,
}

impl Store {
    /// The progress row of subscription `namespace/name`, if any.
    pub async fn progress(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Progress>, StoreError> {
        let row: Option<(i64, Option<i64>, i64, i64)> = sqlx::query_as(
            "SELECT next_position, caught_up_to, position, stream_id
             FROM weir_subscription_progress WHERE namespace = $1 AND name = $2",
        )
        .bind(namespace)
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(
            |(next_position, caught_up_to, position, stream_id)| Progress {
                next_position,
                caught_up_to,
                position,
                stream_id,
            },
        ))
    }

    /// Records where a new subscription (or one whose queue or stream changed) starts:
    /// `caught_up_to` is `Some` when there is nothing to catch up.
    pub async fn start_progress(
        &self,
        namespace: &str,
        name: &str,
        stream_id: i64,
        next_position: i64,
        caught_up_to: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO weir_subscription_progress
               (namespace, name, stream_id, next_position, caught_up_to, position)
             VALUES ($1, $2, $3, $4, $5, 0)
             ON CONFLICT (namespace, name) DO UPDATE SET stream_id = $3,
               next_position = $4, caught_up_to = $5, position = 0, updated_at = now()",
        )
        .bind(namespace)
        .bind(name)
        .bind(stream_id)
        .bind(next_position)
        .bind(caught_up_to)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The catch-up delivered everything below `next_position`.
    pub async fn set_next_position(
        &self,
        namespace: &str,
        name: &str,
        next_position: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE weir_subscription_progress SET next_position = $3, updated_at = now()
             WHERE namespace = $1 AND name = $2",
        )
        .bind(namespace)
        .bind(name)
        .bind(next_position)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The catch-up is over at `high_water_mark`.
    pub async fn set_caught_up(
        &self,
        namespace: &str,
        name: &str,
        high_water_mark: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE weir_subscription_progress SET caught_up_to = $3, updated_at = now()
             WHERE namespace = $1 AND name = $2",
        )
        .bind(namespace)
        .bind(name)
        .bind(high_water_mark)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Raises the delivered position to `position` (never lowers it: workers write
    /// concurrently).
    pub async fn advance_position(
        &self,
        namespace: &str,
        name: &str,
        position: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE weir_subscription_progress SET position = $3, updated_at = now()
             WHERE namespace = $1 AND name = $2 AND position < $3",
        )
        .bind(namespace)
        .bind(name)
        .bind(position)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Forgets a deleted subscription.
    pub async fn delete_progress(&self, namespace: &str, name: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM weir_subscription_progress WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
