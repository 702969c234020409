//! The OpenAPI documents of both HTTP APIs: the committed files under `docs/openapi/` are what
//! the code generates, and a running `weir run` (real RabbitMQ and PostgreSQL) keeps the
//! contract they state. Every request below is answered with a status its operation
//! documents and a body that validates against the documented schema of its content type;
//! every documented status of every operation is provoked here or named in [`NOT_PROVOKED`]
//! with the reason; every path docs/http-api.md names is in the documents, and no method a
//! document does not list is answered.
//!
//! After changing an operation or a response type, regenerate the files with
//! `WEIR_UPDATE_OPENAPI=1 cargo test --test openapi`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use common::{Manifests, Weir, broker_only_yaml, fresh_database, status_sink, stream_yaml, unique};
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_documents_match_the_code() {
    let update = std::env::var("WEIR_UPDATE_OPENAPI").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for (file, text) in weir::openapi::files() {
        let path = root().join(file);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "the OpenAPI documents differ from what the code generates: {stale:?}\n\
         regenerate them with `WEIR_UPDATE_OPENAPI=1 cargo test --test openapi` and commit them"
    );
    for (_, text) in weir::openapi::files() {
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
    }
}

/// Documented statuses this test does not provoke, and why (`method path status reason`, one
/// a line). An entry that is provoked after all, or that no longer is documented, fails the
/// test, so the list cannot go stale.
const NOT_PROVOKED: &str = "\
    # 500 is a fault inside Weir: no well-formed request provokes it on purpose.
    post /v1/namespaces/{ns}/streams/{stream}/events 500  fault
    get /v1/namespaces/{ns}/streams/{stream}/events 500  fault
    get /v1/namespaces/{ns}/streams/{stream}/events/{position} 500  fault
    get /v1/namespaces/{ns}/streams/{stream}/subjects/{subject}/events 500  fault
    get /v1/namespaces/{ns}/correlations/{id}/events 500  fault
    post /v1/namespaces/{ns}/streams/{name}/archive/run 500  fault
    post /v1/namespaces/{ns}/streams/{name}/archive/verify 500  fault
    delete /v1/namespaces/{ns}/streams/{name}/subjects/{subject}/key 500  fault
    post /v1/namespaces/{ns}/streams/{name}/keys/rotate 500  fault
    # A body slower than the body read timeout: tests/ingest_limits.rs.
    post /v1/namespaces/{ns}/streams/{stream}/events 408  slow body
    # Service-account readers exist with the operator's TokenReview only (tests/ingest_auth.rs).
    get /v1/namespaces/{ns}/streams/{stream}/events 403  operator
    get /v1/namespaces/{ns}/streams/{stream}/events/{position} 403  operator
    get /v1/namespaces/{ns}/streams/{stream}/subjects/{subject}/events 403  operator
    # Token reviews and RBAC of the admin API exist with the operator only (tests/admin_access).
    get /v1/status 503  operator
    get /v1/archive 403  operator
    get /v1/archive 503  operator
    delete /v1/namespaces/{ns}/streams/{name}/subjects/{subject}/key 403  operator
    post /v1/namespaces/{ns}/streams/{name}/keys/rotate 403  operator
    get /v1/namespaces/{ns}/streams/{name}/archive 403  operator
    post /v1/namespaces/{ns}/streams/{name}/archive/run 403  operator
    post /v1/namespaces/{ns}/streams/{name}/archive/verify 403  operator
    get /v1/namespaces/{ns}/subscriptions/{name}/deadletters 403  operator
    delete /v1/namespaces/{ns}/subscriptions/{name}/deadletters 403  operator
    post /v1/namespaces/{ns}/subscriptions/{name}/deadletters/redrive 403  operator
    get /v1/namespaces/{ns}/subscriptions/{name}/deadletters/{id} 403  operator
    post /v1/namespaces/{ns}/streams/{name}/archive/verify 409  concurrent run
";

const PUBLISHER: &str = "tok-publisher-0123456789abcdef";
const READER: &str = "tok-reader-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

/// The documents, the answers seen, and the checks of each answer against its document.
struct Contract {
    ingest: Value,
    admin: Value,
    /// (method, path template, status) of every answer.
    seen: BTreeSet<(String, String, u16)>,
    client: reqwest::Client,
}

