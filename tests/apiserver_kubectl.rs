//! The in-process test API server, driven by the real kubectl and by kube-rs: what Weir's
//! CRDs and manifests need from a Kubernetes API (apply, printing, explain, patch, scale,
//! finalizers, watches, conflicts, server-side apply) behaves as on a real cluster.
//!
//! Each test starts its own server, so tests are independent and run in parallel.

mod apiserver;

use std::time::Duration;

use apiserver::{TestApiServer, ok};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};

/// The other three kinds, so `kubectl get weir` has one of each.
const MORE_KINDS: &str = r#"
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {name: mailer, namespace: shop}
spec:
  stream: orders
  sink: {uri: "http://127.0.0.1:9/hook"}
---
apiVersion: weir.dev/v1alpha1
kind: CachePolicy
metadata: {name: hot, namespace: shop}
spec: {streamNames: [orders]}
---
apiVersion: weir.dev/v1alpha1
kind: ArchivePolicy
metadata: {name: nightly, namespace: shop}
spec: {streamNames: [orders]}
"#;

/// Creates the namespace `shop` (with `apply`: `kubectl create namespace` sends protobuf,
/// which the test server does not read).
async fn create_shop(server: &TestApiServer) {
    ok(server
        .kubectl_with_input(
            &["apply", "-f", "-"],
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        )
        .await);
}

/// A server with namespace `shop`, the CRDs, the quickstart and `MORE_KINDS` applied.
async fn with_quickstart() -> TestApiServer {
    let server = TestApiServer::start().await;
    create_shop(&server).await;
    ok(server.kubectl(&["apply", "-f", "crds/"]).await);
    ok(server
        .kubectl(&["apply", "-f", "examples/quickstart/"])
        .await);
    ok(server
        .kubectl_with_input(&["apply", "-f", "-"], MORE_KINDS)
        .await);
    server
}

fn es(server: &TestApiServer, name: &str) -> Value {
    server
        .object("weir.dev", "eventstreams", "shop", name)
        .unwrap_or_else(|| panic!("eventstream {name} is missing"))
}

fn eventstreams(client: kube::Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("weir.dev", "v1alpha1", "EventStream"),
        "eventstreams",
    );
    Api::namespaced_with(client, ns, &ar)
}

fn stream_object(name: &str, max_events: Value) -> DynamicObject {
    let value = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "EventStream",
        "metadata": {"name": name},
        "spec": {
            "broker": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}},
            "batching": {"maxEvents": max_events},
        },
    });
    match serde_json::from_value(value) {
        Ok(o) => o,
        Err(e) => panic!("the test object does not parse: {e}"),
    }
}

fn api_code(err: kube::Error) -> u16 {
    match err {
        kube::Error::Api(status) => status.code,
        other => panic!("expected an API error, got {other}"),
    }
}

/// The output of a background kubectl, which must exit within 30 s.
async fn exited(child: tokio::process::Child, what: &str) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not return"))
        .unwrap_or_else(|e| panic!("kubectl: {e}"))
}

