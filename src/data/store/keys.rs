//! The subjects' data keys of personal-data encryption (`weir_subject_keys`, see
//! `migrations/0005_subject_keys.sql`). Only wrapped keys are stored; wrapping and
//! unwrapping happen in [`crate::data::pii`]. Keys are always read from and written to the
//! primary (a replica could lag behind a forget).

use sqlx::Row;

use super::{Store, StoreError};

/// One subject's stored key.
#[derive(Clone, Debug)]
pub struct SubjectKey {
    pub subject: String,
    pub dek_id: String,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
}

fn decode(row: &sqlx::postgres::PgRow) -> Result<SubjectKey, sqlx::Error> {
    Ok(SubjectKey {
        subject: row.try_get("subject")?,
        dek_id: row.try_get("dek_id")?,
        kek_id: row.try_get("kek_id")?,
        wrapped: row.try_get("wrapped")?,
    })
}

impl Store {
    /// The stored keys of `subjects` (absent subjects have none).
    pub async fn subject_keys(
        &self,
        stream_id: i64,
        subjects: &[String],
    ) -> Result<Vec<SubjectKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT subject, dek_id, kek_id, wrapped FROM weir_subject_keys
             WHERE stream_id = $1 AND subject = ANY($2)",
        )
        .bind(stream_id)
        .bind(subjects)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(decode).collect::<Result<_, _>>()?)
    }

    /// Stores new keys; a subject that has one already keeps it (the caller reads back).
    pub async fn insert_subject_keys(
        &self,
        stream_id: i64,
        keys: &[SubjectKey],
    ) -> Result<(), StoreError> {
        let subjects: Vec<&str> = keys.iter().map(|k| k.subject.as_str()).collect();
        let dek_ids: Vec<&str> = keys.iter().map(|k| k.dek_id.as_str()).collect();
        let kek_ids: Vec<&str> = keys.iter().map(|k| k.kek_id.as_str()).collect();
        let wrapped: Vec<&[u8]> = keys.iter().map(|k| k.wrapped.as_slice()).collect();
        sqlx::query(
            "INSERT INTO weir_subject_keys (stream_id, subject, dek_id, kek_id, wrapped)
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bytea[])
             ON CONFLICT (stream_id, subject) DO NOTHING",
        )
        .bind(stream_id)
        .bind(&subjects)
        .bind(&dek_ids)
        .bind(&kek_ids)
        .bind(&wrapped)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Deletes a subject's key (forget). Whether there was one.
    pub async fn delete_subject_key(
        &self,
        stream_id: i64,
        subject: &str,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM weir_subject_keys WHERE stream_id = $1 AND subject = $2")
            .bind(stream_id)
            .bind(subject)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Up to `limit` keys wrapped by another id than `kek_id` (rotation).
    pub async fn subject_keys_not_wrapped_by(
        &self,
        stream_id: i64,
        kek_id: &str,
        limit: i64,
    ) -> Result<Vec<SubjectKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT subject, dek_id, kek_id, wrapped FROM weir_subject_keys
             WHERE stream_id = $1 AND kek_id <> $2 ORDER BY subject LIMIT $3",
        )
        .bind(stream_id)
        .bind(kek_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(decode).collect::<Result<_, _>>()?)
    }

    /// Replaces `old`'s wrapping with `wrapped` under `kek_id`, only if the row is still the
    /// one read (not forgotten or re-wrapped meanwhile). Whether it was replaced.
    pub async fn rewrap_subject_key(
        &self,
        stream_id: i64,
        old: &SubjectKey,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE weir_subject_keys SET kek_id = $5, wrapped = $6
             WHERE stream_id = $1 AND subject = $2 AND dek_id = $3 AND kek_id = $4",
        )
        .bind(stream_id)
        .bind(&old.subject)
        .bind(&old.dek_id)
        .bind(&old.kek_id)
        .bind(kek_id)
        .bind(wrapped)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn count_subject_keys_not_wrapped_by(
        &self,
        stream_id: i64,
        kek_id: &str,
    ) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM weir_subject_keys WHERE stream_id = $1 AND kek_id <> $2",
        )
        .bind(stream_id)
        .bind(kek_id)
        .fetch_one(self.pool())
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub async fn count_subject_keys(&self, stream_id: i64) -> Result<u64, StoreError> {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM weir_subject_keys WHERE stream_id = $1")
                .bind(stream_id)
                .fetch_one(self.pool())
                .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
