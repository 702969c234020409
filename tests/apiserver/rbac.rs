//! RBAC as the real API server's authorizer applies it, from Role/ClusterRole and
//! RoleBinding/ClusterRoleBinding objects (in tests: the ones the Helm chart renders). A
//! request is allowed when a rule bound to its user, or to one of its groups, matches its
//! verb, API group, resource (with subresource), name and namespace. Non-resource paths
//! (discovery, `/version`, `/openapi`) are allowed to every authenticated user, as the
//! `system:discovery` and `system:public-info-viewer` ClusterRoles do on a real cluster.

use serde_json::{Value, json};

use super::Call;

#[derive(Clone, Debug)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

#[derive(Clone, Debug)]
struct Binding {
    /// `User` names (service accounts as `system:serviceaccount:NS:NAME`) and `Group`s.
    users: Vec<String>,
    groups: Vec<String>,
    /// `None` for a ClusterRoleBinding (every namespace and cluster-scoped requests).
    namespace: Option<String>,
    rules: Vec<Rule>,
}

/// The bindings and their resolved rules.
#[derive(Clone, Debug, Default)]
pub struct Rbac {
    bindings: Vec<Binding>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn rules_of(role: &Value) -> Vec<Rule> {
    role["rules"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| Rule {
                    groups: strings(&r["apiGroups"]),
                    resources: strings(&r["resources"]),
                    verbs: strings(&r["verbs"]),
                    names: strings(&r["resourceNames"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Rbac {
    /// Reads the RBAC objects among `objects` (others are ignored). A binding whose role is
    /// missing grants nothing, as on a real cluster.
    pub fn from_objects(objects: &[Value]) -> Rbac {
        let find = |kind: &str, name: &str, ns: Option<&str>| -> Vec<Rule> {
            objects
                .iter()
                .find(|o| {
                    o["kind"] == kind
                        && o["metadata"]["name"] == name
                        && ns.is_none_or(|ns| o["metadata"]["namespace"] == ns)
                })
                .map(rules_of)
                .unwrap_or_default()
        };
        let mut bindings = Vec::new();
        for o in objects {
            let kind = o["kind"].as_str().unwrap_or_default();
            if kind != "RoleBinding" && kind != "ClusterRoleBinding" {
                continue;
            }
            let ns = o["metadata"]["namespace"].as_str();
            let role_kind = o["roleRef"]["kind"].as_str().unwrap_or_default();
            let role_name = o["roleRef"]["name"].as_str().unwrap_or_default();
            let rules = match role_kind {
                "ClusterRole" => find("ClusterRole", role_name, None),
                // A RoleBinding's Role is in the binding's namespace.
                _ => find("Role", role_name, ns),
            };
            let mut users = Vec::new();
            let mut groups = Vec::new();
            for s in o["subjects"].as_array().into_iter().flatten() {
                let name = s["name"].as_str().unwrap_or_default();
                match s["kind"].as_str() {
                    Some("ServiceAccount") => users.push(format!(
                        "system:serviceaccount:{}:{name}",
                        s["namespace"].as_str().or(ns).unwrap_or("default")
                    )),
                    Some("User") => users.push(name.into()),
                    Some("Group") => groups.push(name.into()),
                    _ => {}
                }
            }
            bindings.push(Binding {
                users,
                groups,
                namespace: if kind == "RoleBinding" {
                    ns.map(String::from)
                } else {
                    None
                },
                rules,
            });
        }
        Rbac { bindings }
    }

    /// Whether `user` (with `groups`) may make `call`.
    pub fn allows(&self, user: &str, groups: &[String], call: &Call) -> bool {
        if call.resource.is_empty() {
            return true;
        }
        let resource = match &call.subresource {
            Some(sub) => format!("{}/{sub}", call.resource),
            None => call.resource.clone(),
        };
        let any = |list: &[String], want: &str| list.iter().any(|x| x == "*" || x == want);
        self.bindings
            .iter()
            .filter(|b| {
                b.users.iter().any(|u| u == user) || b.groups.iter().any(|g| groups.contains(g))
            })
            .filter(|b| match (&b.namespace, &call.namespace) {
                (None, _) => true,
                (Some(bound), Some(asked)) => bound == asked,
                // A Role never grants cluster-scoped requests or lists across namespaces.
                (Some(_), None) => false,
            })
            .flat_map(|b| b.rules.iter())
            .any(|r| {
                any(&r.verbs, &call.verb)
                    && any(&r.groups, &call.group)
                    && (any(&r.resources, &resource)
                        || (call.subresource.is_some()
                            && r.resources.iter().any(|x| {
                                x == &format!(
                                    "*/{}",
                                    call.subresource.as_deref().unwrap_or_default()
                                )
                            })))
                    && (r.names.is_empty()
                        || call.name.as_ref().is_some_and(|n| r.names.contains(n)))
            })
    }
}

/// The 403 Status the real API server answers (its message is what kubectl prints after
/// `Error from server (Forbidden): `).
pub fn forbidden(user: &str, call: &Call) -> Value {
    let qualified = if call.group.is_empty() {
        call.resource.clone()
    } else {
        format!("{}.{}", call.resource, call.group)
    };
    let subject = match &call.name {
        Some(name) => format!("{qualified} \"{name}\""),
        None => qualified,
    };
    let resource = match &call.subresource {
        Some(sub) => format!("{}/{sub}", call.resource),
        None => call.resource.clone(),
    };
    let scope = match &call.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let mut details = json!({ "group": call.group, "kind": call.resource });
    if let Some(name) = &call.name {
        details["name"] = json!(name);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "{subject} is forbidden: User \"{user}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
            call.verb, call.group
        ),
        "reason": "Forbidden",
        "details": details,
        "code": 403,
    })
}

/// The 401 Status for a bearer token the server does not know.
pub fn unauthorized() -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    })
}
