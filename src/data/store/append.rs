//! Appending a batch of publish requests in one transaction.
//!
//! Each request is atomic (all its events or none) but requests of a batch are independent:
//! a request whose `expectedversion` does not match fails alone, the others commit.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::codec::{encode_data, encode_extensions};
use super::{Store, StoreError};
use crate::data::event::{CloudEvent, EXT_EXPECTED_VERSION, ExtValue};
use crate::topology::CompressionPlan;

/// Budget for the subject list of a `weir_subjects` notification: PostgreSQL caps a payload
/// at 8000 bytes and the rest of it (stream id, namespace, name) takes under 300.
const NOTIFY_SUBJECTS_BYTES: usize = 7000;

/// One publish request's events.
pub struct AppendInput<'a> {
    pub events: &'a [CloudEvent],
}

/// Where one event ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub position: i64,
    pub version: Option<i64>,
    /// `(source, id)` was already stored: nothing new was written, this is the original.
    pub duplicate: bool,
}

/// An `expectedversion` that did not match the subject's current version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// Index of the event in its request.
    pub index: usize,
    pub subject: String,
    pub expected: i64,
    pub actual: i64,
}

pub type RequestOutcome = Result<Vec<Appended>, Conflict>;

/// Payload bytes of the events an append wrote: as received and as stored (after the
/// store-time compression), for `weir_store_payload_bytes_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayloadBytes {
    pub raw: u64,
    pub stored: u64,
}

/// `expectedversion` as a number. Ingest has already rejected malformed values.
fn expected_version(ev: &CloudEvent) -> Option<i64> {
    match ev.extensions.get(EXT_EXPECTED_VERSION)? {
        ExtValue::Integer(i) => Some(*i),
        ExtValue::String(s) => s.parse().ok(),
        ExtValue::Bool(_) => None,
    }
}

/// Column vectors for the UNNEST insert.
#[derive(Default)]
struct Rows {
    position: Vec<i64>,
    id: Vec<String>,
    source: Vec<String>,
    ty: Vec<String>,
    subject: Vec<Option<String>>,
    version: Vec<Option<i64>>,
    time: Vec<Option<String>>,
    datacontenttype: Vec<Option<String>>,
    dataschema: Vec<Option<String>>,
    extensions: Vec<Option<String>>,
    correlation: Vec<Option<String>>,
    kind: Vec<i16>,
    encoding: Vec<i16>,
    data: Vec<Option<Vec<u8>>>,
    bytes: PayloadBytes,
}

impl Rows {
    fn push(&mut self, ev: &CloudEvent, position: i64, version: Option<i64>, c: &CompressionPlan) {
        self.position.push(position);
        self.id.push(ev.id.clone());
        self.source.push(ev.source.clone());
        self.ty.push(ev.ty.clone());
        self.subject.push(ev.subject.clone());
        self.version.push(version);
        self.time.push(ev.time.clone());
        self.datacontenttype.push(ev.datacontenttype.clone());
        self.dataschema.push(ev.dataschema.clone());
        self.extensions.push(encode_extensions(ev));
        self.correlation.push(ev.correlation_id());
        match &ev.data {
            Some(d) => {
                let (enc, bytes) = encode_data(d.bytes(), c.min_bytes, c.level);
                self.bytes.raw += d.bytes().len() as u64;
                self.bytes.stored += bytes.len() as u64;
                self.kind.push(d.kind_code());
                self.encoding.push(enc);
                self.data.push(Some(bytes));
            }
            None => {
                self.kind.push(0);
                self.encoding.push(0);
                self.data.push(None);
            }
        }
    }
}

