//! `/openapi/v3`: the index of group/version documents, and one OpenAPI 3 document per
//! group/version built from the served types (the CRD schemas for custom resources).
//!
//! kubectl uses these documents to (1) check that PATCH accepts the `fieldValidation`
//! parameter, so it leaves validation to the server, and (2) render `kubectl explain`.
//! Built-in kinds are described as open objects (no field list): `kubectl explain secret`
//! therefore shows no fields here, unlike on a real cluster.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use serde_json::{Map, Value, json};

use super::registry::{Registry, ResourceType};

/// The document path of a group/version: `api/v1` or `apis/{group}/{version}`.
pub fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The schema name of a kind, in the real server's reversed-group style
/// (`dev.weir.v1alpha1.EventStream`).
fn schema_name(rt: &ResourceType) -> String {
    let group = if rt.group.is_empty() {
        "io.k8s.api.core".to_string()
    } else {
        rt.group.split('.').rev().collect::<Vec<_>>().join(".")
    };
    format!("{group}.{}.{}", rt.version, rt.kind)
}

fn gvk(rt: &ResourceType) -> Value {
    json!({"group": rt.group, "version": rt.version, "kind": rt.kind})
}

fn operation(rt: &ResourceType, action: &str, with_body: bool) -> Value {
    let reference = format!("#/components/schemas/{}", schema_name(rt));
    let mut op = json!({
        "operationId": format!("{action}{}", rt.kind),
        "parameters": [
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        ],
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": reference}}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(rt),
    });
    if with_body {
        let content: Map<String, Value> = if action == "patch" {
            [
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/apply-patch+yaml",
            ]
            .iter()
            .map(|t| (t.to_string(), json!({"schema": {"type": "object"}})))
            .collect()
        } else {
            [(
                "application/json".to_string(),
                json!({"schema": {"$ref": reference}}),
            )]
            .into_iter()
            .collect()
        };
        op["requestBody"] = json!({"content": content});
    }
    op
}

fn object_schema(rt: &ResourceType) -> Value {
    let mut schema = rt.schema.clone().unwrap_or_else(|| {
        json!({
            "type": "object",
            "description": format!("{} ({}).", rt.kind, rt.api_version()),
            "x-kubernetes-preserve-unknown-fields": true,
        })
    });
    if let Some(map) = schema.as_object_mut() {
        let props = map
            .entry("properties")
            .or_insert_with(|| json!({}))
            .as_object_mut();
        if let Some(props) = props {
            props.entry("apiVersion").or_insert_with(|| json!({
                "type": "string",
                "description": "APIVersion defines the versioned schema of this representation of an object.",
            }));
            props.entry("kind").or_insert_with(|| json!({
                "type": "string",
                "description": "Kind is a string value representing the REST resource this object represents.",
            }));
            props.entry("metadata").or_insert_with(|| {
                json!({
                    "type": "object",
                    "description": "Standard object's metadata.",
                })
            });
        }
        map.insert("x-kubernetes-group-version-kind".into(), json!([gvk(rt)]));
    }
    schema
}

/// The OpenAPI 3 document of one group/version, or `None` when it is not served.
pub fn document(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    if !registry.serves(group, version) {
        return None;
    }
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for rt in registry
        .all()
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let base = format!("/{}", gv_path(group, version));
        let collection = if rt.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", rt.plural)
        } else {
            format!("{base}/{}", rt.plural)
        };
        paths.insert(
            collection.clone(),
            json!({
                "get": operation(rt, "list", false),
                "post": operation(rt, "post", true),
            }),
        );
        let item = json!({
            "get": operation(rt, "get", false),
            "put": operation(rt, "put", true),
            "patch": operation(rt, "patch", true),
            "delete": operation(rt, "delete", false),
        });
        paths.insert(format!("{collection}/{{name}}"), item.clone());
        if rt.status_subresource {
            paths.insert(format!("{collection}/{{name}}/status"), item);
        }
        schemas.insert(schema_name(rt), object_schema(rt));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// A content hash for the index's `serverRelativeURL`, so clients re-fetch a document
/// when the served types change.
pub fn hash_of(doc: &Value) -> String {
    let mut h = DefaultHasher::new();
    doc.to_string().hash(&mut h);
    format!("{:016X}", h.finish())
}

/// `GET /openapi/v3`: the index of documents.
pub fn index(registry: &Registry) -> Value {
    let mut gvs: Vec<(String, String)> = Vec::new();
    for t in registry.all() {
        let gv = (t.group.clone(), t.version.clone());
        if !gvs.contains(&gv) {
            gvs.push(gv);
        }
    }
    let paths: Map<String, Value> = gvs
        .iter()
        .filter_map(|(g, v)| {
            let doc = document(registry, g, v)?;
            let path = gv_path(g, v);
            let url = format!("/openapi/v3/{path}?hash={}", hash_of(&doc));
            Some((path, json!({"serverRelativeURL": url})))
        })
        .collect();
    json!({"paths": paths})
}
