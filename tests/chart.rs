//! The Helm chart `charts/weir`, rendered by the real `helm` (scripts/install-helm.sh): it
//! passes `helm lint --strict`; its CRDs are the generated ones; values.schema.json refuses
//! typos (in the file and through `helm template`); every value a template reads exists; the
//! rendered Pod runs under the `restricted` Pod Security Standard, shuts down in order and adapts
//! to platforms that assign user ids; the PodDisruptionBudget never blocks a drain; the archive
//! volume, dashboard ConfigMap, PrometheusRule and ServiceMonitor render as documented; the
//! `tracing` values set the `OTEL_*` variables the worker accepts (none by default); and the
//! rendered RBAC grants exactly what the operator calls.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

#[path = "common/helm.rs"]
mod helm;

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

fn render(args: &[&str]) -> Vec<Value> {
    helm::render(args).unwrap_or_else(|e| panic!("helm template {args:?}: {e}"))
}

fn pod_spec(objects: &[Value]) -> &Value {
    &helm::one(objects, "Deployment")["spec"]["template"]["spec"]
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| &e["value"])
}

#[test]
fn helm_lint_strict_passes_with_every_option() {
    let dir = helm::chart_dir();
    let dir = dir.to_str().unwrap();
    helm::run(&["lint", "--strict", dir]).unwrap_or_else(|e| panic!("helm lint: {e}"));
    let all_on = [
        "--set=keda.enabled=true",
        "--set=serviceMonitor.enabled=true",
        "--set=networkPolicy.enabled=true",
        "--set=grafanaDashboard.enabled=true",
        "--set=prometheusRule.enabled=true",
        "--set=archiveVolume.enabled=true",
        "--set=watchNamespaces={shop,billing}",
        "--set=tracing.otlpEndpoint=http://otel-collector.observability:4318",
        "--set=tracing.headersSecret.name=otlp-auth",
    ];
    let mut args = vec!["lint", "--strict", dir];
    args.extend(all_on);
    helm::run(&args).unwrap_or_else(|e| panic!("helm lint with every option: {e}"));
}

#[test]
fn helm_refuses_typos_and_wrong_types_in_values() {
    for (set, names) in [
        ("--set=replicas=3", "replicas"),
        ("--set=autoscaling.enable=true", "enable"),
        (
            "--set=podSecurityContext.adaptToPlatform=sometimes",
            "adaptToPlatform",
        ),
        (
            "--set=shutdown.preStopSleepSeconds=-1",
            "preStopSleepSeconds",
        ),
        ("--set=tracing.sampler=sometimes", "sampler"),
        ("--set=tracing.otlpEndpoint=collector:4318", "otlpEndpoint"),
    ] {
        let err = helm::render(&[set]).expect_err(set);
        assert!(
            err.contains("values don't meet the specifications of the schema")
                && err.contains(names),
            "{set}: {err}"
        );
    }
}

#[test]
fn span_export_is_off_by_default_and_the_tracing_values_turn_it_on() {
    let otel_env = |objects: &[Value]| -> BTreeMap<String, Value> {
        pod_spec(objects)["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"].as_str().unwrap().starts_with("OTEL_"))
            .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
            .collect()
    };
    assert!(otel_env(&render(&[])).is_empty());
    let objects = render(&[
        "--set=tracing.otlpEndpoint=http://otel-collector.observability:4318",
        "--set=tracing.sampler=parentbased_traceidratio",
        "--set-string=tracing.samplerArg=0.25",
        "--set=tracing.headersSecret.name=otlp-auth",
    ]);
    let env = otel_env(&objects);
    let value = |name: &str| env[name]["value"].as_str().unwrap().to_string();
    assert_eq!(
        value("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "http://otel-collector.observability:4318"
    );
    assert_eq!(value("OTEL_SERVICE_NAME"), "weir");
    assert_eq!(value("OTEL_TRACES_SAMPLER"), "parentbased_traceidratio");
    assert_eq!(value("OTEL_TRACES_SAMPLER_ARG"), "0.25");
    assert_eq!(
        env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"],
        json!({"name": "otlp-auth", "key": "headers"})
    );
    // What the chart sets is what the worker accepts and exports with.
    let settings = weir::otel::Settings::read(|name| {
        env.get(name)
            .and_then(|e| e["value"].as_str())
            .map(String::from)
    })
    .expect("the rendered OTEL_* variables are accepted");
    assert!(settings.export);
}

#[test]
fn the_rendered_pod_is_restricted() {
    let objects = render(&[]);
    let pod = pod_spec(&objects);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["args"][0], "operator");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(pod["topologySpreadConstraints"].is_array());
    // The Deployment's selector is what the operator reports as the subscriptions' `/scale`
    // selector (an HPA on a Subscription reads these Pods' metrics).
    let deployment = helm::one(&objects, "Deployment");
    let labels = deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    let selector = env_value(c, "WEIR_POD_SELECTOR").unwrap().as_str().unwrap();
    let mut pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect();
    let mut given: Vec<String> = selector.split(',').map(String::from).collect();
    pairs.sort();
    given.sort();
    assert_eq!(given, pairs);
    for (k, v) in labels {
        assert_eq!(&deployment["spec"]["template"]["metadata"]["labels"][k], v);
    }
}

