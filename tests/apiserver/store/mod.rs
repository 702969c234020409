//! The object store: objects by resource, the global `resourceVersion` counter, the event
//! log watches replay from, and the write semantics (generation, subresources, finalizers,
//! managed fields, conflicts).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use tokio::sync::broadcast;

mod finish;
mod managed;
mod selectors;
mod write;

pub use selectors::Selectors;

use super::field::{self, ErrorType, FieldError, NameRule};
use super::registry::{Registry, ResourceType};
use super::{Call, schema};

/// `Kind.group` (or `Kind` for the core group), as errors name a kind.
fn group_kind(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        rt.kind.clone()
    } else {
        format!("{}.{}", rt.kind, rt.group)
    }
}

/// How many watch events are kept for watches resuming from an older `resourceVersion`.
/// A real server keeps a few minutes of history (etcd compaction); watches from before the
/// oldest kept event get `410 Gone`. Tests force that with `TestApiServer::compact`.
const LOG_CAPACITY: usize = 10_000;

/// Capacity of the live-event channel: a watcher that falls this far behind is disconnected
/// (the real server also drops slow watchers) and its client re-lists.
pub const BROADCAST_CAPACITY: usize = 4096;

/// An error answered as a `meta.k8s.io/v1 Status`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    fn with_details(mut self, rt: &ResourceType, name: &str) -> Self {
        self.details = json!({"name": name, "group": rt.group, "kind": rt.plural});
        self
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", rt.qualified()),
        )
        .with_details(rt, name)
    }

    pub fn conflict(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                rt.qualified()
            ),
        )
        .with_details(rt, name)
    }

    /// A 422 `Invalid` from `field: Type: ...` texts (see [`ApiError::invalid_fields`]).
    pub fn invalid(rt: &ResourceType, name: &str, causes: &[String]) -> Self {
        let errors: Vec<FieldError> = causes
            .iter()
            .map(|c| {
                let (field, body) = c.split_once(": ").unwrap_or(("", c.as_str()));
                let type_ = if body.starts_with("Required value") {
                    ErrorType::Required
                } else {
                    ErrorType::Invalid
                };
                // The text is already formatted: keep it whole as the detail.
                let mut e = FieldError::new(type_, field, Value::Null, "");
                e.detail = body.to_string();
                e
            })
            .collect();
        let mut err = Self::invalid_fields(rt, name, &errors);
        // The causes' messages are the given texts, not re-rendered.
        if let Some(list) = err.details["causes"].as_array_mut() {
            for (cause, e) in list.iter_mut().zip(&errors) {
                cause["message"] = json!(e.detail);
            }
        }
        let texts: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.detail))
            .collect();
        err.message = format!(
            "{} \"{name}\" is invalid: {}",
            group_kind(rt),
            if texts.len() == 1 {
                texts[0].clone()
            } else {
                format!("[{}]", texts.join(", "))
            }
        );
        err
    }

    /// A 422 `Invalid` as the real server answers it: `Kind.group "name" is invalid: ...`
    /// with `details.kind` the kind and one cause per field error.
    pub fn invalid_fields(rt: &ResourceType, name: &str, errors: &[FieldError]) -> Self {
        let mut err = Self::new(
            422,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: {}",
                group_kind(rt),
                field::aggregate(errors)
            ),
        );
        let mut details = json!({
            "name": name,
            "kind": rt.kind,
            "causes": errors.iter().map(FieldError::cause).collect::<Vec<_>>(),
        });
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        err.details = details;
        err
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The `Status` body.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !self.details.is_null() {
            s["details"] = self.details.clone();
        }
        s
    }
}

pub type Result<T> = std::result::Result<T, ApiError>;

/// The start of a watch: the events to send first, the live events after them, and the
/// resourceVersion the first ones bring the client to.
pub type WatchStart = (
    Vec<(&'static str, Value, Option<Value>)>,
    broadcast::Receiver<Arc<WatchEvent>>,
    u64,
);

/// One change, as watches see it.
#[derive(Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub key: (String, String),
    pub namespace: String,
    pub type_: &'static str,
    pub object: Value,
    /// The object before the change (for MODIFIED and DELETED), so a watch with a selector
    /// can tell an object that starts or stops matching.
    pub old: Option<Value>,
}

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    Main,
    Status,
    Scale,
}