/// [`exited`], and successfully.
async fn finished(child: tokio::process::Child, what: &str) -> std::process::Output {
    let out = exited(child, what).await;
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `kubectl patch KIND NAME -n shop [--subresource SUB] --type TYPE -p BODY`, asserted to
/// succeed.
async fn patch(
    server: &TestApiServer,
    kind: &str,
    name: &str,
    subresource: Option<&str>,
    type_: &str,
    body: &str,
) {
    let mut args = vec!["patch", kind, name, "-n", "shop"];
    if let Some(sub) = subresource {
        args.extend(["--subresource", sub]);
    }
    args.extend(["--type", type_, "-p", body]);
    ok(server.kubectl(&args).await);
}

#[tokio::test]
async fn kubectl_applies_crds_and_quickstart_and_prints_weir_columns() {
    let server = TestApiServer::start().await;
    create_shop(&server).await;
    let out = ok(server.kubectl(&["apply", "-f", "crds/"]).await);
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/eventstreams.weir.dev created"),
        "{out}"
    );
    let established = ok(server
        .kubectl(&[
            "get",
            "crd",
            "subscriptions.weir.dev",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#,
        ])
        .await);
    assert_eq!(established.trim(), "True");

    let out = ok(server
        .kubectl(&["apply", "-f", "examples/quickstart/"])
        .await);
    for line in [
        "eventstream.weir.dev/orders created",
        "eventstream.weir.dev/notifications created",
        "secret/rabbitmq created",
        "secret/pg created",
    ] {
        assert!(out.contains(line), "missing {line:?} in {out}");
    }
    ok(server
        .kubectl_with_input(&["apply", "-f", "-"], MORE_KINDS)
        .await);

    let out = ok(server.kubectl(&["apply", "-f", "crds/"]).await);
    assert!(
        out.contains(
            "customresourcedefinition.apiextensions.k8s.io/eventstreams.weir.dev unchanged"
        ),
        "{out}"
    );

    // All four kinds through the `weir` category, each with its printer columns.
    let out = ok(server.kubectl(&["get", "weir", "-n", "shop"]).await);
    for needle in [
        "eventstream.weir.dev/orders",
        "eventstream.weir.dev/notifications",
        "subscription.weir.dev/mailer",
        "cachepolicy.weir.dev/hot",
        "archivepolicy.weir.dev/nightly",
        "ENDPOINT",
        "HEAD",
        "STREAM",
        "BACKLOG",
        "CONSUMERS",
        "STRATEGY",
        "HIT RATIO",
        "LAST RUN",
        "AGE",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    // The Subscription's Stream column comes from `.spec.stream`.
    let line = out
        .lines()
        .find(|l| l.contains("subscription.weir.dev/mailer"))
        .unwrap_or_default();
    assert!(line.contains("orders"), "{line}");

    // Re-applying unchanged manifests changes nothing, not even resourceVersions.
    let rv = es(&server, "orders")["metadata"]["resourceVersion"].clone();
    let out = ok(server
        .kubectl(&["apply", "-f", "examples/quickstart/"])
        .await);
    assert!(
        out.contains("eventstream.weir.dev/orders unchanged"),
        "{out}"
    );
    assert_eq!(es(&server, "orders")["metadata"]["resourceVersion"], rv);

    let creates: Vec<_> = server
        .calls()
        .into_iter()
        .filter(|c| c.verb == "create" && c.resource == "eventstreams")
        .collect();
    assert_eq!(creates.len(), 2, "{creates:?}");
    assert!(creates[0].user_agent.starts_with("kubectl"));
}

#[tokio::test]
async fn kubectl_get_yaml_and_short_names() {
    let server = with_quickstart().await;
    let out = ok(server
        .kubectl(&["get", "wes", "orders", "-n", "shop", "-o", "yaml"])
        .await);
    for needle in [
        "kind: EventStream",
        "maxEvents: 100",
        "generation: 1",
        "uid: ",
        "creationTimestamp: ",
        "tier: business",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    let out = ok(server.kubectl(&["get", "wes", "-n", "shop"]).await);
    assert!(
        out.contains("orders") && out.contains("notifications"),
        "{out}"
    );
    let out = ok(server.kubectl(&["get", "wsub", "-A"]).await);
    assert!(out.contains("shop") && out.contains("mailer"), "{out}");
    let out = ok(server
        .kubectl(&[
            "get",
            "wes",
            "-n",
            "shop",
            "-l",
            "tier=business",
            "-o",
            "name",
        ])
        .await);
    assert_eq!(out.trim(), "eventstream.weir.dev/orders");
    // `kubectl describe` (the object, then its core v1 Events by field selector).
    let out = ok(server
        .kubectl(&["describe", "wes", "orders", "-n", "shop"])
        .await);
    assert!(out.contains("Max Events:") && out.contains("100"), "{out}");
    let out = ok(server
        .kubectl(&["delete", "-f", "examples/quickstart/"])
        .await);
    assert!(
        out.contains("eventstream.weir.dev \"orders\" deleted"),
        "{out}"
    );
    assert!(server.object("", "secrets", "shop", "pg").is_none());
    let missing = server.kubectl(&["get", "wes", "nope", "-n", "shop"]).await;
    assert!(!missing.success);
    assert!(
        missing.stderr.contains("NotFound") || missing.stderr.contains("not found"),
        "{}",
        missing.stderr
    );
}

#[tokio::test]
async fn kubectl_explain_shows_the_crd_docs() {
    let server = TestApiServer::start().await;
    ok(server.kubectl(&["apply", "-f", "crds/"]).await);
    let out = ok(server
        .kubectl(&["explain", "eventstream.spec.batching"])
        .await);
    for needle in [
        "EventStream",
        "batching",
        "How accepted requests are grouped into one store transaction or one publish.",
        "maxEvents",
        "maxDelay",
        "maxBytes",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    let out = ok(server
        .kubectl(&["explain", "wes.spec.batching.maxEvents"])
        .await);
    assert!(out.contains("Events per batch, at least 1."), "{out}");
}

#[tokio::test]
async fn patches_bump_generation_on_spec_changes_only() {
    let server = with_quickstart().await;
    let generation = |s: &TestApiServer| es(s, "orders")["metadata"]["generation"].as_i64();
    assert_eq!(generation(&server), Some(1));

    patch(
        &server,
        "wes",
        "orders",
        None,
        "merge",
        r#"{"spec":{"batching":{"maxEvents":50}}}"#,
    )
    .await;
    assert_eq!(generation(&server), Some(2));
    assert_eq!(es(&server, "orders")["spec"]["batching"]["maxEvents"], 50);

    // Metadata changes do not bump the generation.
    ok(server
        .kubectl(&["label", "wes", "orders", "-n", "shop", "team=payments"])
        .await);
    assert_eq!(generation(&server), Some(2));
    assert_eq!(
        es(&server, "orders")["metadata"]["labels"]["team"],
        "payments"
    );

    patch(
        &server,
        "wes",
        "orders",
        None,
        "json",
        r#"[{"op":"replace","path":"/spec/batching/maxEvents","value":75}]"#,
    )
    .await;
    assert_eq!(generation(&server), Some(3));

    // Status goes through /status only, without a generation bump.
    let status = r#"{"status":{"observedGeneration":3,"conditions":[{"type":"Ready","status":"True","reason":"Provisioned","message":"ok","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    patch(&server, "wes", "orders", Some("status"), "merge", status).await;
    assert_eq!(generation(&server), Some(3));
    assert_eq!(es(&server, "orders")["status"]["observedGeneration"], 3);
    // A status change through the main resource is ignored.
    patch(
        &server,
        "wes",
        "orders",
        None,
        "merge",
        r#"{"status":{"observedGeneration":99}}"#,
    )
    .await;
    assert_eq!(es(&server, "orders")["status"]["observedGeneration"], 3);
    let out = ok(server
        .kubectl(&["get", "wes", "orders", "-n", "shop"])
        .await);
    let row = out.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("orders") && row.contains("True"), "{out}");

    // `kubectl edit` round trip (the editor is a sed script).
    let mut edit = tokio::process::Command::from(server.kubectl_command());
    edit.args(["edit", "wes", "orders", "-n", "shop"])
        .env("KUBE_EDITOR", "sed -i -e 's/maxEvents: 75$/maxEvents: 80/'");
    let out = edit
        .output()
        .await
        .unwrap_or_else(|e| panic!("kubectl edit: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(es(&server, "orders")["spec"]["batching"]["maxEvents"], 80);
    assert_eq!(generation(&server), Some(4));
}

#[tokio::test]
async fn schema_rejects_wrong_types_and_strict_kubectl_rejects_unknown_fields() {
    let server = with_quickstart().await;
    let api = eventstreams(server.client(), "shop");
    let err = api
        .create(&PostParams::default(), &stream_object("bad", json!("lots")))
        .await
        .expect_err("a string maxEvents must be rejected");
    assert_eq!(api_code(err), 422);

    let manifest = r#"
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: typo, namespace: shop}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}}
  batchingg: {maxEvents: 3}
"#;
    let out = server
        .kubectl_with_input(&["apply", "-f", "-"], manifest)
        .await;
    assert!(!out.success, "{}", out.stdout);
    assert!(out.stderr.contains("unknown field"), "{}", out.stderr);
    // Without strict validation the unknown field is pruned, as a real server does.
    ok(server
        .kubectl_with_input(&["apply", "--validate=false", "-f", "-"], manifest)
        .await);
    let stored = es(&server, "typo");
    assert!(stored["spec"].get("batchingg").is_none(), "{stored}");
    assert_eq!(stored["spec"]["broker"]["urlSecretRef"]["name"], "rabbitmq");
}

#[tokio::test]
async fn kubectl_delete_waits_for_finalizers() {
    let server = with_quickstart().await;
    patch(
        &server,
        "wes",
        "notifications",
        None,
        "merge",
        r#"{"metadata":{"finalizers":["weir.dev/cleanup"]}}"#,
    )
    .await;
    ok(server
        .kubectl(&[
            "delete",
            "wes",
            "notifications",
            "-n",
            "shop",
            "--wait=false",
        ])
        .await);
    let marked = es(&server, "notifications");
    assert!(
        marked["metadata"]["deletionTimestamp"].is_string(),
        "{marked}"
    );
    assert_eq!(marked["metadata"]["generation"], 2);

    // A waiting `kubectl delete` returns once the finalizer is removed.
    let child = server.kubectl_spawn(&[
        "delete",
        "wes",
        "notifications",
        "-n",
        "shop",
        "--timeout=60s",
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        server
            .object("weir.dev", "eventstreams", "shop", "notifications")
            .is_some()
    );
    eventstreams(server.client(), "shop")
        .patch(
            "notifications",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap_or_else(|e| panic!("removing the finalizer: {e}"));
    finished(child, "kubectl delete").await;
    assert!(
        server
            .object("weir.dev", "eventstreams", "shop", "notifications")
            .is_none()
    );

    // Without finalizers, delete removes at once.
    let out = ok(server
        .kubectl(&["delete", "secret", "pg", "-n", "shop"])
        .await);
    assert!(out.contains("secret \"pg\" deleted"), "{out}");
    assert!(server.object("", "secrets", "shop", "pg").is_none());
    ok(server
        .kubectl(&["delete", "wes", "orders", "-n", "shop"])
        .await);
    assert!(
        server
            .object("weir.dev", "eventstreams", "shop", "orders")
            .is_none()
    );
}

#[tokio::test]
async fn kubectl_scale_writes_the_subscription_consumers() {
    let server = with_quickstart().await;
    let out = ok(server
        .kubectl(&["scale", "wsub", "mailer", "-n", "shop", "--replicas=8"])
        .await);
    assert!(out.contains("subscription.weir.dev/mailer scaled"), "{out}");
    let sub = server
        .object("weir.dev", "subscriptions", "shop", "mailer")
        .unwrap_or_else(|| panic!("subscription missing"));
    assert_eq!(sub["spec"]["consumers"], 8);
    assert_eq!(sub["metadata"]["generation"], 2);
    assert!(server.calls().iter().any(|c| c.verb == "patch"
        && c.resource == "subscriptions"
        && c.subresource.as_deref() == Some("scale")));

    patch(
        &server,
        "wsub",
        "mailer",
        Some("status"),
        "merge",
        r#"{"status":{"consumers":8,"selector":"app.kubernetes.io/name=weir"}}"#,
    )
    .await;
    let scale = ok(server
        .kubectl(&[
            "get",
            "wsub",
            "mailer",
            "-n",
            "shop",
            "--subresource",
            "scale",
            "-o",
            "jsonpath={.spec.replicas}/{.status.replicas}/{.status.selector}",
        ])
        .await);
    assert_eq!(scale, "8/8/app.kubernetes.io/name=weir");

    // An HPA-style read-modify-write of /scale, and a status replace, through kube-rs.
    let subs = Api::<DynamicObject>::namespaced_with(
        server.client(),
        "shop",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("weir.dev", "v1alpha1", "Subscription"),
            "subscriptions",
        ),
    );
    let mut scale = subs
        .get_scale("mailer")
        .await
        .unwrap_or_else(|e| panic!("get scale: {e}"));
    assert_eq!(scale.spec.as_ref().and_then(|s| s.replicas), Some(8));
    assert_eq!(
        scale
            .status
            .as_ref()
            .and_then(|s| s.selector.clone())
            .as_deref(),
        Some("app.kubernetes.io/name=weir")
    );
    if let Some(spec) = scale.spec.as_mut() {
        spec.replicas = Some(3);
    }
    subs.replace_scale("mailer", &PostParams::default(), &scale)
        .await
        .unwrap_or_else(|e| panic!("replace scale: {e}"));
    let sub = server
        .object("weir.dev", "subscriptions", "shop", "mailer")
        .unwrap_or_else(|| panic!("subscription missing"));
    assert_eq!(sub["spec"]["consumers"], 3);
    assert_eq!(sub["metadata"]["generation"], 3);
    // The same Scale again carries a stale resourceVersion.
    let err = subs
        .replace_scale("mailer", &PostParams::default(), &scale)
        .await
        .expect_err("a stale scale update must conflict");
    assert_eq!(api_code(err), 409);
    let mut current = subs
        .get_status("mailer")
        .await
        .unwrap_or_else(|e| panic!("get status: {e}"));
    current.data["status"]["consumers"] = json!(3);
    current.data["spec"]["consumers"] = json!(99);
    subs.replace_status("mailer", &PostParams::default(), &current)
        .await
        .unwrap_or_else(|e| panic!("replace status: {e}"));
    let sub = server
        .object("weir.dev", "subscriptions", "shop", "mailer")
        .unwrap_or_else(|| panic!("subscription missing"));
    assert_eq!(sub["status"]["consumers"], 3);
    // Spec changes sent to /status are ignored.
    assert_eq!(sub["spec"]["consumers"], 3);
    assert_eq!(sub["metadata"]["generation"], 3);

    // EventStreams have no /scale.
    let out = server
        .kubectl(&["scale", "wes", "orders", "-n", "shop", "--replicas=2"])
        .await;
    assert!(!out.success);
}

/// Collects watcher events until `pred` holds for the collected list.
async fn wait_for(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    want: &str,
) {
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(e) = rx.recv().await {
            seen.push(e.clone());
            if e == want {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "never saw {want}; saw {seen:?}");
}

#[tokio::test]
async fn kube_watcher_sees_changes_and_recovers_from_410() {
    let server = TestApiServer::start().await;
    create_shop(&server).await;
    ok(server.kubectl(&["apply", "-f", "crds/"]).await);
    let api = eventstreams(server.client(), "shop");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watched = api.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher(watched, watcher::Config::default()).boxed();
        while let Some(event) = stream.next().await {
            let line = match event {
                Ok(watcher::Event::Apply(o)) => format!(
                    "apply {} {}",
                    o.metadata.name.unwrap_or_default(),
                    o.metadata.generation.unwrap_or_default()
                ),
                Ok(watcher::Event::Delete(o)) => {
                    format!("delete {}", o.metadata.name.unwrap_or_default())
                }
                Ok(watcher::Event::Init) => "init".into(),
                Ok(watcher::Event::InitApply(o)) => {
                    format!("initapply {}", o.metadata.name.unwrap_or_default())
                }
                Ok(watcher::Event::InitDone) => "initdone".into(),
                Err(e) => format!("error {e}"),
            };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    wait_for(&mut rx, &mut seen, "initdone").await;

    api.create(&PostParams::default(), &stream_object("a", json!(10)))
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
    wait_for(&mut rx, &mut seen, "apply a 1").await;
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"batching": {"maxEvents": 20}}})),
    )
    .await
    .unwrap_or_else(|e| panic!("patch: {e}"));
    wait_for(&mut rx, &mut seen, "apply a 2").await;

    // History compacted and the watch dropped: resuming gets 410, the watcher re-lists.
    server.compact();
    server.disconnect_watches();
    wait_for(&mut rx, &mut seen, "initapply a").await;
    wait_for(&mut rx, &mut seen, "initdone").await;

    api.create(&PostParams::default(), &stream_object("b", json!(10)))
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
    wait_for(&mut rx, &mut seen, "apply b 1").await;
    api.delete("a", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete: {e}"));
    wait_for(&mut rx, &mut seen, "delete a").await;
    task.abort();

    let lists = server
        .calls()
        .iter()
        .filter(|c| c.resource == "eventstreams" && c.verb == "list")
        .count();
    assert!(lists >= 2, "the watcher must have re-listed after 410");
}

