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

use crate::api::common::READY;
use crate::api::{
    ArchivePolicy, ArchivePolicyStatus, CachePolicy, CachePolicyStatus, EventStream,
    EventStreamStatus, Subscription, SubscriptionStatus,
};
use crate::control::context::{Context, Deleting, LastSync, SyncStamp};
use crate::control::refs::refs_of;
use crate::control::status_body;
use crate::control::status_writer::StatusUpdate;
use crate::control::{ControlError, FINALIZER};
use crate::data::conditions::ConditionType;
use crate::data::plane::{ApplyReport, Desired, Fields, ResourceStatus};
use crate::poison::MutexExt;
use crate::topology::{Key, Kind, Reason};

/// Longest wait between retries of a failing resource.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How soon a valid resource that is not Ready yet is looked at again at first (later, half the
/// time it has been so, up to the refresh interval): streams and consumers usually start
/// within a second or two, and the look costs no build.
const SETTLING_RECHECK: Duration = Duration::from_secs(2);

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
    /// The kind's status struct.
    type Status: Serialize + PartialEq + Clone + Send + Sync;
    /// The conditions currently in `status`.
    fn conditions(&self) -> Vec<Condition>;
    /// Whether the written status is `desired` as far as Weir writes it: conditions other
    /// controllers set are theirs (server-side apply keeps them), and the order of the
    /// conditions is the API server's merge order, not a difference.
    fn status_is(&self, desired: &Self::Status) -> bool;
    /// The status to write for what the data plane observes.
    fn desired_status(rs: &ResourceStatus, conditions: Vec<Condition>) -> Self::Status;
}

macro_rules! weir_resource {
    ($t:ty, $status:ty, $kind:expr, $fin:expr, $build:path) => {
        impl WeirResource for $t {
            const KIND: Kind = $kind;
            const FINALIZED: bool = $fin;
            type Status = $status;
            fn conditions(&self) -> Vec<Condition> {
                self.status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default()
            }
            fn status_is(&self, desired: &$status) -> bool {
                let weirs = |s: &$status| {
                    let mut s = s.clone();
                    if let Some(c) = s.conditions.as_mut() {
                        c.retain(|c| ConditionType::is_weir(&c.type_));
                        c.sort_by(|a, b| a.type_.cmp(&b.type_));
                    }
                    s
                };
                self.status
                    .as_ref()
                    .is_some_and(|s| weirs(s) == weirs(desired))
            }
            fn desired_status(rs: &ResourceStatus, conditions: Vec<Condition>) -> $status {
                $build(rs, conditions)
            }
        }
    };
}
weir_resource!(
    EventStream,
    EventStreamStatus,
    Kind::EventStream,
    true,
    status_body::event_stream
);
weir_resource!(
    Subscription,
    SubscriptionStatus,
    Kind::Subscription,
    true,
    status_body::subscription
);
weir_resource!(
    ArchivePolicy,
    ArchivePolicyStatus,
    Kind::ArchivePolicy,
    false,
    status_body::archive_policy
);
weir_resource!(
    CachePolicy,
    CachePolicyStatus,
    Kind::CachePolicy,
    false,
    status_body::cache_policy
);

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

