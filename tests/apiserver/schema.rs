//! Structural-schema handling of custom resources: pruning of unknown fields (or their
//! rejection under `fieldValidation=Strict`) and validation against the CRD's
//! `openAPIV3Schema`.
//!
//! Differences from the real API server: CEL rules (`x-kubernetes-validations`) and
//! `default` values are not applied, and error messages are close to, not identical with,
//! the real ones.

use serde_json::{Map, Value};

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

/// Turns OpenAPI `nullable: true` into JSON Schema (`type: [t, "null"]`) so a general JSON
/// Schema validator can check the document.
fn to_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out: Map<String, Value> = map
                .iter()
                .filter(|(k, _)| !k.starts_with("x-kubernetes-") && *k != "nullable")
                .map(|(k, v)| {
                    let v = match k.as_str() {
                        // These hold maps of schemas, or schemas; everything else is a keyword value.
                        "properties" | "patternProperties" => Value::Object(
                            v.as_object()
                                .map(|m| {
                                    m.iter()
                                        .map(|(n, s)| (n.clone(), to_json_schema(s)))
                                        .collect()
                                })
                                .unwrap_or_default(),
                        ),
                        "items" | "additionalProperties" | "allOf" | "anyOf" | "oneOf" | "not" => {
                            to_json_schema(v)
                        }
                        _ => v.clone(),
                    };
                    (k.clone(), v)
                })
                .collect();
            if map.get("nullable").and_then(Value::as_bool) == Some(true)
                && let Some(Value::String(t)) = map.get("type")
            {
                out.insert("type".into(), Value::from(vec![t.clone(), "null".into()]));
            }
            if map
                .get("x-kubernetes-int-or-string")
                .and_then(Value::as_bool)
                == Some(true)
            {
                out.remove("type");
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(to_json_schema).collect()),
        other => other.clone(),
    }
}

/// Validates a custom resource (without its metadata) against the CRD schema; returns the
/// violations as `path: message` strings.
pub fn validate(object: &Value, schema: &Value) -> Vec<String> {
    let mut schema = to_json_schema(schema);
    // The object's metadata is validated by the server's own rules, not the CRD schema.
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props.remove("metadata");
    }
    let mut instance = object.clone();
    if let Some(map) = instance.as_object_mut() {
        map.remove("metadata");
    }
    let validator = match jsonschema::validator_for(&schema) {
        Ok(v) => v,
        Err(e) => return vec![format!("the CRD schema is not usable: {e}")],
    };
    validator
        .iter_errors(&instance)
        .map(|e| {
            let path = e
                .instance_path()
                .to_string()
                .trim_start_matches('/')
                .replace('/', ".");
            format!("{path}: Invalid value: {}", e)
        })
        .collect()
}
