//! The object store: objects by resource, the global `resourceVersion` counter, the event
//! log watches replay from, and the write semantics (generation, subresources, finalizers,
//! managed fields, conflicts).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

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

/// Label and field selectors of a list or watch.
#[derive(Default, Clone, Debug)]
pub struct Selectors {
    labels: Vec<LabelReq>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Clone, Debug)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn set_of(s: &str) -> Vec<String> {
    s.trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(|v| v.trim().to_string())
        .collect()
}

impl Selectors {
    /// Parses `labelSelector` and `fieldSelector` query values.
    pub fn parse(label: Option<&str>, field: Option<&str>) -> Result<Self> {
        let mut sel = Self::default();
        for req in split_top(label.unwrap_or_default()) {
            let parsed = if let Some((k, v)) = req.split_once("!=") {
                LabelReq::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = req.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = req.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = req.split_once(" notin ") {
                LabelReq::NotIn(k.trim().into(), set_of(v))
            } else if let Some((k, v)) = req.split_once(" in ") {
                LabelReq::In(k.trim().into(), set_of(v))
            } else if let Some(k) = req.strip_prefix('!') {
                LabelReq::NotExists(k.trim().into())
            } else if req
                .chars()
                .all(|c| c.is_alphanumeric() || "-_./".contains(c))
            {
                LabelReq::Exists(req)
            } else {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {req}"
                )));
            };
            sel.labels.push(parsed);
        }
        for req in split_top(field.unwrap_or_default()) {
            let (k, neg, v) = if let Some((k, v)) = req.split_once("!=") {
                (k, true, v)
            } else if let Some((k, v)) = req.split_once("==") {
                (k, false, v)
            } else if let Some((k, v)) = req.split_once('=') {
                (k, false, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {req}"
                )));
            };
            sel.fields.push((k.trim().into(), neg, v.trim().into()));
        }
        Ok(sel)
    }

    /// Whether `object` matches. Field selectors compare any dotted path as a string,
    /// a superset of the fields a real server allows per kind.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, neg, want)| {
                let mut v = object;
                for part in path.split('.') {
                    v = &v[part];
                }
                let got = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (got == *want) != *neg
            })
    }
}

/// The current time as the API server writes it.
pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Whether `schema` declares a list whose items merge by key (`x-kubernetes-list-type: map`).
fn is_map_list(schema: Option<&Value>) -> bool {
    schema.is_some_and(|s| {
        s["x-kubernetes-list-type"].as_str() == Some("map")
            && s["x-kubernetes-list-map-keys"].is_array()
    })
}

/// The `k:{...}` field-set key of a map-list item.
fn item_key(item: &Value, schema: &Value) -> Option<String> {
    schema::map_key(item, schema).map(|k| format!("k:{k}"))
}

/// `metadata.managedFields`-style field set of an applied or written body. With the
/// object's schema, items of `x-kubernetes-list-type: map` lists are owned one by one
/// (`k:{"type":"Ready"}` with `.` for the item itself); other lists are owned whole.
fn fields_of(value: &Value, root: bool, schema: Option<&Value>) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                if root && (k == "apiVersion" || k == "kind") {
                    continue;
                }
                if root && k == "metadata" {
                    let mut meta = Map::new();
                    for mk in ["labels", "annotations", "finalizers", "ownerReferences"] {
                        if let Some(mv) = v.get(mk) {
                            meta.insert(format!("f:{mk}"), fields_of(mv, false, None));
                        }
                    }
                    if !meta.is_empty() {
                        out.insert("f:metadata".into(), Value::Object(meta));
                    }
                    continue;
                }
                // A Secret's stringData is stored (and owned) as data.
                let name = if root && k == "stringData" {
                    "data"
                } else {
                    k.as_str()
                };
                let child = schema.and_then(|s| schema::property_schema(s, k));
                out.insert(format!("f:{name}"), fields_of(v, false, child));
            }
            Value::Object(out)
        }
        Value::Array(items) if is_map_list(schema) => {
            let Some(schema) = schema else {
                return json!({});
            };
            let item_schema = schema.get("items");
            let mut out = Map::new();
            for item in items {
                let Some(key) = item_key(item, schema) else {
                    continue;
                };
                let mut fields = match fields_of(item, false, item_schema) {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                fields.insert(".".into(), json!({}));
                out.insert(key, Value::Object(fields));
            }
            Value::Object(out)
        }
        // Other lists and scalars are owned as a whole.
        _ => json!({}),
    }
}