impl Sub {
    fn name(self) -> Option<&'static str> {
        match self {
            Sub::Main => None,
            Sub::Status => Some("status"),
            Sub::Scale => Some("scale"),
        }
    }
}

/// A patch body by content type.
pub enum Patch {
    /// `application/json-patch+json`.
    Json(Value),
    /// `application/merge-patch+json`, and `application/strategic-merge-patch+json` treated
    /// as a merge patch (exact for custom resources, which do not support strategic merge;
    /// for built-in kinds list merge keys are ignored, which Weir's kinds do not need).
    Merge(Value),
    /// `application/apply-patch+yaml`: server-side apply, a merge (`listType: map` lists item
    /// by item, by key) plus removal of the fields and items the same manager applied before
    /// and no longer applies, with 409 conflicts when it changes a field another manager
    /// owns (unless `force=true`). Other lists are owned as a whole.
    Apply(Value),
}

/// Per-request write options.
pub struct WriteCtx {
    pub manager: String,
    pub dry_run: bool,
    /// `fieldValidation=Strict`: unknown fields are an error instead of being pruned.
    pub strict: bool,
    /// `force=true` on an apply patch: take fields other managers own instead of a 409.
    pub force: bool,
}

/// The current time as the API server writes it.
pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The content that decides a `generation` bump: everything but metadata (and status
/// when it is a subresource).
fn spec_part(rt: &ResourceType, object: &Value) -> Value {
    let mut v = object.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("metadata");
        map.remove("apiVersion");
        map.remove("kind");
        if rt.status_subresource {
            map.remove("status");
        }
    }
    v
}

/// The object without what a no-op write may change (resourceVersion, managed-field times).
fn comparable(object: &Value) -> Value {
    let mut v = object.clone();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        if let Some(Value::Array(mf)) = meta.get_mut("managedFields") {
            for e in mf {
                if let Some(e) = e.as_object_mut() {
                    e.remove("time");
                }
            }
        }
    }
    v
}

/// Reads a `.a.b.c` path.
pub fn get_path<'a>(object: &'a Value, path: &str) -> &'a Value {
    let mut v = object;
    for part in path.trim_start_matches('.').split('.') {
        v = &v[part];
    }
    v
}

/// Writes a `.a.b.c` path, creating objects on the way.
pub fn set_path(object: &mut Value, path: &str, value: Value) {
    let parts: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    let mut v = object;
    for part in &parts[..parts.len().saturating_sub(1)] {
        if !v[*part].is_object() {
            v[*part] = json!({});
        }
        v = &mut v[*part];
    }
    if let Some(last) = parts.last() {
        v[*last] = value;
    }
}

/// The whole server state, behind one mutex (every operation is short and never awaits).
pub struct Store {
    pub registry: Registry,
    rv: u64,
    objects: HashMap<(String, String), BTreeMap<(String, String), Value>>,
    log: VecDeque<Arc<WatchEvent>>,
    /// Every event with `rv <= compacted` has left the log.
    compacted: u64,
    pub tx: broadcast::Sender<Arc<WatchEvent>>,
    /// Bumped to end every open watch (clients then resume from their last version).
    pub kick: tokio::sync::watch::Sender<u64>,
    pub calls: Vec<Call>,
}

