//! Appending a batch of publish requests in one transaction.
//!
//! Each request is atomic (all its events or none) but requests of a batch are independent:
//! a request whose `expectedversion` does not match fails alone, the others commit.

use std::collections::HashMap;

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

/// What the store held for a batch when it was looked at: the stream's head, and for the
/// batch's events their dedup keys and subjects' versions.
struct Known {
    head: i64,
    ids: HashMap<(String, String), Appended>,
    versions: HashMap<String, i64>,
}

/// One batch decided in memory against [`Known`]: an outcome per request, the rows to write
/// and the head after them.
struct Decided {
    out: Vec<RequestOutcome>,
    rows: Rows,
    next: i64,
}

/// The lookup of a batch's dedup keys, subjects' versions and the stream's head
/// (`$1` stream id, `$2`/`$3` sources and ids, `$4` subjects). Public for the test that
/// checks its plan.
///
/// One index probe per key, whatever the planner believes about the tables: with plain
/// joins, statistics from when a stream was small made PostgreSQL hash-join against every
/// dedup key of the stream, 24 ms per batch at 150,000 events and growing. `LIMIT 1`
/// (the keys are primary keys) keeps each lateral subquery from being flattened.
pub const LOOKUP_SQL: &str = "SELECT 0::int2 AS k, u.source, u.id, e.position, e.version
   FROM UNNEST($2::text[], $3::text[]) AS u(source, id)
   CROSS JOIN LATERAL (SELECT e.position, e.version FROM weir_event_ids e
       WHERE e.stream_id = $1 AND e.source = u.source AND e.id = u.id LIMIT 1) e
 UNION ALL
 SELECT 1::int2, NULL, u.subject, NULL, s.version
   FROM UNNEST($4::text[]) AS u(subject)
   CROSS JOIN LATERAL (SELECT s.version FROM weir_subjects s
       WHERE s.stream_id = $1 AND s.subject = u.subject LIMIT 1) s
 UNION ALL
 SELECT 2::int2, NULL, NULL, head, NULL FROM weir_streams WHERE stream_id = $1";

/// Reads the head, the dedup keys and the subjects' versions a batch needs, in one statement
/// (one snapshot).
async fn look_up(
    conn: &mut sqlx::PgConnection,
    stream_id: i64,
    requests: &[AppendInput<'_>],
) -> Result<Known, StoreError> {
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
    subjects.sort_unstable();
    subjects.dedup();
    let rows = sqlx::query(LOOKUP_SQL)
        .bind(stream_id)
        .bind(&sources)
        .bind(&ids)
        .bind(&subjects)
        .fetch_all(&mut *conn)
        .await?;
    let mut known = Known {
        head: 0,
        ids: HashMap::new(),
        versions: HashMap::new(),
    };
    for row in rows {
        let k: i16 = row.try_get(0)?;
        match k {
            0 => {
                let source: String = row.try_get(1)?;
                let id: String = row.try_get(2)?;
                known.ids.insert(
                    (source, id),
                    Appended {
                        position: row.try_get(3)?,
                        version: row.try_get(4)?,
                        duplicate: true,
                    },
                );
            }
            1 => {
                let subject: String = row.try_get(2)?;
                let version: Option<i64> = row.try_get(4)?;
                known.versions.insert(subject, version.unwrap_or(0));
            }
            _ => known.head = row.try_get(3)?,
        }
    }
    Ok(known)
}

/// Decides every request of a batch in memory; a failing request leaves no trace.
fn decide(
    mut known: Known,
    requests: &[AppendInput<'_>],
    compression: &CompressionPlan,
) -> Decided {
    let mut next = known.head;
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
                .or_else(|| known.ids.get(&(ev.source.clone(), ev.id.clone())).copied())
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
                        .or_else(|| known.versions.get(subject).copied())
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
                    known.ids.insert(
                        (ev.source.clone(), ev.id.clone()),
                        Appended {
                            position,
                            version,
                            duplicate: true,
                        },
                    );
                }
                for (subject, v) in new_versions {
                    known.versions.insert(subject.to_string(), v);
                }
                out.push(Ok(results));
            }
        }
    }
    Decided { out, rows, next }
}

/// How [`write`] makes sure nobody appended since the batch was decided.
enum Guard {
    /// The caller holds the counter row's lock (`FOR UPDATE` in its transaction).
    Locked,
    /// The statement runs on its own (autocommit) and applies only if the head is still
    /// this one; otherwise it writes nothing.
    HeadIs(i64),
}

