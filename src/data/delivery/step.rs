//! What follows one delivery attempt, decided without side effects: the runner does what
//! [`next_step`] says (ack, wait and try again, or dead-letter), so the decision itself is a
//! table that unit tests read row by row.

use std::time::Duration;

use super::backoff::{retry_after_delay, retry_delay};
use super::sender::Outcome;
use crate::topology::DeliveryPlan;

/// The next step after attempt number `attempt` (1 for the first) of one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The sink accepted the event: settle it.
    Done,
    /// Try again after `delay` (already jittered, capped and rounded to a delay bucket).
    Retry { delay: Duration },
    /// No retry left, or the failure is not retryable: dead-letter the event.
    DeadLetter,
}

/// The step after `outcome` of attempt `attempt`, under the subscription's `delivery` policy.
/// `jitter` is the random factor applied to a computed backoff (see
/// [`super::backoff::JITTER`]); a sink's `Retry-After` is honoured without jitter.
pub fn next_step(outcome: &Outcome, attempt: u32, plan: &DeliveryPlan, jitter: f64) -> Step {
    let Outcome::Failed(f) = outcome else {
        return Step::Done;
    };
    // `retry` counts retries, not attempts: retry 3 allows attempts 1 to 4.
    if !f.retryable || attempt > plan.retry {
        return Step::DeadLetter;
    }
    let delay = match f.retry_after {
        Some(asked) => retry_after_delay(plan, asked),
        None => retry_delay(plan, attempt, jitter),
    };
    Step::Retry { delay }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::delivery::sender::Failure;
    use crate::topology::BackoffPolicy;

    fn plan(retry: u32, policy: BackoffPolicy) -> DeliveryPlan {
        DeliveryPlan {
            retry,
            backoff_policy: policy,
            backoff_delay: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            retry_after_max: Duration::from_secs(30),
            ..DeliveryPlan::default()
        }
    }

    fn failed(code: &str, retryable: bool, retry_after: Option<u64>) -> Outcome {
        Outcome::Failed(Failure {
            retryable,
            code: code.into(),
            data: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
        })
    }

    fn retry(ms: u64) -> Step {
        Step::Retry {
            delay: Duration::from_millis(ms),
        }
    }

    #[test]
    fn the_step_after_each_outcome() {
        use BackoffPolicy::{Exponential as Exp, Linear as Lin};
        let ok = || Outcome::Delivered {
            status: 200,
            reply: None,
        };
        // (outcome, attempt, retry, policy, expected step), jitter 1.0 (none).
        let rows: Vec<(&str, Outcome, u32, u32, BackoffPolicy, Step)> = vec![
            ("delivered first time", ok(), 1, 3, Exp, Step::Done),
            ("delivered on the last retry", ok(), 4, 3, Exp, Step::Done),
            (
                "503, first attempt",
                failed("503", true, None),
                1,
                3,
                Exp,
                retry(1000),
            ),
            (
                "503, second attempt doubles",
                failed("503", true, None),
                2,
                3,
                Exp,
                retry(2000),
            ),
            (
                "503, third attempt doubles again",
                failed("503", true, None),
                3,
                3,
                Exp,
                retry(4000),
            ),
            (
                "503, retries used up",
                failed("503", true, None),
                4,
                3,
                Exp,
                Step::DeadLetter,
            ),
            (
                "linear: 3 s, on the √2 bucket grid",
                failed("500", true, None),
                3,
                5,
                Lin,
                retry(2828),
            ),
            (
                "timeout is retried",
                failed("timeout", true, None),
                1,
                1,
                Exp,
                retry(1000),
            ),
            (
                "400 is not retried",
                failed("400", false, None),
                1,
                3,
                Exp,
                Step::DeadLetter,
            ),
            (
                "a sink the guard refuses is not retried",
                failed("refused", false, None),
                1,
                3,
                Exp,
                Step::DeadLetter,
            ),
            (
                "a redirect is not retried",
                failed("302", false, None),
                1,
                3,
                Exp,
                Step::DeadLetter,
            ),
            (
                "retry 0 dead-letters at once",
                failed("503", true, None),
                1,
                0,
                Exp,
                Step::DeadLetter,
            ),
            (
                "Retry-After is honoured",
                failed("429", true, Some(8)),
                1,
                3,
                Exp,
                retry(8000),
            ),
            (
                "Retry-After is capped",
                failed("503", true, Some(600)),
                1,
                3,
                Exp,
                retry(30000),
            ),
            (
                "Retry-After does not revive a 4xx",
                failed("400", false, Some(5)),
                1,
                3,
                Exp,
                Step::DeadLetter,
            ),
            (
                "exponential is capped by backoffMax",
                failed("503", true, None),
                20,
                30,
                Exp,
                retry(60000),
            ),
        ];
        for (what, outcome, attempt, retries, policy, want) in rows {
            let got = next_step(&outcome, attempt, &plan(retries, policy), 1.0);
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn jitter_moves_a_backoff_to_a_neighbouring_bucket_and_no_further() {
        let p = plan(3, BackoffPolicy::Exponential);
        let f = failed("503", true, None);
        let Step::Retry { delay: low } = next_step(&f, 3, &p, 0.0) else {
            panic!("no retry")
        };
        let Step::Retry { delay: high } = next_step(&f, 3, &p, 9.0) else {
            panic!("no retry")
        };
        // 4 s nominal, jitter clamped to ±20%: 3.2 s and 4.8 s, rounded to √2-spaced buckets.
        assert!(
            low < Duration::from_secs(4) && low >= Duration::from_millis(2800),
            "{low:?}"
        );
        assert!(
            high > Duration::from_secs(4) && high <= Duration::from_millis(5700),
            "{high:?}"
        );
    }
}