/// The path template of `doc` that `path` matches, preferring literal segments.
fn template(doc: &Value, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split('/').collect();
    let mut best: Option<(usize, String)> = None;
    for t in doc["paths"].as_object()?.keys() {
        let ts: Vec<&str> = t.split('/').collect();
        if ts.len() != segs.len() {
            continue;
        }
        let mut literal = 0;
        let ok = ts.iter().zip(&segs).all(|(t, s)| {
            if t.starts_with('{') {
                !s.is_empty()
            } else {
                literal += 1;
                t == s
            }
        });
        if ok && best.as_ref().is_none_or(|(l, _)| literal > *l) {
            best = Some((literal, t.clone()));
        }
    }
    best.map(|(_, t)| t)
}

/// Validates `body` against `schema`, resolving `$ref`s in the document's components.
fn validate(doc: &Value, schema: &Value, body: &Value) -> Result<(), String> {
    let mut root = schema.clone();
    if let Some(o) = root.as_object_mut() {
        o.insert("components".into(), doc["components"].clone());
    }
    let validator = jsonschema::validator_for(&root).map_err(|e| format!("schema: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

impl Contract {
    /// Sends `req`, checks the answer against the document (its status must be one of
    /// `expect`) and returns it (status, headers, body).
    async fn check_any(
        &mut self,
        admin: bool,
        req: reqwest::RequestBuilder,
        expect: &[u16],
    ) -> (u16, http::HeaderMap, Value) {
        let (what, resp) = self.send(req).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("a body");
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        self.verify(admin, &what, status, &headers, Some(&body));
        assert!(expect.contains(&status), "{}: {status} {body}", what.text);
        (status, headers, body)
    }

    /// [`Contract::check_any`] with one expected status.
    async fn check(
        &mut self,
        admin: bool,
        req: reqwest::RequestBuilder,
        expect: u16,
    ) -> (http::HeaderMap, Value) {
        let (_, headers, body) = self.check_any(admin, req, &[expect]).await;
        (headers, body)
    }

    /// A follow (`follow=true`): its answer is checked like any other, but a served follow
    /// never ends, so it is checked by its headers and handed back unread (`None`: refused).
    async fn follow(&mut self, req: reqwest::RequestBuilder) -> Option<reqwest::Response> {
        let (what, resp) = self.send(req).await;
        if resp.status() != 200 {
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body: Value = resp.json().await.expect("a problem");
            self.verify(false, &what, status, &headers, Some(&body));
            return None;
        }
        self.verify(false, &what, 200, &resp.headers().clone(), None);
        Some(resp)
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> (Request, reqwest::Response) {
        let req = req.build().expect("a request");
        let what = Request {
            method: req.method().as_str().to_lowercase(),
            path: req.url().path().to_string(),
            text: format!("{} {}", req.method(), req.url()),
        };
        (what, self.client.execute(req).await.expect("an answer"))
    }

    /// The answer's status, content type, headers and body (`None`: an event stream, not
    /// read) against the operation the document gives for the request.
    fn verify(
        &mut self,
        admin: bool,
        req: &Request,
        status: u16,
        headers: &http::HeaderMap,
        body: Option<&Value>,
    ) {
        let what = &req.text;
        let ctype = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let doc = if admin { &self.admin } else { &self.ingest };
        let t = template(doc, &req.path).unwrap_or_else(|| panic!("{what}: path not documented"));
        let op = &doc["paths"][&t][&req.method];
        assert!(op.is_object(), "{what}: method not documented for {t}");
        let documented = &op["responses"][status.to_string()];
        assert!(
            documented.is_object(),
            "{what}: status {status} is not documented for {} {t}: {body:?}",
            req.method
        );
        let media = &documented["content"][&ctype];
        assert!(
            media.is_object(),
            "{what}: content type {ctype:?} is not documented for {status}: {documented}"
        );
        match body {
            Some(body) if ctype.ends_with("json") => {
                if let Err(e) = validate(doc, &media["schema"], body) {
                    panic!("{what}: the {status} body breaks its schema: {e}\nbody: {body}");
                }
            }
            Some(body) => assert!(body.is_string(), "{what}: a text body"),
            None => assert_eq!(ctype, "text/event-stream", "{what}"),
        }
        for (name, _) in documented["headers"].as_object().into_iter().flatten() {
            // `Link` is sent only while a page follows; the others always.
            if name != "Link" {
                assert!(
                    headers.contains_key(name.as_str()),
                    "{what}: no {name} header"
                );
            }
        }
        self.seen.insert((req.method.clone(), t, status));
    }
}

/// What a request was, for the checks and their messages.
struct Request {
    method: String,
    path: String,
    text: String,
}

fn event(id: &str, ty: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/contract", "type": ty,
           "datacontenttype": "application/json", "data": data})
}

fn secrets() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: publishers, namespace: test}}\n\
         stringData: {{checkout: \"{PUBLISHER}\"}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: readers, namespace: test}}\n\
         stringData: {{audit: \"{READER}\"}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: pgdown, namespace: test}}\n\
         stringData: {{url: \"postgres://postgres@127.0.0.1:1/nothing\"}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: pii-keys, namespace: test}}\n\
         stringData: {{keys: \"k1:{}\"}}\n",
        base64_key(),
    )
}

