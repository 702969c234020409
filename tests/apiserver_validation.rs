//! The test API server refuses what a real one refuses, in the real one's words: the CRDs'
//! CEL rules (`x-kubernetes-validations`), the structural schema (types, enums, bounds,
//! `required`), metadata name rules and invalid status writes, each as a 422 `Invalid`
//! `Status` with the real message and causes (read through kube-rs) and as the real kubectl
//! prints it; unknown fields are pruned, or refused under strict field validation. Server-side
//! apply merges `x-kubernetes-list-type: map` lists (conditions) by key per field manager.

mod apiserver;
mod common;

use apiserver::{TestApiServer, ok};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};

/// A server with the CRDs and the namespace `shop`.
async fn server() -> TestApiServer {
    let server = TestApiServer::start().await;
    ok(server.kubectl(&["apply", "-f", "crds/"]).await);
    ok(server
        .kubectl_with_input(
            &["apply", "-f", "-"],
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        )
        .await);
    server
}

fn api(server: &TestApiServer, kind: &str, plural: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("weir.dev", "v1alpha1", kind),
        plural,
    );
    Api::namespaced_with(server.client(), "shop", &ar)
}

fn object(kind: &str, name: &str, spec: Value) -> DynamicObject {
    let value = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    });
    match serde_json::from_value(value) {
        Ok(o) => o,
        Err(e) => panic!("the test object does not parse: {e}"),
    }
}

/// The `Status` of a refused request, as JSON.
fn status_of<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Value {
    match result {
        Err(kube::Error::Api(status)) => match serde_json::to_value(&*status) {
            Ok(v) => v,
            Err(e) => panic!("the Status does not serialize: {e}"),
        },
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// The Status of creating `kind` `name` with `spec` through `api`, which must be refused.
async fn refused(api: &Api<DynamicObject>, kind: &str, name: &str, spec: Value) -> Value {
    status_of(
        api.create(&PostParams::default(), &object(kind, name, spec))
            .await,
    )
}

/// Asserts a 422 `Invalid` Status with exactly these causes `(reason, field, message)`; the
/// message is `Kind.group "name" is invalid: ` and the causes as Go aggregates them.
fn assert_invalid(status: &Value, kind: &str, name: &str, causes: &[(&str, &str, &str)]) {
    let texts: Vec<String> = causes
        .iter()
        .map(|(_, field, msg)| format!("{field}: {msg}"))
        .collect();
    let joined = if texts.len() == 1 {
        texts[0].clone()
    } else {
        format!("[{}]", texts.join(", "))
    };
    let want = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": format!("{kind}.weir.dev \"{name}\" is invalid: {joined}"),
        "reason": "Invalid",
        "details": {
            "name": name,
            "group": "weir.dev",
            "kind": kind,
            "causes": causes.iter().map(|(reason, field, message)| json!({
                "reason": reason, "message": message, "field": field,
            })).collect::<Vec<_>>(),
        },
        "code": 422,
    });
    // kube-rs's Status has no type fields (the raw body's are checked apart).
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            for k in ["metadata", "kind", "apiVersion"] {
                m.remove(k);
            }
        }
        v
    };
    assert_eq!(strip(status), strip(&want), "{status:#}");
}

const TOKENS_WITHOUT_SECRET: &str = r#"
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: guarded, namespace: shop}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}}
  ingest: {auth: {mode: Tokens}}
"#;

const POOL_TOO_LARGE: &str = r#"
apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {name: pooled, namespace: shop}
spec:
  broker: {urlSecretRef: {name: rabbitmq, key: url}}
  store:
    urlSecretRef: {name: pg, key: url}
    pool: {size: 20}
"#;