/// Reads watch lines from a raw HTTP watch until one has `type`.
async fn raw_watch_until(url: &str, type_: &str) -> Vec<Value> {
    let mut resp = weir::tls_provider::http_client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("watch request: {e}"));
    assert!(resp.status().is_success());
    let mut buf = String::new();
    let mut lines = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = buf.find('\n') {
                let line: String = buf.drain(..=i).collect();
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                let hit = v["type"] == type_;
                lines.push(v);
                if hit {
                    return;
                }
            }
        }
    })
    .await;
    assert!(done.is_ok(), "no {type_} event; got {lines:?}");
    lines
}

#[tokio::test]
async fn raw_watch_sends_bookmarks_replays_and_410() {
    let server = with_quickstart().await;
    let base = format!(
        "{}/apis/weir.dev/v1alpha1/namespaces/shop/eventstreams",
        server.url()
    );
    let list: Value = weir::tls_provider::http_client()
        .get(&base)
        .send()
        .await
        .unwrap_or_else(|e| panic!("list: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("list body: {e}"));
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2));

    // Pagination: limit/continue, with remainingItemCount.
    let get = |url: String| async move {
        weir::tls_provider::http_client()
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .json::<Value>()
            .await
            .unwrap_or_else(|e| panic!("GET {url} body: {e}"))
    };
    let page1 = get(format!("{base}?limit=1")).await;
    assert_eq!(page1["items"][0]["metadata"]["name"], "notifications");
    assert_eq!(page1["metadata"]["remainingItemCount"], 1);
    let token = page1["metadata"]["continue"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let encoded = percent_encoding::utf8_percent_encode(&token, percent_encoding::NON_ALPHANUMERIC);
    let page2 = get(format!("{base}?limit=1&continue={encoded}")).await;
    assert_eq!(page2["items"][0]["metadata"]["name"], "orders");
    assert!(page2["metadata"].get("continue").is_none(), "{page2}");

    // A change after the list is replayed to a watch from the list's version.
    ok(server
        .kubectl(&["label", "wes", "orders", "-n", "shop", "x=y"])
        .await);
    let lines = raw_watch_until(&format!("{base}?watch=1&resourceVersion={rv}"), "MODIFIED").await;
    assert_eq!(lines[0]["object"]["metadata"]["labels"]["x"], "y");

    let lines = raw_watch_until(
        &format!("{base}?watch=1&allowWatchBookmarks=true&resourceVersion={rv}"),
        "BOOKMARK",
    )
    .await;
    let bookmark = lines.last().cloned().unwrap_or_default();
    assert_eq!(bookmark["object"]["kind"], "EventStream");
    assert!(bookmark["object"]["metadata"]["resourceVersion"].is_string());

    // With a label selector, an object that starts matching is ADDED and one that stops
    // matching is DELETED.
    let now = server.resource_version();
    ok(server
        .kubectl(&["label", "wes", "notifications", "-n", "shop", "x=y"])
        .await);
    let lines = raw_watch_until(
        &format!("{base}?watch=1&labelSelector=x%3Dy&resourceVersion={now}"),
        "ADDED",
    )
    .await;
    assert_eq!(lines[0]["object"]["metadata"]["name"], "notifications");
    let now = server.resource_version();
    ok(server
        .kubectl(&["label", "wes", "orders", "-n", "shop", "x-"])
        .await);
    let lines = raw_watch_until(
        &format!("{base}?watch=1&labelSelector=x%3Dy&resourceVersion={now}"),
        "DELETED",
    )
    .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["object"]["metadata"]["name"], "orders");

    // An exact list of a past version cannot be served (no snapshots are kept): 410.
    let exact = get(format!(
        "{base}?resourceVersion={rv}&resourceVersionMatch=Exact"
    ))
    .await;
    assert_eq!(exact["code"], 410, "{exact}");

    server.compact();
    let lines = raw_watch_until(&format!("{base}?watch=1&resourceVersion={rv}"), "ERROR").await;
    assert_eq!(lines[0]["object"]["code"], 410);
    assert_eq!(lines[0]["object"]["reason"], "Expired");
}

