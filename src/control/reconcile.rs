//! The reconcilers, one per kind, all in one shape: dereference (read the referenced Secrets
//! and ConfigMaps) → validate and build the whole topology from the caches (no API call) →
//! apply it to the data plane (through `data/`) → status (and Events) for the object.
//!
//! Permanent problems (an invalid spec) set `Ready=False` and wait for a change of the object
//! or of what it references; missing references are re-checked every refresh interval (Weir
//! does not watch Secrets); transient failures (API, broker, store) are returned as errors and
//! retried with exponential backoff by [`error_policy`].

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Resource;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{self, Event as FinalizerEvent, finalizer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::api::common::READY;
use crate::api::{ArchivePolicy, CachePolicy, EventStream, Subscription};
use crate::control::context::Context;
use crate::control::desired::{self, Facts, Observed, REASON_STREAM_DELETED, apply_body};
use crate::control::refs::refs_of;
use crate::control::status_writer::StatusUpdate;
use crate::control::{ControlError, FINALIZER, SUBSCRIPTION_LABEL};
use crate::data::engine::EngineError;
use crate::topology::build::{Built, Reason};
use crate::topology::{Key, Kind};

/// Longest wait between retries of a failing resource.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What the reconcilers need to know about a Weir kind.
pub trait WeirResource:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
    const KIND: Kind;
    /// Whether the kind carries the `weir.dev/cleanup` finalizer (it owns queues or data).
    const FINALIZED: bool;
    /// The conditions currently in `status`.
    fn conditions(&self) -> Vec<Condition>;
}

macro_rules! weir_resource {
    ($t:ty, $kind:expr, $fin:expr) => {
        impl WeirResource for $t {
            const KIND: Kind = $kind;
            const FINALIZED: bool = $fin;
            fn conditions(&self) -> Vec<Condition> {
                self.status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default()
            }
        }
    };
}
weir_resource!(EventStream, Kind::EventStream, true);
weir_resource!(Subscription, Kind::Subscription, true);
weir_resource!(ArchivePolicy, Kind::ArchivePolicy, false);
weir_resource!(CachePolicy, Kind::CachePolicy, false);

fn key_of<K: Resource>(obj: &K) -> Result<Key, ControlError> {
    Ok(Key::new(
        obj.meta()
            .namespace
            .clone()
            .ok_or(ControlError::MissingMetadata("metadata.namespace"))?,
        obj.meta()
            .name
            .clone()
            .ok_or(ControlError::MissingMetadata("metadata.name"))?,
    ))
}

/// The outcome of applying the whole topology.
pub struct Synced {
    pub built: Built,
    /// Per-stream failures of the data plane (broker or store unreachable while provisioning).
    pub stream_errors: Vec<(Key, String)>,
}

/// Builds the topology from the caches (Secrets and ConfigMaps re-read when older than the
/// refresh interval) and moves the data plane to it. With `cleaning` (only the Lease holder,
/// from a finalizer), that object leaves the topology and streams and subscriptions that left
/// it have their queues and data removed when their deletionPolicy says `Delete`.
pub async fn sync(ctx: &Context, cleaning: Option<(Kind, &Key)>) -> Result<Synced, ControlError> {
    let prune = cleaning.is_some();
    tracing::debug!(prune, "sync: waiting for the caches");
    ctx.stores
        .wait_until_ready(ctx.settings.cache_sync_timeout)
        .await?;
    let _guard = ctx.apply_lock.lock().await;
    tracing::debug!("sync: building");
    let (mut index, refs) = ctx.stores.index(cleaning);
    ctx.refs
        .refresh(&ctx.client, &refs, ctx.settings.refresh)
        .await?;
    let (secrets, config_maps) = ctx.refs.resolved(&refs);
    index.secrets = secrets;
    index.config_maps = config_maps;
    let built = crate::topology::build(&index, &ctx.defaults);
    // An invalid new version keeps the previous valid one running (as in standalone mode).
    let kept: BTreeSet<(Kind, Key)> = built
        .reports
        .iter()
        .filter(|r| !r.is_valid())
        .map(|r| (r.kind, r.key.clone()))
        .collect();
    let keep = |kind: Kind| -> BTreeSet<Key> {
        kept.iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| key.clone())
            .collect()
    };
    let mut stream_errors = Vec::new();
    for e in ctx
        .engine
        .apply(&built.topology.streams, &keep(Kind::EventStream), prune)
        .await
    {
        tracing::warn!(error = %e, "applying streams");
        let key = match &e {
            EngineError::Invalid { key, .. }
            | EngineError::Store { key, .. }
            | EngineError::Broker { key, .. } => key.clone(),
        };
        stream_errors.push((key, e.to_string()));
    }
    ctx.engine
        .caches
        .apply(&built.topology.cache_policies, &ctx.engine.streams());
    for e in ctx
        .subscriptions
        .apply(
            &built.topology.subscriptions,
            &keep(Kind::Subscription),
            prune,
        )
        .await
    {
        tracing::warn!(error = %e, "applying subscriptions");
    }
    ctx.archives.apply(&built.topology.archive_policies);
    tracing::debug!(resources = built.reports.len(), "sync: applied");
    ctx.board.update(
        built.reports.clone(),
        kept,
        Vec::new(),
        ctx.settings.endpoint_base.clone(),
    );
    Ok(Synced {
        built,
        stream_errors,
    })
}

