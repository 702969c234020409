//! Standalone: `--admin-token-file` guards dead letters, archive and status details.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::common::{self, Manifests, Weir, fresh_database, unique};
use super::{audit_records, bearer, rabbitmqctl_messages, refusing_sink, wait_queue, weir_cmd};

/// Standalone with `--admin-token-file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_admin_token_guards_dead_letters_archive_and_status() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let exchange = unique("weir.test.admin-");
    let sub = unique("s");
    let sink = refusing_sink().await;
    m.write("orders.yaml", &common::stream_yaml("orders", &exchange, ""));
    m.write(
        "sub.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {sub}, namespace: test}}\n\
             spec:\n  stream: orders\n  sink: {{uri: \"{sink}\"}}\n"
        ),
    );
    m.write(
        "archive.yaml",
        "apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {name: cold, namespace: test}\n\
         spec: {streamNames: [orders]}\n",
    );
    let tokens = tempfile::tempdir().unwrap();
    let token_file = tokens.path().join("admin-token");
    std::fs::write(&token_file, "first-admin-token\n").unwrap();
    let wrong_file = tokens.path().join("wrong-token");
    std::fs::write(&wrong_file, "not-the-token\n").unwrap();
    let mut weir = Weir::start_with_args(
        m.path(),
        &["--admin-token-file", token_file.to_str().unwrap()],
    );
    let client = common::http();
    let token = "first-admin-token";

    // Without a token, status is a summary only; with it, the details.
    let v = common::eventually(
        60,
        "the stream and the subscription Ready",
        || weir.log_text(),
        || async {
            let v: Value = match client
                .get(format!("{}/v1/status", weir.admin))
                .header("authorization", bearer(token))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let ready = |name: &str| {
                v["resources"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|r| r["name"] == name && r["ready"] == true))
            };
            (ready("orders") && ready(&sub)).then_some(v.clone())
        },
    )
    .await;
    assert_eq!(v["details"], true);
    let summary: Value = client
        .get(format!("{}/v1/status", weir.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["details"], false, "{summary}");
    assert_eq!(summary["summary"]["resources"], 3, "{summary}");
    assert!(summary.get("resources").is_none(), "{summary}");
    assert!(!summary.to_string().contains(&sub), "names leak: {summary}");
    // The probes and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = client
            .get(format!("{}{path}", weir.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    // Three dead letters.
    let events: Vec<Value> = (0..3)
        .map(|i| json!({"type": "order.created", "id": format!("d-{i}"), "data": {"n": i}}))
        .collect();
    let r = client
        .post(weir.events_url("test", "orders"))
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let dlq = format!("weir-dlq.test.{sub}");
    wait_queue(&dlq, 3, || weir.log_text()).await;
    let dl_url = format!(
        "{}/v1/namespaces/test/subscriptions/{sub}/deadletters",
        weir.admin
    );

    // No token, a wrong token, a malformed header: 401 with a Bearer challenge, problem+json,
    // and nothing purged.
    for auth in [
        None,
        Some(bearer("not-the-token")),
        Some("Basic YTpi".into()),
    ] {
        let mut rb = client.delete(&dl_url);
        if let Some(a) = &auth {
            rb = rb.header("authorization", a);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let challenge = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{auth:?}"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], 401);
    }
    for (method, url) in [
        (reqwest::Method::GET, dl_url.clone()),
        (reqwest::Method::GET, format!("{dl_url}/d-0")),
        (reqwest::Method::POST, format!("{dl_url}/redrive")),
        (reqwest::Method::GET, format!("{}/v1/archive", weir.admin)),
        (
            reqwest::Method::GET,
            format!("{}/v1/namespaces/test/streams/orders/archive", weir.admin),
        ),
        (
            reqwest::Method::POST,
            format!(
                "{}/v1/namespaces/test/streams/orders/archive/run",
                weir.admin
            ),
        ),
        (
            reqwest::Method::POST,
            format!(
                "{}/v1/namespaces/test/streams/orders/archive/verify",
                weir.admin
            ),
        ),
    ] {
        let r = client.request(method.clone(), &url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{method} {url}");
    }
    // rabbitmqctl's statistics lag: give them time to show a purge, had one happened.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        rabbitmqctl_messages(&dlq),
        Some(3),
        "unauthenticated calls changed the DLQ"
    );
    assert!(
        audit_records(&weir.log_text()).is_empty(),
        "refused calls are not audited: {}",
        weir.log_text()
    );

    // The CLI: without a token it fails naming the flag; with the wrong one 401; with
    // --token-file (and WEIR_TOKEN_FILE) it works.
    let cli = |args: &[&str], token_file: Option<&Path>, env_file: Option<&Path>| {
        let mut c = weir_cmd();
        c.args(["--admin", &weir.admin, "-o", "json"]);
        if let Some(f) = token_file {
            c.arg("--token-file").arg(f);
        }
        if let Some(f) = env_file {
            c.env("WEIR_TOKEN_FILE", f);
        }
        c.args(args).output().unwrap()
    };
    let target = format!("test/{sub}");
    let out = cli(&["dlq", "list", &target], None, None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("--token-file"), "{err}");
    let out = cli(&["dlq", "list", &target], Some(&wrong_file), None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = cli(&["dlq", "list", &target], Some(&token_file), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listed["deadLetters"].as_array().map(Vec::len),
        Some(3),
        "{listed}"
    );
    let out = cli(&["status"], None, Some(&token_file));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["details"], true, "{st}");
    let out = cli(&["archive", "status"], Some(&token_file), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let archived: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        archived["streams"][0]["stream"], "test/orders",
        "{archived}"
    );

    // An authorised purge through the CLI empties the queue and writes one audit line.
    let out = cli(&["dlq", "purge", &target, "--yes"], Some(&token_file), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_queue(&dlq, 0, || weir.log_text()).await;
    let records = audit_records(&weir.log_text());
    assert_eq!(records.len(), 1, "{records:?}\nlog:\n{}", weir.log_text());
    let rec = &records[0];
    assert_eq!(rec["who"], "admin-token");
    assert_eq!(rec["action"], "deadletters.purge");
    assert_eq!(rec["target"], target);
    assert_eq!(rec["count"], 3);
    assert_eq!(rec["outcome"], "success");
    assert_eq!(rec["error"], Value::Null);
    let time = rec["time"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
    let mut keys: Vec<&String> = rec.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "action", "count", "error", "outcome", "target", "time", "type", "who"
        ]
    );

    // An archive run is audited too.
    let r = client
        .post(format!(
            "{}/v1/namespaces/test/streams/orders/archive/run",
            weir.admin
        ))
        .header("authorization", bearer(token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let records = audit_records(&weir.log_text());
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[1]["action"], "archive.run");
    assert_eq!(records[1]["target"], "test/orders");
    assert_eq!(records[1]["outcome"], "success");

    // Rotation: the file is read on every request; the old token stops working at once.
    std::fs::write(&token_file, "second-admin-token\n").unwrap();
    let status = |t: &'static str| {
        let c = client.clone();
        let url = dl_url.clone();
        async move {
            c.get(url)
                .header("authorization", bearer(t))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status("first-admin-token").await, 401);
    assert_eq!(status("second-admin-token").await, 200);
    weir.terminate();
}
