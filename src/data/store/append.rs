//! Appending a batch of publish requests in one transaction.
//!
//! Each request is atomic (all its events or none) but requests of a batch are independent:
//! a request whose `expectedversion` does not match fails alone, the others commit.
//!
//! Appends to one stream commit one after another (positions are gap-free and increase in
//! commit order), so the time between two commits is what bounds a stream's rate. To keep
//! the lookup out of that time, a batch is decided *on top of* the batches this process has
//! decided but not yet seen commit (an [`AppendChain`]) while they commit, and its statement
//! goes out as soon as the batch underneath has committed, guarded by "the head is still what
//! that batch left". If anything else happened in between (the batch underneath failed, another
//! process appended), the guard writes nothing and the batch is decided again under the
//! stream's lock.

mod chain;
mod decide;

pub use chain::AppendChain;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::codec::{encode_data, encode_extensions};
use super::{Store, StoreError};
use crate::data::event::{CloudEvent, EXT_PUBLISHER};
use crate::topology::CompressionPlan;
use decide::{Decided, Known, decide};

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

/// Why a request was refused whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// An `expectedversion` that did not match the subject's current version.
    Version {
        /// Index of the event in its request.
        index: usize,
        subject: String,
        expected: i64,
        actual: i64,
    },
    /// The event's `(source, id)` was stored by another authenticated publisher: it is not
    /// this publisher's duplicate, and storing it again would give one id two events.
    ForeignId {
        /// Index of the event in its request.
        index: usize,
        source: String,
        id: String,
    },
}

pub type RequestOutcome = Result<Vec<Appended>, Conflict>;

/// Payload bytes of the events an append wrote: as received and as stored (after the
/// store-time compression), for `weir_store_payload_bytes_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayloadBytes {
    pub raw: u64,
    pub stored: u64,
}

/// How an append was decided and written, for `weir_store_appends_total{path}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendPath {
    /// Nothing to write (duplicates, conflicts): the read was the answer.
    Read,
    /// Decided on a lock-free read and written under the head guard.
    Direct,
    /// Decided on top of this process's batches that were still committing.
    Chained,
    /// The guard failed (another writer, or a batch it rested on failed): decided again
    /// under the stream's lock.
    Locked,
}

impl AppendPath {
    pub fn label(self) -> &'static str {
        match self {
            AppendPath::Read => "read",
            AppendPath::Direct => "direct",
            AppendPath::Chained => "chained",
            AppendPath::Locked => "locked",
        }
    }
}

/// What an append did, beside its answers.
#[derive(Debug)]
pub struct AppendReport {
    pub bytes: PayloadBytes,
    pub path: AppendPath,
    /// `(request, event, position, version)` of every event written, in position order.
    pub written: Vec<(usize, usize, i64, Option<i64>)>,
    /// Their commit time (`weirrecordedtime`), when something was written.
    pub recorded_at: Option<DateTime<Utc>>,
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
    publisher: Vec<Option<String>>,
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
        self.publisher.push(ev.extension_str(EXT_PUBLISHER));
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

/// The lookup of a batch's dedup keys, subjects' versions and the stream's head
/// (`$1` stream id, `$2`/`$3` sources and ids, `$4` subjects). Public for the test that
/// checks its plan.
///
/// One index probe per key, whatever the planner believes about the tables: with plain
/// joins, statistics from when a stream was small made PostgreSQL hash-join against every
/// dedup key of the stream, 24 ms per batch at 150,000 events and growing. `LIMIT 1`
/// (the keys are primary keys) keeps each lateral subquery from being flattened.
pub const LOOKUP_SQL: &str = "SELECT 0::int2 AS k, u.source, u.id, e.position, e.version,
       e.publisher
   FROM UNNEST($2::text[], $3::text[]) AS u(source, id)
   CROSS JOIN LATERAL (SELECT e.position, e.version, e.publisher FROM weir_event_ids e
       WHERE e.stream_id = $1 AND e.source = u.source AND e.id = u.id LIMIT 1) e
 UNION ALL
 SELECT 1::int2, NULL, u.subject, NULL, s.version, NULL
   FROM UNNEST($4::text[]) AS u(subject)
   CROSS JOIN LATERAL (SELECT s.version FROM weir_subjects s
       WHERE s.stream_id = $1 AND s.subject = u.subject LIMIT 1) s
 UNION ALL
 SELECT 2::int2, NULL, NULL, head, NULL, NULL FROM weir_streams WHERE stream_id = $1";

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
                    (
                        Appended {
                            position: row.try_get(3)?,
                            version: row.try_get(4)?,
                            duplicate: true,
                        },
                        row.try_get(5)?,
                    ),
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

/// How [`write`] makes sure nobody appended since the batch was decided.
enum Guard {
    /// The caller holds the counter row's lock (`FOR UPDATE` in its transaction).
    Locked,
    /// The statement runs on its own (autocommit) and applies only if the head is still
    /// this one; otherwise it writes nothing. The head is checked against the statement's
    /// snapshot: an append still in progress is not waited for (its row is skipped), which is
    /// why a chained batch is sent only after the one underneath has committed.
    HeadIs(i64),
}

/// Writes a decided batch — events, dedup keys, subjects' versions, the new head and the
/// notifications — in one statement. Returns the events' commit time if it applied (always,
/// when locked).
async fn write(
    conn: &mut sqlx::PgConnection,
    stream_id: i64,
    rows: &Rows,
    next: i64,
    guard: Guard,
) -> Result<Option<DateTime<Utc>>, StoreError> {
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
    let expected = match guard {
        Guard::Locked => None,
        Guard::HeadIs(h) => Some(h),
    };
    let (recorded_at, _, _): (Option<DateTime<Utc>>, i64, i64) = sqlx::query_as(
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
           INSERT INTO weir_event_ids (stream_id, source, id, position, version, publisher)
           SELECT $1, u.source, u.id, u.position, u.version, u.publisher
           FROM UNNEST($5::text[], $4::text[], $3::bigint[], $8::bigint[], $23::text[])
                AS u(source, id, position, version, publisher), h
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
         SELECT (SELECT ts FROM h), (SELECT count(*) FROM n), (SELECT count(*) FROM a)",
    )
    .bind(stream_id)
    .bind(expected)
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
    .bind(&rows.publisher)
    .fetch_one(&mut *conn)
    .await?;
    Ok(recorded_at)
}

/// The rows of a decided batch, payloads compressed as the stream says.
fn rows_of(d: &Decided, requests: &[AppendInput<'_>], compression: &CompressionPlan) -> Rows {
    let mut rows = Rows::default();
    for &(ri, ei, position, version) in &d.accepted {
        rows.push(&requests[ri].events[ei], position, version, compression);
    }
    rows
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
            .append_chained(stream_id, requests, compression, &AppendChain::default())
            .await?
            .0)
    }