impl Store {
    /// A store holding the `default`, `kube-system` and `kube-public` namespaces, as a new
    /// cluster does.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let mut store = Self {
            registry: Registry::builtins(),
            rv: 0,
            objects: HashMap::new(),
            log: VecDeque::new(),
            compacted: 0,
            tx,
            kick: tokio::sync::watch::channel(0).0,
            calls: Vec::new(),
        };
        let ctx = WriteCtx {
            manager: "kube-apiserver".into(),
            dry_run: false,
            strict: false,
            force: false,
        };
        for ns in ["default", "kube-system", "kube-public"] {
            let rt = store.namespaces();
            // Creating a fixed, valid namespace in an empty store cannot fail.
            let _ = store.create(&rt, "", json!({"metadata": {"name": ns}}), &ctx);
        }
        store
    }

    fn namespaces(&self) -> ResourceType {
        // The namespaces type is a built-in that is never unregistered.
        self.registry
            .find("", "v1", "namespaces")
            .cloned()
            .expect("built-in namespaces type")
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Forgets the event log and moves the version on (as writes to other resources do on
    /// a real cluster), so every watch resuming from a version handed out so far gets 410.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.log.clear();
        self.compacted = self.rv;
    }

    fn bucket(&self, rt: &ResourceType) -> Option<&BTreeMap<(String, String), Value>> {
        self.objects.get(&rt.key())
    }

    /// The object with the `apiVersion` and `kind` of the type it is served as.
    pub fn with_type_meta(rt: &ResourceType, mut object: Value) -> Value {
        object["apiVersion"] = json!(rt.api_version());
        object["kind"] = json!(rt.kind);
        object
    }

    fn commit(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        mut object: Value,
        type_: &'static str,
    ) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let bucket = self.objects.entry(rt.key()).or_default();
        let key = (ns.to_string(), name.to_string());
        let old = if type_ == "DELETED" {
            bucket.remove(&key)
        } else {
            bucket.insert(key, object.clone())
        };
        let event = Arc::new(WatchEvent {
            rv: self.rv,
            key: rt.key(),
            namespace: ns.to_string(),
            type_,
            object: object.clone(),
            old,
        });
        self.log.push_back(event.clone());
        while self.log.len() > LOG_CAPACITY {
            if let Some(old) = self.log.pop_front() {
                self.compacted = old.rv;
            }
        }
        // No receivers is normal (nobody watching).
        let _ = self.tx.send(event);
        object
    }

    /// `get`.
    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Value> {
        self.bucket(rt)
            .and_then(|b| b.get(&(ns.to_string(), name.to_string())))
            .map(|o| Self::with_type_meta(rt, o.clone()))
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// `list`: the matching objects (all namespaces when `ns` is `None`) and the list's
    /// resourceVersion.
    pub fn list(&self, rt: &ResourceType, ns: Option<&str>, sel: &Selectors) -> (Vec<Value>, u64) {
        let items = self
            .bucket(rt)
            .map(|b| {
                b.iter()
                    .filter(|((ons, _), _)| ns.is_none_or(|n| n == ons))
                    .map(|(_, o)| Self::with_type_meta(rt, o.clone()))
                    .filter(|o| sel.matches(o))
                    .collect()
            })
            .unwrap_or_default();
        (items, self.rv)
    }

    /// The events a watch from `from` must replay (and a receiver for what follows), or
    /// 410 when they have been compacted away. `from = None` means "current state as
    /// ADDED events", which is what a watch without resourceVersion (or with "0") gets.
    pub fn watch_start(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        from: Option<u64>,
    ) -> Result<WatchStart> {
        let rx = self.tx.subscribe();
        let in_scope = |e: &WatchEvent| e.key == rt.key() && ns.is_none_or(|n| n == e.namespace);
        match from {
            None => {
                let (items, rv) = self.list(rt, ns, &Selectors::default());
                Ok((
                    items.into_iter().map(|o| ("ADDED", o, None)).collect(),
                    rx,
                    rv,
                ))
            }
            Some(from) if from < self.compacted => Err(ApiError::gone(format!(
                "too old resource version: {from} ({})",
                self.compacted + 1
            ))),
            Some(from) if from > self.rv => Err(ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {from}, current: {}", self.rv),
            )),
            Some(from) => {
                let replay = self
                    .log
                    .iter()
                    .filter(|e| e.rv > from && in_scope(e))
                    .map(|e| {
                        (
                            e.type_,
                            Self::with_type_meta(rt, e.object.clone()),
                            e.old.clone().map(|o| Self::with_type_meta(rt, o)),
                        )
                    })
                    .collect();
                Ok((replay, rx, self.rv))
            }
        }
    }
}
