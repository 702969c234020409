//! Structural-schema handling of custom resources: pruning of unknown fields (or their
//! rejection under `fieldValidation=Strict`), validation against the CRD's
//! `openAPIV3Schema` with the real server's field errors (types, enums, bounds, lengths,
//! patterns, item counts, `required`, `date-time`, `x-kubernetes-list-type` keys), then its
//! `x-kubernetes-validations` CEL rules (see `cel.rs`) unless a type, enum, required, length
//! or item-count error makes the object unfit for them — as the real server does.
//!
//! Differences from the real API server: `default` values are not applied; formats other
//! than `date-time` are not checked; validation ratcheting (unchanged invalid fields pass) is
//! not done.

use serde_json::{Map, Value, json};

use super::cel;
use super::field::{ErrorType, FieldError, go_float, go_value};

/// Removes fields the schema does not declare, returning their paths (`spec.foo`).
pub fn prune(value: &mut Value, schema: &Value, path: &str, unknown: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true)
        && schema.get("properties").is_none()
        && schema.get("additionalProperties").is_none()
    {
        return;
    }
    match value {
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true);
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if let Some(child_schema) = props.and_then(|p| p.get(&key)) {
                    if let Some(child) = map.get_mut(&key) {
                        prune(child, child_schema, &child_path, unknown);
                    }
                } else if let Some(child_schema) = additional {
                    if let Some(child) = map.get_mut(&key) {
                        prune(child, child_schema, &child_path, unknown);
                    }
                } else if !preserve {
                    map.remove(&key);
                    unknown.push(child_path);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(item, item_schema, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

/// Prunes the non-metadata part of a custom resource. `apiVersion`, `kind` and `metadata`
/// are always kept, as the real server does.
pub fn prune_object(object: &mut Value, schema: &Value) -> Vec<String> {
    let mut unknown = Vec::new();
    if let Value::Object(map) = object {
        let keep: Map<String, Value> = ["apiVersion", "kind", "metadata"]
            .iter()
            .filter_map(|k| map.remove(*k).map(|v| (k.to_string(), v)))
            .collect();
        let mut rest = Value::Object(std::mem::take(map));
        prune(&mut rest, schema, "", &mut unknown);
        if let Value::Object(rest) = rest {
            *map = rest;
        }
        map.extend(keep);
    }
    unknown
}

/// The type name of a JSON value as OpenAPI validation reports it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "integer" => type_name(v) == "integer",
        "number" => v.is_number(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => true,
    }
}

/// `path.key` (or `key` at the root).
pub fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The schema of the property `key` of an object with schema `schema`.
pub fn property_schema<'a>(schema: &'a Value, key: &str) -> Option<&'a Value> {
    schema
        .get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))
}

/// The key of a `x-kubernetes-list-type: map` item: its key fields, as a JSON object.
pub fn map_key(item: &Value, schema: &Value) -> Option<Value> {
    let keys = schema["x-kubernetes-list-map-keys"].as_array()?;
    let mut out = Map::new();
    for k in keys.iter().filter_map(Value::as_str) {
        if let Some(v) = item.get(k) {
            out.insert(k.to_string(), v.clone());
        }
    }
    Some(Value::Object(out))
}