#[tokio::test]
async fn conflicts_server_side_apply_leases_and_events() {
    let server = with_quickstart().await;
    let client = server.client();
    let api = eventstreams(client.clone(), "shop");

    // Update with a stale resourceVersion: 409; without one: 422 for custom resources.
    let stale = api
        .get("orders")
        .await
        .unwrap_or_else(|e| panic!("get: {e}"));
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .unwrap_or_else(|e| panic!("patch: {e}"));
    let err = api
        .replace("orders", &PostParams::default(), &stale)
        .await
        .expect_err("a stale update must conflict");
    assert_eq!(api_code(err), 409);
    let mut unversioned = stale.clone();
    unversioned.metadata.resource_version = None;
    let err = api
        .replace("orders", &PostParams::default(), &unversioned)
        .await
        .expect_err("an unconditional update of a custom resource is invalid");
    assert_eq!(api_code(err), 422);

    // kube-runtime's finalizer helper: `test` for null on a missing path, then `add`.
    api.patch(
        "notifications",
        &PatchParams::default(),
        &Patch::Json::<()>(
            serde_json::from_value(json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["weir.dev/cleanup"]},
            ]))
            .unwrap_or_else(|e| panic!("json patch: {e}")),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("finalizer patch: {e}"));
    assert_eq!(
        es(&server, "notifications")["metadata"]["finalizers"],
        json!(["weir.dev/cleanup"])
    );
    // A failing test is a 422, and nothing is applied.
    let err = api
        .patch(
            "notifications",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([
                    {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
                    {"op": "test", "path": "/metadata/finalizers", "value": null},
                ]))
                .unwrap_or_else(|e| panic!("json patch: {e}")),
            ),
        )
        .await
        .expect_err("a failing test op must fail the patch");
    assert_eq!(api_code(err), 422);
    assert!(
        es(&server, "notifications")["metadata"]
            .get("labels")
            .is_none()
    );

    // Status through server-side apply under the manager `weir`.
    let apply = PatchParams::apply("weir").force();
    // `message` is required in a condition; `observedGeneration` is the optional field a
    // later apply stops setting.
    let status = |observed: Option<i64>| {
        let mut cond = json!({"type": "Ready", "status": "True", "reason": "Provisioned", "message": "ok", "lastTransitionTime": "2026-01-01T00:00:00Z"});
        if let Some(g) = observed {
            cond["observedGeneration"] = json!(g);
        }
        json!({
            "apiVersion": "weir.dev/v1alpha1",
            "kind": "EventStream",
            "status": {"observedGeneration": 1, "conditions": [cond], "endpoint": "http://weir/orders"},
        })
    };
    let before = es(&server, "orders");
    api.patch_status("orders", &apply, &Patch::Apply(status(Some(1))))
        .await
        .unwrap_or_else(|e| panic!("apply status: {e}"));
    let after = es(&server, "orders");
    assert_eq!(after["status"]["endpoint"], "http://weir/orders");
    assert_eq!(
        after["metadata"]["generation"],
        before["metadata"]["generation"]
    );
    assert_eq!(after["spec"], before["spec"]);
    let managed = after["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        managed.iter().any(|m| m["manager"] == "weir"
            && m["operation"] == "Apply"
            && m["subresource"] == "status"),
        "{managed:?}"
    );
    // The same apply again is a no-op: no new resourceVersion.
    api.patch_status("orders", &apply, &Patch::Apply(status(Some(1))))
        .await
        .unwrap_or_else(|e| panic!("apply status: {e}"));
    assert_eq!(
        es(&server, "orders")["metadata"]["resourceVersion"],
        after["metadata"]["resourceVersion"]
    );
    // Fields the manager stops applying are removed.
    let mut without_endpoint = status(None);
    if let Some(s) = without_endpoint["status"].as_object_mut() {
        s.remove("endpoint");
    }
    api.patch_status("orders", &apply, &Patch::Apply(without_endpoint))
        .await
        .unwrap_or_else(|e| panic!("apply status: {e}"));
    let last = es(&server, "orders");
    assert!(last["status"].get("endpoint").is_none(), "{last}");
    assert!(
        last["status"]["conditions"][0]
            .get("observedGeneration")
            .is_none(),
        "{last}"
    );
    assert!(server.calls().iter().any(|c| c.verb == "patch"
        && c.resource == "eventstreams"
        && c.subresource.as_deref() == Some("status")
        && c.field_manager.as_deref() == Some("weir")));

    // Leases: create, renew with the current version, conflict with a stale one.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "shop");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "weir-leader"},
        "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15},
    }))
    .unwrap_or_else(|e| panic!("lease: {e}"));
    let created = leases
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_or_else(|e| panic!("create lease: {e}"));
    let mut renewed = created.clone();
    if let Some(spec) = renewed.spec.as_mut() {
        spec.holder_identity = Some("pod-b".into());
    }
    leases
        .replace("weir-leader", &PostParams::default(), &renewed)
        .await
        .unwrap_or_else(|e| panic!("renew: {e}"));
    let err = leases
        .replace("weir-leader", &PostParams::default(), &created)
        .await
        .expect_err("a stale lease update must conflict");
    assert_eq!(api_code(err), 409);

    // events.k8s.io Events as the kube-rs recorder writes them.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "shop");
    let event: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"generateName": "orders-"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reason": "Provisioned", "note": "exchange declared", "type": "Normal",
        "action": "Reconcile", "reportingController": "weir.dev/operator", "reportingInstance": "pod-a",
        "regarding": {"apiVersion": "weir.dev/v1alpha1", "kind": "EventStream", "name": "orders", "namespace": "shop"},
    }))
    .unwrap_or_else(|e| panic!("event: {e}"));
    let created = events
        .create(&PostParams::default(), &event)
        .await
        .unwrap_or_else(|e| panic!("create event: {e}"));
    assert!(
        created
            .metadata
            .name
            .unwrap_or_default()
            .starts_with("orders-")
    );
    assert_eq!(
        events
            .list(&Default::default())
            .await
            .map(|l| l.items.len())
            .ok(),
        Some(1)
    );

    // What the kube-rs calls (not kubectl's) needed, as RBAC would see it.
    let used = server.permissions_used(|c| !c.is_kubectl());
    for (group, resource, verb) in [
        ("weir.dev", "eventstreams", "get"),
        ("weir.dev", "eventstreams", "update"),
        ("weir.dev", "eventstreams/status", "patch"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "update"),
        ("events.k8s.io", "events", "create"),
    ] {
        assert!(
            used.contains(&(group.to_string(), resource.to_string(), verb.to_string())),
            "{group} {resource} {verb} missing from {used:?}"
        );
    }
    assert!(
        !used
            .iter()
            .any(|(_, r, _)| r == "customresourcedefinitions"),
        "{used:?}"
    );

    // Secrets are read with get.
    let secrets: Api<Secret> = Api::namespaced(client, "shop");
    let pg = secrets
        .get("pg")
        .await
        .unwrap_or_else(|e| panic!("get secret: {e}"));
    // `stringData` was stored as `data`, as a real server does.
    let url = pg
        .data
        .unwrap_or_default()
        .remove("url")
        .map(|b| b.0)
        .unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&url),
        "postgres://postgres@127.0.0.1:5432/postgres"
    );
    assert!(pg.string_data.is_none());
}