#[test]
fn the_pod_shuts_down_in_order() {
    let objects = render(&[]);
    let pod = pod_spec(&objects);
    let c = &pod["containers"][0];
    let sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .unwrap();
    assert_eq!(sleep, 5);
    assert_eq!(env_value(c, "WEIR_DRAIN_TIMEOUT"), Some(&json!("15s")));
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(grace >= sleep + 15 + 10, "grace {grace}");

    // No preStop on clusters without the sleep action.
    let objects = render(&["--set=shutdown.preStopSleepSeconds=0"]);
    assert!(pod_spec(&objects)["containers"][0]["lifecycle"].is_null());

    // A grace period the drain cannot fit in is refused at render time.
    let err = helm::render(&[
        "--set=terminationGracePeriodSeconds=20",
        "--set=shutdown.drainTimeoutSeconds=30",
    ])
    .expect_err("a grace period shorter than the drain");
    assert!(
        err.contains("terminationGracePeriodSeconds (20) must be at least") && err.contains("(45)"),
        "{err}"
    );
}

#[test]
fn the_disruption_budget_never_blocks_a_drain() {
    let pdb = |args: &[&str]| -> Option<Value> {
        helm::of_kind(&render(args), "PodDisruptionBudget")
            .first()
            .map(|p| p["spec"].clone())
    };
    // Default: one worker at a time, whatever the replica count.
    let spec = pdb(&[]).expect("a PDB by default");
    assert_eq!(spec["maxUnavailable"], 1);
    assert!(spec.get("minAvailable").is_none());
    let spec = pdb(&["--set=autoscaling.enabled=false", "--set=replicaCount=1"]).unwrap();
    assert_eq!(spec["maxUnavailable"], 1);

    let min1 = [
        "--set=podDisruptionBudget.maxUnavailable=null",
        "--set=podDisruptionBudget.minAvailable=1",
    ];
    // minAvailable 1 with a single replica would block every drain: not rendered.
    let mut args = min1.to_vec();
    args.extend(["--set=autoscaling.enabled=false", "--set=replicaCount=1"]);
    assert_eq!(pdb(&args), None);
    // ... nor with an autoscaler that may go down to one.
    let mut args = min1.to_vec();
    args.push("--set=autoscaling.minReplicas=1");
    assert_eq!(pdb(&args), None);
    // With two replicas at least, it is.
    let mut args = min1.to_vec();
    args.extend(["--set=autoscaling.enabled=false", "--set=replicaCount=2"]);
    let spec = pdb(&args).expect("minAvailable 1 of 2");
    assert_eq!(spec["minAvailable"], 1);
    assert!(spec.get("maxUnavailable").is_none());
    let mut args = min1.to_vec();
    args.extend(["--set=keda.enabled=true", "--set=keda.minReplicaCount=3"]);
    assert!(pdb(&args).is_some());
    assert_eq!(pdb(&["--set=podDisruptionBudget.enabled=false"]), None);
}

#[test]
fn platforms_that_assign_user_ids_get_none_from_the_chart() {
    let ids = |args: &[&str]| -> Vec<String> {
        let objects = render(args);
        let sc = pod_spec(&objects)["securityContext"].clone();
        assert_eq!(sc["runAsNonRoot"], true, "{sc}");
        ["runAsUser", "runAsGroup", "fsGroup"]
            .into_iter()
            .filter(|k| sc.get(*k).is_some())
            .map(String::from)
            .collect()
    };
    assert_eq!(ids(&[]).len(), 3);
    // OpenShift (restricted-v2 assigns the ids): detected from the served API groups.
    assert!(ids(&["--api-versions=security.openshift.io/v1"]).is_empty());
    assert!(ids(&["--set=podSecurityContext.adaptToPlatform=force"]).is_empty());
    assert_eq!(
        ids(&[
            "--api-versions=security.openshift.io/v1",
            "--set=podSecurityContext.adaptToPlatform=disabled"
        ])
        .len(),
        3
    );
}