/// The paths (field-set keys: `f:name`, `k:{...}`, `.`) of the leaves of a field set.
fn leaf_paths(fields: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match fields.as_object() {
        Some(map) if !map.is_empty() => {
            for (k, v) in map {
                prefix.push(k.clone());
                leaf_paths(v, prefix, out);
                prefix.pop();
            }
        }
        _ => out.push(prefix.clone()),
    }
}

fn has_path(fields: &Value, path: &[String]) -> bool {
    let mut v = fields;
    for p in path {
        match v.get(p) {
            Some(next) => v = next,
            None => return false,
        }
    }
    true
}

/// Whether a field set has `path` as a member (a leaf), not only as the parent of what
/// it owns (a manager owning some items of a list does not own the list).
fn owns(fields: &Value, path: &[String]) -> bool {
    let mut v = fields;
    for p in path {
        match v.get(p) {
            Some(next) => v = next,
            None => return false,
        }
    }
    v.as_object().is_none_or(|m| m.is_empty())
}

/// Whether a `k:{...}` key names `item`.
fn key_matches(seg: &str, item: &Value) -> bool {
    let Some(key) = seg
        .strip_prefix("k:")
        .and_then(|k| serde_json::from_str::<Value>(k).ok())
    else {
        return false;
    };
    key.as_object()
        .is_some_and(|m| m.iter().all(|(k, v)| item.get(k) == Some(v)))
}

/// One step of a field path into a value.
fn step<'a>(v: &'a Value, seg: &str) -> Option<&'a Value> {
    if seg == "." {
        return Some(v);
    }
    if let Some(name) = seg.strip_prefix("f:") {
        return v.get(name);
    }
    v.as_array()?.iter().find(|item| key_matches(seg, item))
}

fn step_mut<'a>(v: &'a mut Value, seg: &str) -> Option<&'a mut Value> {
    if seg == "." {
        return Some(v);
    }
    if let Some(name) = seg.strip_prefix("f:") {
        return v.get_mut(name);
    }
    v.as_array_mut()?
        .iter_mut()
        .find(|item| key_matches(seg, item))
}

/// Removes the value at a field path (a `.` path removes the list item).
fn remove_path(object: &mut Value, path: &[String]) {
    let path = match path.split_last() {
        Some((last, rest)) if last == "." => rest,
        _ => path,
    };
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut v = object;
    for p in parents {
        match step_mut(v, p) {
            Some(next) => v = next,
            None => return,
        }
    }
    if let Some(name) = last.strip_prefix("f:") {
        if let Some(map) = v.as_object_mut() {
            map.remove(name);
        }
    } else if let Some(list) = v.as_array_mut() {
        list.retain(|item| !key_matches(last, item));
    }
}

/// The value at a field path, if present.
fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = object;
    for p in path {
        v = step(v, p)?;
    }
    Some(v)
}

/// Whether a write changed what a field path owns: a value, or (`.`) an item's presence.
fn differs(old: &Value, new: &Value, path: &[String]) -> bool {
    if path.last().is_some_and(|l| l == ".") {
        value_at(old, path).is_some() != value_at(new, path).is_some()
    } else {
        value_at(old, path) != value_at(new, path)
    }
}

/// A field path as conflict messages print it: `.status.conditions[type="Ready"].message`.
fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if let Some(name) = seg.strip_prefix("f:") {
            out.push('.');
            out.push_str(name);
        } else if let Some(key) = seg
            .strip_prefix("k:")
            .and_then(|k| serde_json::from_str::<Value>(k).ok())
            .and_then(|k| k.as_object().cloned())
        {
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        }
    }
    out
}

/// Removes a path from a `fieldsV1` set, and the parents it leaves empty.
fn remove_field(fields: &mut Value, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let Some(map) = fields.as_object_mut() else {
        return false;
    };
    if rest.is_empty() {
        return map.remove(first).is_some();
    }
    let Some(child) = map.get_mut(first) else {
        return false;
    };
    let removed = remove_field(child, rest);
    if child.as_object().is_some_and(|c| c.is_empty()) {
        map.remove(first);
    }
    removed
}

