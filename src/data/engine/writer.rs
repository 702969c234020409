//! What the batcher of a stream with a store writes through (the append chain, the relay's
//! handoff, the payload counters) and reports to (metrics, the append-failing flag).

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::Health;
use crate::data::batcher::{BatchObserver, BatchWriter};
use crate::data::event::{CloudEvent, StoredEvent};
use crate::data::relay::Handoff;
use crate::data::store::{RequestOutcome, Store, StoreError};
use crate::data::tracecontext::{Round, Stage};
use crate::metrics::Metrics;
use crate::topology::Key;

pub(super) struct StoreWriter {
    pub(super) store: Store,
    pub(super) health: Arc<Health>,
    pub(super) stream_id: Arc<OnceLock<i64>>,
    pub(super) compression: crate::topology::CompressionPlan,
    /// This stream's batches in flight, so the next one is decided while the previous commits.
    pub(super) chain: crate::data::store::AppendChain,
    /// `weir_store_appends_total{path}` of this stream, and its namespace and name.
    pub(super) paths: prometheus::IntCounterVec,
    pub(super) labels: [String; 2],
    /// Committed batches for this process's relay.
    pub(super) handoff: Handoff,
    /// `weir_store_payload_bytes_total{kind="raw"|"stored"}` of this stream.
    pub(super) payload_raw: prometheus::IntCounter,
    pub(super) payload_stored: prometheus::IntCounter,
}

impl BatchWriter for StoreWriter {
    fn write<'a>(
        &'a self,
        requests: &'a [Vec<CloudEvent>],
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<RequestOutcome>, StoreError>> + Send + 'a>,
    > {
        Box::pin(async move {
            let Some(id) = self.stream_id.get().copied() else {
                return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
            };
            let inputs: Vec<_> = requests
                .iter()
                .map(|r| crate::data::store::AppendInput { events: r })
                .collect();
            // Ended when this write returns, committed or not.
            let spans = Round::start(
                Stage::Commit,
                [&self.labels[0], &self.labels[1]],
                requests.iter().flatten(),
            );
            let (outcomes, report) = self
                .store
                .append_chained(id, &inputs, &self.compression, &self.chain)
                .await
                .inspect_err(|e| spans.failed(e))?;
            self.paths
                .with_label_values(&[&self.labels[0], &self.labels[1], report.path.label()])
                .inc();
            if let Some(last) = report.written.iter().map(|w| w.2).max() {
                self.health.head.fetch_max(last, Ordering::AcqRel);
            }
            self.payload_raw.inc_by(report.bytes.raw);
            self.payload_stored.inc_by(report.bytes.stored);
            if let Some(recorded_time) = report.recorded_at
                && self.handoff.wanted()
            {
                // Exactly what reading these rows back would give.
                let events = report
                    .written
                    .iter()
                    .map(|&(r, e, position, version)| StoredEvent {
                        position,
                        version,
                        recorded_time,
                        event: requests[r][e].clone(),
                    })
                    .collect();
                self.handoff.offer(events);
            }
            Ok(outcomes)
        })
    }
}

pub(super) struct Observer {
    pub(super) metrics: Metrics,
    pub(super) key: Key,
    /// An append that failed is said once per change (the store's health is the pool's).
    pub(super) health: Arc<Health>,
}

impl BatchObserver for Observer {
    fn batch_written(&self, events: usize, elapsed: Duration) {
        if self.health.append_failing.swap(false, Ordering::AcqRel) {
            tracing::info!(stream = %self.key, "appends succeed again");
        }
        let l = [self.key.namespace.as_str(), self.key.name.as_str()];
        self.metrics
            .batch_events
            .with_label_values(&l)
            .observe(events as f64);
        self.metrics
            .store_append_duration
            .with_label_values(&l)
            .observe(elapsed.as_secs_f64());
    }
    fn retried(&self) {
        if !self.health.append_failing.swap(true, Ordering::AcqRel) {
            tracing::warn!(stream = %self.key, "store unavailable: an append failed and is retried");
        }
        self.metrics
            .store_append_retries
            .with_label_values(&[self.key.namespace.as_str(), self.key.name.as_str()])
            .inc();
    }
}
