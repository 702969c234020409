//! The data plane: everything that moves events. It depends on `topology` only (never on
//! `kube` or `api`), so it runs the same under the operator and in standalone mode.

pub mod access;
pub mod archive;
pub mod auth;
pub mod batcher;
pub mod broker;
pub mod cache;
pub mod conditions;
pub mod delivery;
pub mod engine;
pub mod event;
pub mod http;
pub mod ingest;
pub mod pii;
pub mod plane;
pub mod problem;
pub mod relay;
pub mod store;
pub mod subscriptions;
pub mod trace;
pub mod tracecontext;

use std::time::Duration;

/// The delay before retry `failures + 1` after `failures` consecutive failures (≥ 1):
/// `base × 2^(failures-1)`, capped at `max`, then scaled by a random factor in `0.5..=1.0` so
/// that many resources failing at once (a database restart) do not retry in lock-step.
pub fn backoff(base: Duration, max: Duration, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let delay = base.saturating_mul(1u32 << exp).min(max);
    delay.mul_f64(rand::random_range(0.5..=1.0))
}

/// A recurring failure of one resource (its store, its broker), retried with [`backoff`] and
/// told to the log once per state change: the first failure, a different error at most once
/// a minute after that, and the recovery. A thousand resources failing every few seconds
/// otherwise write a thousand lines every few seconds.
#[derive(Debug)]
pub struct Trouble {
    base: Duration,
    max: Duration,
    failures: u32,
    said: Option<String>,
    said_at: Option<std::time::Instant>,
}

/// Least time between two lines about the same resource's trouble.
const TROUBLE_QUIET: Duration = Duration::from_secs(60);

impl Trouble {
    pub fn new(base: Duration, max: Duration) -> Trouble {
        Trouble {
            base,
            max,
            failures: 0,
            said: None,
            said_at: None,
        }
    }

    /// Records a failure: the delay before the next try, and whether to log `error` now.
    pub fn failed(&mut self, error: &str) -> (Duration, bool) {
        self.failures = self.failures.saturating_add(1);
        let new = self.said.as_deref() != Some(error);
        let quiet = self.said_at.is_some_and(|t| t.elapsed() < TROUBLE_QUIET);
        let say = self.said.is_none() || (new && !quiet);
        if say {
            self.said = Some(error.to_string());
            self.said_at = Some(std::time::Instant::now());
        }
        (backoff(self.base, self.max, self.failures), say)
    }

    /// Records a success: true when it ends a failure that was logged (log the recovery).
    pub fn ok(&mut self) -> bool {
        self.failures = 0;
        self.said_at = None;
        self.said.take().is_some()
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Sleeps for `d`; false when `cancel` fired first.
pub async fn sleep_or_cancel(cancel: &tokio_util::sync::CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(30);
        for _ in 0..100 {
            let d1 = backoff(base, max, 1);
            assert!(d1 >= base / 2 && d1 <= base, "{d1:?}");
            let d3 = backoff(base, max, 3);
            assert!(d3 >= base * 2 && d3 <= base * 4, "{d3:?}");
            let big = backoff(base, max, 1000);
            assert!(big >= max / 2 && big <= max, "{big:?}");
        }
    }

    #[test]
    fn trouble_is_said_once_per_state_change() {
        let mut t = Trouble::new(Duration::from_millis(10), Duration::from_secs(1));
        assert!(t.failed("refused").1, "the first failure is said");
        for _ in 0..100 {
            assert!(!t.failed("refused").1, "the same failure is not said again");
        }
        assert!(
            !t.failed("timed out").1,
            "another error within a minute is not said"
        );
        assert_eq!(t.failures(), 102);
        assert!(t.ok(), "the recovery is said");
        assert!(!t.ok(), "once");
        assert!(
            t.failed("refused").1,
            "a new failure after a recovery is said"
        );
    }
}
