//! Documents decoded into typed resources: the field path of a type error and every unknown
//! field are problems (the API server rejects unknown fields too), and the Secret and ConfigMap
//! fields Weir reads.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::report::FieldProblem;
use crate::topology::Key;

/// Decodes a Weir resource, with the field path of a type error and every unknown field as a
/// problem (the API server rejects unknown fields too; here they would be silently ignored).
pub(crate) fn decode_resource<T>(value: Value, key: &Key) -> Result<T, Vec<FieldProblem>>
where
    T: DeserializeOwned + Resource,
{
    let mut obj: T = decode(value)?;
    let meta = obj.meta_mut();
    meta.namespace = Some(key.namespace.clone());
    // Server-owned in Kubernetes; set by the loader here.
    meta.generation = None;
    Ok(obj)
}

/// Typed deserialization through `serde_path_to_error` (the path of a type error) and
/// `serde_ignored` (the path of every unknown field).
pub(crate) fn decode<T: DeserializeOwned>(value: Value) -> Result<T, Vec<FieldProblem>> {
    let mut unknown = Vec::new();
    let result: Result<T, _> = {
        let mut on_ignored = |path: serde_ignored::Path<'_>| {
            let path = ignored_path(&path);
            // Read by the loader itself, not by the typed structs.
            if path != "apiVersion" && path != "kind" {
                unknown.push(path);
            }
        };
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut on_ignored))
    };
    let mut problems: Vec<FieldProblem> = Vec::new();
    let value = match result {
        Ok(value) => Some(value),
        Err(err) => {
            let path = err.path().to_string();
            let path = if path == "." { String::new() } else { path };
            problems.push(FieldProblem::new(path, err.into_inner().to_string()));
            None
        }
    };
    problems.extend(
        unknown
            .into_iter()
            .map(|p| FieldProblem::new(p, "unknown field")),
    );
    match value {
        Some(value) if problems.is_empty() => Ok(value),
        _ => Err(problems),
    }
}

/// A `serde_ignored` path written like `serde_path_to_error` writes its paths
/// (`spec.schemas[0].type`), without the markers it adds for options and newtypes.
fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        P::Map { parent, key } => {
            let parent = ignored_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent)
        }
    }
}

/// The fields of a `v1/Secret` manifest that Weir reads or accepts.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretManifest {
    #[allow(dead_code)] // Checked for validity only.
    metadata: ObjectMeta,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    string_data: BTreeMap<String, String>,
    #[allow(dead_code)] // Accepted so that real Secret manifests load; Weir has no use for it.
    #[serde(default, rename = "type")]
    type_: Option<String>,
    #[allow(dead_code)] // As above.
    #[serde(default)]
    immutable: Option<bool>,
}

/// `data` base64-decoded, then `stringData` on top (it wins, as on the API server).
pub(crate) fn decode_secret(value: Value) -> Result<BTreeMap<String, Vec<u8>>, Vec<FieldProblem>> {
    let secret: SecretManifest = decode(value)?;
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for (k, v) in secret.data {
        match base64::engine::general_purpose::STANDARD.decode(v.trim()) {
            Ok(bytes) => {
                out.insert(k, bytes);
            }
            Err(err) => problems.push(FieldProblem::new(
                format!("data.{k}"),
                format!("invalid base64: {err}"),
            )),
        }
    }
    for (k, v) in secret.string_data {
        out.insert(k, v.into_bytes());
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// The fields of a `v1/ConfigMap` manifest that Weir reads or accepts.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigMapManifest {
    #[allow(dead_code)] // Checked for validity only.
    metadata: ObjectMeta,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[allow(dead_code)] // Accepted so that real ConfigMap manifests load; nothing Weir reads is binary.
    #[serde(default)]
    binary_data: BTreeMap<String, String>,
    #[allow(dead_code)] // As above.
    #[serde(default)]
    immutable: Option<bool>,
}

pub(crate) fn decode_config_map(
    value: Value,
) -> Result<BTreeMap<String, String>, Vec<FieldProblem>> {
    let cm: ConfigMapManifest = decode(value)?;
    Ok(cm.data)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::Value;

    use super::*;

    #[derive(Deserialize, Debug)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Sample {
        spec: SampleSpec,
    }
    #[derive(Deserialize, Debug)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct SampleSpec {
        max_events: Option<u32>,
        items: Vec<Item>,
    }
    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Item {
        name: String,
    }

    fn problems_of(yaml: &str) -> Vec<String> {
        let value: Value = crate::yaml::from_str(yaml).unwrap();
        match decode::<Sample>(value) {
            Ok(_) => Vec::new(),
            Err(ps) => ps
                .into_iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect(),
        }
    }

    #[test]
    fn decode_reports_type_errors_and_unknown_fields_with_paths() {
        assert_eq!(
            problems_of("kind: X\napiVersion: v\nspec: {maxEvents: x, items: []}"),
            ["spec.maxEvents: invalid type: string \"x\", expected u32"]
        );
        assert_eq!(
            problems_of("spec: {maxEvent: 5, items: [{name: a, nmae: b}]}"),
            // In key order: a manifest is decoded from the JSON data model, whose objects
            // are ordered by key.
            [
                "spec.items[0].nmae: unknown field",
                "spec.maxEvent: unknown field"
            ]
        );
        assert_eq!(
            problems_of("spec: {maxEvents: 5, items: []}"),
            Vec::<String>::new()
        );
        assert_eq!(
            problems_of("other: 1"),
            [": missing field `spec`", "other: unknown field"]
        );
    }

    #[test]
    fn secret_data_is_decoded_and_string_data_wins() {
        let value: Value = crate::yaml::from_str(
            "metadata: {name: s}\ndata: {a: aGVsbG8=, b: eA==}\nstringData: {b: plain}\ntype: Opaque",
        )
        .unwrap();
        let data = decode_secret(value).map_err(|_| ()).unwrap();
        assert_eq!(data["a"], b"hello");
        assert_eq!(data["b"], b"plain");

        let value: Value =
            crate::yaml::from_str("metadata: {name: s}\ndata: {a: 'not base64!'}").unwrap();
        let problems = decode_secret(value).err().unwrap();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path, "data.a");
        assert!(
            problems[0].message.starts_with("invalid base64"),
            "{}",
            problems[0].message
        );
    }
}
