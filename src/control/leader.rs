//! Leader election on a `coordination.k8s.io` Lease, through `kube-lease-manager`.
//!
//! The holder writes status, handles finalizers (and so removes data on delete) and records
//! Events; every replica runs the data plane regardless. On shutdown the Lease is released,
//! so another replica takes over at once instead of after the lease duration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::control::ControlError;

/// Where the Lease lives and who this replica is.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per replica (the Pod name in a cluster).
    pub identity: String,
    /// Seconds the lock stays valid after its last renewal. 15 s, as kube-controller-manager:
    /// a dead holder is replaced within that.
    pub duration: u64,
    /// Seconds before expiry at which the holder renews; also the clock skew tolerated.
    pub grace: u64,
}

/// Starts competing for the Lease. `flag` follows the holder state; `changes` gets a message
/// on every change (so controllers can write status at once when leadership arrives). The
/// returned task releases the Lease once `stop` is cancelled.
pub async fn start(
    client: Client,
    cfg: LeaseConfig,
    flag: Arc<AtomicBool>,
    changes: watch::Sender<bool>,
    stop: CancellationToken,
) -> Result<JoinHandle<()>, ControlError> {
    let manager = LeaseManagerBuilder::new(client, &cfg.name)
        .with_namespace(&cfg.namespace)
        .with_identity(&cfg.identity)
        .with_field_manager(format!("weir-lease-{}", cfg.identity))
        .with_duration(cfg.duration)
        .with_grace(cfg.grace)
        .build()
        .await?;
    let (mut rx, task) = manager.watch().await;
    Ok(tokio::spawn(async move {
        loop {
            let holder = *rx.borrow_and_update();
            if flag.swap(holder, Ordering::AcqRel) != holder {
                tracing::info!(identity = %cfg.identity, holder, "leadership changed");
                let _ = changes.send(holder);
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = rx.changed() => if changed.is_err() { break },
            }
        }
        flag.store(false, Ordering::Release);
        // Closing the channel makes the manager release the Lease and end.
        drop(rx);
        match task.await {
            Ok(Ok(_)) => tracing::info!("Lease released"),
            Ok(Err(e)) => log_error(&e),
            Err(e) => tracing::warn!(error = %e, "Lease task"),
        }
    }))
}

fn log_error(e: &LeaseManagerError) {
    tracing::warn!(error = %e, "releasing the Lease");
}