#[tokio::test]
async fn cel_rules_refuse_with_the_real_status_and_kubectl_message() {
    let server = server().await;
    let streams = api(&server, "EventStream", "eventstreams");

    // Create: the rule at spec.ingest.auth, its `message`, the node's type as the value.
    let bad = object(
        "EventStream",
        "guarded",
        json!({"broker": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}},
               "ingest": {"auth": {"mode": "Tokens"}}}),
    );
    let status = status_of(streams.create(&PostParams::default(), &bad).await);
    assert_invalid(
        &status,
        "EventStream",
        "guarded",
        &[(
            "FieldValueInvalid",
            "spec.ingest.auth",
            "Invalid value: \"object\": mode Tokens requires tokensSecretRef",
        )],
    );
    let out = server
        .kubectl_with_input(&["apply", "-f", "-"], TOKENS_WITHOUT_SECRET)
        .await;
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr.contains(
            "The EventStream \"guarded\" is invalid: spec.ingest.auth: Invalid value: \"object\": mode Tokens requires tokensSecretRef"
        ),
        "{}",
        out.stderr
    );
    assert!(
        server
            .object("weir.dev", "eventstreams", "shop", "guarded")
            .is_none()
    );
    // The raw answer is a `v1` `Status`.
    let raw = common::http()
        .post(format!(
            "{}/apis/weir.dev/v1alpha1/namespaces/shop/eventstreams",
            server.url()
        ))
        .json(&bad)
        .send()
        .await
        .expect("the server answers");
    assert_eq!(raw.status().as_u16(), 422);
    let raw: Value = raw.json().await.expect("a JSON Status");
    assert_eq!(
        (raw["kind"].as_str(), raw["apiVersion"].as_str()),
        (Some("Status"), Some("v1")),
        "{raw}"
    );
    assert_eq!(raw["details"], status["details"], "{raw}");

    // Update: a valid stream patched into the violation is refused and stays as it was.
    let good = object(
        "EventStream",
        "guarded",
        json!({"broker": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}},
               "ingest": {"auth": {"mode": "Tokens", "tokensSecretRef": {"name": "publishers"}}}}),
    );
    streams
        .create(&PostParams::default(), &good)
        .await
        .expect("a Tokens stream with its Secret is valid");
    let patch = json!({"spec": {"ingest": {"auth": {"tokensSecretRef": null}}}});
    let status = status_of(
        streams
            .patch("guarded", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
    );
    assert_eq!(status["code"], 422, "{status}");
    assert_eq!(
        status["details"]["causes"][0]["field"], "spec.ingest.auth",
        "{status}"
    );
    let stored = server
        .object("weir.dev", "eventstreams", "shop", "guarded")
        .expect("the stream");
    assert_eq!(
        stored["spec"]["ingest"]["auth"]["tokensSecretRef"]["name"], "publishers",
        "a refused patch changes nothing"
    );

    // A messageExpression (the numbers in the message), on a nested node.
    let out = server
        .kubectl_with_input(&["apply", "-f", "-"], POOL_TOO_LARGE)
        .await;
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr.contains(
            "The EventStream \"pooled\" is invalid: spec.store.pool: Invalid value: \"object\": size (20) must not exceed maxConnections (10)"
        ),
        "{}",
        out.stderr
    );

    // Rules on list items (path with the index), and the `filter` macro with `size()`.
    let status = refused(
        &streams,
        "EventStream",
        "typed",
        json!({"broker": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}},
               "validation": {"schemas": [{"type": "a", "schema": {}}, {"type": "b"}]}}),
    )
    .await;
    assert_invalid(
        &status,
        "EventStream",
        "typed",
        &[(
            "FieldValueInvalid",
            "spec.validation.schemas[1]",
            "Invalid value: \"object\": exactly one of schema or schemaFrom must be set",
        )],
    );
    let subs = api(&server, "Subscription", "subscriptions");
    let dead_letter_twice = object(
        "Subscription",
        "mailer",
        json!({"stream": "orders", "sink": {"uri": "http://127.0.0.1:9/"},
               "delivery": {"deadLetterSink": {"uri": "http://127.0.0.1:9/dl", "stream": "dead"}}}),
    );
    let status = status_of(
        subs.create(&PostParams::default(), &dead_letter_twice)
            .await,
    );
    assert_invalid(
        &status,
        "Subscription",
        "mailer",
        &[(
            "FieldValueInvalid",
            "spec.delivery.deadLetterSink",
            "Invalid value: \"object\": exactly one of uri, ref or stream must be set",
        )],
    );
    // Two rules failing at once: both causes, in brackets.
    let status = refused(
        &subs,
        "Subscription",
        "mailer",
        json!({"stream": "orders", "sink": {},
               "delivery": {"deadLetterSink": {}}}),
    )
    .await;
    let fields: Vec<&str> = status["details"]["causes"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["field"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(fields.len(), 2, "{status}");
    assert!(fields.contains(&"spec.sink"), "{status}");
    assert!(fields.contains(&"spec.delivery.deadLetterSink"), "{status}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Subscription.weir.dev \"mailer\" is invalid: [")),
        "{status}"
    );
}

