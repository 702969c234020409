//! `spec.ingest.rateLimit` of an EventStream: a token bucket counted in events.

use std::num::NonZeroU32;

use super::*;

/// The stream's rate limit, or `None` when it has none (no `rateLimit`, or
/// `eventsPerSecond` 0 or unset: unlimited). `burst` 0 or unset is `eventsPerSecond`: one
/// second's worth. A `burst` without a rate limits nothing, so it is refused rather than
/// ignored.
pub(super) fn rate_limit_plan(cx: &mut Cx<'_>, spec: &EventStreamSpec) -> Option<RateLimitPlan> {
    let r = spec.ingest.as_ref()?.rate_limit.as_ref()?;
    let burst = r.burst.and_then(NonZeroU32::new);
    let Some(events_per_second) = r.events_per_second.and_then(NonZeroU32::new) else {
        if let Some(b) = burst {
            cx.invalid(
                "spec.ingest.rateLimit.burst",
                format!(
                    "burst {b} without eventsPerSecond limits nothing: set eventsPerSecond \
                     (0 or unset means unlimited) or remove burst"
                ),
            );
        }
        return None;
    };
    Some(RateLimitPlan {
        events_per_second,
        burst: burst.unwrap_or(events_per_second),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::topology::build::build;
    use crate::topology::index::Index;
    use crate::topology::{Defaults, Key};

    fn plan_of(rate_limit: serde_json::Value) -> (Option<super::RateLimitPlan>, Vec<String>) {
        let mut index = Index::default();
        let stream = serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "EventStream",
            "metadata": {"name": "s", "namespace": "t"},
            "spec": {
                "broker": {"urlSecretRef": {"name": "amqp", "key": "url"}},
                "ingest": {"rateLimit": rate_limit},
            },
        });
        let key = Key::new("t", "s");
        index
            .streams
            .insert(key, serde_json::from_value(stream).expect("an EventStream"));
        let url = b"amqp://guest:guest@127.0.0.1:5672/%2f".to_vec();
        index.secrets.insert(
            Key::new("t", "amqp"),
            [("url".to_string(), url)].into_iter().collect(),
        );
        let built = build(&index, &Defaults::default());
        let plan = built
            .topology
            .streams
            .values()
            .next()
            .and_then(|p| p.rate_limit);
        let problems = built
            .reports
            .iter()
            .flat_map(|r| r.problems.iter().map(ToString::to_string))
            .collect();
        (plan, problems)
    }

    #[test]
    fn burst_defaults_to_one_second_of_the_rate() {
        let (plan, problems) = plan_of(json!({"eventsPerSecond": 5}));
        assert!(problems.is_empty(), "{problems:?}");
        let plan = plan.expect("a rate limit");
        assert_eq!((plan.events_per_second.get(), plan.burst.get()), (5, 5));
        let (plan, _) = plan_of(json!({"eventsPerSecond": 5, "burst": 20}));
        assert_eq!(plan.map(|p| p.burst.get()), Some(20));
    }

    #[test]
    fn zero_or_no_rate_is_unlimited_and_a_lone_burst_is_refused() {
        assert_eq!(plan_of(json!({"eventsPerSecond": 0})), (None, vec![]));
        assert_eq!(plan_of(json!({})), (None, vec![]));
        let (plan, problems) = plan_of(json!({"burst": 10}));
        assert_eq!(plan, None);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("spec.ingest.rateLimit.burst") && p.contains("eventsPerSecond")),
            "{problems:?}"
        );
    }
}
