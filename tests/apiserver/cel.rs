//! The CRDs' `x-kubernetes-validations` rules, evaluated with the `cel` crate as the real
//! API server evaluates them: at each schema node that declares rules, with `self` the value
//! there (rules of absent or null values do not run) and, on updates, `oldSelf` the stored
//! value at the same place (object properties by name, `x-kubernetes-list-type: map` items
//! by key). Transition rules (those using `oldSelf`) run only when there is an old value. A
//! rule that is false gives the rule's `messageExpression` (when it yields a one-line
//! string), else its `message`, else `failed rule: RULE`, at the node's path plus the rule's
//! `fieldPath`, as the error its `reason` names (default `FieldValueInvalid`, whose value
//! is the node's schema type, e.g. `"object"`).
//!
//! Differences from the real API server: no cost budget, no Kubernetes CEL libraries
//! (`quantity`, `url`, `ip`, ...), `date-time`/`duration` strings stay strings, and
//! compilation errors are reported on write rather than when the CRD is created.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use super::field::{ErrorType, FieldError};
use super::schema::{child_path, map_key, property_schema};

/// A JSON value as CEL sees it (integers as `int`, as the API server converts them).
fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => cel::Value::Int(i),
            (None, Some(u), _) => cel::Value::UInt(u),
            (None, None, Some(f)) => cel::Value::Float(f),
            _ => cel::Value::Null,
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let m: HashMap<String, cel::Value> =
                map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            cel::Value::from(m)
        }
    }
}

/// The schema type shown as the bad value of a rule's error.
fn schema_type(schema: &Value) -> &str {
    schema["type"].as_str().unwrap_or("object")
}

/// A rule's `fieldPath` (`.a.b`, `.a['b']`) as a dotted suffix.
fn field_path_suffix(fp: &str) -> String {
    fp.trim_start_matches('.')
        .replace("['", ".")
        .replace("']", "")
}

/// The value at the same place in the old object, when it can be correlated.
fn correlated<'a>(old: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    old.and_then(|o| o.get(key)).filter(|v| !v.is_null())
}

/// Evaluates the rules at `value`'s node and below, appending violations to `errs`.
pub fn check(
    value: &Value,
    old: Option<&Value>,
    schema: &Value,
    path: &str,
    errs: &mut Vec<FieldError>,
) {
    if value.is_null() {
        return;
    }
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        let this = to_cel(value);
        let before = old.filter(|o| !o.is_null()).map(to_cel);
        for rule in rules {
            run_rule(rule, &this, before.as_ref(), schema, path, errs);
        }
    }
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if let Some(child) = property_schema(schema, k) {
                    check(v, correlated(old, k), child, &child_path(path, k), errs);
                }
            }
        }
        Value::Array(items) => {
            let Some(item_schema) = schema.get("items") else {
                return;
            };
            let is_map = schema["x-kubernetes-list-type"].as_str() == Some("map");
            let old_items = old.and_then(Value::as_array);
            for (i, item) in items.iter().enumerate() {
                // Only map-list items correlate (by key); other lists have no old items.
                let old_item = if is_map {
                    let key = map_key(item, schema);
                    old_items.and_then(|list| {
                        list.iter()
                            .find(|o| key.is_some() && map_key(o, schema) == key)
                    })
                } else {
                    None
                };
                check(item, old_item, item_schema, &format!("{path}[{i}]"), errs);
            }
        }
        _ => {}
    }
}

fn run_rule(
    rule: &Value,
    this: &cel::Value,
    before: Option<&cel::Value>,
    schema: &Value,
    path: &str,
    errs: &mut Vec<FieldError>,
) {
    let source = rule["rule"].as_str().unwrap_or_default();
    let type_ = schema_type(schema);
    let program = match cel::Program::compile(source) {
        Ok(p) => p,
        Err(e) => {
            errs.push(FieldError::invalid(
                path,
                Value::from(type_),
                format!("compilation failed: {e}"),
            ));
            return;
        }
    };
    let transition = program.references().has_variable("oldSelf");
    if transition && before.is_none() {
        return;
    }
    let mut ctx = cel::Context::default();
    ctx.add_variable_from_value("self", this.clone());
    if let Some(b) = before {
        ctx.add_variable_from_value("oldSelf", b.clone());
    }
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(true)) => {}
        Ok(cel::Value::Bool(false)) => {
            let detail = message_of(rule, &ctx, source);
            let field = match rule["fieldPath"].as_str().filter(|f| !f.is_empty()) {
                Some(fp) => child_path(path, &field_path_suffix(fp)),
                None => path.to_string(),
            };
            let err = match rule["reason"].as_str() {
                Some("FieldValueForbidden") => {
                    FieldError::new(ErrorType::Forbidden, &field, Value::Null, detail)
                }
                Some("FieldValueRequired") => FieldError::required(&field, detail),
                Some("FieldValueDuplicate") => {
                    FieldError::new(ErrorType::Duplicate, &field, Value::from(type_), "")
                }
                _ => FieldError::invalid(&field, Value::from(type_), detail),
            };
            errs.push(err);
        }
        Ok(other) => errs.push(FieldError::invalid(
            path,
            Value::from(type_),
            format!("rule did not evaluate to a bool: {other:?}"),
        )),
        Err(e) => errs.push(FieldError::invalid(path, Value::from(type_), e.to_string())),
    }
}

/// The message of a failed rule: its `messageExpression` when that yields a non-empty
/// one-line string, else `message`, else `failed rule: RULE`.
fn message_of(rule: &Value, ctx: &cel::Context, source: &str) -> String {
    if let Some(expr) = rule["messageExpression"].as_str()
        && let Ok(p) = cel::Program::compile(expr)
        && let Ok(cel::Value::String(s)) = p.execute(ctx)
        && !s.trim().is_empty()
        && !s.contains('\n')
    {
        return s.to_string();
    }
    match rule["message"].as_str().filter(|m| !m.is_empty()) {
        Some(m) => m.to_string(),
        None => format!("failed rule: {}", source.trim()),
    }
}