/// Builds the topology from the caches (Secrets and ConfigMaps re-read when older than the
/// refresh interval) and moves the data plane to it. With `cleaning` (only the Lease holder,
/// from a finalizer), that object leaves the topology and streams and subscriptions that left
/// it have their queues and data removed when their deletionPolicy says `Delete`.
pub async fn sync(
    ctx: &Context,
    cleaning: Option<(Kind, &Key)>,
) -> Result<ApplyReport, ControlError> {
    let prune = cleaning.is_some();
    tracing::debug!(prune, "sync: waiting for the caches");
    ctx.stores
        .wait_until_ready(ctx.settings.cache_sync_timeout)
        .await?;
    // The index is read and applied under one lock, so that an older snapshot of the caches
    // is never applied after a newer one.
    let _guard = ctx.apply_lock.lock().await;
    let cleaned = {
        let mut cleaned = ctx.cleaned.locked();
        // Forget the objects that have left the caches (their deletion completed).
        let deleting = ctx.stores.deleting_uids();
        cleaned.retain(|uid| deleting.contains(uid));
        cleaned.clone()
    };
    let leader = ctx.is_leader();
    // Before the index: an object changing in between makes the stamp older than what is
    // applied (the next sync builds again), never newer.
    let objects = ctx.stores.fingerprint();
    let last = ctx.last_sync.locked().clone();
    if cleaning.is_none()
        && let Some(last) = last
        && last.stamp.objects == objects
        && last.stamp.leader == leader
        && last.stamp.cleaned == cleaned
    {
        // The same objects reference the same Secrets and ConfigMaps: read those that are
        // due, and if none changed, the running topology is what a build would give.
        ctx.refs
            .refresh(&ctx.client, &last.refs, ctx.settings.refresh)
            .await?;
        if ctx.refs.version() == last.stamp.refs {
            ctx.syncs.with_label_values(&["unchanged"]).inc();
            return Ok(last.report);
        }
    }
    let metrics = &ctx.plane.engine.metrics;
    let started = std::time::Instant::now();
    let (mut index, refs) = ctx.stores.index(&Deleting {
        cleaning,
        leader,
        cleaned: &cleaned,
    });
    // The Secret reads of `refresh` are network waits, not the index's cost: left out.
    let indexing = started.elapsed();
    ctx.refs
        .refresh(&ctx.client, &refs, ctx.settings.refresh)
        .await?;
    // Before the cached copies are read: a change landing in between makes the stamp older
    // than what is applied, never newer.
    let stamp = SyncStamp {
        objects,
        refs: ctx.refs.version(),
        leader,
        cleaned: cleaned.clone(),
    };
    let started = std::time::Instant::now();
    let (secrets, config_maps) = ctx.refs.resolved(&refs);
    index.secrets = secrets;
    index.config_maps = config_maps;
    metrics.observe_sync("index", indexing + started.elapsed());
    let started = std::time::Instant::now();
    let built = {
        let mut builder = ctx.builder.locked();
        let built = builder.build(&index);
        metrics.count_plans(builder.last);
        built
    };
    metrics.observe_sync("build", started.elapsed());
    let started = std::time::Instant::now();
    let desired = Desired {
        built,
        broken: BTreeSet::new(),
        deleting_streams: ctx.stores.deleting_streams(),
        source_problems: Vec::new(),
    };
    let report = ctx.plane.apply(desired, prune).await;
    metrics.observe_sync("apply", started.elapsed());
    ctx.syncs.with_label_values(&["applied"]).inc();
    // Here rather than on every sync: objects leave the caches only through a change, and a
    // change is what makes a sync build.
    ctx.forget_departed();
    // Only a clean apply may stand in for the next one: a failed stream or subscription
    // start is retried by applying again.
    *ctx.last_sync.locked() =
        (report.stream_errors.is_empty() && report.errors.is_empty()).then(|| LastSync {
            stamp,
            refs,
            report: report.clone(),
        });
    Ok(report)
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
        ctx.succeeded(K::KIND, &key);
    }
    result
}

