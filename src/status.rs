//! What `weir status` and `/v1/status` show: every resource with its conditions, as
//! `kubectl get weir` would. Assembled from the topology's reports (is the spec valid?) and
//! the engine's health (are its broker and store reachable?).

use crate::poison::RwLockExt;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock};

use serde::Serialize;

use crate::data::engine::Engine;
use crate::data::subscriptions::Subscriptions;
use crate::topology::Key;
use crate::topology::build::Report;
use crate::topology::index::Kind;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

impl Condition {
    fn new(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
        Condition {
            type_: type_.into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub ready: bool,
    pub conditions: Vec<Condition>,
    /// Kind-specific fields (endpoint, exchange, head, ...).
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// The latest view of the control plane, replaced on every apply.
#[derive(Default)]
pub struct StatusBoard {
    inner: RwLock<Snapshot>,
    /// The running subscriptions, for their conditions and fields.
    subscriptions: OnceLock<Arc<Subscriptions>>,
    /// The archivers, for ArchivePolicy totals.
    archives: OnceLock<Arc<crate::data::archive::Archives>>,
}

#[derive(Default, Clone)]
struct Snapshot {
    loaded: bool,
    reports: Vec<Report>,
    /// Resources whose new version is invalid but whose previous version keeps running.
    kept: BTreeSet<(Kind, Key)>,
    /// Manifest problems that belong to no resource (unparsable files).
    manifest_problems: Vec<String>,
    endpoint_base: String,
}

impl StatusBoard {
    pub fn update(
        &self,
        reports: Vec<Report>,
        kept: BTreeSet<(Kind, Key)>,
        manifest_problems: Vec<String>,
        endpoint_base: String,
    ) {
        let mut s = self.inner.writing();
        *s = Snapshot {
            loaded: true,
            reports,
            kept,
            manifest_problems,
            endpoint_base,
        };
    }

    /// Makes subscription status (conditions, queues, backlog, position) part of the view.
    pub fn attach_subscriptions(&self, subscriptions: Arc<Subscriptions>) {
        let _ = self.subscriptions.set(subscriptions);
    }

    /// Makes ArchivePolicy totals (lastRun, archivedEvents, ...) part of the view.
    pub fn attach_archives(&self, archives: Arc<crate::data::archive::Archives>) {
        let _ = self.archives.set(archives);
    }

    /// True once a topology has been applied (readiness).
    pub fn loaded(&self) -> bool {
        self.inner.reading().loaded
    }

    pub fn manifest_problems(&self) -> Vec<String> {
        self.inner.reading().manifest_problems.clone()
    }

    /// Every resource with its conditions. Computed from memory only (the topology's reports,
    /// the engine's and subscriptions' state): it answers at once whatever the database or
    /// broker do, and takes no lock that reconciliation holds across an await.
    pub fn resources(&self, engine: &Engine) -> Vec<ResourceStatus> {
        let snap = self.inner.reading().clone();
        let mut out = Vec::new();
        for r in &snap.reports {
            let mut conditions = Vec::new();
            let mut fields = serde_json::Map::new();
            let kept = snap.kept.contains(&(r.kind, r.key.clone()));
            let valid = r.problems.is_empty();
            let spec_msg = r
                .problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            let reason = r
                .problems
                .first()
                .map_or("Valid".to_string(), |p| format!("{:?}", p.reason));
            let mut ready = valid;
            // The first dependency that is not ready names the Ready condition's reason.
            let mut why: Option<(String, String)> = None;
            if r.kind == Kind::EventStream {
                if let Some(rt) = engine.stream(&r.key.namespace, &r.key.name) {
                    let mut deps = vec![("BrokerReady", rt.broker_condition())];
                    if let Some(c) = rt.store_condition() {
                        deps.push(("StoreReady", c));
                        // What this process knows to be committed (its appends, its relay,
                        // the set-up's read): status never waits for the database.
                        fields.insert(
                            "head".into(),
                            rt.health.head.load(Ordering::Acquire).to_string().into(),
                        );
                    }
                    for (ty, c) in deps {
                        if !c.ok && why.is_none() {
                            why = Some((c.reason.to_string(), c.message.clone()));
                        }
                        ready &= c.ok;
                        conditions.push(Condition::new(ty, c.ok, c.reason, c.message));
                    }
                    fields.insert("exchange".into(), rt.plan.broker.exchange.clone().into());
                    fields.insert(
                        "endpoint".into(),
                        format!(
                            "{}/v1/namespaces/{}/streams/{}/events",
                            snap.endpoint_base, r.key.namespace, r.key.name
                        )
                        .into(),
                    );
                } else {
                    ready = false;
                }
            }
            if r.kind == Kind::CachePolicy
                && let Some(cache) = engine.caches.policy(&r.key)
            {
                // Sampled on this replica: each replica has its own cache.
                if let Some(ratio) = cache.hit_ratio() {
                    fields.insert("hitRatio".into(), format!("{ratio:.2}").into());
                }
                fields.insert("entries".into(), cache.entry_count().into());
            }
            if r.kind == Kind::ArchivePolicy
                && let Some(archives) = self.archives.get()
            {
                let (f, error) = archives.policy_status(&r.key);
                fields.extend(f);
                if let Some(e) = error {
                    conditions.push(Condition::new("ArchiveHealthy", false, "ArchiveFailed", e));
                    ready = false;
                }
            }
            if r.kind == Kind::Subscription
                && let Some(subs) = self.subscriptions.get()
            {
                let (running, failure) =
                    subscription_status(subs, &r.key, &mut conditions, &mut fields);
                ready &= running;
                if why.is_none() {
                    why = failure;
                }
            }
            let ready_cond = if !valid && kept {
                Condition::new(
                    "Ready",
                    false,
                    &reason,
                    format!(
                        "the new version is invalid, the previous one keeps running: {spec_msg}"
                    ),
                )
            } else if !valid {
                Condition::new("Ready", false, &reason, spec_msg)
            } else if !ready {
                let (reason, message) = why
                    .or_else(|| {
                        conditions
                            .iter()
                            .find(|c| c.status == "False")
                            .map(|c| (c.reason.clone(), c.message.clone()))
                    })
                    .unwrap_or_else(|| ("NotReady".into(), "starting".into()));
                Condition::new("Ready", false, &reason, message)
            } else {
                Condition::new("Ready", true, "Ready", "")
            };
            conditions.insert(0, ready_cond);
            out.push(ResourceStatus {
                kind: r.kind.to_string(),
                namespace: r.key.namespace.clone(),
                name: r.key.name.clone(),
                generation: r.generation,
                ready: ready && valid,
                conditions,
                fields,
            });
        }
        out
    }
}

/// Conditions (`SinkReachable`, `CaughtUp`, `Ordering`) and fields (`queue`,
/// `deadLetterQueue`, `consumers`, `selector`, `backlog`, `position`) of a subscription;
/// returns whether it runs, and why set-up fails if it does (reason, message).
fn subscription_status(
    subs: &Subscriptions,
    key: &Key,
    conditions: &mut Vec<Condition>,
    fields: &mut serde_json::Map<String, serde_json::Value>,
) -> (bool, Option<(String, String)>) {
    let Some((runner, plan)) = subs.get(key) else {
        let why = subs
            .problem(key)
            .unwrap_or_else(|| "not running".to_string());
        conditions.push(Condition::new("Running", false, "NotRunning", why));
        return (false, None);
    };
    let failure = runner.state.failure().map(|(r, m)| (r.to_string(), m));
    let st = &runner.state;
    let (sink_ok, sink_msg) = st
        .sink()
        .unwrap_or((true, "no delivery attempted yet".to_string()));
    conditions.push(Condition::new(
        "SinkReachable",
        sink_ok,
        if sink_ok {
            "Delivered"
        } else {
            "DeliveryFailed"
        },
        sink_msg,
    ));
    let caught_up = st.caught_up.load(Ordering::Acquire);
    conditions.push(Condition::new(
        "CaughtUp",
        caught_up,
        if caught_up { "Live" } else { "CatchingUp" },
        st.error().unwrap_or_else(|| {
            if caught_up {
                String::new()
            } else {
                "provisioning its queues or replaying stored events".to_string()
            }
        }),
    ));
    let (ordering_reason, ordering_msg) = match &plan.ordering {
        crate::topology::OrderingPlan::None => ("Unordered", String::new()),
        crate::topology::OrderingPlan::PerKey {
            partition_key,
            partitions: 1,
        } => (
            "Serial",
            format!("one lane: every event in order (key {partition_key})"),
        ),
        crate::topology::OrderingPlan::PerKey {
            partition_key,
            partitions,
        } => (
            "PerKey",
            format!("{partitions} lanes keyed by {partition_key}"),
        ),
    };
    conditions.push(Condition::new(
        "Ordering",
        true,
        ordering_reason,
        ordering_msg,
    ));
    let queues = runner.names.consumed();
    fields.insert("queue".into(), runner.names.queue.clone().into());
    if queues.len() > 1 || queues[0] != runner.names.queue {
        fields.insert("partitionQueues".into(), queues.into());
    }
    fields.insert(
        "deadLetterQueue".into(),
        runner.names.dead_letter_queue.clone().into(),
    );
    fields.insert("consumers".into(), runner.settings().consumers.into());
    fields.insert(
        "selector".into(),
        format!("weir.dev/subscription={}", key.name).into(),
    );
    let backlog = st.backlog.load(Ordering::Acquire);
    if backlog >= 0 {
        fields.insert("backlog".into(), backlog.into());
    }
    fields.insert(
        "position".into(),
        st.position.load(Ordering::Acquire).to_string().into(),
    );
    if let Some(n) = st.notice() {
        fields.insert("notice".into(), n.into());
    }
    (caught_up && st.error().is_none(), failure)
}