/// Writes a decided batch — events, dedup keys, subjects' versions, the new head and the
/// notifications — in one statement. Returns whether it applied (always, when locked).
async fn write(
    conn: &mut sqlx::PgConnection,
    stream_id: i64,
    d: &Decided,
    guard: Guard,
) -> Result<bool, StoreError> {
    let rows = &d.rows;
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
    // `h` moves the head (and the commit time, which never goes backwards); every other
    // part reads `h`, so when the guard's head no longer matches nothing is written. Under
    // the lock the head always matches.
    let expected_head = match guard {
        Guard::Locked => None,
        Guard::HeadIs(h) => Some(h),
    };
    let (applied, _, _): (i64, i64, i64) = sqlx::query_as(
        "WITH h AS (
           UPDATE weir_streams SET head = $19,
               head_time = GREATEST(clock_timestamp(), head_time)
           WHERE stream_id = $1 AND ($2::bigint IS NULL OR head = $2)
           RETURNING head_time AS ts, namespace, name
         ),
         ev AS (
           INSERT INTO weir_events (stream_id, position, id, source, type, subject, version,
               time, datacontenttype, dataschema, extensions, correlation_id,
               data_kind, data_encoding, data, recorded_at)
           SELECT $1, u.*, h.ts FROM UNNEST($3::bigint[], $4::text[], $5::text[],
               $6::text[], $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[],
               $12::text[], $13::text[], $14::int2[], $15::int2[], $16::bytea[]) AS u, h
         ),
         ids AS (
           INSERT INTO weir_event_ids (stream_id, source, id, position, version)
           SELECT $1, u.source, u.id, u.position, u.version
           FROM UNNEST($5::text[], $4::text[], $3::bigint[], $8::bigint[])
                AS u(source, id, position, version), h
         ),
         subj AS (
           INSERT INTO weir_subjects (stream_id, subject, version)
           SELECT $1, u.subject, u.version
           FROM UNNEST($17::text[], $18::bigint[]) AS u(subject, version), h
           ON CONFLICT (stream_id, subject) DO UPDATE SET version = EXCLUDED.version
         ),
         n AS (
           SELECT pg_notify('weir_subjects', json_build_object('stream_id', $1::bigint,
               'namespace', h.namespace, 'name', h.name, 'subjects', $20::text[],
               'correlations', $21::text[])::text)
           FROM h
           WHERE cardinality($17::text[]) > 0 OR $22::int > 0
         ),
         a AS (
           SELECT pg_notify('weir_appended', $1::text || ':' || $19::text) FROM h
         )
         SELECT (SELECT count(*) FROM h), (SELECT count(*) FROM n), (SELECT count(*) FROM a)",
    )
    .bind(stream_id)
    .bind(expected_head)
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
    .bind(d.next)
    .bind(notify_subjects)
    .bind(notify_correlations)
    .bind(correlations.len() as i32)
    .fetch_one(&mut *conn)
    .await?;
    Ok(applied == 1)
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
    ///
    /// Optimistic first: the batch is decided against a lock-free read, then written by one
    /// autocommitted statement that applies only if the stream's head has not moved (every
    /// append moves it, so an unchanged head means the read is still true). The counter
    /// row is then locked only while PostgreSQL runs that statement and commits, not across
    /// round trips to this process. If another append got in between, the batch is decided
    /// again under the lock, as before.
    pub async fn append_counted(
        &self,
        stream_id: i64,
        requests: &[AppendInput<'_>],
        compression: &CompressionPlan,
    ) -> Result<(Vec<RequestOutcome>, PayloadBytes), StoreError> {
        let mut conn = self.acquire().await?;
        let known = look_up(&mut conn, stream_id, requests).await?;
        let head = known.head;
        let decided = decide(known, requests, compression);
        if decided.rows.position.is_empty() {
            // Nothing to write (duplicates, conflicts): the read is the answer.
            return Ok((decided.out, decided.rows.bytes));
        }
        if write(&mut conn, stream_id, &decided, Guard::HeadIs(head)).await? {
            return Ok((decided.out, decided.rows.bytes));
        }

        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        // The per-stream counter row, locked until commit: appends to one stream are
        // serialised across processes, which makes positions gap-free and commit-ordered.
        sqlx::query("SELECT 1 FROM weir_streams WHERE stream_id = $1 FOR UPDATE")
            .bind(stream_id)
            .execute(&mut *tx)
            .await?;
        // Read again after the lock, so (READ COMMITTED) it sees every commit made before.
        let known = look_up(&mut tx, stream_id, requests).await?;
        let decided = decide(known, requests, compression);
        if !decided.rows.position.is_empty() {
            write(&mut tx, stream_id, &decided, Guard::Locked).await?;
        }
        tx.commit().await?;
        Ok((decided.out, decided.rows.bytes))
    }
}
