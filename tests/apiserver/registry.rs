//! The resource types the test API server serves: a fixed set of built-in kinds plus the
//! kinds of every CustomResourceDefinition that has been created, and the legacy discovery
//! documents (`/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`) describing them.

use serde_json::{Value, json};

/// Where the `/scale` subresource reads and writes its fields (from the CRD).
#[derive(Clone, Debug)]
pub struct ScalePaths {
    /// JSONPath of the desired replicas, e.g. `.spec.consumers`.
    pub spec_replicas: String,
    /// JSONPath of the observed replicas, e.g. `.status.consumers`.
    pub status_replicas: String,
    /// JSONPath of the label selector string, if any.
    pub label_selector: Option<String>,
}

/// One printer column of a resource (the CRD's `additionalPrinterColumns`).
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// One served resource of one group/version.
#[derive(Clone, Debug)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    pub status_subresource: bool,
    pub scale: Option<ScalePaths>,
    pub columns: Vec<Column>,
    /// The `openAPIV3Schema` of a custom resource.
    pub schema: Option<Value>,
    /// Served from a CRD: schema pruning/validation, no unconditional update, object returned on delete.
    pub custom: bool,
    /// Whether `metadata.generation` is maintained (custom resources and CRDs).
    pub generation: bool,
}

impl ResourceType {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The storage key: objects are shared by all versions of a group's resource.
    pub fn key(&self) -> (String, String) {
        (self.group.clone(), self.plural.clone())
    }

