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

/// The four CRDs, in a stable order: EventStream, Subscription, ArchivePolicy, CachePolicy.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        EventStream::crd(),
        Subscription::crd(),
        ArchivePolicy::crd(),
        CachePolicy::crd(),
    ]
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
/// directories), and returns the paths written. This is what `weir crds --write` does.
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
    Ok(written)
}
