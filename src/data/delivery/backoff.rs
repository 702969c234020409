//! Delays between delivery attempts, and the fixed delay buckets that make them durable.
//!
//! A retry waits in a RabbitMQ delay queue whose `x-message-ttl` dead-letters it back to the
//! subscription's queue. RabbitMQ 3.10 expires messages only at the head of a queue, so one
//! queue must hold one delay only: delays are rounded to a bucket, one queue per bucket.
//! Buckets are `backoffDelay × 2^(k/2)` (a step of √2 ≈ 41%), so that the ±20% jitter still
//! spreads a burst of retries over neighbouring buckets, and `backoffMax` is a bucket of its
//! own, so that no rounded delay ever exceeds the cap.

use std::time::Duration;

use crate::topology::{BackoffPolicy, DeliveryPlan};

/// Fraction by which a computed delay is randomly stretched or shrunk.
pub const JITTER: f64 = 0.2;

/// The nominal delay before retry `n` (n ≥ 1), without jitter and uncapped:
/// `delay × 2^(n-1)` (exponential) or `delay × n` (linear).
pub fn nominal(plan: &DeliveryPlan, n: u32) -> Duration {
    let n = n.max(1);
    match plan.backoff_policy {
        BackoffPolicy::Exponential => plan.backoff_delay.saturating_mul(1u32 << (n - 1).min(30)),
        BackoffPolicy::Linear => plan.backoff_delay.saturating_mul(n),
    }
}

/// The delay before retry `n`: the nominal delay scaled by `jitter` (clamped to
/// `1 ± JITTER`), capped by `backoffMax`, then rounded to its bucket.
pub fn retry_delay(plan: &DeliveryPlan, n: u32, jitter: f64) -> Duration {
    let j = jitter.clamp(1.0 - JITTER, 1.0 + JITTER);
    let d = nominal(plan, n).mul_f64(j).min(plan.backoff_max);
    bucket(d, plan.backoff_delay, plan.backoff_max)
}

/// The delay a `Retry-After` asks for, capped by `retryAfterMax` and rounded *up* to a bucket
/// so that the sink is not called earlier than it asked (except when the cap cuts it).
pub fn retry_after_delay(plan: &DeliveryPlan, asked: Duration) -> Duration {
    let cap = plan.retry_after_max.max(plan.backoff_delay);
    let d = asked.min(cap);
    let base = plan.backoff_delay.max(Duration::from_millis(1));
    let mut b = base;
    while b < d {
        b = step(base, b);
    }
    b.min(cap)
}

/// `d` rounded to the nearest bucket of the grid `base × 2^(k/2)` (in log scale), at least
/// `base` and never above `cap` (which is itself a bucket).
pub fn bucket(d: Duration, base: Duration, cap: Duration) -> Duration {
    let base = base.max(Duration::from_millis(1));
    if d >= cap {
        return cap;
    }
    if d <= base {
        return base.min(cap);
    }
    let k = (2.0 * (d.as_secs_f64() / base.as_secs_f64()).log2()).round();
    let b = base.mul_f64(2f64.powf(k / 2.0));
    Duration::from_millis(b.as_millis() as u64).clamp(base, cap)
}

fn step(base: Duration, b: Duration) -> Duration {
    let k = (2.0 * (b.as_secs_f64() / base.as_secs_f64()).log2()).round() + 1.0;
    let next = Duration::from_millis(base.mul_f64(2f64.powf(k / 2.0)).as_millis() as u64);
    next.max(b + Duration::from_millis(1))
}

/// Every bucket a subscription can use, up to `max(backoffMax, retryAfterMax)`: the delay
/// queues to remove when the subscription is deleted.
pub fn all_buckets(plan: &DeliveryPlan) -> Vec<Duration> {
    let base = plan.backoff_delay.max(Duration::from_millis(1));
    let top = plan.backoff_max.max(plan.retry_after_max);
    let mut out = vec![];
    let mut b = base;
    while b < top {
        out.push(b);
        b = step(base, b);
    }
    out.push(plan.backoff_max);
    out.push(plan.retry_after_max.max(plan.backoff_delay));
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(policy: BackoffPolicy, delay_ms: u64, max_ms: u64) -> DeliveryPlan {
        DeliveryPlan {
            backoff_policy: policy,
            backoff_delay: Duration::from_millis(delay_ms),
            backoff_max: Duration::from_millis(max_ms),
            retry_after_max: Duration::from_secs(2),
            ..DeliveryPlan::default()
        }
    }

    #[test]
    fn exponential_grows_by_powers_of_two_and_is_capped() {
        let p = plan(BackoffPolicy::Exponential, 200, 5_000);
        let ds: Vec<u128> = (1..=8)
            .map(|n| retry_delay(&p, n, 1.0).as_millis())
            .collect();
        assert_eq!(ds, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn linear_grows_by_multiples() {
        let p = plan(BackoffPolicy::Linear, 100, 60_000);
        assert_eq!(nominal(&p, 3), Duration::from_millis(300));
        // 300 ms lies between the buckets 283 and 400: the nearest (log scale) is 283.
        assert_eq!(retry_delay(&p, 3, 1.0), Duration::from_millis(282));
        assert_eq!(retry_delay(&p, 4, 1.0), Duration::from_millis(400));
    }

    #[test]
    fn jitter_is_bounded_and_never_exceeds_the_cap() {
        let p = plan(BackoffPolicy::Exponential, 200, 1_000);
        for n in 1..20 {
            for j in [0.0, 0.8, 1.0, 1.2, 5.0] {
                let d = retry_delay(&p, n, j);
                assert!(d <= p.backoff_max, "{n} {j} {d:?}");
                assert!(d >= p.backoff_delay, "{n} {j} {d:?}");
            }
        }
        // Jitter moves a delay to a neighbouring bucket at most.
        assert_eq!(retry_delay(&p, 2, 0.8), Duration::from_millis(282));
        assert_eq!(retry_delay(&p, 2, 1.2), Duration::from_millis(565));
    }

    #[test]
    fn retry_after_rounds_up_and_is_capped() {
        let p = plan(BackoffPolicy::Exponential, 100, 1_000);
        assert_eq!(
            retry_after_delay(&p, Duration::from_millis(150)),
            Duration::from_millis(200)
        );
        assert_eq!(
            retry_after_delay(&p, Duration::from_secs(3600)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn every_used_bucket_is_listed() {
        let p = plan(BackoffPolicy::Exponential, 100, 1_000);
        let all = all_buckets(&p);
        for n in 1..12 {
            for j in [0.8, 0.9, 1.0, 1.1, 1.2] {
                assert!(all.contains(&retry_delay(&p, n, j)), "{n} {j}");
            }
        }
        for ms in [1, 150, 999, 1500, 9999] {
            let d = retry_after_delay(&p, Duration::from_millis(ms));
            assert!(all.contains(&d), "{ms} → {d:?} not in {all:?}");
        }
    }
}