#[tokio::test]
async fn kubectl_wait_server_side_apply_watch_and_namespace_delete() {
    let server = with_quickstart().await;

    // `kubectl wait` (list + watch by name) returns once a controller sets Ready.
    let child = server.kubectl_spawn(&[
        "wait",
        "--for=condition=Ready",
        "wes/orders",
        "-n",
        "shop",
        "--timeout=30s",
    ]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let ready = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "EventStream",
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Provisioned",
            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
    });
    eventstreams(server.client(), "shop")
        .patch_status(
            "orders",
            &PatchParams::apply("weir").force(),
            &Patch::Apply(ready),
        )
        .await
        .unwrap_or_else(|e| panic!("status: {e}"));
    let out = finished(child, "kubectl wait").await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("condition met"));

    // `kubectl get -w` prints the rows of Table watch events.
    let child = server.kubectl_spawn(&["get", "wes", "-n", "shop", "-w", "--request-timeout=4s"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ok(server
        .kubectl(&["label", "wes", "notifications", "-n", "shop", "w=1"])
        .await);
    let out = exited(child, "kubectl get -w").await;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        printed
            .lines()
            .filter(|l| l.starts_with("notifications"))
            .count(),
        2,
        "{printed}"
    );
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with("orders") && l.contains("True")),
        "{printed}"
    );

    // `kubectl apply --server-side`: the manager `kubectl` owns the applied fields.
    let out = ok(server
        .kubectl(&["apply", "--server-side", "-f", "examples/quickstart/"])
        .await);
    assert!(
        out.contains("eventstream.weir.dev/orders serverside-applied"),
        "{out}"
    );
    let managed = es(&server, "orders")["metadata"]["managedFields"].clone();
    assert!(
        managed.as_array().is_some_and(|m| m
            .iter()
            .any(|e| e["manager"] == "kubectl" && e["operation"] == "Apply")),
        "{managed}"
    );
    assert_eq!(
        server
            .object("", "secrets", "shop", "pg")
            .map(|s| s["type"].clone()),
        Some(json!("Opaque"))
    );

    // Deleting a CRD stops serving its kind and deletes its objects.
    ok(server
        .kubectl(&["delete", "crd", "archivepolicies.weir.dev"])
        .await);
    let out = ok(server.kubectl(&["get", "crd", "-o", "name"]).await);
    assert!(!out.contains("archivepolicies"), "{out}");
    assert!(out.contains("eventstreams.weir.dev"), "{out}");
    ok(server
        .kubectl(&["apply", "-f", "crds/archivepolicies.weir.dev.yaml"])
        .await);
    let out = ok(server
        .kubectl(&["get", "wap", "-n", "shop", "-o", "name"])
        .await);
    assert!(out.trim().is_empty(), "the old objects must be gone: {out}");

    // Deleting the namespace deletes what is in it.
    ok(server.kubectl(&["delete", "namespace", "shop"]).await);
    assert!(
        server
            .object("weir.dev", "eventstreams", "shop", "orders")
            .is_none()
    );
    assert!(server.object("", "secrets", "shop", "pg").is_none());
    let out = ok(server.kubectl(&["get", "ns", "-o", "name"]).await);
    assert!(!out.contains("namespace/shop"), "{out}");
}