/// Retries transient failures with exponential backoff (2 s, 4 s, ... up to 5 min), and
/// records a Warning Event whose reason is the error's category.
pub fn error_policy<K: WeirResource>(obj: Arc<K>, err: &ControlError, ctx: Arc<Context>) -> Action {
    let Ok(key) = key_of(obj.as_ref()) else {
        return Action::await_change();
    };
    let n = ctx.failed(K::KIND, &key);
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
    let spec = serde_json::to_value(obj.as_ref())?;
    let own = refs_of(&key.namespace, &spec["spec"]);
    ctx.refs.refresh(&ctx.client, &own, Duration::ZERO).await?;
    let applied = sync(ctx, None).await?;
    let (Some(report), Some(mut observed)) = (
        ctx.plane.report(K::KIND, &key),
        ctx.plane.observe(K::KIND, &key),
    ) else {
        // Not in the cache yet (a reconcile racing the watch): the watch event follows.
        return Ok(Action::requeue(ctx.settings.refresh));
    };
    if let Fields::Subscription(f) = &mut observed.fields {
        // Every worker Pod runs every subscription's consumers: `/scale` selects them all.
        f.selector = Some(ctx.settings.pod_selector.clone());
    }
    // Only the holder writes status, so only the holder needs to look again soon.
    let settling = if ctx.is_leader() {
        !write_status(obj.as_ref(), &key, &observed, ctx).await?
    } else {
        false
    };
    if let Some(message) = applied.stream_errors.get(&key) {
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
    let settling_for = {
        let mut since = ctx.settling.locked();
        if settling {
            let first = *since
                .entry((K::KIND, key.clone()))
                .or_insert_with(std::time::Instant::now);
            Some(first.elapsed())
        } else {
            since.remove(&(K::KIND, key.clone()));
            None
        }
    };
    if let Some(d) = settling_for {
        // Valid but not Ready yet (a stream connecting, a consumer starting): nothing else
        // wakes this reconcile when the data plane gets there, so look again soon rather than
        // a refresh interval later, less often the longer it lasts (a broker down for long).
        // Cheap: the sync finds the topology unchanged.
        let delay = SETTLING_RECHECK.max(d / 2).min(ctx.settings.refresh);
        return Ok(Action::requeue(delay));
    }
    Ok(Action::requeue(ctx.settings.refresh))
}

/// Queues the object's new status when it differs from the written one, and records an Event
/// when `Ready` changes. Answers whether the object is `Ready=True`.
async fn write_status<K: WeirResource>(
    obj: &K,
    key: &Key,
    observed: &ResourceStatus,
    ctx: &Context,
) -> Result<bool, ControlError> {
    let previous = obj.conditions();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let conditions = status_body::conditions(observed, &previous, &now);
    let desired = K::desired_status(observed, conditions.clone());
    if !obj.status_is(&desired) {
        ctx.status.push(StatusUpdate {
            kind: K::KIND,
            key: key.clone(),
            body: status_body::apply_body(K::KIND, &key.name, &serde_json::to_value(&desired)?),
        });
    }
    let Some(ready) = conditions.iter().find(|c| c.type_ == READY) else {
        return Ok(true);
    };
    let before = previous.iter().find(|c| c.type_ == READY);
    if before.is_none_or(|b| b.status != ready.status || b.reason != ready.reason) {
        let (type_, note) = if ready.status == "True" {
            (EventType::Normal, format!("{} {} is ready", K::KIND, key))
        } else {
            (EventType::Warning, ready.message.clone())
        };
        publish(
            ctx,
            obj,
            type_,
            &ready.reason,
            "Reconcile",
            truncate(&note, 1000),
        )
        .await;
    }
    Ok(ready.status == "True")
}

async fn cleanup<K: WeirResource>(obj: Arc<K>, ctx: &Context) -> Result<Action, ControlError> {
    let key = key_of(obj.as_ref())?;
    ctx.settling.locked().remove(&(K::KIND, key.clone()));
    if K::KIND == Kind::EventStream {
        let subs = ctx.stores.subscriptions_of(&key);
        if !subs.is_empty() {
            // The stream keeps running under its subscriptions (they report StreamDeleted);
            // the error keeps the finalizer and retries until they are gone.
            return Err(ControlError::StreamInUse(key.to_string(), subs.join(", ")));
        }
    }
    // Marked cleaned before the sync: a sync of another reconcile that runs after this one
    // (before the finalizer's removal reaches the cache) must not start the object again.
    let uid = obj.meta().uid.clone();
    if let Some(uid) = &uid {
        ctx.cleaned.locked().insert(uid.clone());
    }
    let unmark = || {
        if let Some(uid) = &uid {
            ctx.cleaned.locked().remove(uid);
        }
    };
    let applied = match sync(ctx, Some((K::KIND, &key))).await {
        Ok(applied) => applied,
        Err(e) => {
            // Retried: until then it runs again, so the retry's sync finds it to prune.
            unmark();
            return Err(e);
        }
    };
    if let Some(message) = applied.stream_errors.get(&key) {
        unmark();
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
