//! Field management: the field sets of `metadata.managedFields`, server-side apply's merge
//! and conflicts, ownership moving between managers, and JSON patches.

use serde_json::{Map, Value, json};

use super::*;

/// Whether `schema` declares a list whose items merge by key (`x-kubernetes-list-type: map`).
pub(super) fn is_map_list(schema: Option<&Value>) -> bool {
    schema.is_some_and(|s| {
        s["x-kubernetes-list-type"].as_str() == Some("map")
            && s["x-kubernetes-list-map-keys"].is_array()
    })
}

/// The `k:{...}` field-set key of a map-list item.
pub(super) fn item_key(item: &Value, schema: &Value) -> Option<String> {
    schema::map_key(item, schema).map(|k| format!("k:{k}"))
}

/// `metadata.managedFields`-style field set of an applied or written body. With the
/// object's schema, items of `x-kubernetes-list-type: map` lists are owned one by one
/// (`k:{"type":"Ready"}` with `.` for the item itself); other lists are owned whole.
pub(super) fn fields_of(value: &Value, root: bool, schema: Option<&Value>) -> Value {
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
pub(super) fn leaf_paths(fields: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
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

pub(super) fn has_path(fields: &Value, path: &[String]) -> bool {
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
pub(super) fn owns(fields: &Value, path: &[String]) -> bool {
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
pub(super) fn key_matches(seg: &str, item: &Value) -> bool {
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
pub(super) fn step<'a>(v: &'a Value, seg: &str) -> Option<&'a Value> {
    if seg == "." {
        return Some(v);
    }
    if let Some(name) = seg.strip_prefix("f:") {
        return v.get(name);
    }
    v.as_array()?.iter().find(|item| key_matches(seg, item))
}

pub(super) fn step_mut<'a>(v: &'a mut Value, seg: &str) -> Option<&'a mut Value> {
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
pub(super) fn remove_path(object: &mut Value, path: &[String]) {
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
pub(super) fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = object;
    for p in path {
        v = step(v, p)?;
    }
    Some(v)
}

/// Whether a write changed what a field path owns: a value, or (`.`) an item's presence.
pub(super) fn differs(old: &Value, new: &Value, path: &[String]) -> bool {
    if path.last().is_some_and(|l| l == ".") {
        value_at(old, path).is_some() != value_at(new, path).is_some()
    } else {
        value_at(old, path) != value_at(new, path)
    }
}

/// A field path as conflict messages print it: `.status.conditions[type="Ready"].message`.
pub(super) fn display_path(path: &[String]) -> String {
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
pub(super) fn remove_field(fields: &mut Value, path: &[String]) -> bool {
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
pub(super) fn retain_present(fields: &mut Value, object: &Value) {
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
pub(super) fn apply_conflicts(
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
pub(super) fn transfer_ownership(new: &mut Value, old: &Value, fields: &Value, manager: &str) {
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
pub(super) fn changed_fields(fields: &Value, old: &Value, new: &Value) -> Value {
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
pub(super) fn union_fields(fields: &mut Value, other: &Value) {
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
pub(super) fn apply_merge(target: &mut Value, applied: &Value, schema: Option<&Value>) {
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
pub(super) fn strip_directives(v: &mut Value) {
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
pub(super) fn apply_json_patch(
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