/// The structural-schema errors of `value` (at `path`) against `schema`.
fn check_node(value: &Value, schema: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let in_body = |detail: &str| format!("{path} in body {detail}");
    if value.is_null() {
        if schema["nullable"].as_bool() != Some(true)
            && let Some(t) = schema["type"].as_str()
        {
            errs.push(FieldError::new(
                ErrorType::TypeInvalid,
                path,
                json!("null"),
                in_body(&format!("must be of type {t}: \"null\"")),
            ));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"].as_bool() == Some(true) {
        if !(value.is_string() || type_name(value) == "integer") {
            let actual = type_name(value);
            errs.push(FieldError::new(
                ErrorType::TypeInvalid,
                path,
                json!(actual),
                in_body(&format!("must be of type integer,string: \"{actual}\"")),
            ));
            return;
        }
    } else if let Some(t) = schema["type"].as_str()
        && !has_type(value, t)
    {
        let actual = type_name(value);
        errs.push(FieldError::new(
            ErrorType::TypeInvalid,
            path,
            json!(actual),
            in_body(&format!("must be of type {t}: \"{actual}\"")),
        ));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let supported: Vec<String> = allowed
            .iter()
            .map(|a| match a {
                Value::String(s) => Value::String(s.clone()).to_string(),
                other => Value::String(other.to_string()).to_string(),
            })
            .collect();
        errs.push(FieldError::new(
            ErrorType::NotSupported,
            path,
            value.clone(),
            format!("supported values: {}", supported.join(", ")),
        ));
    }
    match value {
        Value::String(s) => check_string(s, value, schema, path, errs),
        Value::Number(n) => {
            let Some(x) = n.as_f64() else { return };
            let exclusive = |k: &str| schema[k].as_bool() == Some(true);
            if let Some(min) = schema["minimum"].as_f64() {
                let (bad, word) = if exclusive("exclusiveMinimum") {
                    (x <= min, "greater than")
                } else {
                    (x < min, "greater than or equal to")
                };
                if bad {
                    errs.push(FieldError::invalid(
                        path,
                        value.clone(),
                        in_body(&format!("should be {word} {}", go_float(min))),
                    ));
                }
            }
            if let Some(max) = schema["maximum"].as_f64() {
                let (bad, word) = if exclusive("exclusiveMaximum") {
                    (x >= max, "less than")
                } else {
                    (x > max, "less than or equal to")
                };
                if bad {
                    errs.push(FieldError::invalid(
                        path,
                        value.clone(),
                        in_body(&format!("should be {word} {}", go_float(max))),
                    ));
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                let unit = if max == 1 { "item" } else { "items" };
                errs.push(FieldError::new(
                    ErrorType::TooMany,
                    path,
                    json!(items.len()),
                    format!("must have at most {max} {unit}"),
                ));
            }
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                errs.push(FieldError::invalid(
                    path,
                    json!(items.len()),
                    in_body(&format!("should have at least {min} items")),
                ));
            }
            let Some(item_schema) = schema.get("items") else {
                return;
            };
            for (i, item) in items.iter().enumerate() {
                check_node(item, item_schema, &format!("{path}[{i}]"), errs);
            }
            // `x-kubernetes-list-type`: keys (map) or items (set) must be unique.
            let mut seen: Vec<Value> = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let id = match schema["x-kubernetes-list-type"].as_str() {
                    Some("map") => map_key(item, schema),
                    Some("set") => Some(item.clone()),
                    _ => None,
                };
                let Some(id) = id else { continue };
                if seen.contains(&id) {
                    errs.push(FieldError::new(
                        ErrorType::Duplicate,
                        &format!("{path}[{i}]"),
                        id,
                        "",
                    ));
                } else {
                    seen.push(id);
                }
            }
        }
        Value::Object(map) => {
            if let Some(required) = schema["required"].as_array() {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        errs.push(FieldError::required(&child_path(path, r), ""));
                    }
                }
            }
            for (k, v) in map {
                if let Some(child) = property_schema(schema, k) {
                    check_node(v, child, &child_path(path, k), errs);
                }
            }
        }
        Value::Bool(_) | Value::Null => {}
    }
}

fn check_string(s: &str, value: &Value, schema: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let in_body = |detail: &str| format!("{path} in body {detail}");
    let chars = s.chars().count() as u64;
    if let Some(max) = schema["maxLength"].as_u64()
        && chars > max
    {
        let unit = if max == 1 { "byte" } else { "bytes" };
        errs.push(FieldError::new(
            ErrorType::TooLong,
            path,
            Value::Null,
            format!("may not be more than {max} {unit}"),
        ));
    }
    if let Some(min) = schema["minLength"].as_u64()
        && chars < min
    {
        errs.push(FieldError::invalid(
            path,
            value.clone(),
            in_body(&format!("should be at least {min} chars long")),
        ));
    }
    if let Some(pattern) = schema["pattern"].as_str()
        && !regex::Regex::new(pattern).is_ok_and(|r| r.is_match(s))
    {
        errs.push(FieldError::invalid(
            path,
            value.clone(),
            in_body(&format!("should match '{pattern}'")),
        ));
    }
    if schema["format"].as_str() == Some("date-time")
        && chrono::DateTime::parse_from_rfc3339(s).is_err()
    {
        errs.push(FieldError::new(
            ErrorType::TypeInvalid,
            path,
            value.clone(),
            in_body(&format!("must be of type date-time: {}", go_value(value))),
        ));
    }
}

/// Validates a custom resource against its CRD schema: the structural checks, then (when
/// no blocking error makes the object unfit for them) the CEL rules, with `old` (the
/// stored object, on updates) for transition rules. `metadata` is left to the server's
/// own rules.
pub fn validate(object: &Value, old: Option<&Value>, schema: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut body = object.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("metadata");
        map.remove("apiVersion");
        map.remove("kind");
    }
    if let Some(map) = body.as_object() {
        if let Some(required) = schema["required"].as_array() {
            for r in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(r) && !["metadata", "apiVersion", "kind"].contains(&r) {
                    errs.push(FieldError::required(r, ""));
                }
            }
        }
        for (k, v) in map {
            if let Some(child) = property_schema(schema, k) {
                check_node(v, child, k, &mut errs);
            }
        }
    }
    // The error types after which the real server does not run the rules.
    let blocking = errs.iter().any(|e| {
        matches!(
            e.type_,
            ErrorType::TypeInvalid
                | ErrorType::NotSupported
                | ErrorType::Required
                | ErrorType::TooLong
                | ErrorType::TooMany
        )
    });
    if blocking {
        errs.push(FieldError::invalid(
            "",
            Value::Null,
            "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
        ));
    } else {
        // Root rules see the name and generateName of the metadata only, as on a real server.
        let mut with_meta = body;
        let meta = &object["metadata"];
        let mut m = Map::new();
        for k in ["name", "generateName"] {
            if let Some(v) = meta.get(k) {
                m.insert(k.into(), v.clone());
            }
        }
        if let Some(map) = with_meta.as_object_mut() {
            map.insert("metadata".into(), Value::Object(m));
        }
        cel::check(&with_meta, old, schema, "", &mut errs);
    }
    errs
}