/// Keeps the fields of a set that exist (non-null) in `object`.
fn retain_present(fields: &mut Value, object: &Value) {
    let Some(map) = fields.as_object_mut() else {
        return;
    };
    map.retain(|k, child| {
        if k == "." {
            return true;
        }
        match step(object, k) {
            None | Some(Value::Null) => false,
            Some(v) => {
                if (v.is_object() || v.is_array())
                    && child.as_object().is_some_and(|c| !c.is_empty())
                {
                    retain_present(child, v);
                    child.as_object().is_some_and(|c| !c.is_empty())
                } else {
                    true
                }
            }
        }
    });
}

/// Server-side apply conflicts: fields the apply changes that another manager owns.
fn apply_conflicts(
    managers: &[Value],
    manager: &str,
    fields: &Value,
    base: &Value,
    patched: &Value,
) -> Vec<String> {
    let mut leaves = Vec::new();
    leaf_paths(fields, &mut Vec::new(), &mut leaves);
    let mut conflicts = Vec::new();
    for path in leaves {
        if !differs(base, patched, &path) {
            continue;
        }
        for other in managers.iter().filter(|e| e["manager"] != manager) {
            if owns(&other["fieldsV1"], &path) {
                conflicts.push(format!(
                    "conflict with \"{}\": {}",
                    other["manager"].as_str().unwrap_or_default(),
                    display_path(&path)
                ));
            }
        }
    }
    conflicts
}

/// A write takes the fields it changes from every other manager (managers left with no
/// fields are dropped), as the real server's field management does.
fn transfer_ownership(new: &mut Value, old: &Value, fields: &Value, manager: &str) {
    let mut leaves = Vec::new();
    leaf_paths(fields, &mut Vec::new(), &mut leaves);
    let changed: Vec<Vec<String>> = leaves
        .into_iter()
        .filter(|p| differs(old, new, p))
        .collect();
    let Some(list) = new["metadata"]["managedFields"].as_array_mut() else {
        return;
    };
    for entry in list.iter_mut().filter(|e| e["manager"] != manager) {
        for path in &changed {
            if owns(&entry["fieldsV1"], path) {
                remove_field(&mut entry["fieldsV1"], path);
            }
        }
    }
    list.retain(|e| {
        e["manager"] == manager || e["fieldsV1"].as_object().is_some_and(|f| !f.is_empty())
    });
}

/// The part of a field set whose values differ between `old` and `new`.
fn changed_fields(fields: &Value, old: &Value, new: &Value) -> Value {
    let mut leaves = Vec::new();
    leaf_paths(fields, &mut Vec::new(), &mut leaves);
    let mut out = json!({});
    for path in leaves
        .iter()
        .filter(|p| !p.is_empty() && differs(old, new, p))
    {
        let mut v = &mut out;
        for seg in path {
            if !v.is_object() {
                *v = json!({});
            }
            let Some(map) = v.as_object_mut() else { break };
            v = map.entry(seg.clone()).or_insert_with(|| json!({}));
        }
    }
    out
}

/// Adds the fields of `other` to `fields`.
fn union_fields(fields: &mut Value, other: &Value) {
    let (Some(into), Some(from)) = (fields.as_object_mut(), other.as_object()) else {
        return;
    };
    for (k, v) in from {
        match into.get_mut(k) {
            Some(existing) => union_fields(existing, v),
            None => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Server-side apply's merge of an applied body into the object: objects field by field,
/// `x-kubernetes-list-type: map` lists item by item (by key, new items appended), other
/// lists and scalars replaced; `null` removes a field.
fn apply_merge(target: &mut Value, applied: &Value, schema: Option<&Value>) {
    match applied {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let Some(map) = target.as_object_mut() else {
                return;
            };
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                    continue;
                }
                let child = schema.and_then(|s| schema::property_schema(s, k));
                apply_merge(map.entry(k.clone()).or_insert(Value::Null), v, child);
            }
        }
        Value::Array(items) if is_map_list(schema) => {
            let Some(schema) = schema else { return };
            let mut list = target.as_array().cloned().unwrap_or_default();
            for item in items {
                let key = schema::map_key(item, schema);
                match list.iter_mut().find(|l| schema::map_key(l, schema) == key) {
                    Some(existing) => apply_merge(existing, item, schema.get("items")),
                    None => list.push(item.clone()),
                }
            }
            *target = Value::Array(list);
        }
        other => *target = other.clone(),
    }
}

/// Removes `$`-directives of strategic merge patches (e.g. `$setElementOrder/...`), which a
/// merge patch would otherwise store as fields.
fn strip_directives(v: &mut Value) {
    if let Value::Object(map) = v {
        map.retain(|k, _| !k.starts_with('$'));
        for child in map.values_mut() {
            strip_directives(child);
        }
    }
}

