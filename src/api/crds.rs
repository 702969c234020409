//! The CustomResourceDefinitions of the four kinds, as objects and as the YAML in `crds/`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{ArchivePolicy, CachePolicy, EventStream, Subscription};

/// Failure to render the CRDs.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("cannot render CRD {name} as YAML: {source}")]
    Yaml {
        name: String,
        #[source]
        source: serde_yaml::Error,
    },
}

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
    serde_yaml::to_string(crd).map_err(|source| CrdError::Yaml {
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
