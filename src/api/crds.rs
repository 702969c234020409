//! The CustomResourceDefinitions of the four kinds, as objects and as the YAML in `crds/`.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{ArchivePolicy, CachePolicy, EventStream, Subscription};

/// Failure to render the CRDs.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// A CRD could not be serialised.
    #[error("cannot render CRD {name} as YAML: {source}")]
    Yaml {
        name: String,
        #[source]
        source: serde_saphyr::ser_error::Error,
    },
    /// A CRD file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The directories, relative to the repository root, that hold one file per CRD: the plain
/// manifests and the Helm chart's copy (Helm installs `crds/` before the templates).
pub const CRD_DIRS: [&str; 2] = ["crds", "charts/weir/crds"];

/// The four CRDs in one file (what [`to_yaml`] prints), relative to the repository root: the
/// release artifact for `kubectl apply --server-side -f`, since `helm upgrade` never updates
/// CRDs (docs/upgrading.md).
pub const CRD_BUNDLE: &str = "deploy/weir-crds.yaml";

/// The four CRDs, in a stable order: EventStream, Subscription, ArchivePolicy, CachePolicy.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        EventStream::crd(),
        Subscription::crd(),
        ArchivePolicy::crd(),
        CachePolicy::crd(),
    ]
    .into_iter()
    .map(with_kubernetes_integer_formats)
    .collect()
}

/// schemars names Rust's unsigned integers `uint16`/`uint32`/`uint64`; the API server knows
/// only `int32` and `int64` and (from 1.34) warns about other formats on every apply. Each is
/// rewritten to the signed format that holds its range, with the range as `minimum`/`maximum`
/// (a tighter bound already there is kept).
fn with_kubernetes_integer_formats(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    rewrite_integer_formats(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

fn rewrite_integer_formats(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let range = match map.get("format").and_then(Value::as_str) {
                Some("uint8") => Some(("int32", Some(u64::from(u8::MAX)))),
                Some("uint16") => Some(("int32", Some(u64::from(u16::MAX)))),
                Some("uint32") => Some(("int64", Some(u64::from(u32::MAX)))),
                Some("uint64" | "uint") => Some(("int64", None)),
                _ => None,
            };
            if let Some((format, max)) = range {
                map.insert("format".into(), format.into());
                let min = map.get("minimum").and_then(Value::as_f64).unwrap_or(0.0);
                map.insert("minimum".into(), (min.max(0.0) as u64).into());
                if let Some(max) = max {
                    let tighter = map
                        .get("maximum")
                        .and_then(Value::as_f64)
                        .map_or(max, |m| (m as u64).min(max));
                    map.insert("maximum".into(), tighter.into());
                }
            }
            for v in map.values_mut() {
                rewrite_integer_formats(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_integer_formats),
        _ => {}
    }
}

/// The file a CRD is written to under `crds/`, e.g. `eventstreams.weir.dev.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// One CRD as a YAML document (no leading `---`).
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, CrdError> {
    serde_saphyr::to_string(crd).map_err(|source| CrdError::Yaml {
        name: crd.metadata.name.clone().unwrap_or_default(),
        source,
    })
}

/// All four CRDs as one multi-document YAML stream (`---` before each document), in the order
/// of [`all`]; this is what `weir crds` prints.
pub fn to_yaml() -> Result<String, CrdError> {
    let mut out = String::new();
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&crd_yaml(&crd)?);
    }
    Ok(out)
}

/// Writes every CRD to its [`file_name`] in each of [`CRD_DIRS`] under `root` (creating the
/// directories) and all of them to [`CRD_BUNDLE`], and returns the paths written. This is
/// what `weir crds --write` does.
pub fn write_files(root: &Path) -> Result<Vec<PathBuf>, CrdError> {
    let mut written = Vec::new();
    for dir in CRD_DIRS {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).map_err(|source| CrdError::Io {
            path: dir.clone(),
            source,
        })?;
        for crd in all() {
            let path = dir.join(file_name(&crd));
            std::fs::write(&path, crd_yaml(&crd)?).map_err(|source| CrdError::Io {
                path: path.clone(),
                source,
            })?;
            written.push(path);
        }
    }
    let bundle = root.join(CRD_BUNDLE);
    if let Some(dir) = bundle.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CrdError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(&bundle, to_yaml()?).map_err(|source| CrdError::Io {
        path: bundle.clone(),
        source,
    })?;
    written.push(bundle);
    Ok(written)
}