/// Reconciles one object of kind `K` (see the module docs).
pub async fn reconcile<K: WeirResource>(
    obj: Arc<K>,
    ctx: Arc<Context>,
) -> Result<Action, ControlError> {
    let key = key_of(obj.as_ref())?;
    let result = if K::FINALIZED && ctx.is_leader() {
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &key.namespace);
        let c = ctx.clone();
        finalizer(&api, FINALIZER, obj, |event| async move {
            match event {
                FinalizerEvent::Apply(o) => apply(o, &c).await,
                FinalizerEvent::Cleanup(o) => cleanup(o, &c).await,
            }
        })
        .await
        .map_err(|e| match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            other => ControlError::Finalizer(other.to_string()),
        })
    } else if obj.meta().deletion_timestamp.is_some() {
        // Not the holder, or a kind without data of its own: stop running it here; the
        // holder's finalizer removes its data.
        sync(&ctx, None).await.map(|_| Action::await_change())
    } else {
        apply(obj, &ctx).await
    };
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

/// Retries transient failures with exponential backoff (2 s, 4 s, ... up to 5 min), and
/// records a Warning Event whose reason is the error's category.
pub fn error_policy<K: WeirResource>(obj: Arc<K>, err: &ControlError, ctx: Arc<Context>) -> Action {
    let Ok(key) = key_of(obj.as_ref()) else {
        return Action::await_change();
    };
    let n = ctx.failed(&key);
    let delay = Duration::from_secs(1u64 << n.min(9)).min(MAX_BACKOFF);
    tracing::warn!(kind = %K::KIND, resource = %key, error = %err, retry_in = ?delay, "reconcile failed");
    if ctx.is_leader() {
        let ctx = ctx.clone();
        let reason = err.category().to_string();
        let note = truncate(&err.to_string(), 1000);
        tokio::spawn(async move {
            publish(
                &ctx,
                obj.as_ref(),
                EventType::Warning,
                &reason,
                "Reconcile",
                note,
            )
            .await;
        });
    }
    Action::requeue(delay)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

async fn publish<K: WeirResource>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "recording an Event");
    }
}