    /// [`Store::append`] on a stream's [`AppendChain`], also returning the payload bytes
    /// written (raw and as stored).
    ///
    /// Optimistic first: the batch is decided against a lock-free read plus the chain's
    /// batches the read did not see, then written by one autocommitted statement that
    /// applies only if the stream's head is still the one it was decided on (every append
    /// moves the head forward, so an unchanged head means the decision is still true; a
    /// batch decided on top of another is sent only once that one has committed, so the
    /// head it expects is one that really was written).
    /// The counter row is then locked only while PostgreSQL runs that statement and commits,
    /// never across round trips to this process, and the next batch is ready to go when it
    /// commits. If the guard fails, the batch is decided again under the lock.
    pub async fn append_chained(
        &self,
        stream_id: i64,
        requests: &[AppendInput<'_>],
        compression: &CompressionPlan,
        chain: &AppendChain,
    ) -> Result<(Vec<RequestOutcome>, AppendReport), StoreError> {
        let mut conn = self.acquire().await?;
        let known = look_up(&mut conn, stream_id, requests).await?;
        let placed = chain.place(stream_id, known, requests);
        match placed.seq {
            // Nothing to write (duplicates, conflicts) and decided on committed state only:
            // the read is the answer.
            None if !placed.on_pending => {
                let report = AppendReport {
                    bytes: PayloadBytes::default(),
                    path: AppendPath::Read,
                    written: vec![],
                    recorded_at: None,
                };
                return Ok((placed.decided.out, report));
            }
            // An answer resting on batches that may still fail cannot be given yet: the
            // locked path waits for them and decides again.
            None => {}
            Some(seq) => {
                let rows = rows_of(&placed.decided, requests, compression);
                let next = placed.decided.next;
                // The statement checks the head against its snapshot and skips the row
                // (writes nothing) when the head differs, without waiting for an append in
                // progress: it is sent once the batch underneath has committed. Everything
                // else (lookup, decision, rows) was done while that one committed.
                let underneath = match placed.prev {
                    Some(mut prev) => matches!(
                        prev.wait_for(Option::is_some).await.as_deref(),
                        Ok(Some(true))
                    ),
                    None => true,
                };
                let applied = match underneath {
                    true => write(
                        &mut conn,
                        stream_id,
                        &rows,
                        next,
                        Guard::HeadIs(placed.base),
                    )
                    .await
                    .inspect_err(|_| chain.settle(seq, false))?,
                    // It failed: this batch's guard would too.
                    false => None,
                };
                chain.settle(seq, applied.is_some());
                if applied.is_some() {
                    let report = AppendReport {
                        bytes: rows.bytes,
                        path: match placed.on_pending {
                            true => AppendPath::Chained,
                            false => AppendPath::Direct,
                        },
                        written: placed.decided.accepted,
                        recorded_at: applied,
                    };
                    return Ok((placed.decided.out, report));
                }
            }
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
        let decided = decide(&known, requests);
        let rows = rows_of(&decided, requests, compression);
        let mut recorded_at = None;
        if !decided.accepted.is_empty() {
            let next = decided.next;
            recorded_at = write(&mut tx, stream_id, &rows, next, Guard::Locked).await?;
        }
        tx.commit().await?;
        let report = AppendReport {
            bytes: rows.bytes,
            path: AppendPath::Locked,
            written: decided.accepted,
            recorded_at,
        };
        Ok((decided.out, report))
    }
}