#[test]
fn the_archive_volume_is_a_claim_mounted_where_policies_write() {
    let objects = render(&[]);
    assert!(helm::of_kind(&objects, "PersistentVolumeClaim").is_empty());

    let objects = render(&[
        "--set=archiveVolume.enabled=true",
        "--set=archiveVolume.size=50Gi",
    ]);
    let pvc = helm::one(&objects, "PersistentVolumeClaim");
    assert_eq!(pvc["metadata"]["name"], "weir-archive");
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "50Gi");
    assert_eq!(pvc["spec"]["accessModes"], json!(["ReadWriteMany"]));
    assert_eq!(
        pvc["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let pod = pod_spec(&objects);
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "archive")
        .expect("an archive volume");
    assert_eq!(volume["persistentVolumeClaim"]["claimName"], "weir-archive");
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "archive")
        .expect("an archive mount");
    assert_eq!(mount["mountPath"], "/var/lib/weir/archive");

    let objects = render(&[
        "--set=archiveVolume.enabled=true",
        "--set=archiveVolume.existingClaim=archives",
    ]);
    assert!(helm::of_kind(&objects, "PersistentVolumeClaim").is_empty());
    let pod = pod_spec(&objects);
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["persistentVolumeClaim"]["claimName"] == "archives")
    );
}

/// (apiGroup, resource, verb) triples a list of PolicyRules grants.
fn granted(rules: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules.as_array().unwrap() {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    assert_ne!(v, "*", "wildcard verb in {rule}");
                    assert_ne!(r, "*", "wildcard resource in {rule}");
                    out.insert((
                        g.as_str().unwrap().to_string(),
                        r.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn rendered_rbac_grants_exactly_the_calls_the_operator_makes() {
    let used: BTreeSet<(String, String, String)> = weir::control::API_CALLS
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    let check = |objects: &[Value]| {
        let mut all = BTreeSet::new();
        for kind in ["ClusterRole", "Role"] {
            for role in helm::of_kind(objects, kind) {
                all.extend(granted(&role["rules"]));
            }
        }
        let missing: Vec<_> = used.difference(&all).collect();
        let extra: Vec<_> = all.difference(&used).collect();
        assert!(
            missing.is_empty(),
            "calls the chart does not allow: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "rules for calls the code never makes: {extra:?}"
        );
        // No list/watch of Secrets anywhere.
        assert!(!all.iter().any(|(_, r, v)| r == "secrets" && v != "get"));
    };
    // All namespaces: one ClusterRole holds the resource rules.
    let objects = render(&[]);
    check(&objects);
    let cluster = granted(&helm::one(&objects, "ClusterRole")["rules"]);
    assert!(cluster.contains(&("weir.dev".into(), "eventstreams".into(), "watch".into())));
    // Listed namespaces: the resource rules only in a Role per namespace.
    let objects = render(&["--set=watchNamespaces={shop,billing}"]);
    check(&objects);
    let cluster = granted(&helm::one(&objects, "ClusterRole")["rules"]);
    assert!(!cluster.iter().any(|(g, _, _)| g == "weir.dev"));
    let namespaces: BTreeSet<&str> = helm::of_kind(&objects, "Role")
        .iter()
        .filter(|r| {
            r["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["apiGroups"][0] == "weir.dev")
        })
        .map(|r| r["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(namespaces, BTreeSet::from(["shop", "billing"]));
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
    let objects = render(&["--set=serviceMonitor.enabled=true"]);
    let monitor = helm::one(&objects, "ServiceMonitor");
    let endpoints = monitor["spec"]["endpoints"].as_array().unwrap();
    assert!(!endpoints.is_empty());
    for e in endpoints {
        assert_eq!(e["honorLabels"], true, "{e}");
    }
    assert!(helm::of_kind(&render(&[]), "ServiceMonitor").is_empty());
}

#[test]
fn the_dashboard_ships_as_a_configmap_for_grafanas_sidecar() {
    assert!(helm::of_kind(&render(&[]), "ConfigMap").is_empty());
    let objects = render(&[
        "--set=grafanaDashboard.enabled=true",
        "--set=grafanaDashboard.namespace=monitoring",
    ]);
    let cm = helm::one(&objects, "ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "Weir");
    let shipped: Value = serde_json::from_str(cm["data"]["weir.json"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(&read(&chart().join("dashboards/weir.json"))).unwrap();
    assert_eq!(shipped, file);
}

#[test]
fn the_prometheus_rule_is_the_checked_rule_file() {
    let path = chart().join("rules/weir.rules.yaml");
    // The rule file is valid for Prometheus itself.
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool (Debian package prometheus; scripts/services.sh installs it)");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(helm::of_kind(&render(&[]), "PrometheusRule").is_empty());
    let objects = render(&[
        "--set=prometheusRule.enabled=true",
        "--set=prometheusRule.labels.release=kube-prometheus-stack",
    ]);
    let rule = helm::one(&objects, "PrometheusRule");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let file: Value = weir::yaml::from_str(&read(&path)).unwrap();
    assert_eq!(
        rule["spec"], file,
        "the PrometheusRule's spec is the rule file"
    );
    let alerts: BTreeSet<&str> = file["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for wanted in [
        "WeirRelayLagGrowing",
        "WeirDeadLettersGrowing",
        "WeirStoreUnavailable",
        "WeirBrokerPublishFailing",
        "WeirIngestErrors",
        "WeirArchiveFailing",
        "WeirPoolExhausted",
    ] {
        assert!(alerts.contains(wanted), "{wanted} missing: {alerts:?}");
    }
}