async fn apply<K: WeirResource>(obj: Arc<K>, ctx: &Context) -> Result<Action, ControlError> {
    let key = key_of(obj.as_ref())?;
    // Dereference: what this object references is read again now (it may just have been
    // edited to point at another Secret); the rest of the index within the refresh interval.
    let value = serde_json::to_value(obj.as_ref())?;
    let own = refs_of(&key.namespace, &value["spec"]);
    ctx.refs.refresh(&ctx.client, &own, Duration::ZERO).await?;
    let synced = sync(ctx, None).await?;
    let Some(report) = synced.built.report(K::KIND, &key) else {
        // Not in the cache yet (a reconcile racing the watch): the watch event follows.
        return Ok(Action::requeue(ctx.settings.refresh));
    };
    let facts = facts(K::KIND, &key, &synced, ctx).await;
    let previous = obj.conditions();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let d = desired::desired(report, &facts, &previous, now);
    if ctx.is_leader() {
        let current = value.get("status").cloned().unwrap_or(json!({}));
        if current != d.status {
            ctx.status.push(StatusUpdate {
                kind: K::KIND,
                key: key.clone(),
                body: apply_body(K::KIND, &key.name, &d.status),
            });
        }
        let before = previous.iter().find(|c| c.type_ == READY);
        let changed =
            before.is_none_or(|b| b.status != d.ready.status || b.reason != d.ready.reason);
        if changed {
            let (type_, note) = if d.ready.status == "True" {
                (EventType::Normal, format!("{} {} is ready", K::KIND, key))
            } else {
                (EventType::Warning, d.ready.message.clone())
            };
            publish(
                ctx,
                obj.as_ref(),
                type_,
                &d.ready.reason,
                "Reconcile",
                truncate(&note, 1000),
            )
            .await;
        }
    }
    if let Some((_, message)) = synced.stream_errors.iter().find(|(k, _)| *k == key) {
        return Err(ControlError::DataPlane(message.clone()));
    }
    if !report.is_valid() && report.problems.iter().all(|p| p.reason.is_permanent()) {
        // Only an edit fixes it; the edit is a watch event.
        return Ok(Action::await_change());
    }
    if !report.is_valid()
        && report
            .problems
            .iter()
            .any(|p| p.reason == Reason::SecretNotFound || p.reason == Reason::ConfigMapNotFound)
    {
        // Secrets are not watched: look again soon, so that creating one is noticed quickly.
        return Ok(Action::requeue(
            ctx.settings.refresh.min(Duration::from_secs(10)),
        ));
    }
    Ok(Action::requeue(ctx.settings.refresh))
}

async fn cleanup<K: WeirResource>(obj: Arc<K>, ctx: &Context) -> Result<Action, ControlError> {
    let key = key_of(obj.as_ref())?;
    if K::KIND == Kind::EventStream {
        let subs = ctx.stores.subscriptions_of(&key);
        if !subs.is_empty() {
            // The stream keeps running under its subscriptions (they report StreamDeleted);
            // the error keeps the finalizer and retries until they are gone.
            return Err(ControlError::StreamInUse(key.to_string(), subs.join(", ")));
        }
    }
    let synced = sync(ctx, Some((K::KIND, &key))).await?;
    if let Some((_, message)) = synced.stream_errors.iter().find(|(k, _)| *k == key) {
        return Err(ControlError::DataPlane(message.clone()));
    }
    let value = serde_json::to_value(obj.as_ref())?;
    let policy = value["spec"]["deletionPolicy"]
        .as_str()
        .unwrap_or(if K::KIND == Kind::EventStream {
            "Retain"
        } else {
            "Delete"
        })
        .to_string();
    publish(
        ctx,
        obj.as_ref(),
        EventType::Normal,
        "CleanedUp",
        "Delete",
        format!("{} {key} stopped; deletionPolicy {policy} applied", K::KIND),
    )
    .await;
    Ok(Action::await_change())
}

