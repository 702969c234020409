//! Operator mode: TokenReview + SubjectAccessReview decide who may use the admin API.

use std::time::Duration;

use serde_json::{Value, json};

use super::apiserver::TestApiServer;
use super::common::{self, AMQP_URL, Operator, unique};
use super::{audit_records, bearer, rabbitmqctl_messages, refusing_sink, wait_queue, weir_cmd};

/// Operator mode: TokenReview + SubjectAccessReview through the test API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_admin_is_decided_by_rbac() {
    let server = TestApiServer::start().await;
    let ns = unique("adm");
    server.apply_crds().await;
    let sub = "refused";
    let sink = refusing_sink().await;
    let manifests = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\n\
         stringData: {{url: \"{AMQP_URL}\"}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: {ns}}}\n\
         spec: {{broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}, deletionPolicy: Delete}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {sub}, namespace: {ns}}}\n\
         spec: {{stream: orders, sink: {{uri: \"{sink}\"}}, deletionPolicy: Delete}}\n"
    );
    server.apply(&manifests).await;
    let op = Operator::start(server.kubeconfig(), "op-admin", &unique("weir-"), &[]);

    // Published once the subscription's queue is bound (202 from a broker-only stream).
    let dlq = format!("weir-dlq.{ns}.{sub}");
    for n in 0..2 {
        common::eventually(
            90,
            "the subscription Ready and a publish routed",
            || op.log_text(),
            || async {
                let ready = server
                    .object("weir.dev", "subscriptions", &ns, sub)
                    .is_some_and(|o| {
                        o["status"]["conditions"].as_array().is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                    });
                let ev = json!({"specversion": "1.0", "id": format!("e-{n}"), "source": "/t",
                                "type": "order.created", "data": {}});
                (ready && common::publish_event(&op.url, &ns, "orders", &ev).await == 202)
                    .then_some(())
            },
        )
        .await;
    }
    wait_queue(&dlq, 2, || op.log_text()).await;

    let admin = server.issue_token("ops", "admin", &["weir"]);
    let viewer = server.issue_token("ops", "viewer", &["weir"]);
    let other_audience = server.issue_token("ops", "admin", &["https://kubernetes.default.svc"]);
    server.grant(
        "system:serviceaccount:ops:admin",
        "delete",
        "weir.dev",
        "subscriptions",
        "deadletters",
        &ns,
    );
    server.grant(
        "system:serviceaccount:ops:viewer",
        "get",
        "weir.dev",
        "subscriptions",
        "deadletters",
        &ns,
    );
    let client = common::http();
    let url = format!(
        "{}/v1/namespaces/{ns}/subscriptions/{sub}/deadletters",
        op.admin
    );
    let purge = |token: Option<String>| {
        let mut rb = client.delete(&url);
        if let Some(t) = token {
            rb = rb.header("authorization", bearer(&t));
        }
        async move { rb.send().await.unwrap() }
    };
    let r = purge(None).await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(purge(Some("bogus".into())).await.status(), 401);
    assert_eq!(
        purge(Some(other_audience)).await.status(),
        401,
        "a token for another audience"
    );
    let r = purge(Some(viewer.clone())).await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("system:serviceaccount:ops:viewer may not delete subscriptions/deadletters"),
        "{body}"
    );
    // The viewer may list.
    let r = client
        .get(&url)
        .header("authorization", bearer(&viewer))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listed: Value = r.json().await.unwrap();
    assert_eq!(listed["deadLetters"].as_array().map(Vec::len), Some(2));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        rabbitmqctl_messages(&dlq),
        Some(2),
        "refused purges changed the DLQ"
    );
    assert!(audit_records(&op.log_text()).is_empty());

    // The allowed account, through the CLI.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{admin}\n")).unwrap();
    let out = weir_cmd()
        .args(["--admin", &op.admin, "--token-file"])
        .arg(&token_file)
        .args(["dlq", "purge", &format!("{ns}/{sub}"), "--yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_queue(&dlq, 0, || op.log_text()).await;
    let records = audit_records(&op.log_text());
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["who"], "system:serviceaccount:ops:admin");
    assert_eq!(records[0]["action"], "deadletters.purge");
    assert_eq!(records[0]["target"], format!("{ns}/{sub}"));
    assert_eq!(records[0]["count"], 2);

    // Status: a summary without a token; with one, only what the caller may `get`.
    let st: Value = client
        .get(format!("{}/v1/status", op.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["details"], false, "{st}");
    server.grant(
        "system:serviceaccount:ops:viewer",
        "get",
        "weir.dev",
        "subscriptions",
        "",
        &ns,
    );
    let st: Value = client
        .get(format!("{}/v1/status", op.admin))
        .header("authorization", bearer(&viewer))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = st["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Subscription"], "{st}");

    // The reviews are calls the chart's RBAC must allow (tests/chart.rs compares the list).
    let used = server.permissions_used(|c| !c.is_kubectl());
    for (group, resource) in [
        ("authentication.k8s.io", "tokenreviews"),
        ("authorization.k8s.io", "subjectaccessreviews"),
    ] {
        let call = (
            group.to_string(),
            resource.to_string(),
            "create".to_string(),
        );
        assert!(used.contains(&call), "{call:?} not made: {used:?}");
        assert!(
            weir::control::API_CALLS.contains(&(group, resource, "create")),
            "{call:?} missing from API_CALLS"
        );
    }
    drop(op);
}
