//! Status writes: server-side apply of the `status` subresource under the field manager
//! `weir`, made only by the Lease holder, through a bounded queue drained by one task.
//!
//! Reconciles never wait on a status write: they enqueue it. A full queue drops the update
//! (counted) — the resource is reconciled again within the refresh interval, which writes a
//! fresh status then — so a slow API server can never stall the data plane.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{ArchivePolicy, CachePolicy, EventStream, Subscription};
use crate::control::FIELD_MANAGER;
use crate::topology::{Key, Kind};

/// Default queue capacity: a few times the resources a namespace typically holds, so a full
/// resync of a busy cluster fits while a stuck API server cannot make it grow without bound.
pub const DEFAULT_CAPACITY: usize = 1024;
/// Longest one status write may take before it is abandoned (and counted as timed out).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// One status to write.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusUpdate {
    pub kind: Kind,
    pub key: Key,
    /// The whole apply body: `apiVersion`, `kind`, `metadata.name` and `status`.
    pub body: serde_json::Value,
}

/// The sending side of the status queue, with its counters.
#[derive(Clone)]
pub struct StatusQueue {
    tx: mpsc::Sender<StatusUpdate>,
    /// `weir_status_writes_total{outcome}`: enqueued, dropped, written, failed, timeout,
    /// skipped (not the Lease holder).
    pub counter: IntCounterVec,
}

impl StatusQueue {
    /// A queue of `capacity` updates, its counter registered on `registry` (a second
    /// registration on the same registry reuses nothing and is ignored).
    pub fn new(
        capacity: usize,
        registry: &Registry,
    ) -> (StatusQueue, mpsc::Receiver<StatusUpdate>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        // The metric name and label are static and valid: construction cannot fail.
        let counter = IntCounterVec::new(
            Opts::new(
                "weir_status_writes_total",
                "Status writes of the operator by outcome",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(counter.clone()));
        (StatusQueue { tx, counter }, rx)
    }

    /// Enqueues `update`; returns false (and counts a drop) when the queue is full or closed.
    pub fn push(&self, update: StatusUpdate) -> bool {
        match self.tx.try_send(update) {
            Ok(()) => {
                self.counter.with_label_values(&["enqueued"]).inc();
                true
            }
            Err(_) => {
                self.counter.with_label_values(&["dropped"]).inc();
                false
            }
        }
    }

    /// How many updates had `outcome` so far.
    pub fn count(&self, outcome: &str) -> u64 {
        self.counter.with_label_values(&[outcome]).get()
    }
}

/// Writes one status with server-side apply.
pub async fn write(client: &Client, update: &StatusUpdate) -> Result<(), kube::Error> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let ns = update.key.namespace.as_str();
    let name = update.key.name.as_str();
    let patch = Patch::Apply(&update.body);
    match update.kind {
        Kind::EventStream => {
            Api::<EventStream>::namespaced(client.clone(), ns)
                .patch_status(name, &pp, &patch)
                .await?;
        }
        Kind::Subscription => {
            Api::<Subscription>::namespaced(client.clone(), ns)
                .patch_status(name, &pp, &patch)
                .await?;
        }
        Kind::ArchivePolicy => {
            Api::<ArchivePolicy>::namespaced(client.clone(), ns)
                .patch_status(name, &pp, &patch)
                .await?;
        }
        Kind::CachePolicy => {
            Api::<CachePolicy>::namespaced(client.clone(), ns)
                .patch_status(name, &pp, &patch)
                .await?;
        }
    }
    Ok(())
}

/// Drains the queue until `stop` is cancelled and the queue is empty (or closed): each update
/// is written if this replica still holds the Lease, within [`WRITE_TIMEOUT`].
pub async fn run(
    client: Client,
    mut rx: mpsc::Receiver<StatusUpdate>,
    counter: IntCounterVec,
    leader: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        let update = tokio::select! {
            u = rx.recv() => match u { Some(u) => u, None => break },
            _ = stop.cancelled() => {
                // Write what is already queued, then stop: the last status of a graceful
                // shutdown is worth keeping, and the queue is bounded.
                rx.close();
                match rx.recv().await { Some(u) => u, None => break }
            }
        };
        if !leader.load(Ordering::Acquire) {
            counter.with_label_values(&["skipped"]).inc();
            continue;
        }
        match tokio::time::timeout(WRITE_TIMEOUT, write(&client, &update)).await {
            Ok(Ok(())) => counter.with_label_values(&["written"]).inc(),
            Ok(Err(e)) => {
                counter.with_label_values(&["failed"]).inc();
                tracing::warn!(kind = %update.kind, resource = %update.key, error = %e, "status write failed");
            }
            Err(_) => {
                counter.with_label_values(&["timeout"]).inc();
                tracing::warn!(kind = %update.kind, resource = %update.key, "status write timed out");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(n: &str) -> StatusUpdate {
        StatusUpdate {
            kind: Kind::EventStream,
            key: Key::new("shop", n),
            body: serde_json::json!({}),
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (q, mut rx) = StatusQueue::new(2, &Registry::new());
        assert!(q.push(update("a")));
        assert!(q.push(update("b")));
        assert!(!q.push(update("c")));
        assert_eq!(q.count("enqueued"), 2);
        assert_eq!(q.count("dropped"), 1);
        assert_eq!(rx.try_recv().map(|u| u.key.name).ok().as_deref(), Some("a"));
        assert!(q.push(update("d")));
    }
}