/// What the data plane says about one resource: dependency conditions and status fields.
pub async fn facts(kind: Kind, key: &Key, synced: &Synced, ctx: &Context) -> Facts {
    let mut f = Facts::default();
    match kind {
        Kind::EventStream => {
            let Some(rt) = ctx.engine.stream(&key.namespace, &key.name) else {
                if synced.built.topology.streams.contains_key(key) {
                    let why = synced
                        .stream_errors
                        .iter()
                        .find(|(k, _)| k == key)
                        .map_or("not started yet".to_string(), |(_, m)| m.clone());
                    f.not_ready = Some(("NotRunning".into(), why));
                }
                return f;
            };
            let mut deps = vec![("BrokerReady", rt.broker_condition())];
            if let Some(c) = rt.store_condition() {
                deps.push(("StoreReady", c));
                // The head comes from the store (shared by every replica), asked with a short
                // limit; what this process knows when the database does not answer in time.
                let mut head = rt.health.head.load(Ordering::Acquire);
                if let (Some(store), Some(id)) = (rt.store(), rt.stream_id())
                    && let Ok(Ok(h)) =
                        tokio::time::timeout(Duration::from_secs(1), store.head(id)).await
                {
                    head = head.max(h);
                }
                f.fields.insert("head".into(), json!(head.to_string()));
            }
            for (ty, c) in deps {
                f.conditions
                    .push(Observed::new(ty, c.ok, c.reason, c.message));
            }
            f.fields
                .insert("exchange".into(), json!(rt.plan.broker.exchange.clone()));
            f.fields.insert(
                "endpoint".into(),
                json!(format!(
                    "{}/v1/namespaces/{}/streams/{}/events",
                    ctx.settings.endpoint_base.trim_end_matches('/'),
                    key.namespace,
                    key.name
                )),
            );
        }
        Kind::Subscription => {
            f.fields.insert(
                "selector".into(),
                json!(format!("{SUBSCRIPTION_LABEL}={}", key.name)),
            );
            if let Some(plan) = synced.built.topology.subscriptions.get(key)
                && ctx.stores.stream_deleting(&plan.stream)
            {
                f.not_ready = Some((
                    REASON_STREAM_DELETED.into(),
                    format!("EventStream {} is being deleted", plan.stream),
                ));
            }
            match ctx.subscriptions.get(key) {
                Some((runner, plan)) => {
                    f.fields
                        .insert("queue".into(), json!(runner.names.queue.clone()));
                    f.fields.insert(
                        "deadLetterQueue".into(),
                        json!(runner.names.dead_letter_queue.clone()),
                    );
                    f.fields.insert("consumers".into(), json!(plan.consumers));
                    // Sampled from the broker's queue counts: the same for every replica.
                    let backlog = runner.state.backlog.load(Ordering::Acquire);
                    if backlog >= 0 {
                        f.fields.insert("backlog".into(), json!(backlog));
                    }
                    let position = runner.state.position.load(Ordering::Acquire);
                    if position > 0 {
                        f.fields
                            .insert("position".into(), json!(position.to_string()));
                    }
                    let caught_up = runner.state.caught_up.load(Ordering::Acquire);
                    f.conditions.push(Observed::info(
                        "CaughtUp",
                        caught_up,
                        if caught_up { "CaughtUp" } else { "Replaying" },
                        "",
                    ));
                    if let Some((ok, message)) = runner.state.sink() {
                        f.conditions.push(Observed::info(
                            "SinkReachable",
                            ok,
                            if ok { "Delivered" } else { "SinkUnreachable" },
                            message,
                        ));
                    }
                    if f.not_ready.is_none() {
                        if let Some((reason, e)) = runner.state.failure() {
                            f.not_ready = Some((reason.into(), e));
                        } else if let Some(e) = runner.state.error() {
                            f.not_ready = Some(("NotRunning".into(), e));
                        }
                    }
                }
                None => {
                    if let Some(plan) = synced.built.topology.subscriptions.get(key) {
                        f.fields.insert("consumers".into(), json!(plan.consumers));
                        if f.not_ready.is_none() {
                            let why = ctx
                                .subscriptions
                                .problem(key)
                                .unwrap_or_else(|| "not started yet".to_string());
                            f.not_ready = Some(("NotRunning".into(), why));
                        }
                    }
                }
            }
        }
        Kind::ArchivePolicy => {
            // Totals come from the segments table, the same on every replica.
            let (fields, error) = ctx.archives.policy_status(key);
            for (k, v) in fields {
                f.fields.insert(k, v);
            }
            if let Some(e) = error
                && f.not_ready.is_none()
            {
                f.not_ready = Some(("ArchiveFailed".into(), e));
            }
        }
        Kind::CachePolicy => {
            if let Some(cache) = ctx.engine.caches.policy(key) {
                // Sampled on this replica: each replica has its own cache.
                if let Some(ratio) = cache.hit_ratio() {
                    f.fields
                        .insert("hitRatio".into(), json!(format!("{ratio:.2}")));
                }
            }
        }
    }
    f
}
