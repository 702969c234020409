//! Publish and read authentication (`spec.ingest.auth`) in standalone mode, against the real
//! RabbitMQ and PostgreSQL: bearer tokens from Secrets, read-only callers, the publisher
//! recorded with each event, dedup scoped to the publisher, traces limited to readable
//! streams, token rotation, and `ServiceAccounts` refused without an API server.

mod apiserver;
mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

const CHECKOUT: &str = "tok-checkout-0123456789abcdef";
const BILLING: &str = "tok-billing-0123456789abcdef";
const AUDIT: &str = "tok-audit-0123456789abcdef";
const ROTATED: &str = "tok-checkout-rotated-0123456789";

fn secrets_yaml(checkout_token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: publishers, namespace: test}}\n\
         stringData: {{checkout: \"{checkout_token}\", billing: \"{BILLING}\"}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: readers, namespace: test}}\n\
         stringData: {{audit: \"{AUDIT}\"}}\n"
    )
}

const AUTH: &str = "  ingest:\n    auth:\n      mode: Tokens\n      tokensSecretRef: {name: publishers}\n      readers: {tokensSecretRef: {name: readers}}\n";

fn event(id: &str, extra: Value) -> Value {
    let mut ev = json!({
        "specversion": "1.0",
        "id": id,
        "source": "/auth-test",
        "type": "order.created",
        "subject": format!("order-{id}"),
        "data": {"n": 1},
    });
    if let (Some(ev), Some(extra)) = (ev.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            ev.insert(k.clone(), v.clone());
        }
    }
    ev
}