fn base64_key() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([7u8; 32])
}

/// The document a port serves at `/openapi.json`.
async fn document(client: &reqwest::Client, base: &str) -> Value {
    let resp = client.get(format!("{base}/openapi.json")).send().await;
    let resp = resp.unwrap_or_else(|e| panic!("GET {base}/openapi.json: {e}"));
    resp.json()
        .await
        .unwrap_or_else(|e| panic!("{base}/openapi.json is not JSON: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_server_keeps_its_documented_contract() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let ex = unique("weir.test.openapi.");
    m.write("auth.yaml", &secrets());
    m.write(
        "orders.yaml",
        &stream_yaml(
            "orders",
            &ex,
            "  validation:\n    maxRequestBytes: 8KiB\n    allowUnknownTypes: false\n    \
             schemas:\n      - type: order.created\n        schema: {type: object, required: [orderId], properties: {orderId: {type: string}}}\n",
        ),
    );
    m.write(
        "secured.yaml",
        &stream_yaml(
            "secured",
            &format!("{ex}.secured"),
            "  ingest:\n    rateLimit: {eventsPerSecond: 1, burst: 2}\n    auth:\n      mode: Tokens\n      \
             tokensSecretRef: {name: publishers}\n      readers: {tokensSecretRef: {name: readers}}\n",
        ),
    );
    m.write(
        "private.yaml",
        &stream_yaml(
            "private",
            &format!("{ex}.private"),
            "  pii: {fields: [/email], keySecretRef: {name: pii-keys, key: keys}}\n",
        ),
    );
    m.write(
        "news.yaml",
        &broker_only_yaml("news", &format!("{ex}.news")),
    );
    m.write(
        "archive.yaml",
        "apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {name: cold, namespace: test}\n\
         spec:\n  streamNames: [orders]\n  archiveAfter: 1s\n  schedule: 1h\n",
    );
    // A sink answering 400: every delivery is dead-lettered at once.
    let sink = status_sink(400).await;
    m.write(
        "mail.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: mail, namespace: test}}\n\
             spec:\n  stream: orders\n  sink: {{uri: \"{sink}\"}}\n"
        ),
    );
    let token_file = m.path().join("..admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let weir = Weir::start_with_args(
        m.path(),
        &[
            "--admin-token-file",
            token_file.to_str().unwrap(),
            "--max-followers",
            "1",
            "--follow-heartbeat",
            "1s",
        ],
    );
    let client = common::http();
    // Status details need the admin token here; `Weir::wait_ready` asks without one.
    let status_url = format!("{}/v1/status", weir.admin);
    common::eventually(
        60,
        "every resource ready",
        || weir.log_text(),
        || {
            let req = client.get(&status_url).bearer_auth(ADMIN_TOKEN);
            async move {
                let v: Value = req.send().await.ok()?.json().await.ok()?;
                let ready: BTreeSet<&str> = v["resources"]
                    .as_array()?
                    .iter()
                    .filter(|r| r["ready"] == true)
                    .filter_map(|r| r["name"].as_str())
                    .collect();
                ["orders", "secured", "private", "news", "mail"]
                    .iter()
                    .all(|s| ready.contains(s))
                    .then_some(())
            }
        },
    )
    .await;
    let mut c = Contract {
        ingest: document(&client, &weir.url).await,
        admin: document(&client, &weir.admin).await,
        seen: BTreeSet::new(),
        client: client.clone(),
    };
    // What each port serves is what the code generates (and so the committed files).
    assert_eq!(
        c.ingest,
        serde_json::to_value(weir::openapi::ingest()).unwrap()
    );
    assert_eq!(
        c.admin,
        serde_json::to_value(weir::openapi::admin()).unwrap()
    );

    ingest_contract(&mut c, &weir).await;
    admin_contract(&mut c, &weir, &db).await;
    outage_contract(&mut c, &weir, &m, &ex).await;
    coverage(&c);
    undocumented_routes(&c, &weir).await;
    drop(weir);
}

async fn ingest_contract(c: &mut Contract, weir: &Weir) {
    let u = weir.url.clone();
    let cl = c.client.clone();
    let orders = format!("{u}/v1/namespaces/test/streams/orders/events");
    let secured = format!("{u}/v1/namespaces/test/streams/secured/events");
    let ce = "application/cloudevents+json";
    c.check(false, cl.get(format!("{u}/openapi.json")), 200)
        .await;

    // The four content modes.
    let structured = event("o1", "order.created", json!({"orderId": "a"}));
    let mut with_subject = structured.clone();
    with_subject["subject"] = json!("s1");
    with_subject["correlationid"] = json!("saga-1");
    let send = |body: &Value, ctype: &str| {
        cl.post(&orders)
            .header("content-type", ctype)
            .body(body.to_string())
    };
    c.check(false, send(&with_subject, ce), 201).await;
    let batch = json!([
        event("o2", "order.created", json!({"orderId": "b"})),
        event("o3", "order.created", json!({"orderId": "c"}))
    ]);
    c.check(
        false,
        send(&batch, "application/cloudevents-batch+json"),
        201,
    )
    .await;
    let binary = cl
        .post(&orders)
        .header("content-type", "application/json")
        .header("ce-specversion", "1.0")
        .header("ce-id", "o4")
        .header("ce-source", "/contract")
        .header("ce-type", "order.created")
        .header("ce-subject", "s1")
        .body(r#"{"orderId":"d"}"#);
    c.check(false, binary, 201).await;
    let simple = json!({"type": "order.created", "data": {"orderId": "e"}, "subject": "s1",
                        "correlationId": "saga-1"});
    c.check(false, send(&simple, "application/json"), 201).await;
    // The refusals, each with its status.
    c.check(false, send(&json!("x"), "text/plain"), 415).await;
    c.check(
        false,
        cl.post(&orders).header("content-type", ce).body("{\"id\":"),
        400,
    )
    .await;
    let big = event("big", "order.created", json!({"orderId": "x".repeat(9000)}));
    c.check(false, send(&big, ce), 413).await;
    let broken = event("bad", "order.created", json!({"orderId": 5}));
    c.check(false, send(&broken, ce), 422).await;
    let mut stale = event("o9", "order.created", json!({"orderId": "f"}));
    stale["subject"] = json!("s1");
    stale["expectedversion"] = json!("1");
    c.check(false, send(&stale, ce), 409).await;
    let nowhere = format!("{u}/v1/namespaces/test/streams/nowhere/events");
    c.check(
        false,
        cl.post(&nowhere)
            .header("content-type", ce)
            .body(structured.to_string()),
        404,
    )
    .await;
    let news = format!("{u}/v1/namespaces/test/streams/news/events");
    let n1 = event("n1", "news.posted", json!({}));
    c.check(
        false,
        cl.post(&news)
            .header("content-type", ce)
            .body(n1.to_string()),
        202,
    )
    .await;
    // Pii: data that is not JSON cannot be encrypted.
    let private = format!("{u}/v1/namespaces/test/streams/private/events");
    let mut p1 = event("p1", "signup", json!({"email": "a@example.com"}));
    p1["subject"] = json!("alice");
    c.check(
        false,
        cl.post(&private)
            .header("content-type", ce)
            .body(p1.to_string()),
        201,
    )
    .await;
    let text = cl
        .post(&private)
        .header("content-type", "text/plain")
        .header("ce-specversion", "1.0")
        .header("ce-id", "p2")
        .header("ce-source", "/contract")
        .header("ce-type", "signup")
        .header("ce-subject", "alice")
        .body("plain text");
    c.check(false, text, 422).await;

    // A stream with tokens and a rate limit.
    let two = json!([event("t1", "a", json!({})), event("t2", "a", json!({}))]);
    let three = json!([
        event("t3", "a", json!({})),
        event("t4", "a", json!({})),
        event("t5", "a", json!({}))
    ]);
    let batch_ct = "application/cloudevents-batch+json";
    let sec = |body: &Value, token: Option<&str>| {
        let r = cl
            .post(&secured)
            .header("content-type", batch_ct)
            .body(body.to_string());
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    };
    c.check(false, sec(&two, None), 401).await;
    c.check(false, sec(&two, Some(READER)), 403).await;
    c.check(false, sec(&three, Some(PUBLISHER)), 413).await;
    // Burst 2, one token a second: a second request of two right after the first is 429
    // (tried again should the machine be slow enough for the bucket to refill between).
    let mut limited = false;
    for i in 0..10 {
        for half in ["a", "b"] {
            let body = json!([
                event(&format!("r{i}{half}1"), "a", json!({})),
                event(&format!("r{i}{half}2"), "a", json!({}))
            ]);
            let (status, _, _) = c
                .check_any(false, sec(&body, Some(PUBLISHER)), &[201, 429])
                .await;
            limited |= status == 429;
        }
        if limited {
            break;
        }
    }
    assert!(limited, "no publish was rate limited");

    // Reads.
    c.check(false, cl.get(format!("{orders}?from=1&limit=10")), 200)
        .await;
    c.check(false, cl.get(format!("{orders}?limit=0")), 400)
        .await;
    c.check(false, cl.get(format!("{orders}/1")), 200).await;
    c.check(false, cl.get(format!("{orders}/999")), 404).await;
    c.check(false, cl.get(format!("{orders}/x")), 400).await;
    c.check(false, cl.get(&news), 404).await;
    c.check(false, cl.get(format!("{news}/1")), 404).await;
    c.check(false, cl.get(&secured), 401).await;
    c.check(false, cl.get(&secured).bearer_auth(READER), 200)
        .await;
    c.check(false, cl.get(format!("{secured}/1")), 401).await;
    c.check(
        false,
        cl.get(format!("{secured}/1")).bearer_auth(READER),
        200,
    )
    .await;
    let subject = format!("{u}/v1/namespaces/test/streams/orders/subjects/s1/events");
    let (h, _) = c
        .check(false, cl.get(format!("{subject}?limit=1")), 200)
        .await;
    assert!(
        h.contains_key("link"),
        "a first page of one of three events links the next"
    );
    c.check(false, cl.get(format!("{subject}?asOf=yesterday")), 400)
        .await;
    let sub_of =
        |stream: &str| format!("{u}/v1/namespaces/test/streams/{stream}/subjects/s1/events");
    c.check(false, cl.get(sub_of("news")), 404).await;

    c.check(false, cl.get(sub_of("secured")), 401).await;
    // Follows: the first holds the only place (--max-followers 1), the second is refused.
    let range_follow = format!("{orders}?follow=true");
    let subject_follow = format!("{subject}?follow=true");
    let held = c
        .follow(cl.get(&range_follow))
        .await
        .expect("the first follow is served");
    assert!(
        c.follow(cl.get(&subject_follow)).await.is_none(),
        "a second follow over the cap"
    );
    drop(held);
    // The worker notices the closed connection at its next heartbeat (--follow-heartbeat);
    // until then the place is taken.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let held = loop {
        if let Some(r) = c.follow(cl.get(&subject_follow)).await {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the follow place was never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(
        c.follow(cl.get(&range_follow)).await.is_none(),
        "a second follow over the cap"
    );
    drop(held);
    let trace = format!("{u}/v1/namespaces/test/correlations/saga-1/events");
    let (_, body) = c.check(false, cl.get(&trace), 200).await;
    assert_eq!(body["events"].as_array().map(Vec::len), Some(2), "{body}");
    c.check(false, cl.get(format!("{trace}?limit=0")), 400)
        .await;
}

async fn admin_contract(c: &mut Contract, weir: &Weir, db: &str) {
    let a = weir.admin.clone();
    let cl = c.client.clone();
    let get = |path: &str, token: Option<&str>| {
        let r = cl.get(format!("{a}{path}"));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    };
    let t = Some(ADMIN_TOKEN);
    c.check(true, get("/openapi.json", None), 200).await;
    c.check(true, get("/healthz", None), 200).await;
    c.check(true, get("/metrics", None), 200).await;
    c.check(true, get("/readyz", None), 200).await;
    let (_, body) = c.check(true, get("/v1/status", None), 200).await;
    assert_eq!(body["details"], false, "{body}");
    let (_, body) = c.check(true, get("/v1/status", t), 200).await;
    assert_eq!(body["details"], true, "{body}");
    c.check(true, get("/v1/status", Some("wrong-token-0123456789")), 401)
        .await;

    // Dead letters: the sink answers 400, so the subscription's deliveries are dead letters.
    let dlq = "/v1/namespaces/test/subscriptions/mail/deadletters";
    let mut found = Vec::new();
    for i in 0..600 {
        let (_, body) = c.check(true, get(dlq, t), 200).await;
        if let Some(first) = body["deadLetters"].as_array().and_then(|l| l.first()) {
            found.push(first["id"].as_str().unwrap().to_string());
            break;
        }
        // Publish one the subscription (bound after start) certainly sees.
        if i % 50 == 0 {
            let ev = event(
                &format!("late{i}"),
                "order.created",
                json!({"orderId": "z"}),
            );
            let url = format!("{}/v1/namespaces/test/streams/orders/events", weir.url);
            let r = cl
                .post(url)
                .header("content-type", "application/cloudevents+json")
                .body(ev.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let id = found.pop().expect("a dead letter within 60 s");
    c.check(true, get(dlq, None), 401).await;
    c.check(
        true,
        get("/v1/namespaces/test/subscriptions/nobody/deadletters", t),
        404,
    )
    .await;
    c.check(true, get(&format!("{dlq}/{id}"), t), 200).await;
    c.check(true, get(&format!("{dlq}/no-such-id"), t), 404)
        .await;
    c.check(true, get(&format!("{dlq}/{id}"), None), 401).await;
    c.check(
        true,
        get("/v1/namespaces/test/subscriptions/nobody/deadletters/x", t),
        404,
    )
    .await;
    let post = |path: &str, token: Option<&str>| {
        let r = cl.post(format!("{a}{path}"));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    };
    let delete = |path: &str, token: Option<&str>| {
        let r = cl.delete(format!("{a}{path}"));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    };
    let redrive = format!("{dlq}/redrive");
    c.check(true, post(&redrive, None), 401).await;
    c.check(
        true,
        post(
            "/v1/namespaces/test/subscriptions/nobody/deadletters/redrive",
            t,
        ),
        404,
    )
    .await;
    c.check(true, post(&format!("{redrive}?limit=1"), t), 200)
        .await;
    c.check(true, delete(dlq, None), 401).await;
    c.check(
        true,
        delete("/v1/namespaces/test/subscriptions/nobody/deadletters", t),
        404,
    )
    .await;
    c.check(true, delete(dlq, t), 200).await;

    // Archives.
    let archive = "/v1/namespaces/test/streams/orders/archive";
    c.check(true, get("/v1/archive", None), 401).await;
    let (_, body) = c.check(true, get("/v1/archive", t), 200).await;
    assert_eq!(body["streams"][0]["stream"], "test/orders", "{body}");
    c.check(true, get(archive, t), 200).await;
    c.check(true, get(archive, None), 401).await;
    c.check(
        true,
        get("/v1/namespaces/test/streams/news/archive", t),
        404,
    )
    .await;
    for op in ["run?maxSegments=1", "verify"] {
        c.check(true, post(&format!("{archive}/{op}"), t), 200)
            .await;
        c.check(true, post(&format!("{archive}/{op}"), None), 401)
            .await;
        c.check(
            true,
            post(&format!("/v1/namespaces/test/streams/news/archive/{op}"), t),
            404,
        )
        .await;
    }
    // Another run holding the stream (its advisory lock, taken here as another worker's run
    // would hold it): 409.
    {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(db).await.unwrap();
        let id: i64 = sqlx::query_scalar(
            "SELECT stream_id FROM weir_streams WHERE namespace = 'test' AND name = 'orders'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let held = weir::data::store::segments::try_archive_lock(&mut conn, id).await;
        assert!(held.unwrap(), "the archive lock of test/orders is free");
        c.check(true, post(&format!("{archive}/run"), t), 409).await;
        conn.close().await.unwrap();
    }

    // Personal-data keys.
    let forget = "/v1/namespaces/test/streams/private/subjects/alice/key";
    c.check(true, delete(forget, None), 401).await;
    c.check(
        true,
        delete("/v1/namespaces/test/streams/orders/subjects/alice/key", t),
        404,
    )
    .await;
    let (_, body) = c.check(true, delete(forget, t), 200).await;
    assert_eq!(body["forgotten"], true, "{body}");
    let rotate = "/v1/namespaces/test/streams/private/keys/rotate";
    c.check(true, post(rotate, None), 401).await;
    c.check(true, post(&format!("{rotate}?limit=0"), t), 400)
        .await;
    c.check(
        true,
        post("/v1/namespaces/test/streams/orders/keys/rotate", t),
        404,
    )
    .await;
    c.check(true, post(rotate, t), 200).await;
    // Reading the forgotten subject back is still a 200 (its fields are marked).
    let private = format!("{}/v1/namespaces/test/streams/private/events/1", weir.url);
    let (_, body) = c.check(false, cl.get(private), 200).await;
    assert_eq!(body["data"]["email"], "weir:pii:forgotten", "{body}");
}

/// A stream whose database never answers, added last (its namespace's traces meet it too):
/// its publishes and reads are 503, and so is `/readyz`.
async fn outage_contract(c: &mut Contract, weir: &Weir, m: &Manifests, ex: &str) {
    // A stream whose store never answers, with personal-data fields and an archive policy,
    // so that the archive and key operations meet the outage too.
    m.write(
        "down.yaml",
        &(stream_yaml(
            "down",
            &format!("{ex}.down"),
            "  pii: {fields: [/email], keySecretRef: {name: pii-keys, key: keys}}\n",
        )
        .replace(
            "urlSecretRef: {name: pg, key: url}",
            "urlSecretRef: {name: pgdown, key: url}",
        ) + "---\napiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\n\
             metadata: {name: colddown, namespace: test}\n\
             spec:\n  streamNames: [down]\n  archiveAfter: 1s\n  schedule: 1h\n"),
    );
    let readyz = format!("{}/readyz", weir.admin);
    let cl = c.client.clone();
    common::eventually(
        60,
        "/readyz naming the stream test/down",
        || weir.log_text(),
        || {
            let req = cl.get(&readyz);
            async move {
                let text = req.send().await.ok()?.text().await.ok()?;
                text.contains("test/down").then_some(())
            }
        },
    )
    .await;
    let (_, body) = c.check(true, cl.get(&readyz), 503).await;
    assert!(
        body.as_str().is_some_and(|b| b.contains("test/down")),
        "{body}"
    );
    let down = format!("{}/v1/namespaces/test/streams/down/events", weir.url);
    let ev = event("d1", "a", json!({}));
    let publish = cl
        .post(&down)
        .header("content-type", "application/cloudevents+json")
        .body(ev.to_string());
    c.check(false, publish, 503).await;
    c.check(false, cl.get(&down), 503).await;
    c.check(false, cl.get(format!("{down}/1")), 503).await;
    let subject = format!(
        "{}/v1/namespaces/test/streams/down/subjects/s1/events",
        weir.url
    );
    c.check(false, cl.get(subject), 503).await;
    let trace = format!("{}/v1/namespaces/test/correlations/saga-1/events", weir.url);
    c.check(false, cl.get(trace), 503).await;
    let admin = |method: reqwest::Method, path: &str| {
        cl.request(
            method,
            format!("{}/v1/namespaces/test/streams/down{path}", weir.admin),
        )
        .bearer_auth(ADMIN_TOKEN)
    };
    use reqwest::Method;
    c.check(true, admin(Method::GET, "/archive"), 503).await;
    c.check(true, admin(Method::POST, "/archive/run"), 503)
        .await;
    c.check(true, admin(Method::POST, "/archive/verify"), 503)
        .await;
    c.check(true, admin(Method::DELETE, "/subjects/alice/key"), 503)
        .await;
    c.check(true, admin(Method::POST, "/keys/rotate"), 503)
        .await;
    broker_outage_contract(c, weir, m, ex).await;
}

/// The dead-letter operations of a running subscription whose broker connection is then cut
/// (a proxy between the stream and RabbitMQ).
async fn broker_outage_contract(c: &mut Contract, weir: &Weir, m: &Manifests, ex: &str) {
    let mut proxy = common::chaos::ChaosProxy::start("127.0.0.1:5672").await;
    let port = proxy.port;
    m.write(
        "cut.yaml",
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitcut, namespace: test}}\n\
             stringData: {{url: \"amqp://guest:guest@127.0.0.1:{port}/%2f\"}}\n---\n{}---\n\
             apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: cutmail, namespace: test}}\n\
             spec:\n  stream: cut\n  sink: {{uri: \"http://127.0.0.1:9/\"}}\n",
            stream_yaml("cut", &format!("{ex}.cut"), "").replace(
                "urlSecretRef: {name: rabbitmq, key: url}",
                "urlSecretRef: {name: rabbitcut, key: url}",
            )
        ),
    );
    let dlq = format!(
        "{}/v1/namespaces/test/subscriptions/cutmail/deadletters",
        weir.admin
    );
    let cl = c.client.clone();
    common::eventually(
        60,
        "the subscription cutmail answering its dead letters",
        || weir.log_text(),
        || {
            let req = cl.get(&dlq).bearer_auth(ADMIN_TOKEN);
            async move { (req.send().await.ok()?.status() == 200).then_some(()) }
        },
    )
    .await;
    proxy.cut();
    let req = |method: reqwest::Method, path: &str| {
        cl.request(method, format!("{dlq}{path}"))
            .bearer_auth(ADMIN_TOKEN)
    };
    use reqwest::Method;
    c.check(true, req(Method::GET, ""), 503).await;
    c.check(true, req(Method::GET, "/some-id"), 503).await;
    c.check(true, req(Method::POST, "/redrive"), 503).await;
    c.check(true, req(Method::DELETE, ""), 503).await;
    proxy.restore().await;
}

/// Every documented status of every operation was answered here or is in [`NOT_PROVOKED`].
fn coverage(c: &Contract) {
    let mut documented = BTreeSet::new();
    for doc in [&c.ingest, &c.admin] {
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for status in op["responses"].as_object().unwrap().keys() {
                    documented.insert((
                        method.clone(),
                        path.clone(),
                        status.parse::<u16>().unwrap(),
                    ));
                }
            }
        }
    }
    let exempt: BTreeMap<(String, String, u16), &str> = NOT_PROVOKED
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut f = l.splitn(4, ' ');
            let (m, p, s) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            let why = f.next().unwrap_or("").trim();
            assert!(!why.is_empty(), "NOT_PROVOKED: {l:?} gives no reason");
            ((m.to_string(), p.to_string(), s.parse().unwrap()), why)
        })
        .collect();
    let missing: Vec<_> = documented
        .iter()
        .filter(|k| !c.seen.contains(*k) && !exempt.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but never answered: {missing:#?}"
    );
    let stale: Vec<_> = exempt
        .keys()
        .filter(|k| c.seen.contains(*k) || !documented.contains(*k))
        .collect();
    assert!(
        stale.is_empty(),
        "NOT_PROVOKED entries answered here or not documented: {stale:#?}"
    );
}

/// The reverse: every path docs/http-api.md names is documented, and no method a document
/// does not list is answered on a documented path (utoipa-axum registers each route with its
/// operation, so the server has no other routes; this checks that from outside).
async fn undocumented_routes(c: &Contract, weir: &Weir) {
    let prose = std::fs::read_to_string(root().join("docs/http-api.md")).unwrap();
    let normalise = |p: &str| -> String {
        p.split('/')
            .map(|s| if s.starts_with('{') { "{}" } else { s })
            .collect::<Vec<_>>()
            .join("/")
    };
    let mut documented = BTreeSet::new();
    for doc in [&c.ingest, &c.admin] {
        for path in doc["paths"].as_object().unwrap().keys() {
            documented.insert(normalise(path));
        }
    }
    let mut named = BTreeSet::new();
    for piece in prose.split('`') {
        let piece = piece.trim();
        let path = match piece.split_once(' ') {
            Some((m, p)) if ["GET", "POST", "DELETE", "PUT", "PATCH"].contains(&m) => p,
            _ => continue,
        };
        let path = path.split(['?', ' ']).next().unwrap();
        let path = path.replace("…/streams/", "/v1/namespaces/{ns}/streams/");
        if path.starts_with('/') {
            named.insert(normalise(&path));
        }
    }
    assert!(
        named.len() >= 15,
        "paths found in docs/http-api.md: {named:?}"
    );
    let absent: Vec<_> = named.difference(&documented).collect();
    assert!(
        absent.is_empty(),
        "docs/http-api.md names paths the documents lack: {absent:?}"
    );

    for (base, doc) in [(&weir.url, &c.ingest), (&weir.admin, &c.admin)] {
        for (path, item) in doc["paths"].as_object().unwrap() {
            let concrete = path
                .split('/')
                .map(|s| if s.starts_with('{') { "1" } else { s })
                .collect::<Vec<_>>()
                .join("/");
            for method in ["get", "post", "put", "patch", "delete"] {
                if item.get(method).is_some() {
                    continue;
                }
                let m = http::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let r = c
                    .client
                    .request(m, format!("{base}{concrete}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    r.status(),
                    405,
                    "{method} {path} is not documented but was answered {}",
                    r.status()
                );
            }
        }
    }
}

/// The schemas bite: an answer the code never sends breaks them (so the contract test's
/// validations can fail).
#[test]
fn schemas_refuse_answers_the_code_never_sends() {
    let ingest = serde_json::to_value(weir::openapi::ingest()).unwrap();
    let publish = &ingest["paths"]["/v1/namespaces/{ns}/streams/{stream}/events"]["post"];
    let created = &publish["responses"]["201"]["content"]["application/json"]["schema"];
    let good = json!({"results": [{"id": "a", "source": "/s", "position": 1, "duplicate": false}]});
    validate(&ingest, created, &good).unwrap();
    let bad =
        json!({"results": [{"id": "a", "source": "/s", "position": "1", "duplicate": false}]});
    assert!(validate(&ingest, created, &bad).is_err());
    let problem = &publish["responses"]["422"]["content"]["application/problem+json"]["schema"];
    let unknown = json!({"type": "https://weir.dev/problems/nope", "title": "t", "status": 422,
                         "detail": "d", "errors": []});
    assert!(validate(&ingest, problem, &unknown).is_err());
}
