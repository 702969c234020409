//! Consistency of the Helm chart `charts/weir`, checked without `helm`: its CRDs are the
//! generated ones, its values match values.schema.json (and typos are rejected), every value a
//! template reads exists, the templates' actions are balanced, the Pod runs under the
//! `restricted` Pod Security Standard, and its RBAC grants exactly what the operator calls.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/weir")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn values() -> Value {
    weir::yaml::from_str(&read(&chart().join("values.yaml"))).unwrap()
}

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(&read(&chart().join("values.schema.json"))).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

fn templates() -> Vec<(String, String)> {
    let mut out: Vec<_> = std::fs::read_dir(chart().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                read(&p),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let listed = |dir: &str| -> BTreeSet<String> {
        std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect()
    };
    assert_eq!(listed("crds"), listed("charts/weir/crds"));
    for crd in weir::api::crds::all() {
        let name = weir::api::crds::file_name(&crd);
        let expected = weir::api::crds::crd_yaml(&crd).unwrap();
        assert_eq!(
            read(&root.join("charts/weir/crds").join(&name)),
            expected,
            "charts/weir/crds/{name} differs from the generated CRD (regenerate with `WEIR_UPDATE_CRDS=1 cargo test --test crds`)"
        );
    }
}

#[test]
fn default_values_satisfy_the_schema() {
    let v = validator();
    let values = values();
    let errors: Vec<String> = v.iter_errors(&values).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn the_schema_rejects_typos_and_wrong_types() {
    let v = validator();
    let mutate = |f: &dyn Fn(&mut Value)| {
        let mut values = values();
        f(&mut values);
        values
    };
    let cases: Vec<(&str, Value)> = vec![
        (
            "unknown top-level key",
            mutate(&|v| v["replicas"] = json!(3)),
        ),
        (
            "misspelt nested key",
            mutate(&|v| v["autoscaling"]["enable"] = json!(true)),
        ),
        (
            "string where a number belongs",
            mutate(&|v| v["replicaCount"] = json!("two")),
        ),
        (
            "bad duration",
            mutate(&|v| v["operator"]["refresh"] = json!("a minute")),
        ),
        (
            "bad namespace name",
            mutate(&|v| v["watchNamespaces"] = json!(["Shop_1"])),
        ),
        (
            "a sink range that is not a CIDR",
            mutate(&|v| v["operator"]["sinkAllowCidrs"] = json!(["metadata server"])),
        ),
        (
            "unknown service type",
            mutate(&|v| v["service"]["ingest"]["type"] = json!("Ingress")),
        ),
    ];
    for (what, values) in cases {
        assert!(!v.is_valid(&values), "{what} was accepted");
    }
    // And a legitimate override passes.
    let ok = mutate(&|v| {
        v["watchNamespaces"] = json!(["shop", "billing"]);
        v["keda"]["enabled"] = json!(true);
        v["env"] = json!([{"name": "EVENT_BATCH_SIZE", "value": "100"}]);
        v["operator"]["sinkAllowCidrs"] = json!(["169.254.10.0/24", "fd00:ec2::254/128"]);
    });
    assert!(v.is_valid(&ok));
}

/// Every `.Values.a.b.c` a template reads.
fn value_paths(text: &str) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(".Values.") {
        rest = &rest[i + ".Values.".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
            .unwrap_or(rest.len());
        let path: Vec<String> = rest[..end]
            .trim_end_matches('.')
            .split('.')
            .map(String::from)
            .collect();
        out.insert(path);
    }
    out
}

#[test]
fn every_value_a_template_reads_exists_and_every_value_is_read() {
    let values = values();
    let mut used_top = BTreeSet::new();
    for (name, text) in templates() {
        for path in value_paths(&text) {
            let mut v = &values;
            for seg in &path {
                v = v.get(seg).unwrap_or_else(|| {
                    panic!(
                        "{name} reads .Values.{} which values.yaml lacks",
                        path.join(".")
                    )
                });
            }
            used_top.insert(path[0].clone());
        }
    }
    let declared: BTreeSet<String> = values.as_object().unwrap().keys().cloned().collect();
    let unused: Vec<_> = declared.difference(&used_top).collect();
    assert!(unused.is_empty(), "values no template reads: {unused:?}");
}

#[test]
fn template_actions_are_balanced() {
    for (name, text) in templates() {
        let mut depth: i32 = 0;
        let mut rest = text.as_str();
        while let Some(i) = rest.find("{{") {
            let after = &rest[i + 2..];
            let close = after
                .find("}}")
                .unwrap_or_else(|| panic!("{name}: unclosed {{{{"));
            let action = after[..close]
                .trim_start_matches('-')
                .trim_end_matches('-')
                .trim();
            let word = action.split_whitespace().next().unwrap_or("");
            match word {
                "if" | "range" | "with" | "define" | "block" => depth += 1,
                "end" => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0, "{name}: `end` without an opening action");
            rest = &after[close + 2..];
        }
        assert_eq!(depth, 0, "{name}: unbalanced if/range/with/define");
    }
}

#[test]
fn the_pod_is_restricted() {
    let deployment = read(&chart().join("templates/deployment.yaml"));
    for needle in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "type: RuntimeDefault",
        "path: /readyz",
        "path: /healthz",
        "topologySpreadConstraints",
        "- operator",
    ] {
        assert!(deployment.contains(needle), "deployment lacks {needle}");
    }
    let helpers = read(&chart().join("templates/_helpers.tpl"));
    for label in [
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
    ] {
        assert!(helpers.contains(label), "helpers lack {label}");
    }
    let values = values();
    assert_eq!(values["replicaCount"], 2);
    assert_eq!(values["autoscaling"]["enabled"], true);
}

/// The rules of one `define` block of `_helpers.tpl` (plain YAML by convention).
fn rules(helpers: &str, define: &str) -> Vec<Value> {
    let start = helpers
        .find(&format!("define \"{define}\""))
        .unwrap_or_else(|| panic!("no define {define}"));
    let body = &helpers[start..];
    let body = &body[body.find("}}").unwrap() + 2..];
    let body = &body[..body.find("{{- end }}").unwrap()];
    let y: Value = weir::yaml::from_str(body).unwrap();
    y.as_array().unwrap().clone()
}

#[test]
fn rbac_grants_exactly_the_calls_the_operator_makes() {
    let helpers = read(&chart().join("templates/_helpers.tpl"));
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    for define in ["weir.resourceRules", "weir.clusterRules", "weir.leaseRules"] {
        for rule in rules(&helpers, define) {
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for v in rule["verbs"].as_array().unwrap() {
                        let t = (
                            g.as_str().unwrap().to_string(),
                            r.as_str().unwrap().to_string(),
                            v.as_str().unwrap().to_string(),
                        );
                        assert!(t.2 != "*", "wildcard verb in {define}");
                        granted.insert(t);
                    }
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> = weir::control::API_CALLS
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    let missing: Vec<_> = used.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "calls the chart does not allow: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "rules for calls the code never makes: {extra:?}"
    );
    // No list/watch of Secrets anywhere.
    assert!(!granted.iter().any(|(_, r, v)| r == "secrets" && v != "get"));
}

#[test]
fn chart_version_follows_the_crate() {
    let chart: BTreeMap<String, Value> =
        weir::yaml::from_str(&read(&chart().join("Chart.yaml"))).unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion"
    );
    assert_eq!(chart["name"].as_str(), Some("weir"));
}

#[test]
fn the_service_monitor_keeps_weirs_namespace_label() {
    // The dashboard and the KEDA query select on Weir's own `namespace` label; a scrape
    // without honorLabels would rename it `exported_namespace`.
    let (_, text) = templates()
        .into_iter()
        .find(|(name, _)| name == "servicemonitor.yaml")
        .expect("the ServiceMonitor template");
    let endpoint = text.split("endpoints:").nth(1).expect("an endpoints list");
    assert!(
        endpoint.lines().any(|l| l.trim() == "honorLabels: true"),
        "{endpoint}"
    );
}