/// Applies a JSON patch as the real server does, where a `test` for `null` of a missing
/// path succeeds (kube-runtime's finalizer helper relies on that); the patch is atomic
/// because the caller patches a copy.
fn apply_json_patch(
    doc: &mut Value,
    ops: &json_patch::Patch,
) -> std::result::Result<(), json_patch::PatchError> {
    for op in &ops.0 {
        if let json_patch::PatchOperation::Test(t) = op
            && t.value.is_null()
            && doc.pointer(t.path.as_str()).is_none()
        {
            continue;
        }
        json_patch::patch(doc, std::slice::from_ref(op))?;
    }
    Ok(())
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

    fn check_namespace(&self, rt: &ResourceType, ns: &str) -> Result<()> {
        if !rt.namespaced {
            return Ok(());
        }
        let nst = self.namespaces();
        if self.get(&nst, "", ns).is_err() {
            return Err(ApiError::not_found(&nst, ns));
        }
        Ok(())
    }

    /// Prunes and validates a custom resource about to be stored (`old`: the stored object,
    /// on updates), returning its field errors; unknown fields under
    /// `fieldValidation=Strict` are a 400, as on a real server.
    fn admit(
        &self,
        rt: &ResourceType,
        object: &mut Value,
        old: Option<&Value>,
        ctx: &WriteCtx,
    ) -> Result<Vec<FieldError>> {
        let Some(schema) = rt.schema.as_ref().filter(|_| rt.custom) else {
            return Ok(Vec::new());
        };
        let unknown = schema::prune_object(object, schema);
        if ctx.strict && !unknown.is_empty() {
            let msgs: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{}\" cannot be handled as a {kind}: strict decoding error: {}",
                rt.version,
                msgs.join(", "),
                kind = rt.kind,
            )));
        }
        Ok(schema::validate(object, old, schema))
    }

    /// The naming rule of a kind's objects.
    fn name_rule(rt: &ResourceType) -> NameRule {
        match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "namespaces") => NameRule::Label,
            ("", "services") => NameRule::Dns1035,
            _ => NameRule::Subdomain,
        }
    }

    /// The `metadata.name`/`generateName` errors of an object about to be created.
    fn name_errors(rt: &ResourceType, body: &Value, name: &str) -> Vec<FieldError> {
        let mut errs = Vec::new();
        if Self::is_crd(rt) {
            let want = format!(
                "{}.{}",
                body["spec"]["names"]["plural"].as_str().unwrap_or_default(),
                body["spec"]["group"].as_str().unwrap_or_default()
            );
            if name != want {
                errs.push(FieldError::invalid(
                    "metadata.name",
                    json!(name),
                    "must be spec.names.plural+\".\"+spec.group",
                ));
            }
            return errs;
        }
        let rule = Self::name_rule(rt);
        if let Some(prefix) = body["metadata"]["generateName"].as_str() {
            for msg in field::name_problems(rule, prefix, true) {
                errs.push(FieldError::invalid(
                    "metadata.generateName",
                    json!(prefix),
                    msg,
                ));
            }
        }
        for msg in field::name_problems(rule, name, false) {
            errs.push(FieldError::invalid("metadata.name", json!(name), msg));
        }
        errs
    }

    /// A Secret's `stringData` is merged into `data` (base64) and never stored, and its
    /// type defaults to `Opaque`, as on a real server.
    fn normalize_secret(rt: &ResourceType, object: &mut Value) {
        use base64::Engine;
        if !(rt.group.is_empty() && rt.plural == "secrets") {
            return;
        }
        if object["type"].as_str().is_none_or(str::is_empty) {
            object["type"] = json!("Opaque");
        }
        let Some(string_data) = object.as_object_mut().and_then(|m| m.remove("stringData")) else {
            return;
        };
        if !object["data"].is_object() {
            object["data"] = json!({});
        }
        if let Some(map) = string_data.as_object() {
            for (k, v) in map {
                let plain = v.as_str().unwrap_or_default();
                object["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(plain));
            }
        }
    }

    fn is_crd(rt: &ResourceType) -> bool {
        rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions"
    }

    /// A CRD is accepted and established as soon as it is stored.
    fn establish(crd: &mut Value) {
        let t = now();
        let cond = |type_: &str, reason: &str, msg: &str| json!({"type": type_, "status": "True", "reason": reason, "message": msg, "lastTransitionTime": t});
        let versions: Vec<Value> = crd["spec"]["versions"]
            .as_array()
            .map(|vs| {
                vs.iter()
                    .filter(|v| v["storage"].as_bool() == Some(true))
                    .map(|v| v["name"].clone())
                    .collect()
            })
            .unwrap_or_default();
        crd["status"] = json!({
            "acceptedNames": crd["spec"]["names"],
            "conditions": [
                cond("NamesAccepted", "NoConflicts", "no conflicts found"),
                cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            ],
            "storedVersions": versions,
        });
    }

    fn managed_entry(
        rt: &ResourceType,
        ctx: &WriteCtx,
        operation: &str,
        sub: Sub,
        fields: Value,
    ) -> Value {
        let mut e = json!({
            "manager": ctx.manager,
            "operation": operation,
            "apiVersion": rt.api_version(),
            "time": now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        });
        if let Some(s) = sub.name() {
            e["subresource"] = json!(s);
        }
        e
    }

    fn record_manager(object: &mut Value, entry: Value) {
        let same = |e: &Value| {
            e["manager"] == entry["manager"]
                && e["operation"] == entry["operation"]
                && e["subresource"] == entry["subresource"]
        };
        let mut list: Vec<Value> = object["metadata"]["managedFields"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        list.retain(|e| !same(e));
        list.push(entry);
        object["metadata"]["managedFields"] = Value::Array(list);
    }

    /// `create`.
    pub fn create(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        mut body: Value,
        ctx: &WriteCtx,
    ) -> Result<Value> {
        self.create_with(rt, ns, &mut body, ctx, "Update")?;
        Ok(body)
    }

    fn create_with(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        body: &mut Value,
        ctx: &WriteCtx,
        operation: &str,
    ) -> Result<()> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be an object",
            ));
        }
        if !body["metadata"].is_object() {
            body["metadata"] = json!({});
        }
        let fields = fields_of(body, true, rt.schema.as_ref());
        let mut name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            let Some(prefix) = body["metadata"]["generateName"].as_str() else {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    &["metadata.name: Required value: name or generateName is required".into()],
                ));
            };
            let suffix: String = (0..5)
                .map(|_| {
                    let chars = b"bcdfghjklmnpqrstvwxz2456789";
                    chars[rand::random_range(0..chars.len())] as char
                })
                .collect();
            name = format!("{prefix}{suffix}");
        }
        if rt.namespaced {
            match body["metadata"]["namespace"].as_str() {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
        }
        self.check_namespace(rt, ns)?;
        if self.get(rt, ns, &name).is_ok() {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", rt.qualified()),
            )
            .with_details(rt, &name));
        }
        // The status of a resource with a status subresource cannot be set on create.
        if rt.status_subresource
            && let Some(map) = body.as_object_mut()
        {
            map.remove("status");
        }
        let mut errors = Self::name_errors(rt, body, &name);
        errors.extend(self.admit(rt, body, None, ctx)?);
        if !errors.is_empty() {
            return Err(ApiError::invalid_fields(rt, &name, &errors));
        }
        Self::normalize_secret(rt, body);
        *body = Self::with_type_meta(rt, body.take());
        let meta = &mut body["metadata"];
        meta["name"] = json!(name);
        if rt.namespaced {
            meta["namespace"] = json!(ns);
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        meta["uid"] = json!(uuid::Uuid::now_v7().to_string());
        meta["creationTimestamp"] = json!(now());
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("resourceVersion");
            m.remove("managedFields");
            if rt.generation {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
        }
        Self::record_manager(
            body,
            Self::managed_entry(rt, ctx, operation, Sub::Main, fields),
        );
        if Self::is_crd(rt) {
            Self::establish(body);
        }
        if rt.group.is_empty() && rt.plural == "namespaces" {
            body["status"] = json!({"phase": "Active"});
            body["spec"] = json!({"finalizers": ["kubernetes"]});
        }
        if ctx.dry_run {
            return Ok(());
        }
        *body = self.commit(rt, ns, &name, body.take(), "ADDED");
        if Self::is_crd(rt) {
            self.registry.register_crd(body);
        }
        Ok(())
    }

    /// `update` (PUT) of the object or of a subresource.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: Value,
        sub: Sub,
        ctx: &WriteCtx,
    ) -> Result<Value> {
        let old = self.get(rt, ns, name)?;
        let (body, fields) = if sub == Sub::Scale {
            let fields = fields_of(&body, false, None);
            (self.object_with_scale(rt, &old, &body)?, fields)
        } else {
            let fields = fields_of(&body, true, rt.schema.as_ref());
            (body, fields)
        };
        match body["metadata"]["resourceVersion"].as_str() {
            None | Some("") if rt.custom => {
                return Err(ApiError::invalid(rt, name, &[
                    "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update".into(),
                ]));
            }
            None | Some("") => {}
            Some(rv)
                if rv
                    != old["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default() =>
            {
                return Err(ApiError::conflict(rt, name));
            }
            Some(_) => {}
        }
        let entry = Self::managed_entry(rt, ctx, "Update", sub, fields);
        let out = self.finish_write(rt, ns, name, old, body, sub, ctx, entry)?;
        self.scale_response(rt, out, sub)
    }

    /// `patch` of the object or of a subresource; an apply patch creates a missing object.
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        patch: Patch,
        sub: Sub,
        ctx: &WriteCtx,
    ) -> Result<Value> {
        let old = match self.get(rt, ns, name) {
            Ok(old) => old,
            Err(e) => {
                if let (Patch::Apply(body), Sub::Main) = (&patch, sub) {
                    let mut body = body.clone();
                    if body["metadata"]["name"].as_str().is_some_and(|n| n != name) {
                        return Err(ApiError::bad_request(
                            "the name of the object does not match the name on the URL",
                        ));
                    }
                    body["metadata"]["name"] = json!(name);
                    self.create_with(rt, ns, &mut body, ctx, "Apply")?;
                    return Ok(body);
                }
                return Err(e);
            }
        };
        // Patches to /scale apply to the Scale view of the object.
        let base = if sub == Sub::Scale {
            self.scale_of(rt, &old)?
        } else {
            old.clone()
        };
        let mut patched = base.clone();
        // The Scale view has no schema of its own.
        let schema = rt.schema.as_ref().filter(|_| sub != Sub::Scale);
        let (operation, fields) = match &patch {
            Patch::Json(ops) => {
                // As on the real API server (evanphx/json-patch), `test` of a missing path
                // against `null` succeeds: kube-rs adds the first finalizer that way.
                let ops = match ops.as_array() {
                    Some(list) => Value::Array(
                        list.iter()
                            .filter(|op| {
                                !(op["op"] == "test"
                                    && op["value"].is_null()
                                    && patched.pointer(op["path"].as_str().unwrap_or("")).is_none())
                            })
                            .cloned()
                            .collect(),
                    ),
                    None => ops.clone(),
                };
                let ops: json_patch::Patch = serde_json::from_value(ops)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                apply_json_patch(&mut patched, &ops).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!("the JSON patch cannot be applied: {e}"),
                    )
                })?;
                ("Update", fields_of(&patched, sub != Sub::Scale, schema))
            }
            Patch::Merge(body) => {
                let mut body = body.clone();
                strip_directives(&mut body);
                json_patch::merge(&mut patched, &body);
                ("Update", fields_of(&body, sub != Sub::Scale, schema))
            }
            Patch::Apply(body) => {
                apply_merge(&mut patched, body, schema);
                let fields = fields_of(body, sub != Sub::Scale, schema);
                // Fields this manager applied before and no longer applies are removed,
                // unless another manager also owns them.
                let managers: Vec<Value> = old["metadata"]["managedFields"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let subname = sub.name().map(Value::from).unwrap_or(Value::Null);
                let mine = |e: &Value| {
                    e["manager"] == json!(ctx.manager)
                        && e["operation"] == "Apply"
                        && e["subresource"] == subname
                };
                if let Some(prev) = managers.iter().find(|e| mine(e)) {
                    let mut leaves = Vec::new();
                    leaf_paths(&prev["fieldsV1"], &mut Vec::new(), &mut leaves);
                    for path in leaves {
                        // A list item stays while another manager owns anything in it.
                        let owned = match path.split_last() {
                            Some((last, item)) if last == "." => item,
                            _ => path.as_slice(),
                        };
                        let owned_elsewhere = managers
                            .iter()
                            .filter(|e| !mine(e))
                            .any(|e| has_path(&e["fieldsV1"], owned));
                        if !has_path(&fields, &path) && !owned_elsewhere {
                            remove_path(&mut patched, &path);
                        }
                    }
                }
                if !ctx.force {
                    let conflicts =
                        apply_conflicts(&managers, &ctx.manager, &fields, &base, &patched);
                    if !conflicts.is_empty() {
                        return Err(ApiError::new(
                            409,
                            "Conflict",
                            format!(
                                "Apply failed with {} conflict{}: {}",
                                conflicts.len(),
                                if conflicts.len() == 1 { "" } else { "s" },
                                conflicts.join("\n")
                            ),
                        )
                        .with_details(rt, name));
                    }
                }
                ("Apply", fields)
            }
        };
        // A resourceVersion in the patch is a precondition.
        if let Some(rv) = patched["metadata"]["resourceVersion"].as_str()
            && rv
                != base["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
        {
            return Err(ApiError::conflict(rt, name));
        }
        let new = if sub == Sub::Scale {
            self.object_with_scale(rt, &old, &patched)?
        } else {
            patched
        };
        let entry = Self::managed_entry(rt, ctx, operation, sub, fields);
        let out = self.finish_write(rt, ns, name, old, new, sub, ctx, entry)?;
        self.scale_response(rt, out, sub)
    }

    fn scale_response(&self, rt: &ResourceType, object: Value, sub: Sub) -> Result<Value> {
        if sub == Sub::Scale {
            self.scale_of(rt, &object)
        } else {
            Ok(object)
        }
    }

    /// The `autoscaling/v1 Scale` view of an object.
    pub fn scale_of(&self, rt: &ResourceType, object: &Value) -> Result<Value> {
        let Some(paths) = &rt.scale else {
            return Err(ApiError::not_found(
                rt,
                object["metadata"]["name"].as_str().unwrap_or_default(),
            ));
        };
        let meta = &object["metadata"];
        let mut status =
            json!({"replicas": get_path(object, &paths.status_replicas).as_i64().unwrap_or(0)});
        if let Some(sel) = &paths.label_selector
            && let Some(s) = get_path(object, sel).as_str()
        {
            status["selector"] = json!(s);
        }
        Ok(json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta["resourceVersion"],
                "creationTimestamp": meta["creationTimestamp"],
            },
            "spec": {"replicas": get_path(object, &paths.spec_replicas).as_i64().unwrap_or(0)},
            "status": status,
        }))
    }

    /// The object with the replicas of a written Scale.
    fn object_with_scale(&self, rt: &ResourceType, old: &Value, scale: &Value) -> Result<Value> {
        let name = old["metadata"]["name"].as_str().unwrap_or_default();
        let Some(paths) = &rt.scale else {
            return Err(ApiError::not_found(rt, name));
        };
        let Some(replicas) = scale["spec"]["replicas"].as_i64() else {
            return Err(ApiError::invalid(
                rt,
                name,
                &["spec.replicas: Required value".into()],
            ));
        };
        if replicas < 0 {
            return Err(ApiError::invalid(
                rt,
                name,
                &[format!(
                    "spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
                )],
            ));
        }
        let mut new = old.clone();
        set_path(&mut new, &paths.spec_replicas, json!(replicas));
        new["metadata"]["resourceVersion"] = scale["metadata"]["resourceVersion"].clone();
        Ok(new)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_write(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        old: Value,
        mut new: Value,
        sub: Sub,
        ctx: &WriteCtx,
        entry: Value,
    ) -> Result<Value> {
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be an object",
            ));
        }
        if sub == Sub::Status {
            // Only the status is taken from a status write.
            let status = new.get("status").cloned();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else if rt.status_subresource {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
            "managedFields",
        ] {
            match old["metadata"].get(field) {
                Some(v) => new["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        // Status writes are validated too (the whole object, so spec rules still hold).
        let errors = self.admit(rt, &mut new, Some(&old), ctx)?;
        if !errors.is_empty() {
            return Err(ApiError::invalid_fields(rt, name, &errors));
        }
        if sub != Sub::Status {
            Self::normalize_secret(rt, &mut new);
        }
        new = Self::with_type_meta(rt, new);
        if rt.generation && spec_part(rt, &new) != spec_part(rt, &old) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0);
            new["metadata"]["generation"] = json!(g + 1);
        }
        if Self::is_crd(rt) {
            Self::establish(&mut new);
            // The establishment times of an unchanged CRD stay as they were.
            if spec_part(rt, &new) == spec_part(rt, &old) {
                new["status"] = old["status"].clone();
            }
        }
        let mut entry = entry;
        let update = entry["operation"] == "Update";
        if update {
            // An update (PUT or patch) owns the fields it changed, besides those it owned
            // before; restating a value another manager set does not take it over.
            let mut fields = changed_fields(&entry["fieldsV1"], &old, &new);
            let same = |e: &&Value| {
                e["manager"] == entry["manager"]
                    && e["operation"] == "Update"
                    && e["subresource"] == entry["subresource"]
            };
            if let Some(prev) = old["metadata"]["managedFields"]
                .as_array()
                .and_then(|l| l.iter().find(same))
            {
                union_fields(&mut fields, &prev["fieldsV1"]);
            }
            entry["fieldsV1"] = fields;
        }
        transfer_ownership(&mut new, &old, &entry["fieldsV1"], &ctx.manager);
        // An update owns what it set, not what it removed.
        if update {
            retain_present(&mut entry["fieldsV1"], &new);
        }
        // An update that owns nothing has no entry, as on a real server.
        if !(update && entry["fieldsV1"].as_object().is_some_and(|f| f.is_empty())) {
            Self::record_manager(&mut new, entry);
        }
        if comparable(&new) == comparable(&old) {
            // A no-op write changes nothing, not even the resourceVersion.
            return Ok(old);
        }
        let finalizers_empty = new["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if ctx.dry_run {
            return Ok(new);
        }
        if new["metadata"]["deletionTimestamp"].is_string() && finalizers_empty {
            return Ok(self.remove(rt, ns, name, new));
        }
        let out = self.commit(rt, ns, name, new, "MODIFIED");
        if Self::is_crd(rt) {
            self.registry.register_crd(&out);
        }
        Ok(out)
    }

    /// Removes an object for good (and what depends on it).
    fn remove(&mut self, rt: &ResourceType, ns: &str, name: &str, object: Value) -> Value {
        let out = self.commit(rt, ns, name, object, "DELETED");
        if Self::is_crd(rt) {
            // The real server's `customresourcecleanup` finalizer deletes the instances first;
            // here they go at once, each with a DELETED event.
            let types = super::registry::types_of_crd(&out);
            if let Some(t) = types.first() {
                let keys: Vec<(String, String)> = self
                    .bucket(t)
                    .map(|b| b.keys().cloned().collect())
                    .unwrap_or_default();
                for (ons, oname) in keys {
                    if let Ok(o) = self.get(t, &ons, &oname) {
                        self.commit(t, &ons, &oname, o, "DELETED");
                    }
                }
            }
            self.registry.unregister_crd(&out);
        }
        out
    }

    /// `delete`: marks an object with finalizers, removes one without. Returns the object.
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        options: &Value,
        ctx: &WriteCtx,
    ) -> Result<Value> {
        let mut object = self.get(rt, ns, name)?;
        let pre = &options["preconditions"];
        if let Some(uid) = pre["uid"].as_str()
            && Some(uid) != object["metadata"]["uid"].as_str()
        {
            return Err(ApiError::conflict(rt, name));
        }
        if let Some(rv) = pre["resourceVersion"].as_str()
            && Some(rv) != object["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(rt, name));
        }
        if ctx.dry_run {
            return Ok(object);
        }
        if rt.group.is_empty() && rt.plural == "namespaces" {
            // Namespace contents are deleted (honouring their finalizers) and the namespace
            // goes at once, where a real cluster keeps it `Terminating` until it is empty.
            let types: Vec<ResourceType> = self
                .registry
                .all()
                .iter()
                .filter(|t| t.namespaced)
                .cloned()
                .collect();
            for t in types {
                let names: Vec<String> = self
                    .bucket(&t)
                    .map(|b| {
                        b.keys()
                            .filter(|(n, _)| n == name)
                            .map(|(_, o)| o.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for o in names {
                    let _ = self.delete(&t, name, &o, &Value::Null, ctx);
                }
            }
            return Ok(self.remove(rt, ns, name, object));
        }
        let has_finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if !has_finalizers {
            return Ok(self.remove(rt, ns, name, object));
        }
        if object["metadata"]["deletionTimestamp"].is_string() {
            return Ok(object);
        }
        object["metadata"]["deletionTimestamp"] = json!(now());
        object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        if rt.generation {
            let g = object["metadata"]["generation"].as_i64().unwrap_or(0);
            object["metadata"]["generation"] = json!(g + 1);
        }
        Ok(self.commit(rt, ns, name, object, "MODIFIED"))
    }
}