    /// `plural.group` (or `plural`), the name used in error messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn discovery_entries(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.scale.is_some() {
            out.push(json!({
                "name": format!("{}/scale", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

fn builtin(
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    short: &[&str],
    namespaced: bool,
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: Vec::new(),
        namespaced,
        status_subresource: false,
        scale: None,
        columns: Vec::new(),
        schema: None,
        custom: false,
        generation: false,
    }
}

fn column(name: &str, type_: &str, json_path: &str) -> Column {
    Column {
        name: name.into(),
        type_: type_.into(),
        format: String::new(),
        description: String::new(),
        priority: 0,
        json_path: json_path.into(),
    }
}

/// The registry of served resource types.
#[derive(Clone, Debug)]
pub struct Registry {
    types: Vec<ResourceType>,
}

impl Registry {
    /// The built-in kinds Weir and kubectl use. Core v1 Events and `events.k8s.io/v1`
    /// Events are stored separately here, whereas a real cluster serves one storage
    /// through both APIs.
    pub fn builtins() -> Self {
        let mut namespaces = builtin("", "v1", "Namespace", "namespaces", &["ns"], false);
        namespaces.status_subresource = true;
        namespaces.columns = vec![column("Status", "string", ".status.phase")];
        let mut secrets = builtin("", "v1", "Secret", "secrets", &[], true);
        secrets.columns = vec![column("Type", "string", ".type")];
        let mut crds = builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            &["crd", "crds"],
            false,
        );
        crds.status_subresource = true;
        crds.generation = true;
        crds.columns = vec![column(
            "Created At",
            "string",
            ".metadata.creationTimestamp",
        )];
        let mut leases = builtin("coordination.k8s.io", "v1", "Lease", "leases", &[], true);
        leases.columns = vec![column("Holder", "string", ".spec.holderIdentity")];
        let mut events = builtin("events.k8s.io", "v1", "Event", "events", &["ev"], true);
        events.columns = vec![
            column("Reason", "string", ".reason"),
            column("Note", "string", ".note"),
        ];
        Self {
            types: vec![
                namespaces,
                secrets,
                builtin("", "v1", "ConfigMap", "configmaps", &["cm"], true),
                // Stored only (no controller runs them): examples/kubernetes applies a sink's
                // Deployment and Service beside the Weir resources.
                builtin("", "v1", "Service", "services", &["svc"], true),
                builtin("apps", "v1", "Deployment", "deployments", &["deploy"], true),
                builtin("", "v1", "Event", "events", &["ev"], true),
                events,
                leases,
                crds,
            ],
        }
    }

    /// The type served at `group/version/plural`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    /// All served types.
    pub fn all(&self) -> &[ResourceType] {
        &self.types
    }

    /// Serves (or re-serves after an update) the versions of a CRD.
    pub fn register_crd(&mut self, crd: &Value) {
        let types = types_of_crd(crd);
        self.unregister_crd(crd);
        self.types.extend(types);
    }

    /// Stops serving a CRD's resources.
    pub fn unregister_crd(&mut self, crd: &Value) {
        let group = crd["spec"]["group"].as_str().unwrap_or_default();
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default();
        self.types
            .retain(|t| !(t.custom && t.group == group && t.plural == plural));
    }

    /// The groups other than core, with their versions, in registration order.
    fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for t in self.types.iter().filter(|t| !t.group.is_empty()) {
            match out.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, versions)) if versions.contains(&t.version) => {}
                Some((_, versions)) => versions.push(t.version.clone()),
                None => out.push((t.group.clone(), vec![t.version.clone()])),
            }
        }
        out
    }

    /// Whether `group/version` is served at all.
    pub fn serves(&self, group: &str, version: &str) -> bool {
        self.types
            .iter()
            .any(|t| t.group == group && t.version == version)
    }

    /// `GET /api`.
    pub fn api_versions(&self, server_address: &str) -> Value {
        json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        })
    }

    fn group_doc(group: &str, versions: &[String]) -> Value {
        let versions: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
            .collect();
        json!({
            "name": group,
            "versions": versions,
            "preferredVersion": versions[0],
        })
    }

    /// `GET /apis`.
    pub fn api_group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .iter()
            .map(|(g, vs)| Self::group_doc(g, vs))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `GET /apis/{group}`.
    pub fn api_group(&self, group: &str) -> Option<Value> {
        self.groups()
            .into_iter()
            .find(|(g, _)| g == group)
            .map(|(g, vs)| {
                let mut doc = Self::group_doc(&g, &vs);
                doc["kind"] = json!("APIGroup");
                doc["apiVersion"] = json!("v1");
                doc
            })
    }

    /// `GET /api/v1` or `GET /apis/{group}/{version}`.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        if !self.serves(group, version) {
            return None;
        }
        let resources: Vec<Value> = self
            .types
            .iter()
            .filter(|t| t.group == group && t.version == version)
            .flat_map(|t| t.discovery_entries())
            .collect();
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": gv,
            "resources": resources,
        }))
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// The resource types a CRD declares (one per served version).
pub fn types_of_crd(crd: &Value) -> Vec<ResourceType> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let Some(versions) = spec["versions"].as_array() else {
        return Vec::new();
    };
    versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .map(|v| {
            let columns = v["additionalPrinterColumns"]
                .as_array()
                .map(|cols| {
                    cols.iter()
                        .map(|c| Column {
                            name: str_of(&c["name"]),
                            type_: str_of(&c["type"]),
                            format: str_of(&c["format"]),
                            description: str_of(&c["description"]),
                            priority: c["priority"].as_i64().unwrap_or(0),
                            json_path: str_of(&c["jsonPath"]),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let scale = v["subresources"]["scale"].as_object().map(|s| ScalePaths {
                spec_replicas: s.get("specReplicasPath").map(str_of).unwrap_or_default(),
                status_replicas: s.get("statusReplicasPath").map(str_of).unwrap_or_default(),
                label_selector: s.get("labelSelectorPath").map(str_of),
            });
            let kind = str_of(&names["kind"]);
            let singular = names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| kind.to_lowercase());
            ResourceType {
                group: str_of(&spec["group"]),
                version: str_of(&v["name"]),
                kind,
                plural: str_of(&names["plural"]),
                singular,
                short_names: strings(&names["shortNames"]),
                categories: strings(&names["categories"]),
                namespaced: spec["scope"].as_str() != Some("Cluster"),
                status_subresource: v["subresources"]["status"].is_object(),
                scale,
                columns,
                schema: Some(v["schema"]["openAPIV3Schema"].clone()),
                custom: true,
                generation: true,
            }
        })
        .collect()
}
