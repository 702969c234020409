//! Server-side printing: `meta.k8s.io/v1` `Table` responses built from a resource's printer
//! columns, which is how `kubectl get` shows them.

use chrono::{DateTime, Utc};
use jsonpath_rust::JsonPath;
use serde_json::{Value, json};

use super::registry::ResourceType;

/// Whether the request's `Accept` header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept.contains("as=Table")
}

/// Evaluates a printer-column JSONPath (`.status.conditions[?(@.type=="Ready")].status`) and
/// returns its values. Kubernetes JSONPath has no leading `$`; the subset used by CRD columns
/// (fields, indexes, filters) is also RFC 9535 JSONPath.
pub fn eval(object: &Value, path: &str) -> Vec<Value> {
    let path = path.trim();
    let path = if path.starts_with('$') {
        path.to_string()
    } else {
        format!("${path}")
    };
    object
        .query(&path)
        .map(|found| found.into_iter().cloned().collect())
        .unwrap_or_default()
}

/// `kubectl`'s human-readable age (the API server's `HumanDuration`).
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    format!("{}y", hours / 24 / 365)
}

fn cell(type_: &str, value: &Value) -> Value {
    match (type_, value) {
        ("integer", Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .map(Value::from)
            .unwrap_or(Value::Null),
        ("number", Value::Number(_))
        | ("boolean", Value::Bool(_))
        | ("string", Value::String(_)) => value.clone(),
        ("date", Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => json!(human_duration(
                (Utc::now() - t.with_timezone(&Utc)).num_seconds()
            )),
            Err(_) => json!("<invalid>"),
        },
        // A column whose declared type does not match the value prints nothing, as on a
        // real server.
        _ => Value::Null,
    }
}

fn columns_of(rt: &ResourceType) -> Vec<(String, String, String, String, i64, String)> {
    let mut cols = vec![(
        "Name".to_string(),
        "string".to_string(),
        "name".to_string(),
        "Name must be unique within a namespace.".to_string(),
        0,
        ".metadata.name".to_string(),
    )];
    for c in &rt.columns {
        cols.push((
            c.name.clone(),
            c.type_.clone(),
            c.format.clone(),
            c.description.clone(),
            c.priority,
            c.json_path.clone(),
        ));
    }
    // Built-in kinds and CRDs without an Age column get one, as the real server prints them.
    if !rt
        .columns
        .iter()
        .any(|c| c.name == "Age" || c.name == "Created At")
    {
        cols.push((
            "Age".into(),
            "date".into(),
            String::new(),
            "CreationTimestamp".into(),
            0,
            ".metadata.creationTimestamp".into(),
        ));
    }
    cols
}

/// Builds the Table for `objects`. `include_object` is the request's `includeObject`
/// (`None`, `Metadata` (the default) or `Object`).
pub fn table(
    rt: &ResourceType,
    objects: &[Value],
    resource_version: &str,
    include_object: &str,
) -> Value {
    let cols = columns_of(rt);
    let definitions: Vec<Value> = cols
        .iter()
        .map(|(name, type_, format, description, priority, _)| {
            json!({
                "name": name,
                "type": type_,
                "format": format,
                "description": description,
                "priority": priority,
            })
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let cells: Vec<Value> = cols
                .iter()
                .map(|(_, type_, _, _, _, path)| {
                    eval(obj, path)
                        .first()
                        .map(|v| cell(type_, v))
                        .unwrap_or(Value::Null)
                })
                .collect();
            let object = match include_object {
                "None" => Value::Null,
                "Object" => obj.clone(),
                _ => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                }),
            };
            json!({"cells": cells, "object": object})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions,
        "rows": rows,
    })
}