#[test]
fn weir_validate_gives_the_rules_messages() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("a temporary directory: {e}"),
    };
    let secrets = match std::fs::read_to_string("examples/quickstart/secrets.yaml") {
        Ok(s) => s,
        Err(e) => panic!("the quickstart secrets: {e}"),
    };
    let files = [
        ("secrets.yaml", secrets.as_str()),
        ("auth.yaml", TOKENS_WITHOUT_SECRET),
        ("pool.yaml", POOL_TOO_LARGE),
    ];
    for (name, text) in files {
        if let Err(e) = std::fs::write(dir.path().join(name), text) {
            panic!("write {name}: {e}");
        }
    }
    let out = match std::process::Command::new(common::weir_binary())
        .args(["validate", "-f"])
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("run weir validate: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("auth.yaml doc 1: spec.ingest.auth: mode Tokens requires tokensSecretRef"),
        "{text}"
    );
    assert!(
        text.contains(
            "pool.yaml doc 1: spec.store.pool: size (20) must not exceed maxConnections (10)"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn schema_errors_have_the_real_shapes() {
    let server = server().await;
    let subs = api(&server, "Subscription", "subscriptions");
    let blocked = "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation";
    let blocked_cause = format!("Invalid value: \"null\": {blocked}");

    // Wrong type: FieldValueTypeInvalid; enum: FieldValueNotSupported with the supported
    // values (null included, as declared). Either way the CEL rules are not run.
    let sink = json!({"uri": "http://127.0.0.1:9/"});
    for (name, field, value, cause) in [
        (
            "typed",
            "consumers",
            json!("lots"),
            (
                "FieldValueTypeInvalid",
                "spec.consumers",
                "Invalid value: \"string\": spec.consumers in body must be of type integer: \"string\"",
            ),
        ),
        (
            "ordered",
            "ordering",
            json!("random"),
            (
                "FieldValueNotSupported",
                "spec.ordering",
                "Unsupported value: \"random\": supported values: \"none\", \"perKey\", \"null\"",
            ),
        ),
    ] {
        let spec = json!({"stream": "orders", "sink": sink, field: value});
        let status = refused(&subs, "Subscription", name, spec).await;
        let blocked = ("FieldValueInvalid", "<nil>", blocked_cause.as_str());
        assert_invalid(&status, "Subscription", name, &[cause, blocked]);
    }

    // Bounds (Go's float formatting of the limits) and `required`.
    let status = refused(
        &subs,
        "Subscription",
        "bounded",
        json!({"stream": "orders", "sink": {"ref": {"port": 70000}},
               "partitions": 0, "delivery": {"retry": 5_000_000_000u64}}),
    )
    .await;
    let mut causes: Vec<(String, String, String)> = status["details"]["causes"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                    (s("reason"), s("field"), s("message"))
                })
                .collect()
        })
        .unwrap_or_default();
    causes.sort();
    let mut want = vec![
        (
            "FieldValueInvalid",
            "spec.delivery.retry",
            "Invalid value: 5000000000: spec.delivery.retry in body should be less than or equal to 4.294967295e+09",
        ),
        (
            "FieldValueInvalid",
            "spec.partitions",
            "Invalid value: 0: spec.partitions in body should be greater than or equal to 1",
        ),
        (
            "FieldValueInvalid",
            "spec.sink.ref.port",
            "Invalid value: 70000: spec.sink.ref.port in body should be less than or equal to 65535",
        ),
        ("FieldValueRequired", "spec.sink.ref.name", "Required value"),
        // A missing required field is blocking: the rules are not run.
        ("FieldValueInvalid", "<nil>", blocked_cause.as_str()),
    ];
    want.sort();
    let want: Vec<(String, String, String)> = want
        .into_iter()
        .map(|(a, b, c)| (a.into(), b.into(), c.into()))
        .collect();
    assert_eq!(causes, want, "{status:#}");

    // None (or two) of stream, streams and streamSelector: the spec's CEL rule.
    for (name, spec) in [
        ("nostream", json!({"sink": {"uri": "http://127.0.0.1:9/"}})),
        (
            "twostreams",
            json!({"stream": "orders", "streams": ["orders"], "sink": {"uri": "http://127.0.0.1:9/"}}),
        ),
    ] {
        let status = refused(&subs, "Subscription", name, spec).await;
        assert_invalid(
            &status,
            "Subscription",
            name,
            &[(
                "FieldValueInvalid",
                "spec",
                "Invalid value: \"object\": either stream, or streams and/or streamSelector must be set",
            )],
        );
    }

    // kubectl prints each cause.
    let out = server
        .kubectl_with_input(
            &["apply", "-f", "-"],
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {name: typed, namespace: shop}\n\
             spec: {stream: orders, sink: {uri: \"http://127.0.0.1:9/\"}, consumers: lots}\n",
        )
        .await;
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr.contains("The Subscription \"typed\" is invalid")
            && out.stderr.contains(
                "spec.consumers: Invalid value: \"string\": spec.consumers in body must be of type integer: \"string\""
            ),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn unknown_fields_are_pruned_or_refused_when_strict() {
    let server = server().await;
    let subs = api(&server, "Subscription", "subscriptions");
    let typo = object(
        "Subscription",
        "typo",
        json!({"stream": "orders", "sink": {"uri": "http://127.0.0.1:9/", "retries": 3}, "consumerz": 2}),
    );
    let created = subs
        .create(&PostParams::default(), &typo)
        .await
        .expect("unknown fields are pruned, not refused");
    assert!(
        created.data["spec"].get("consumerz").is_none(),
        "{:?}",
        created.data
    );
    let stored = server
        .object("weir.dev", "subscriptions", "shop", "typo")
        .expect("the subscription");
    assert!(stored["spec"].get("consumerz").is_none(), "{stored}");
    assert!(stored["spec"]["sink"].get("retries").is_none(), "{stored}");
    assert_eq!(stored["spec"]["sink"]["uri"], "http://127.0.0.1:9/");

    // kubectl validates strictly by default (server-side): the real 400 and its words.
    let manifest = "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {name: strict, namespace: shop}\n\
                    spec: {stream: orders, sink: {uri: \"http://127.0.0.1:9/\"}, consumerz: 2}\n";
    let out = server
        .kubectl_with_input(&["apply", "-f", "-"], manifest)
        .await;
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr.contains(
            "Subscription in version \"v1alpha1\" cannot be handled as a Subscription: strict decoding error: unknown field \"spec.consumerz\""
        ),
        "{}",
        out.stderr
    );
    assert!(
        server
            .object("weir.dev", "subscriptions", "shop", "strict")
            .is_none()
    );
    ok(server
        .kubectl_with_input(&["apply", "--validate=false", "-f", "-"], manifest)
        .await);
    let stored = server
        .object("weir.dev", "subscriptions", "shop", "strict")
        .expect("the subscription");
    assert!(stored["spec"].get("consumerz").is_none(), "{stored}");
}

const SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

#[tokio::test]
async fn names_follow_the_real_rules() {
    let server = server().await;
    let streams = api(&server, "EventStream", "eventstreams");
    let spec = json!({"broker": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}}});

    let status = status_of(
        streams
            .create(
                &PostParams::default(),
                &object("EventStream", "Bad_Name", spec.clone()),
            )
            .await,
    );
    assert_invalid(
        &status,
        "EventStream",
        "Bad_Name",
        &[(
            "FieldValueInvalid",
            "metadata.name",
            format!("Invalid value: \"Bad_Name\": {SUBDOMAIN}").as_str(),
        )],
    );
    let out = server
        .kubectl_with_input(
            &["apply", "-f", "-"],
            "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {name: Bad_Name, namespace: shop}\n\
             spec: {broker: {urlSecretRef: {name: rabbitmq, key: url}}}\n",
        )
        .await;
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "The EventStream \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": {SUBDOMAIN}"
        )),
        "{}",
        out.stderr
    );

    // Dots are fine in a subdomain, not in a namespace (a label); 64 characters are too many.
    streams
        .create(
            &PostParams::default(),
            &object("EventStream", "orders.v2", spec.clone()),
        )
        .await
        .expect("a dotted name is a valid subdomain");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(server.client());
    let ns = |name: &str| {
        let value = json!({"metadata": {"name": name}});
        match serde_json::from_value::<k8s_openapi::api::core::v1::Namespace>(value) {
            Ok(n) => n,
            Err(e) => panic!("namespace object: {e}"),
        }
    };
    let status = status_of(
        namespaces
            .create(&PostParams::default(), &ns("team.a"))
            .await,
    );
    assert_eq!(status["code"], 422, "{status}");
    assert_eq!(
        status["message"],
        format!(
            "Namespace \"team.a\" is invalid: metadata.name: Invalid value: \"team.a\": {LABEL}"
        ),
        "{status}"
    );
    assert_eq!(status["details"]["kind"], "Namespace", "{status}");
    let long = "a".repeat(64);
    let status = status_of(namespaces.create(&PostParams::default(), &ns(&long)).await);
    assert_eq!(
        status["details"]["causes"][0]["message"],
        format!("Invalid value: \"{long}\": must be no more than 63 characters"),
        "{status}"
    );

    // Secrets (a built-in kind) through kubectl, and generateName.
    let out = server
        .kubectl_with_input(
            &["apply", "-f", "-"],
            "apiVersion: v1\nkind: Secret\nmetadata: {name: Pg, namespace: shop}\nstringData: {url: x}\n",
        )
        .await;
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "The Secret \"Pg\" is invalid: metadata.name: Invalid value: \"Pg\": {SUBDOMAIN}"
        )),
        "{}",
        out.stderr
    );
    let mut generated = object("EventStream", "", spec.clone());
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("orders-".into());
    let made = streams
        .create(&PostParams::default(), &generated)
        .await
        .expect("a generateName ending in a dash is valid");
    assert!(
        made.metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("orders-") && n.len() == 12),
        "{:?}",
        made.metadata.name
    );
}

