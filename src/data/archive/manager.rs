//! The archivers of this process: one scheduled task per (ArchivePolicy, stream). Every
//! replica runs the same schedule; the advisory lock of [`super::archiver::run_once`] makes
//! one of them do the work and the others skip that round, so a replica that dies mid-run is
//! replaced at the next tick of any other.

use crate::poison::MutexExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::ArchiveError;
use super::archiver::{self, RunReport, Settings};
use super::verify::{self, VerifyReport};
use crate::data::engine::Engine;
use crate::data::store::Store;
use crate::metrics::Metrics;
use crate::topology::{ArchiveDestinationPlan, ArchivePlan, Key};

struct Entry {
    policy: Key,
    settings: Settings,
    schedule: Duration,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    last: Arc<Mutex<LastRun>>,
}

/// What the last run on this replica did, and the stream's archive totals read after it
/// (status shows these without asking the database).
#[derive(Clone, Debug, Default)]
struct LastRun {
    error: Option<String>,
    totals: Option<Totals>,
}

/// Archive totals of one stream, as the database last said.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    events: i64,
    raw: i64,
    stored: i64,
    last_run: Option<DateTime<Utc>>,
}

/// Reads a stream's archive totals (after each run, for status).
async fn read_totals(store: &Store, id: i64) -> Result<Totals, ArchiveError> {
    let t = store.archive_totals(id).await?;
    Ok(Totals {
        events: t.events,
        raw: t.raw_bytes,
        stored: t.stored_bytes,
        last_run: t.last_run,
    })
}

async fn refresh_totals(store: &Store, id: i64, last: &Mutex<LastRun>) {
    if let Ok(t) = read_totals(store, id).await {
        last.locked().totals = Some(t);
    }
}

/// Every archiver of this process.
pub struct Archives {
    engine: Arc<Engine>,
    metrics: Metrics,
    running: Mutex<BTreeMap<Key, Entry>>,
}

/// Archive totals of one stream, read from its database (the same on every replica).
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamArchive {
    pub stream: String,
    pub policy: String,
    pub destination: String,
    pub schedule_seconds: f64,
    pub segments: i64,
    pub archived_events: i64,
    pub raw_bytes: i64,
    pub stored_bytes: i64,
    pub compression_ratio: Option<f64>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_run: Option<DateTime<Utc>>,
    /// The first position still in the hot table, if any.
    pub hot_from: Option<i64>,
    pub head: i64,
    /// The last run on this replica failed with this error.
    pub last_error: Option<String>,
}

fn settings(plan: &ArchivePlan) -> Settings {
    Settings {
        archive_after: plan.archive_after,
        delete_after: plan.delete_after.filter(|d| *d != Duration::MAX),
        segment_max_events: plan.segment_max_events.max(1),
        segment_max_bytes: plan.segment_max_bytes.max(1),
        level: plan.compression_level,
        dictionary: plan.dictionary,
        volume: match &plan.destination {
            ArchiveDestinationPlan::Store => None,
            ArchiveDestinationPlan::Volume(p) => Some(p.clone()),
        },
    }
}

/// What an ArchivePolicy's archivers have archived so far, summed over its streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyTotals {
    pub events: i64,
    /// The archived events' size as CloudEvents JSON.
    pub raw: i64,
    /// The segments' size.
    pub stored: i64,
    pub last_run: Option<DateTime<Utc>>,
}