/// `(id, weirpublisher)` of every event of a batch read.
fn ids_and_publishers(batch: &Value) -> Vec<(String, String)> {
    batch
        .as_array()
        .expect("a batch")
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_string(),
                e["weirpublisher"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn publish(&self, stream: &str, token: Option<&str>, ev: &Value) -> (StatusCode, Value) {
        let mut req = self
            .http
            .post(format!(
                "{}/v1/namespaces/test/streams/{stream}/events",
                self.base
            ))
            .header("content-type", "application/cloudevents+json")
            .body(ev.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("publish");
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            let www = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            assert!(
                www.starts_with("Bearer"),
                "401 without WWW-Authenticate: Bearer ({www:?})"
            );
        }
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("read");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_guard_publish_read_and_trace() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write("tokens.yaml", &secrets_yaml(CHECKOUT));
    m.write(
        "orders.yaml",
        &stream_yaml("orders", &unique("weir.test.auth."), AUTH),
    );
    m.write(
        "open.yaml",
        &stream_yaml("open", &unique("weir.test.auth."), ""),
    );
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "orders").await;
    w.wait_ready("test", "open").await;
    let c = Client {
        http: common::http(),
        base: w.url.clone(),
    };

    // Publish: no bearer, an unknown one, a reader's → refused; a publisher's → stored.
    let (s, body) = c.publish("orders", None, &event("a1", json!({}))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["type"], "https://weir.dev/problems/unauthorized");
    let (s, _) = c
        .publish(
            "orders",
            Some("wrong-token-0123456789"),
            &event("a1", json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, body) = c
        .publish("orders", Some(AUDIT), &event("a1", json!({})))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a reader may not publish: {body}");
    let (s, body) = c
        .publish("orders", Some(CHECKOUT), &event("a1", json!({})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // The publisher cannot name itself.
    let (s, body) = c
        .publish(
            "orders",
            Some(CHECKOUT),
            &event("a2", json!({"weirpublisher": "billing"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("weirpublisher"), "{body}");

    // Reads: page, one event, subject.
    let page = "/v1/namespaces/test/streams/orders/events?from=1";
    let one = "/v1/namespaces/test/streams/orders/events/1";
    let subject = "/v1/namespaces/test/streams/orders/subjects/order-a1/events";
    for path in [page, one, subject] {
        assert_eq!(
            c.get(path, None).await.0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            c.get(path, Some("wrong-token-0123456789")).await.0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        for t in [AUDIT, CHECKOUT] {
            let (s, body) = c.get(path, Some(t)).await;
            assert_eq!(s, StatusCode::OK, "{path}: {body}");
        }
    }
    let (_, ev) = c.get(one, Some(AUDIT)).await;
    assert_eq!(ev["id"], "a1");
    assert_eq!(
        ev["weirpublisher"], "checkout",
        "the stored event names its publisher"
    );

    // Dedup is per publisher: billing takes id "x" first; checkout's "x" is refused (409),
    // not answered as a duplicate of billing's event; each publisher's own repeat is a duplicate.
    let (s, body) = c
        .publish("orders", Some(BILLING), &event("x", json!({})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["results"][0]["duplicate"], false);
    let (s, body) = c
        .publish("orders", Some(CHECKOUT), &event("x", json!({})))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["type"], "https://weir.dev/problems/id-conflict");
    let (s, body) = c
        .publish("orders", Some(BILLING), &event("x", json!({})))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(body["results"][0]["duplicate"], true, "{body}");
    let (s, body) = c
        .publish("orders", Some(CHECKOUT), &event("a1", json!({})))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(body["results"][0]["duplicate"], true, "{body}");
    // One event per id, each with its own publisher: nothing lost, nothing shadowed.
    let (_, all) = c.get(page, Some(AUDIT)).await;
    let got = ids_and_publishers(&all);
    assert_eq!(
        got,
        vec![
            ("a1".to_string(), "checkout".to_string()),
            ("x".to_string(), "billing".to_string())
        ]
    );

    // A trace holds only the streams the caller may read.
    let corr = json!({"correlationid": "saga-1"});
    let (s, _) = c
        .publish("orders", Some(CHECKOUT), &event("t1", corr.clone()))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = c.publish("open", None, &event("t2", corr)).await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "the open stream takes anonymous publishes"
    );
    let trace_ids = |v: &Value| -> Vec<String> {
        v["events"]
            .as_array()
            .map(|es| {
                es.iter()
                    .map(|e| {
                        format!(
                            "{}/{}",
                            e["stream"].as_str().unwrap_or(""),
                            e["id"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let trace = "/v1/namespaces/test/correlations/saga-1/events";
    let (s, anon) = c.get(trace, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(trace_ids(&anon), vec!["open/t2"], "{anon}");
    let (_, audit) = c.get(trace, Some(AUDIT)).await;
    let mut ids = trace_ids(&audit);
    ids.sort();
    assert_eq!(ids, vec!["open/t2", "orders/t1"], "{audit}");
    // `weir trace` sends the token of --token-file.
    let token_dir = tempfile::tempdir().expect("tempdir");
    let token_file = token_dir.path().join("audit-token");
    std::fs::write(&token_file, format!("{AUDIT}\n")).expect("token file");
    let out = std::process::Command::new(weir_binary())
        .args(["--url", &w.url, "-o", "json", "--token-file"])
        .arg(&token_file)
        .args(["trace", "test", "saga-1"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("weir trace");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).expect("weir trace -o json");
    let mut ids = trace_ids(&cli);
    ids.sort();
    assert_eq!(ids, vec!["open/t2", "orders/t1"], "{cli}");

    // Rotation: the Secret's new token takes over, the old one stops working.
    m.write("tokens.yaml", &secrets_yaml(ROTATED));
    // Reads store nothing, so polling with them cannot leave events behind.
    eventually(
        30,
        "the rotated token to take over",
        || w.log_text(),
        || async { (c.get(page, Some(ROTATED)).await.0 == StatusCode::OK).then_some(()) },
    )
    .await;
    let (s, _) = c
        .publish("orders", Some(CHECKOUT), &event("r1", json!({})))
        .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "the old token still works after rotation"
    );
    assert_eq!(
        c.get(page, Some(CHECKOUT)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, body) = c
        .publish("orders", Some(ROTATED), &event("r2", json!({})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (_, all) = c.get(page, Some(AUDIT)).await;
    let ids: Vec<&str> = all
        .as_array()
        .expect("a batch")
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert!(
        !ids.contains(&"r1"),
        "an event published with the old token was stored: {ids:?}"
    );
    assert!(ids.contains(&"r2"), "{ids:?}");
}

/// Bad auth settings are refused at validation with the field named; `ServiceAccounts` needs
/// an API server, so standalone refuses it and `weir validate --operator` accepts it.
#[test]
fn auth_settings_are_validated() {
    let m = Manifests::new("postgres://postgres@127.0.0.1:5432/unused");
    m.write("tokens.yaml", &secrets_yaml("short"));
    m.write(
        "orders.yaml",
        &stream_yaml("orders", "weir.test.orders", AUTH),
    );
    m.write(
        "sa.yaml",
        &stream_yaml(
            "sa",
            "weir.test.sa",
            "  ingest:\n    auth:\n      mode: ServiceAccounts\n      serviceAccounts: [{namespace: shop, name: checkout}]\n",
        ),
    );
    let validate = |extra: &[&str]| {
        let out = std::process::Command::new(weir_binary())
            .args(["validate", "-f"])
            .arg(m.path())
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("weir validate");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = validate(&[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("spec.ingest.auth.tokensSecretRef") && out.contains("at least 16 characters"),
        "{out}"
    );
    assert!(
        out.contains("spec.ingest.auth.mode") && out.contains("operator mode"),
        "standalone must refuse ServiceAccounts: {out}"
    );
    m.write("tokens.yaml", &secrets_yaml(CHECKOUT));
    let (ok, out) = validate(&[]);
    assert!(!ok, "{out}");
    assert!(!out.contains("tokensSecretRef"), "{out}");
    let (ok, out) = validate(&["--operator"]);
    assert!(ok, "the operator supports ServiceAccounts: {out}");
}

/// `ServiceAccounts` through the operator: the test API server issues service account tokens
/// and answers TokenReview for them (audience included), so the whole path runs as in a
/// cluster: a listed account publishes (201), an unlisted one is authenticated but refused
/// (403), a reader account reads but cannot publish, a token for another audience or a
/// revoked one is unknown (401), and no token is 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_accounts_through_token_review() {
    let server = apiserver::TestApiServer::start().await;
    let ns = unique("sa");
    let db = fresh_database().await;
    server.apply_crds().await;
    let manifests = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\n\
         stringData: {{url: \"{AMQP_URL}\"}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: pg, namespace: {ns}}}\n\
         stringData: {{url: \"{db}\"}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: {ns}}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}\n  \
         store: {{urlSecretRef: {{name: pg, key: url}}}}\n  ingest:\n    auth:\n      \
         mode: ServiceAccounts\n      serviceAccounts: [{{namespace: {ns}, name: checkout}}]\n      \
         readers: {{serviceAccounts: [{{namespace: {ns}, name: audit}}]}}\n---\n\
         {}---\n\
         apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: tokened, namespace: {ns}}}\n\
         spec:\n  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}\n  \
         store: {{urlSecretRef: {{name: pg, key: url}}}}\n{AUTH}",
        secrets_yaml(CHECKOUT).replace("namespace: test", &format!("namespace: {ns}"))
    );
    server.apply(&manifests).await;
    let op = Operator::start(server.kubeconfig(), "op-auth", &unique("weir-"), &[]);
    let c = Client {
        http: common::http(),
        base: op.url.clone(),
    };
    let publish = |token: Option<String>, id: &'static str| {
        let c = &c;
        let ns = ns.clone();
        async move {
            let mut req = c
                .http
                .post(format!(
                    "{}/v1/namespaces/{ns}/streams/orders/events",
                    c.base
                ))
                .header("content-type", "application/cloudevents+json")
                .body(event(id, json!({})).to_string());
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(r) => (
                    r.status().as_u16(),
                    r.json::<Value>().await.unwrap_or(Value::Null),
                ),
                Err(_) => (0, Value::Null),
            }
        }
    };
    let checkout = server.issue_token(&ns, "checkout", &["weir"]);
    // The stream is ready once the listed account's publish is stored.
    eventually(
        90,
        "a publish by the listed service account",
        || op.log_text(),
        || async { (publish(Some(checkout.clone()), "s1").await.0 == 201).then_some(()) },
    )
    .await;
    let other = server.issue_token(&ns, "other", &["weir"]);
    let (s, body) = publish(Some(other), "s2").await;
    assert_eq!(s, 403, "an authenticated but unlisted account: {body}");
    let audit = server.issue_token(&ns, "audit", &["weir"]);
    let (s, body) = publish(Some(audit.clone()), "s3").await;
    assert_eq!(s, 403, "a reader may not publish: {body}");
    let wrong_audience = server.issue_token(&ns, "checkout", &["vault"]);
    assert_eq!(publish(Some(wrong_audience), "s4").await.0, 401);
    assert_eq!(publish(None, "s5").await.0, 401);
    assert_eq!(publish(Some("not-a-token".into()), "s6").await.0, 401);

    let page = format!("/v1/namespaces/{ns}/streams/orders/events?from=1");
    let (s, events) = c.get(&page, Some(&audit)).await;
    assert_eq!(s, StatusCode::OK, "{events}");
    let got = ids_and_publishers(&events);
    assert_eq!(
        got,
        vec![(
            "s1".to_string(),
            format!("system:serviceaccount:{ns}:checkout")
        )],
        "only the listed account's event is stored, naming it"
    );
    assert_eq!(c.get(&page, None).await.0, StatusCode::UNAUTHORIZED);

    // Tokens under the operator: a rotated Secret takes over within the refresh interval
    // (the operator here re-reads Secrets every 2 s), the old token stops working.
    let tokened = format!("/v1/namespaces/{ns}/streams/tokened/events?from=1");
    eventually(
        60,
        "the Tokens stream to answer its reader",
        || op.log_text(),
        || async { (c.get(&tokened, Some(AUDIT)).await.0 == StatusCode::OK).then_some(()) },
    )
    .await;
    assert_eq!(c.get(&tokened, Some(CHECKOUT)).await.0, StatusCode::OK);
    server
        .apply(&secrets_yaml(ROTATED).replace("namespace: test", &format!("namespace: {ns}")))
        .await;
    eventually(
        30,
        "the rotated token to take over under the operator",
        || op.log_text(),
        || async { (c.get(&tokened, Some(ROTATED)).await.0 == StatusCode::OK).then_some(()) },
    )
    .await;
    assert_eq!(
        c.get(&tokened, Some(CHECKOUT)).await.0,
        StatusCode::UNAUTHORIZED,
        "the old token still works after rotation"
    );

    // A revoked token stops working once the positive-answer cache entry expires.
    server.revoke_token(&checkout);
    eventually(
        30,
        "the revoked token to be refused",
        || op.log_text(),
        || async {
            (c.get(&page, Some(&checkout)).await.0 == StatusCode::UNAUTHORIZED).then_some(())
        },
    )
    .await;
}
