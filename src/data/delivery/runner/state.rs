//! What status shows about a running subscription, shared by its tasks.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64};

use crate::poison::MutexExt;

/// What status shows about a running subscription.
pub struct SubState {
    /// Highest stream position delivered (or dead-lettered) so far.
    pub position: AtomicI64,
    pub caught_up: AtomicBool,
    pub provisioned: AtomicBool,
    /// Provisioned and scaled to zero (`consumers: 0`): no consumer runs.
    pub scaled_to_zero: AtomicBool,
    pub inflight: AtomicI64,
    /// Ready and unacknowledged messages of the subscription's queues plus retries waiting
    /// in delay queues (sampled every few seconds); -1 before the first sample.
    pub backlog: AtomicI64,
    /// Last attempt's outcome: reachable, and what happened.
    pub sink: Mutex<Option<(bool, String)>>,
    /// Why the subscription is not running, if it is not.
    pub error: Mutex<Option<String>>,
    /// The reason of `error` when set-up failed.
    pub(super) failure: Mutex<Option<&'static str>>,
    /// Something the operator should know although it runs (a queue kept with old
    /// arguments).
    pub notice: Mutex<Option<String>>,
}

impl Default for SubState {
    fn default() -> Self {
        SubState {
            position: AtomicI64::new(0),
            caught_up: AtomicBool::new(false),
            provisioned: AtomicBool::new(false),
            scaled_to_zero: AtomicBool::new(false),
            inflight: AtomicI64::new(0),
            backlog: AtomicI64::new(-1),
            sink: Mutex::new(None),
            error: Mutex::new(None),
            failure: Mutex::new(None),
            notice: Mutex::new(None),
        }
    }
}

impl SubState {
    pub(super) fn set_error(&self, e: Option<String>) {
        if e.is_none() {
            *self.failure.locked() = None;
        }
        *self.error.locked() = e;
    }
    /// Records why the subscription does not run, with its condition reason.
    pub(super) fn set_failure(&self, reason: &'static str, e: String) {
        *self.error.locked() = Some(e);
        *self.failure.locked() = Some(reason);
    }
    /// Why set-up fails, as a condition reason (StoreUnavailable, BrokerUnavailable,
    /// ProvisioningFailed) with the error, while it does.
    pub fn failure(&self) -> Option<(&'static str, String)> {
        let reason = (*self.failure.locked())?;
        Some((reason, self.error().unwrap_or_default()))
    }
    pub fn error(&self) -> Option<String> {
        self.error.locked().clone()
    }
    pub fn notice(&self) -> Option<String> {
        self.notice.locked().clone()
    }
    pub fn sink(&self) -> Option<(bool, String)> {
        self.sink.locked().clone()
    }
}