#[tokio::test]
async fn status_writes_are_validated_and_never_change_the_spec() {
    let server = server().await;
    let subs = api(&server, "Subscription", "subscriptions");
    subs.create(
        &PostParams::default(),
        &object(
            "Subscription",
            "mailer",
            json!({"stream": "orders", "sink": {"uri": "http://127.0.0.1:9/"}}),
        ),
    )
    .await
    .expect("a valid subscription");

    // Merge patch of /status: a bound violated.
    let patch = json!({"status": {"backlog": -1}});
    let status = status_of(
        subs.patch_status("mailer", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
    );
    assert_invalid(
        &status,
        "Subscription",
        "mailer",
        &[(
            "FieldValueInvalid",
            "status.backlog",
            "Invalid value: -1: status.backlog in body should be greater than or equal to 0",
        )],
    );

    // Server-side apply of /status: a condition without its required fields, a bad time.
    let apply = json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "Subscription",
        "metadata": {"name": "mailer"},
        "status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "Ready", "message": "", "lastTransitionTime": "yesterday"},
            {"type": "CaughtUp", "status": "True"},
        ]},
    });
    let status = status_of(
        subs.patch_status(
            "mailer",
            &PatchParams::apply("tester"),
            &Patch::Apply(&apply),
        )
        .await,
    );
    let fields: Vec<(&str, &str)> = status["details"]["causes"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| {
                    (
                        c["field"].as_str().unwrap_or_default(),
                        c["reason"].as_str().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    for want in [
        (
            "status.conditions[0].lastTransitionTime",
            "FieldValueTypeInvalid",
        ),
        (
            "status.conditions[1].lastTransitionTime",
            "FieldValueRequired",
        ),
        ("status.conditions[1].reason", "FieldValueRequired"),
        ("status.conditions[1].message", "FieldValueRequired"),
    ] {
        assert!(fields.contains(&want), "{want:?} in {status:#}");
    }
    assert!(
        status["message"].as_str().is_some_and(|m| m.contains(
            "status.conditions[0].lastTransitionTime: Invalid value: \"yesterday\": status.conditions[0].lastTransitionTime in body must be of type date-time: \"yesterday\""
        )),
        "{status:#}"
    );

    // Two items with one key in a map list: a duplicate.
    let ready = json!({"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                       "lastTransitionTime": "2026-01-01T00:00:00Z"});
    let patch = json!({"status": {"conditions": [ready, ready]}});
    let status = status_of(
        subs.patch_status("mailer", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
    );
    assert_invalid(
        &status,
        "Subscription",
        "mailer",
        &[(
            "FieldValueDuplicate",
            "status.conditions[1]",
            "Duplicate value: {\"type\":\"Ready\"}",
        )],
    );

    // A valid status write that also carries a spec change: the status is taken, the spec
    // and generation are not; an unknown status field is pruned.
    let before = server
        .object("weir.dev", "subscriptions", "shop", "mailer")
        .expect("the subscription");
    let patch = json!({
        "spec": {"stream": "elsewhere"},
        "status": {"backlog": 7, "conditions": [ready], "bogus": true},
    });
    subs.patch_status("mailer", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("a valid status write");
    let after = server
        .object("weir.dev", "subscriptions", "shop", "mailer")
        .expect("the subscription");
    assert_eq!(after["status"]["backlog"], 7, "{after}");
    assert!(after["status"].get("bogus").is_none(), "{after}");
    assert_eq!(after["spec"], before["spec"], "{after}");
    assert_eq!(
        after["metadata"]["generation"],
        before["metadata"]["generation"]
    );
}

fn condition(type_: &str, status: &str) -> Value {
    json!({"type": type_, "status": status, "reason": "Test", "message": "",
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

fn condition_types(server: &TestApiServer) -> Vec<String> {
    let obj = server
        .object("weir.dev", "subscriptions", "shop", "mailer")
        .expect("the subscription");
    obj["status"]["conditions"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|c| c["type"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn server_side_apply_merges_conditions_by_type_per_manager() {
    let server = server().await;
    let subs = api(&server, "Subscription", "subscriptions");
    subs.create(
        &PostParams::default(),
        &object(
            "Subscription",
            "mailer",
            json!({"stream": "orders", "sink": {"uri": "http://127.0.0.1:9/"}}),
        ),
    )
    .await
    .expect("a valid subscription");
    let body = |conditions: Vec<Value>| {
        json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Subscription",
               "metadata": {"name": "mailer"}, "status": {"conditions": conditions}})
    };
    let apply = |manager: &str, conditions: Vec<Value>, force: bool| {
        let mut pp = PatchParams::apply(manager);
        if force {
            pp = pp.force();
        }
        let subs = subs.clone();
        let b = body(conditions);
        async move { subs.patch_status("mailer", &pp, &Patch::Apply(&b)).await }
    };

    apply(
        "weir",
        vec![condition("Ready", "True"), condition("CaughtUp", "True")],
        true,
    )
    .await
    .expect("weir applies two conditions");
    apply("monitor", vec![condition("Probed", "True")], false)
        .await
        .expect("another manager applies its own condition");
    assert_eq!(condition_types(&server), ["Ready", "CaughtUp", "Probed"]);
    let obj = server
        .object("weir.dev", "subscriptions", "shop", "mailer")
        .expect("the subscription");
    let managed = obj["metadata"]["managedFields"].to_string();
    assert!(
        managed.contains(r#"k:{\"type\":\"Ready\"}"#)
            && managed.contains(r#"k:{\"type\":\"Probed\"}"#),
        "{managed}"
    );

    // A JSON patch of the object (as kube-runtime adds its finalizer) owns what it changed
    // only, not the conditions it restated.
    let add_label: json_patch::Patch = match serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/labels", "value": {"team": "mail"}},
    ])) {
        Ok(p) => p,
        Err(e) => panic!("the JSON patch: {e}"),
    };
    subs.patch(
        "mailer",
        &PatchParams {
            field_manager: Some("labeller".into()),
            ..PatchParams::default()
        },
        &Patch::Json::<()>(add_label),
    )
    .await
    .expect("a JSON patch of the labels");

    // weir stops producing CaughtUp: it goes; the other manager's condition stays.
    apply("weir", vec![condition("Ready", "False")], true)
        .await
        .expect("weir applies one condition");
    assert_eq!(condition_types(&server), ["Ready", "Probed"]);
    let obj = server
        .object("weir.dev", "subscriptions", "shop", "mailer")
        .expect("the subscription");
    assert_eq!(obj["status"]["conditions"][0]["status"], "False");

    // Changing a field of weir's item without force is a conflict naming the item's key.
    let err = apply(
        "monitor",
        vec![condition("Probed", "True"), condition("Ready", "True")],
        false,
    )
    .await;
    let status = status_of(err);
    assert_eq!(status["code"], 409, "{status}");
    assert!(
        status["message"].as_str().is_some_and(
            |m| m.contains("conflict with \"weir\": .status.conditions[type=\"Ready\"].status")
        ),
        "{status:#}"
    );
    assert_eq!(condition_types(&server), ["Ready", "Probed"]);

    // The other manager stops applying its condition: it goes, weir's stays.
    apply("monitor", vec![], false)
        .await
        .expect("monitor applies no conditions");
    assert_eq!(condition_types(&server), ["Ready"]);
}

/// A CRD of the test's own with the rule features Weir's CRDs do not use (yet): a
/// transition rule on `oldSelf`, `fieldPath` and `reason`, a `messageExpression`, a rule
/// without a message, `matches`.
const WIDGETS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.test.weir.dev}
spec:
  group: test.weir.dev
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - rule: "self.size == oldSelf.size"
              message: size is immutable
              fieldPath: .size
              reason: FieldValueForbidden
            - rule: "!has(self.color) || self.color.matches('^[a-z]+$')"
              messageExpression: "'color ' + self.color + ' is not lower case'"
            - rule: "self.size < 100"
            properties:
              size: {type: integer}
              color: {type: string, maxLength: 10}
"#;

#[tokio::test]
async fn rule_features_transition_field_path_reason_and_message_expression() {
    let server = server().await;
    ok(server
        .kubectl_with_input(&["apply", "-f", "-"], WIDGETS)
        .await);
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("test.weir.dev", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(server.client(), "shop", &ar);
    let widget = |name: &str, spec: Value| -> DynamicObject {
        let value = json!({"apiVersion": "test.weir.dev/v1", "kind": "Widget",
                           "metadata": {"name": name}, "spec": spec});
        match serde_json::from_value(value) {
            Ok(o) => o,
            Err(e) => panic!("the widget does not parse: {e}"),
        }
    };
    let causes = |status: &Value| -> Vec<(String, String, String)> {
        status["details"]["causes"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|c| {
                        let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                        (s("reason"), s("field"), s("message"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let one = |reason: &str, field: &str, message: &str| {
        vec![(reason.to_string(), field.to_string(), message.to_string())]
    };

    // On create the transition rule does not run; the messageExpression names the value.
    let status = status_of(
        widgets
            .create(
                &PostParams::default(),
                &widget("w", json!({"size": 5, "color": "Red"})),
            )
            .await,
    );
    assert_eq!(
        causes(&status),
        one(
            "FieldValueInvalid",
            "spec",
            "Invalid value: \"object\": color Red is not lower case"
        ),
        "{status:#}"
    );
    // A rule without a message.
    let status = status_of(
        widgets
            .create(&PostParams::default(), &widget("w", json!({"size": 200})))
            .await,
    );
    assert_eq!(
        causes(&status),
        one(
            "FieldValueInvalid",
            "spec",
            "Invalid value: \"object\": failed rule: self.size < 100"
        ),
        "{status:#}"
    );
    // maxLength: Too long, which keeps the rules from running.
    let status = status_of(
        widgets
            .create(
                &PostParams::default(),
                &widget("w", json!({"size": 5, "color": "abcdefghijkl"})),
            )
            .await,
    );
    let got = causes(&status);
    assert_eq!(got.len(), 2, "{status:#}");
    assert_eq!(
        got[0],
        (
            "FieldValueTooLong".to_string(),
            "spec.color".to_string(),
            "Too long: may not be more than 10 bytes".to_string()
        ),
        "{status:#}"
    );

    // On update the transition rule runs against the stored value: fieldPath and reason.
    widgets
        .create(
            &PostParams::default(),
            &widget("w", json!({"size": 5, "color": "red"})),
        )
        .await
        .expect("a valid widget");
    let patch = json!({"spec": {"size": 6}});
    let status = status_of(
        widgets
            .patch("w", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
    );
    assert_eq!(
        causes(&status),
        one(
            "FieldValueForbidden",
            "spec.size",
            "Forbidden: size is immutable"
        ),
        "{status:#}"
    );
    assert_eq!(
        status["message"],
        "Widget.test.weir.dev \"w\" is invalid: spec.size: Forbidden: size is immutable"
    );
    let patch = json!({"spec": {"color": "blue"}});
    widgets
        .patch("w", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("changing another field keeps the size");
}
