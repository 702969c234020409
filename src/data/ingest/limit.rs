//! `spec.ingest.rateLimit`: a token bucket per stream and worker, counted in events.
//!
//! A request of `n` events takes `n` tokens at once or none: it is either wholly admitted or
//! answered 429 with `Retry-After` (the seconds until the bucket holds `n` again, rounded
//! up), and nothing of it is stored. A request of more events than the bucket holds
//! (`burst`) could never pass, however long it waited: it is answered 413 at once, naming
//! the burst, so that a client does not retry it for ever as it would a 429.
//!
//! The bucket belongs to the stream's runtime, which the engine rebuilds whenever the
//! stream's plan changes: a re-applied `rateLimit` takes effect with a full bucket. Each
//! worker has its own bucket, so N workers behind one Service admit up to N times the rate.
//!
//! Buckets are per stream, not per publisher. [`admit`] already takes the authenticated
//! publisher, so a keyed bucket per publisher can be added there without touching the HTTP
//! layer.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::data::engine::StreamRuntime;
use crate::data::problem::{HttpProblem, ProblemKind};
use crate::metrics::Metrics;
use crate::topology::RateLimitPlan;

/// The `reason` label of `weir_ingest_rejected_total` for a request over the rate.
pub const REASON_RATE_LIMITED: &str = "rate_limited";
/// The `reason` label for a request of more events than the burst.
pub const REASON_OVER_BURST: &str = "over_burst";

/// Why a request was not admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The bucket holds fewer than the request's events now; it will in `retry_after`.
    #[error("the stream's rate limit is exhausted; retry in {retry_after:?}")]
    Exhausted { retry_after: Duration },
    /// The request holds more events than the bucket ever does.
    #[error("a request of {events} events exceeds the stream's rate limit burst of {burst}")]
    OverBurst { events: usize, burst: u32 },
}

impl Refusal {
    /// The `reason` label of `weir_ingest_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Exhausted { .. } => REASON_RATE_LIMITED,
            Refusal::OverBurst { .. } => REASON_OVER_BURST,
        }
    }

    /// The answer: 429 with `Retry-After`, or 413 for a request that can never pass.
    pub fn problem(&self) -> HttpProblem {
        match self {
            Refusal::Exhausted { retry_after } => {
                HttpProblem::rate_limited(retry_after_seconds(*retry_after))
            }
            Refusal::OverBurst { events, burst } => HttpProblem::new(
                ProblemKind::PayloadTooLarge,
                format!(
                    "this request holds {events} events, more than this stream's rate limit \
                     burst of {burst} (spec.ingest.rateLimit.burst): it can never be admitted; \
                     send at most {burst} events per request"
                ),
            ),
        }
    }
}

/// `Retry-After` in whole seconds: rounded up (a client that waits that long finds the
/// tokens there), and at least 1 (0 would invite an immediate retry that fails again when
/// the wait was a few milliseconds).
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// One stream's bucket on this worker.
pub struct RateLimit<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    clock: C,
    burst: NonZeroU32,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("burst", &self.burst)
            .finish()
    }
}

impl RateLimit {
    pub fn new(plan: &RateLimitPlan) -> RateLimit {
        RateLimit::with_clock(plan, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimit<C> {
    /// A bucket reading time from `clock` (tests pass a fake one).
    pub fn with_clock(plan: &RateLimitPlan, clock: C) -> RateLimit<C> {
        let quota = Quota::per_second(plan.events_per_second).allow_burst(plan.burst);
        RateLimit {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
            burst: plan.burst,
        }
    }

    /// Takes `events` tokens, all or none.
    pub fn take(&self, events: usize) -> Result<(), Refusal> {
        let over = || Refusal::OverBurst {
            events,
            burst: self.burst.get(),
        };
        // An empty request costs nothing (parsing refuses empty batches before this anyway).
        let Some(n) = u32::try_from(events).ok().map(NonZeroU32::new) else {
            return Err(over());
        };
        let Some(n) = n else { return Ok(()) };
        match self.limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Refusal::Exhausted {
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
            Err(_insufficient) => Err(over()),
        }
    }
}

/// The rate-limit check of a publish: after parsing (so `events` is known), before the
/// append. `publisher` is the authenticated publisher, if any; buckets are per stream for now
/// (see the module doc). A refusal is counted in `weir_ingest_rejected_total` (events) and
/// returned as the problem to answer.
pub fn admit(
    metrics: &Metrics,
    rt: &StreamRuntime,
    publisher: Option<&str>,
    events: usize,
) -> Result<(), HttpProblem> {
    // The hook for buckets per publisher (`ingest.auth`): one bucket per stream for now.
    let _ = publisher;
    let Some(limit) = &rt.rate_limit else {
        return Ok(());
    };
    limit.take(events).map_err(|refusal| {
        let key = &rt.plan.key;
        metrics
            .ingest_rejected
            .with_label_values(&[&key.namespace, &key.name, refusal.reason()])
            .inc_by(events as u64);
        refusal.problem()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn plan(events_per_second: u32, burst: u32) -> RateLimitPlan {
        RateLimitPlan {
            events_per_second: NonZeroU32::new(events_per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn the_burst_passes_then_the_next_event_waits_for_its_token() {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit::with_clock(&plan(5, 5), clock.clone());
        for i in 0..5 {
            assert_eq!(limit.take(1), Ok(()), "event {i} of the burst");
        }
        // One token comes back every 200 ms.
        assert_eq!(
            limit.take(1),
            Err(Refusal::Exhausted {
                retry_after: Duration::from_millis(200)
            })
        );
        clock.advance(Duration::from_millis(199));
        assert!(limit.take(1).is_err());
        clock.advance(Duration::from_millis(1));
        assert_eq!(limit.take(1), Ok(()));
    }

    #[test]
    fn a_batch_costs_its_events_all_or_none() {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit::with_clock(&plan(10, 10), clock.clone());
        assert_eq!(limit.take(7), Ok(()));
        // 3 tokens left: a batch of 4 is refused whole and takes nothing...
        assert_eq!(
            limit.take(4),
            Err(Refusal::Exhausted {
                retry_after: Duration::from_millis(100)
            })
        );
        // ...so the 3 are still there.
        assert_eq!(limit.take(3), Ok(()));
        // The wait names the time until the whole batch fits: 10 tokens take a second.
        assert_eq!(
            limit.take(10),
            Err(Refusal::Exhausted {
                retry_after: Duration::from_secs(1)
            })
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(limit.take(10), Ok(()));
    }

    #[test]
    fn a_batch_larger_than_the_burst_can_never_pass() {
        let limit = RateLimit::with_clock(&plan(100, 20), FakeRelativeClock::default());
        let refusal = limit.take(21).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::OverBurst {
                events: 21,
                burst: 20
            }
        );
        assert_eq!(refusal.problem().status, 413);
        assert_eq!(refusal.reason(), "over_burst");
        // It took nothing: the full burst still passes.
        assert_eq!(limit.take(20), Ok(()));
        assert!(matches!(
            limit.take(usize::MAX),
            Err(Refusal::OverBurst { .. })
        ));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_at_least_one() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(200)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        let p = Refusal::Exhausted {
            retry_after: Duration::from_millis(2500),
        }
        .problem();
        assert_eq!((p.status, p.retry_after), (429, Some(3)));
    }
}