#[tokio::test]
async fn kube_recorder_events_and_streaming_list_watcher() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let server = with_quickstart().await;
    // The generated kubeconfig works for kube-rs too (as `KUBECONFIG` for a weir process).
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig())
        .unwrap_or_else(|e| panic!("kubeconfig: {e}"));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig: {e}"));
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).unwrap_or_else(|e| panic!("client: {e}"));

    // The kube-runtime recorder creates an events.k8s.io Event, then patches its series.
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "weir".into(),
            instance: Some("weir-0".into()),
        },
    );
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("weir.dev/v1alpha1".into()),
        kind: Some("EventStream".into()),
        name: Some("orders".into()),
        namespace: Some("shop".into()),
        uid: es(&server, "orders")["metadata"]["uid"]
            .as_str()
            .map(String::from),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "SecretMissing".into(),
        note: Some("secret pg has no key url".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    for _ in 0..2 {
        recorder
            .publish(&event, &reference)
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
    }
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "shop");
    let list = events
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("list events: {e}"));
    assert_eq!(list.items.len(), 1, "{:?}", list.items);
    assert_eq!(list.items[0].reason.as_deref(), Some("SecretMissing"));
    assert_eq!(list.items[0].series.as_ref().map(|s| s.count), Some(2));
    let verbs: Vec<String> = server
        .calls()
        .iter()
        .filter(|c| c.group == "events.k8s.io" && c.resource == "events")
        .map(|c| c.verb.clone())
        .collect();
    assert!(
        verbs.contains(&"create".to_string()) && verbs.contains(&"patch".to_string()),
        "{verbs:?}"
    );

    // A watcher with streaming lists (sendInitialEvents) gets the current objects, then
    // the end-of-initial-events bookmark.
    let api = eventstreams(client, "shop");
    let mut stream = watcher(api, watcher::Config::default().streaming_lists()).boxed();
    let mut names = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(e)) = stream.next().await {
            match e {
                watcher::Event::InitApply(o) => names.push(o.metadata.name.unwrap_or_default()),
                watcher::Event::InitDone => return true,
                _ => {}
            }
        }
        false
    })
    .await;
    assert_eq!(done, Ok(true));
    names.sort();
    assert_eq!(names, ["notifications", "orders"]);
    assert!(server.calls().iter().any(|c| c.verb == "watch"
        && c.resource == "eventstreams"
        && c.path.contains("eventstreams")));
}