impl Store {
    /// Appends the requests of one batch in a single transaction and returns one outcome per
    /// request, in order. Nothing is visible to anyone before the commit.
    pub async fn append(
        &self,
        stream_id: i64,
        requests: &[AppendInput<'_>],
        compression: &CompressionPlan,
    ) -> Result<Vec<RequestOutcome>, StoreError> {
        Ok(self
            .append_counted(stream_id, requests, compression)
            .await?
            .0)
    }

    /// [`Store::append`], also returning the payload bytes written (raw and as stored).
    pub async fn append_counted(
        &self,
        stream_id: i64,
        requests: &[AppendInput<'_>],
        compression: &CompressionPlan,
    ) -> Result<(Vec<RequestOutcome>, PayloadBytes), StoreError> {
        let mut conn = self.acquire().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;

        // The per-stream counter row, locked until commit: appends to one stream are
        // serialised across processes, which makes positions gap-free and commit-ordered.
        let (head, head_time): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT head, head_time FROM weir_streams WHERE stream_id = $1 FOR UPDATE",
        )
        .bind(stream_id)
        .fetch_one(&mut *tx)
        .await?;

        // What is already stored: dedup keys and subjects' versions. This runs after the
        // lock, so (READ COMMITTED) it sees every commit made before we got the lock.
        let mut sources = Vec::new();
        let mut ids = Vec::new();
        let mut subjects = Vec::new();
        for r in requests {
            for ev in r.events {
                sources.push(ev.source.as_str());
                ids.push(ev.id.as_str());
                if let Some(s) = &ev.subject {
                    subjects.push(s.as_str());
                }
            }
        }
        let rows = sqlx::query(
            "SELECT 0::int2 AS k, e.source, e.id, e.position, e.version
               FROM UNNEST($2::text[], $3::text[]) AS u(source, id)
               JOIN weir_event_ids e ON e.stream_id = $1 AND e.source = u.source AND e.id = u.id
             UNION ALL
             SELECT 1::int2, NULL, s.subject, NULL, s.version
               FROM weir_subjects s WHERE s.stream_id = $1 AND s.subject = ANY($4::text[])",
        )
        .bind(stream_id)
        .bind(&sources)
        .bind(&ids)
        .bind(&subjects)
        .fetch_all(&mut *tx)
        .await?;
        let mut known: HashMap<(String, String), Appended> = HashMap::new();
        let mut versions: HashMap<String, i64> = HashMap::new();
        for row in rows {
            let k: i16 = row.try_get(0)?;
            if k == 0 {
                let source: String = row.try_get(1)?;
                let id: String = row.try_get(2)?;
                known.insert(
                    (source, id),
                    Appended {
                        position: row.try_get(3)?,
                        version: row.try_get(4)?,
                        duplicate: true,
                    },
                );
            } else {
                let subject: String = row.try_get(2)?;
                let version: Option<i64> = row.try_get(4)?;
                versions.insert(subject, version.unwrap_or(0));
            }
        }

        // Decide every request in memory; a failing request leaves no trace in the maps.
        let mut next = head;
        let mut out = Vec::with_capacity(requests.len());
        let mut rows = Rows::default();
        for r in requests {
            let mut new_known: HashMap<(&str, &str), Appended> = HashMap::new();
            let mut new_versions: HashMap<&str, i64> = HashMap::new();
            let mut results = Vec::with_capacity(r.events.len());
            let mut accepted = Vec::new();
            let mut conflict = None;
            let mut pos = next;
            for (index, ev) in r.events.iter().enumerate() {
                let key = (ev.source.as_str(), ev.id.as_str());
                if let Some(orig) = new_known
                    .get(&key)
                    .copied()
                    .or_else(|| known.get(&(ev.source.clone(), ev.id.clone())).copied())
                {
                    results.push(Appended {
                        duplicate: true,
                        ..orig
                    });
                    continue;
                }
                let version = match &ev.subject {
                    Some(subject) => {
                        let current = new_versions
                            .get(subject.as_str())
                            .copied()
                            .or_else(|| versions.get(subject).copied())
                            .unwrap_or(0);
                        if let Some(expected) = expected_version(ev)
                            && expected != current
                        {
                            conflict = Some(Conflict {
                                index,
                                subject: subject.clone(),
                                expected,
                                actual: current,
                            });
                            break;
                        }
                        new_versions.insert(subject.as_str(), current + 1);
                        Some(current + 1)
                    }
                    None => None,
                };
                pos += 1;
                let appended = Appended {
                    position: pos,
                    version,
                    duplicate: false,
                };
                new_known.insert(key, appended);
                results.push(appended);
                accepted.push((ev, pos, version));
            }
            match conflict {
                Some(c) => out.push(Err(c)),
                None => {
                    next = pos;
                    for (ev, position, version) in accepted {
                        rows.push(ev, position, version, compression);
                        known.insert(
                            (ev.source.clone(), ev.id.clone()),
                            Appended {
                                position,
                                version,
                                duplicate: true,
                            },
                        );
                    }
                    for (subject, v) in new_versions {
                        versions.insert(subject.to_string(), v);
                    }
                    out.push(Ok(results));
                }
            }
        }

        if !rows.position.is_empty() {
            // One subject row per subject: its final version in this batch.
            let mut final_versions: HashMap<&str, i64> = HashMap::new();
            for (s, v) in rows.subject.iter().zip(&rows.version) {
                if let (Some(s), Some(v)) = (s, v) {
                    let e = final_versions.entry(s.as_str()).or_insert(*v);
                    *e = (*e).max(*v);
                }
            }
            let (subj, subj_v): (Vec<&str>, Vec<i64>) = final_versions.into_iter().unzip();
            // Correlation ids appended: cached traces of those ids are stale too.
            let mut correlations: Vec<&str> = rows
                .correlation
                .iter()
                .flatten()
                .map(String::as_str)
                .collect();
            correlations.sort_unstable();
            correlations.dedup();
            // The read caches of every replica drop these subjects on `weir_subjects` (sent at
            // commit). A notification holds under 8000 bytes: a list that might not fit (JSON
            // escaping can grow a character to 6 bytes) is sent as null, "every subject".
            let fits = subj
                .iter()
                .chain(&correlations)
                .map(|s| s.len() * 6 + 4)
                .sum::<usize>()
                <= NOTIFY_SUBJECTS_BYTES;
            let notify_subjects = fits.then_some(&subj);
            let notify_correlations = fits.then_some(&correlations);
            sqlx::query(
                "WITH t AS (SELECT GREATEST(clock_timestamp(), $2::timestamptz) AS ts),
                 ev AS (
                   INSERT INTO weir_events (stream_id, position, id, source, type, subject, version,
                       time, datacontenttype, dataschema, extensions, correlation_id,
                       data_kind, data_encoding, data, recorded_at)
                   SELECT $1, u.*, t.ts FROM UNNEST($3::bigint[], $4::text[], $5::text[],
                       $6::text[], $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[],
                       $12::text[], $13::text[], $14::int2[], $15::int2[], $16::bytea[]) AS u, t
                 ),
                 ids AS (
                   INSERT INTO weir_event_ids (stream_id, source, id, position, version)
                   SELECT $1, u.source, u.id, u.position, u.version
                   FROM UNNEST($5::text[], $4::text[], $3::bigint[], $8::bigint[])
                        AS u(source, id, position, version)
                 ),
                 subj AS (
                   INSERT INTO weir_subjects (stream_id, subject, version)
                   SELECT $1, u.subject, u.version
                   FROM UNNEST($17::text[], $18::bigint[]) AS u(subject, version)
                   ON CONFLICT (stream_id, subject) DO UPDATE SET version = EXCLUDED.version
                 ),
                 h AS (
                   UPDATE weir_streams SET head = $19, head_time = (SELECT ts FROM t)
                   WHERE stream_id = $1
                 ),
                 n AS (
                   SELECT pg_notify('weir_subjects', json_build_object('stream_id', s.stream_id,
                       'namespace', s.namespace, 'name', s.name, 'subjects', $20::text[],
                       'correlations', $21::text[])::text)
                   FROM weir_streams s
                   WHERE s.stream_id = $1
                     AND (cardinality($17::text[]) > 0 OR $22::int > 0)
                 )
                 SELECT pg_notify('weir_appended', $1::text || ':' || $19::text),
                        (SELECT count(*) FROM n)",
            )
            .bind(stream_id)
            .bind(head_time)
            .bind(&rows.position)
            .bind(&rows.id)
            .bind(&rows.source)
            .bind(&rows.ty)
            .bind(&rows.subject)
            .bind(&rows.version)
            .bind(&rows.time)
            .bind(&rows.datacontenttype)
            .bind(&rows.dataschema)
            .bind(&rows.extensions)
            .bind(&rows.correlation)
            .bind(&rows.kind)
            .bind(&rows.encoding)
            .bind(&rows.data)
            .bind(&subj)
            .bind(&subj_v)
            .bind(next)
            .bind(notify_subjects)
            .bind(notify_correlations)
            .bind(correlations.len() as i32)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok((out, rows.bytes))
    }
}