impl Archives {
    pub fn new(engine: Arc<Engine>) -> Archives {
        Archives {
            metrics: engine.metrics.clone(),
            engine,
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// Moves the archivers to `plans`: new (policy, stream) pairs start (their first run at
    /// once), changed ones restart, absent ones stop.
    pub fn apply(&self, plans: &BTreeMap<Key, ArchivePlan>) {
        let mut want: BTreeMap<Key, (Key, Settings, Duration)> = BTreeMap::new();
        for plan in plans.values() {
            for stream in &plan.streams {
                want.insert(
                    stream.clone(),
                    (plan.key.clone(), settings(plan), plan.schedule),
                );
            }
        }
        let mut running = self.running.locked();
        running.retain(|stream, e| {
            let keep = want
                .get(stream)
                .is_some_and(|(p, s, d)| *p == e.policy && *s == e.settings && *d == e.schedule);
            if !keep {
                e.cancel.cancel();
            }
            keep
        });
        for (stream, (policy, settings, schedule)) in want {
            if running.contains_key(&stream) {
                continue;
            }
            let cancel = CancellationToken::new();
            let last = Arc::new(Mutex::new(LastRun::default()));
            let task = tokio::spawn(schedule_loop(
                self.engine.clone(),
                self.metrics.clone(),
                stream.clone(),
                settings.clone(),
                schedule,
                cancel.clone(),
                last.clone(),
            ));
            running.insert(
                stream,
                Entry {
                    policy,
                    settings,
                    schedule,
                    cancel,
                    task,
                    last,
                },
            );
        }
    }

    /// Stops every archiver (a run in progress is abandoned: its transaction rolls back).
    pub async fn shutdown(&self) {
        let entries: Vec<Entry> = std::mem::take(&mut *self.running.locked())
            .into_values()
            .collect();
        for e in &entries {
            e.cancel.cancel();
        }
        for e in entries {
            let _ = tokio::time::timeout(Duration::from_secs(5), e.task).await;
        }
    }

    fn store_of(&self, stream: &Key) -> Result<(Store, i64), ArchiveError> {
        let rt = self
            .engine
            .stream(&stream.namespace, &stream.name)
            .ok_or_else(|| ArchiveError::NotRunning(stream.to_string()))?;
        match (rt.store(), rt.stream_id()) {
            (Some(s), Some(id)) => Ok((s.clone(), id)),
            _ => Err(ArchiveError::NotRunning(stream.to_string())),
        }
    }

    /// Runs the stream's archiver now, at most `max_segments` segments (the CLI calls this
    /// repeatedly to draw its progress).
    pub async fn run_now(
        &self,
        stream: &Key,
        max_segments: Option<usize>,
    ) -> Result<RunReport, ArchiveError> {
        let (settings, last) = {
            let running = self.running.locked();
            let e = running
                .get(stream)
                .ok_or_else(|| ArchiveError::NotArchived(stream.to_string()))?;
            (e.settings.clone(), e.last.clone())
        };
        let (store, id) = self.store_of(stream)?;
        let r = archiver::run_once(&store, id, stream, &settings, max_segments, &|_, _| {}).await;
        record(&self.metrics, stream, &r, &last);
        refresh_totals(&store, id, &last).await;
        r
    }

    /// The streams archived here.
    pub fn streams(&self) -> Vec<Key> {
        self.running.locked().keys().cloned().collect()
    }

    /// The streams a policy archives here.
    pub fn streams_of(&self, policy: &Key) -> Vec<Key> {
        self.running
            .locked()
            .iter()
            .filter(|(_, e)| e.policy == *policy)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Totals of one archived stream.
    pub async fn stream_status(&self, stream: &Key) -> Result<StreamArchive, ArchiveError> {
        let (policy, settings, schedule, last) = {
            let running = self.running.locked();
            let e = running
                .get(stream)
                .ok_or_else(|| ArchiveError::NotArchived(stream.to_string()))?;
            (
                e.policy.clone(),
                e.settings.clone(),
                e.schedule,
                e.last.locked().clone(),
            )
        };
        let (store, id) = self.store_of(stream)?;
        let summary = store.archive_summary(id).await?;
        let (segments, events, raw, stored, last_run) = (
            summary.totals.segments,
            summary.totals.events,
            summary.totals.raw_bytes,
            summary.totals.stored_bytes,
            summary.totals.last_run,
        );
        let (hot_from, head) = (summary.hot_from, summary.head);
        Ok(StreamArchive {
            stream: stream.to_string(),
            policy: policy.to_string(),
            destination: match &settings.volume {
                None => "store".into(),
                Some(p) => format!("volume {}", p.display()),
            },
            schedule_seconds: schedule.as_secs_f64(),
            segments,
            archived_events: events,
            raw_bytes: raw,
            stored_bytes: stored,
            compression_ratio: (stored > 0).then(|| raw as f64 / stored as f64),
            last_run,
            hot_from,
            head,
            last_error: last.error,
        })
    }

    /// Checks every segment of one archived stream.
    pub async fn verify(&self, stream: &Key) -> Result<VerifyReport, ArchiveError> {
        if !self.running.locked().contains_key(stream) {
            return Err(ArchiveError::NotArchived(stream.to_string()));
        }
        let (store, id) = self.store_of(stream)?;
        verify::verify(&store, id, &|_, _| {}).await
    }

    /// Status fields of a policy (summed over its streams) and the error of its last failed
    /// run on this replica, if the last run failed. From memory: the totals each stream's
    /// archiver read after its last run (status never waits for the database).
    pub fn policy_status(&self, policy: &Key) -> (PolicyTotals, Option<String>) {
        let mut totals = PolicyTotals::default();
        let mut error = None;
        for (stream, e) in self.running.locked().iter() {
            if e.policy != *policy {
                continue;
            }
            let last = e.last.locked().clone();
            if let Some(t) = last.totals {
                totals.events += t.events;
                totals.raw += t.raw;
                totals.stored += t.stored;
                totals.last_run = totals.last_run.max(t.last_run);
            }
            if let Some(err) = last.error {
                error = Some(format!("{stream}: {err}"));
            }
        }
        (totals, error)
    }
}

fn record(
    metrics: &Metrics,
    stream: &Key,
    r: &Result<RunReport, ArchiveError>,
    last: &Mutex<LastRun>,
) {
    let l = [stream.namespace.as_str(), stream.name.as_str()];
    let outcome = match r {
        Ok(report) => {
            metrics
                .archive_events
                .with_label_values(&l)
                .inc_by(report.events);
            metrics
                .archive_bytes
                .with_label_values(&[l[0], l[1], "raw"])
                .inc_by(report.raw_bytes);
            metrics
                .archive_bytes
                .with_label_values(&[l[0], l[1], "stored"])
                .inc_by(report.stored_bytes);
            metrics
                .archive_deleted_events
                .with_label_values(&l)
                .inc_by(report.deleted_events);
            metrics
                .archive_run_duration
                .with_label_values(&l)
                .observe(report.seconds);
            last.locked().error = None;
            "ok"
        }
        // Another replica (or the admin API) is running it: nothing to record.
        Err(ArchiveError::Busy) => "busy",
        Err(e) => {
            tracing::warn!(stream = %stream, error = %e, "archive run failed");
            last.locked().error = Some(e.to_string());
            "error"
        }
    };
    metrics
        .archive_runs
        .with_label_values(&[l[0], l[1], outcome])
        .inc();
}

async fn schedule_loop(
    engine: Arc<Engine>,
    metrics: Metrics,
    stream: Key,
    settings: Settings,
    schedule: Duration,
    cancel: CancellationToken,
    last: Arc<Mutex<LastRun>>,
) {
    loop {
        let store = engine
            .stream(&stream.namespace, &stream.name)
            .and_then(|rt| Some((rt.store()?.clone(), rt.stream_id()?)));
        let ready = store.is_some();
        if let Some((store, id)) = store {
            let run = archiver::run_once(&store, id, &stream, &settings, None, &|_, _| {});
            let r = tokio::select! {
                _ = cancel.cancelled() => return,
                r = run => r,
            };
            record(&metrics, &stream, &r, &last);
            refresh_totals(&store, id, &last).await;
        }
        // A stream still provisioning is tried again soon rather than after a full period.
        let wait = if !ready {
            schedule.min(Duration::from_secs(1))
        } else {
            schedule
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