#[tokio::test]
async fn server_side_apply_conflicts_and_lease_handover() {
    use kube_lease_manager::LeaseManagerBuilder;
    let server = with_quickstart().await;
    let client = server.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "shop");

    // Two managers applying different values to one field: the second gets 409 unless
    // it forces; a merge patch (an update) takes the field over without a conflict.
    let holder = |who: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "probe"}, "spec": {"holderIdentity": who}})
    };
    leases
        .patch(
            "probe",
            &PatchParams::apply("a"),
            &Patch::Apply(holder("a")),
        )
        .await
        .unwrap_or_else(|e| panic!("apply a: {e}"));
    let err = leases
        .patch(
            "probe",
            &PatchParams::apply("b"),
            &Patch::Apply(holder("b")),
        )
        .await
        .expect_err("b must conflict with a");
    assert_eq!(api_code(err), 409);
    // Applying the value already there is shared ownership, not a conflict.
    leases
        .patch(
            "probe",
            &PatchParams::apply("b"),
            &Patch::Apply(holder("a")),
        )
        .await
        .unwrap_or_else(|e| panic!("apply same value: {e}"));
    leases
        .patch(
            "probe",
            &PatchParams::apply("c").force(),
            &Patch::Apply(holder("c")),
        )
        .await
        .unwrap_or_else(|e| panic!("forced apply: {e}"));
    leases
        .patch(
            "probe",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": null}})),
        )
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    leases
        .patch(
            "probe",
            &PatchParams::apply("a"),
            &Patch::Apply(holder("a")),
        )
        .await
        .unwrap_or_else(|e| panic!("apply after release: {e}"));

    // kube-lease-manager on this server: one holder at a time; killing it hands over.
    let start = |identity: &'static str| {
        let client = client.clone();
        async move {
            LeaseManagerBuilder::new(client, "weir-leader")
                .with_namespace("shop")
                .with_identity(identity)
                .with_duration(2)
                .with_grace(1)
                .build()
                .await
                .unwrap_or_else(|e| panic!("lease manager: {e}"))
                .watch()
                .await
        }
    };
    let (rx_a, task_a) = start("replica-a").await;
    let (rx_b, task_b) = start("replica-b").await;
    let leader = |rx_a: &tokio::sync::watch::Receiver<bool>,
                  rx_b: &tokio::sync::watch::Receiver<bool>| {
        (*rx_a.borrow(), *rx_b.borrow())
    };
    let mut settled = (false, false);
    for _ in 0..100 {
        settled = leader(&rx_a, &rx_b);
        if settled.0 != settled.1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        settled.0 != settled.1,
        "exactly one replica must hold the lease: {settled:?}"
    );
    let (holder_task, survivor) = if settled.0 {
        (task_a, rx_b)
    } else {
        (task_b, rx_a)
    };
    holder_task.abort();
    let took_over = tokio::time::timeout(Duration::from_secs(20), async {
        let mut survivor = survivor;
        while !*survivor.borrow_and_update() {
            if survivor.changed().await.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(
        took_over,
        Ok(true),
        "the other replica must take the lease over"
    );
}

/// For manual use: starts a server with the CRDs and the quickstart applied, prints its
/// kubeconfig and serves for `WEIR_TEST_APISERVER_SECONDS` (default 600) seconds:
/// `cargo test --test apiserver_kubectl serve_manually -- --ignored --nocapture`, then
/// `kubectl --kubeconfig <printed path> get weir -A`.
#[tokio::test]
#[ignore = "manual use: serves until the timeout"]
async fn serve_manually() {
    let server = with_quickstart().await;
    println!("url: {}", server.url());
    println!("kubeconfig: {}", server.kubeconfig().display());
    let seconds = std::env::var("WEIR_TEST_APISERVER_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
}
