//! A stream's set-up in the background: its rows in the store (then its relay), its exchange,
//! and the broker health it reports; each retried with backoff until cancelled.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Health;
use crate::data::broker::Broker;
use crate::data::relay::Relay;
use crate::data::store::{Store, StoreError};
use crate::data::{Trouble, sleep_or_cancel};
use crate::topology::Key;

/// Backoff of a stream's set-up after a failure: from 200 ms, doubling, capped at 30 s, with
/// jitter (a thousand streams of a database that refuses retry a few times a minute each).
const SETUP_RETRY_BASE: Duration = Duration::from_millis(200);
const SETUP_RETRY_MAX: Duration = Duration::from_secs(30);

/// Migrates the database (once per database), creates the stream's rows, then runs the relay.
/// Set-ups of one database run a few at a time ([`Store::provision_slot`]); while the pool's
/// health check says the database is down, a set-up waits for it to come back instead of
/// trying. The stream answers 503 meanwhile and its StoreReady condition says why.
pub(super) async fn provision_store(
    key: Key,
    store: Store,
    stream_id: Arc<OnceLock<i64>>,
    health: Arc<Health>,
    cancel: CancellationToken,
    mut relay: Relay,
) {
    let mut trouble = Trouble::new(SETUP_RETRY_BASE, SETUP_RETRY_MAX);
    let mut db = store.health();
    let id = loop {
        if let Some(e) = store.unavailable() {
            health.set_error(Some(format!("store: {e}")));
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = db.changed() => if r.is_err() { return },
            }
            continue;
        }
        let r = async {
            let _slot = store.provision_slot().await;
            store.migrate().await?;
            let id = store.ensure_stream(&key.namespace, &key.name).await?;
            let head = store.head(id).await?;
            Ok::<_, StoreError>((id, head))
        };
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = r => r,
        };
        match r {
            Ok((id, head)) => {
                health.head.fetch_max(head, Ordering::AcqRel);
                break id;
            }
            Err(e) => {
                let msg = format!("store: {e}");
                let (delay, say) = trouble.failed(&msg);
                if say {
                    tracing::warn!(stream = %key, error = %e, "store not ready");
                }
                health.set_error(Some(msg));
                if !sleep_or_cancel(&cancel, delay).await {
                    return;
                }
            }
        }
    };
    if trouble.ok() {
        tracing::info!(stream = %key, "store ready");
    }
    let _ = stream_id.set(id);
    health.store_ready.store(true, Ordering::Release);
    health.set_error(None);
    relay.stream_id = id;
    relay.run(cancel).await;
}

pub(super) async fn provision_exchange(
    key: Key,
    broker: Broker,
    exchange: String,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    let mut trouble = Trouble::new(SETUP_RETRY_BASE, SETUP_RETRY_MAX);
    loop {
        match broker.declare_exchange(&exchange).await {
            Ok(()) => {
                if trouble.ok() {
                    tracing::info!(stream = %key, "exchange declared");
                }
                health.set_broker_error(None);
                return;
            }
            Err(e) => {
                let msg = format!("broker: {e}");
                let (delay, say) = trouble.failed(&msg);
                if say {
                    tracing::warn!(stream = %key, error = %e, "exchange not declared yet");
                }
                health.set_broker_error(Some(msg));
                if !sleep_or_cancel(&cancel, delay).await {
                    return;
                }
            }
        }
    }
}

/// Samples the broker connection's health for status and readiness.
pub(super) async fn watch_broker(broker: Broker, health: Arc<Health>, cancel: CancellationToken) {
    loop {
        let ok = broker.healthy().await;
        health.broker_ready.store(ok, Ordering::Release);
        if !sleep_or_cancel(&cancel, Duration::from_secs(2)).await {
            return;
        }
    }
}
