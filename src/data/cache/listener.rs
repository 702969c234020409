//! Cache invalidation across replicas: one `LISTEN` per database (the store's notification
//! session) whose `weir_subjects` notes drop the cached subjects and traces an append changed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use super::registry::Shared;

/// The payload of a `weir_subjects` notification (built in the append's SQL).
#[derive(serde::Deserialize)]
pub(super) struct SubjectsNotice {
    pub(super) stream_id: i64,
    pub(super) namespace: String,
    pub(super) name: String,
    /// `null` when the list would not fit a notification.
    pub(super) subjects: Option<Vec<String>>,
    /// The correlation ids appended; `null` (with `subjects`) when they would not fit.
    #[serde(default)]
    pub(super) correlations: Option<Vec<String>>,
}

pub(super) struct Listener {
    pub(super) cancel: CancellationToken,
    pub(super) live: Arc<AtomicBool>,
}

/// Follows `weir_subjects` of one database through its notification session (one `LISTEN`
/// per database and process, shared with the relays). The caches of that database are used
/// only while the session listens (`live`); every cache is cleared whenever it connects or
/// disconnects, and when this listener fell behind the session's notes: notifications missed
/// then may concern any cached subject or trace.
pub(super) async fn listen(
    notifier: crate::data::store::notify::Notifier,
    shared: Arc<Shared>,
    live: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    use crate::data::store::notify::Note;
    use tokio::sync::broadcast::error::RecvError;
    let mut notes = notifier.notes();
    // Subscribed before looking: a change after this look arrives as a note.
    if notifier.live() {
        shared.clear_all();
        live.store(true, Ordering::Release);
    }
    loop {
        let note = tokio::select! {
            _ = cancel.cancelled() => {
                live.store(false, Ordering::Release);
                return;
            }
            n = notes.recv() => n,
        };
        match note {
            Ok(Note::Subjects(payload)) => shared.on_notification(&payload),
            Ok(Note::Connected) => {
                shared.clear_all();
                live.store(true, Ordering::Release);
            }
            Ok(Note::Disconnected) => {
                live.store(false, Ordering::Release);
                shared.clear_all();
                tracing::warn!(
                    "cache invalidation listener lost its connection; caches bypassed until it is back"
                );
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "cache invalidation fell behind; caches cleared");
                shared.clear_all();
            }
            Err(RecvError::Closed) => {
                live.store(false, Ordering::Release);
                return;
            }
        }
    }
}
