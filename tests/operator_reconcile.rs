//! Reconciler tests against a mocked API server (tower-test): each test scripts the API
//! server's side and checks the exact requests the reconciler makes — finalizer added and
//! removed, Secrets read with `get`, the status apply body, the Events.
//!
//! None of these scenarios reaches RabbitMQ or PostgreSQL: the streams either reference a
//! missing Secret (so they never get a plan) or are being deleted.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};
use weir::api::{EventStream, Subscription};
use weir::control::reconcile::{error_policy, reconcile};
use weir::control::status_writer;
use weir::control::{Context, ControlError, FINALIZER, Stores};
use weir::topology::Kind;

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn stream(finalizer: bool, deleting: bool) -> EventStream {
    let mut v = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "EventStream",
        "metadata": {"name": "orders", "namespace": "shop", "generation": 2,
                     "uid": "u-orders", "resourceVersion": "10"},
        "spec": {"broker": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}}}
    });
    if finalizer {
        v["metadata"]["finalizers"] = json!([FINALIZER]);
    }
    if deleting {
        v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    serde_json::from_value(v).unwrap()
}

fn subscription() -> Subscription {
    serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "Subscription",
        "metadata": {"name": "notify", "namespace": "shop", "generation": 1,
                     "uid": "u-notify", "resourceVersion": "11",
                     "finalizers": [FINALIZER]},
        "spec": {"stream": "orders", "sink": {"uri": "http://notifier.shop.svc/hook"}}
    }))
    .unwrap()
}

/// Caches holding `streams` and `subs`, already filled (as after the first list).
fn stores(streams: Vec<EventStream>, subs: Vec<Subscription>) -> Stores {
    let (s_store, mut s_writer): (_, Writer<EventStream>) = reflector::store();
    let (sub_store, mut sub_writer): (_, Writer<Subscription>) = reflector::store();
    s_writer.apply_watcher_event(&watcher::Event::Init);
    for s in streams {
        s_writer.apply_watcher_event(&watcher::Event::InitApply(s));
    }
    s_writer.apply_watcher_event(&watcher::Event::InitDone);
    sub_writer.apply_watcher_event(&watcher::Event::Init);
    for s in subs {
        sub_writer.apply_watcher_event(&watcher::Event::InitApply(s));
    }
    sub_writer.apply_watcher_event(&watcher::Event::InitDone);
    // The writers may go: the stores keep their content and readiness.
    let mut stores = Stores::default();
    stores.streams = vec![s_store];
    stores.subscriptions = vec![sub_store];
    stores
}

/// One request as the mock API server saw it.
#[derive(Debug)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// Takes the next request (failing after 5 s), and answers it with `status` and `reply`
/// (`None`: echo the request body).
async fn next(handle: &mut ApiHandle, status: StatusCode, reply: Option<Value>) -> Seen {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the reconciler made no further request")
        .expect("the client went away");
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let answer = reply.unwrap_or_else(|| body.clone());
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&answer).unwrap()))
            .unwrap(),
    );
    Seen {
        method,
        path,
        query,
        content_type,
        body,
    }
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "secrets \"rabbitmq\" not found", "reason": "NotFound", "code": 404})
}

fn mocked() -> (Client, ApiHandle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

#[tokio::test]
async fn the_holder_adds_the_finalizer_first() {
    let (client, mut handle) = mocked();
    let obj = stream(false, false);
    let (ctx, _rx) = Context::test(client, stores(vec![obj.clone()], vec![]));
    let task = tokio::spawn(reconcile(Arc::new(obj.clone()), ctx));

    let mut with_finalizer = serde_json::to_value(&obj).unwrap();
    with_finalizer["metadata"]["finalizers"] = json!([FINALIZER]);
    let seen = next(&mut handle, StatusCode::OK, Some(with_finalizer)).await;
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(
        seen.path,
        "/apis/weir.dev/v1alpha1/namespaces/shop/eventstreams/orders"
    );
    assert_eq!(seen.content_type, "application/json-patch+json");
    let ops = seen.body.as_array().unwrap();
    assert!(
        ops.iter()
            .any(|op| op["op"] == "add" && op["value"].to_string().contains(FINALIZER)),
        "no finalizer add in {ops:?}"
    );
    let action = task.await.unwrap().unwrap();
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_missing_secret_is_reported_in_status_and_as_an_event() {
    let (client, mut handle) = mocked();
    let obj = stream(true, false);
    let (ctx, mut rx) = Context::test(client.clone(), stores(vec![obj.clone()], vec![]));
    let task = tokio::spawn(reconcile(Arc::new(obj.clone()), ctx.clone()));

    // Dereference: the Secret is read with `get`, never listed.
    let seen = next(&mut handle, StatusCode::NOT_FOUND, Some(not_found())).await;
    assert_eq!(seen.method, Method::GET);
    assert_eq!(seen.path, "/api/v1/namespaces/shop/secrets/rabbitmq");
    // A missing Secret is not cached as final: the whole-index refresh reads it again.
    let seen = next(&mut handle, StatusCode::NOT_FOUND, Some(not_found())).await;
    assert_eq!(seen.path, "/api/v1/namespaces/shop/secrets/rabbitmq");
    // The Ready transition is an Event whose reason is the category.
    let seen = next(&mut handle, StatusCode::CREATED, None).await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, "/apis/events.k8s.io/v1/namespaces/shop/events");
    assert_eq!(seen.body["reason"], "SecretNotFound");
    assert_eq!(seen.body["type"], "Warning");
    assert_eq!(seen.body["regarding"]["kind"], "EventStream");
    assert_eq!(seen.body["regarding"]["name"], "orders");
    assert_eq!(seen.body["reportingController"], "weir.dev/operator");
    assert!(seen.body["note"].as_str().unwrap().contains("rabbitmq"));

    let action = task.await.unwrap().unwrap();
    // Secrets are not watched: a missing one is looked for again soon.
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));

    let update = rx.try_recv().expect("a status update was queued");
    assert_eq!(update.kind, Kind::EventStream);
    let status = &update.body["status"];
    assert_eq!(update.body["apiVersion"], "weir.dev/v1alpha1");
    assert_eq!(update.body["kind"], "EventStream");
    assert_eq!(update.body["metadata"]["name"], "orders");
    assert_eq!(status["observedGeneration"], 2);
    let ready = &status["conditions"][0];
    assert_eq!(ready["type"], "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "SecretNotFound");
    assert!(ready["message"].as_str().unwrap().contains("rabbitmq"));
    assert_eq!(ready["observedGeneration"], 2);

    // The writer applies it server-side under the field manager `weir`.
    let counter = ctx.status.counter.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, wrx) = tokio::sync::mpsc::channel(4);
    tx.send(update.clone()).await.unwrap();
    drop(tx);
    let writer = tokio::spawn(status_writer::run(
        client,
        wrx,
        counter.clone(),
        ctx.leader.clone(),
        stop,
    ));
    let seen = next(
        &mut handle,
        StatusCode::OK,
        Some(serde_json::to_value(&obj).unwrap()),
    )
    .await;
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(
        seen.path,
        "/apis/weir.dev/v1alpha1/namespaces/shop/eventstreams/orders/status"
    );
    assert_eq!(seen.content_type, "application/apply-patch+yaml");
    assert!(seen.query.contains("fieldManager=weir"), "{}", seen.query);
    assert!(seen.query.contains("force=true"), "{}", seen.query);
    assert_eq!(seen.body, update.body);
    writer.await.unwrap();
    assert_eq!(counter.with_label_values(&["written"]).get(), 1);
}

#[tokio::test]
async fn only_the_holder_writes_status_and_records_events() {
    let (client, mut handle) = mocked();
    let obj = stream(true, false);
    let (ctx, mut rx) = Context::test(client, stores(vec![obj.clone()], vec![]));
    ctx.leader
        .store(false, std::sync::atomic::Ordering::Release);
    let task = tokio::spawn(reconcile(Arc::new(obj), ctx));
    for _ in 0..2 {
        let seen = next(&mut handle, StatusCode::NOT_FOUND, Some(not_found())).await;
        assert_eq!(seen.method, Method::GET, "a non-holder only reads");
    }
    task.await.unwrap().unwrap();
    assert!(rx.try_recv().is_err(), "a non-holder queued a status");
    // No further request (no finalizer patch, no Event).
    assert!(
        !matches!(
            tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await,
            Ok(Some(_))
        ),
        "a non-holder made a write"
    );
}

#[tokio::test]
async fn a_deleted_stream_with_retain_is_released() {
    let (client, mut handle) = mocked();
    let obj = stream(true, true);
    let (ctx, _rx) = Context::test(client, stores(vec![obj.clone()], vec![]));
    let task = tokio::spawn(reconcile(Arc::new(obj.clone()), ctx));

    let seen = next(&mut handle, StatusCode::CREATED, None).await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.body["reason"], "CleanedUp");
    assert!(
        seen.body["note"]
            .as_str()
            .unwrap()
            .contains("deletionPolicy Retain")
    );
    let mut released = serde_json::to_value(&obj).unwrap();
    released["metadata"]["finalizers"] = json!([]);
    let seen = next(&mut handle, StatusCode::OK, Some(released)).await;
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(seen.content_type, "application/json-patch+json");
    assert!(
        seen.body
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["op"] == "remove"),
        "no finalizer removal in {:?}",
        seen.body
    );
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn a_stream_is_not_torn_down_under_its_subscriptions() {
    let (client, mut handle) = mocked();
    let es = stream(true, true);
    let sub = subscription();
    let (ctx, mut rx) = Context::test(client, stores(vec![es.clone()], vec![sub.clone()]));

    // The stream keeps its finalizer and retries.
    let err = reconcile(Arc::new(es.clone()), ctx.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, ControlError::StreamInUse(..)), "{err}");
    assert!(err.to_string().contains("notify"));

    // The subscription reports StreamDeleted.
    let task = tokio::spawn(reconcile(Arc::new(sub), ctx.clone()));
    // The stream is still in the index (kept for its subscription): its Secret is read.
    let seen = next(&mut handle, StatusCode::NOT_FOUND, Some(not_found())).await;
    assert_eq!(seen.method, Method::GET);
    let seen = next(&mut handle, StatusCode::CREATED, None).await;
    assert_eq!(seen.body["reason"], "StreamDeleted");
    assert_eq!(seen.body["regarding"]["kind"], "Subscription");
    task.await.unwrap().unwrap();
    let update = rx.try_recv().unwrap();
    assert_eq!(update.kind, Kind::Subscription);
    let status = &update.body["status"];
    assert_eq!(status["conditions"][0]["reason"], "StreamDeleted");
    // `/scale` selects the Pods that run the consumers (every worker), not a label no Pod has.
    assert_eq!(
        status["selector"],
        "app.kubernetes.io/name=weir,app.kubernetes.io/component=operator"
    );

    // The retry policy backs off and records a Warning Event with the category as reason.
    let action = error_policy(Arc::new(es), &err, ctx);
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    let seen = next(&mut handle, StatusCode::CREATED, None).await;
    assert_eq!(seen.body["reason"], "StreamInUse");
    assert_eq!(seen.body["type"], "Warning");
}

/// Secrets are re-read when the cached copy is older than the refresh interval (a rotated
/// credential is picked up within it), and not before.
#[tokio::test]
async fn secrets_are_read_again_after_the_refresh_interval() {
    use weir::control::refs::{RefCache, Refs};
    use weir::topology::Key;
    tokio::time::pause();
    let (client, mut handle) = mocked();
    let cache = Arc::new(RefCache::default());
    let refs = Refs {
        secrets: [Key::new("shop", "rabbitmq")].into(),
        config_maps: Default::default(),
    };
    let secret = |url: &str| {
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "rabbitmq", "namespace": "shop"},
               "stringData": {"url": url}})
    };
    let refresh = Duration::from_secs(60);

    let (c, r, cl) = (cache.clone(), refs.clone(), client.clone());
    let first = tokio::spawn(async move { c.refresh(&cl, &r, refresh).await });
    let seen = next(&mut handle, StatusCode::OK, Some(secret("amqp://one"))).await;
    assert_eq!(seen.path, "/api/v1/namespaces/shop/secrets/rabbitmq");
    first.await.unwrap().unwrap();
    assert_eq!(
        cache.resolved(&refs).0[&Key::new("shop", "rabbitmq")]["url"],
        b"amqp://one"
    );

    // Within the interval: served from the cache, no request.
    tokio::time::advance(Duration::from_secs(30)).await;
    tokio::time::timeout(
        Duration::from_secs(1),
        cache.refresh(&client, &refs, refresh),
    )
    .await
    .expect("served from the cache, without a request")
    .unwrap();

    // Past it: read again, and the rotated value replaces the old one.
    tokio::time::advance(Duration::from_secs(31)).await;
    let (c, r, cl) = (cache.clone(), refs.clone(), client.clone());
    let again = tokio::spawn(async move { c.refresh(&cl, &r, refresh).await });
    let seen = next(&mut handle, StatusCode::OK, Some(secret("amqp://two"))).await;
    assert_eq!(seen.method, Method::GET);
    again.await.unwrap().unwrap();
    assert_eq!(
        cache.resolved(&refs).0[&Key::new("shop", "rabbitmq")]["url"],
        b"amqp://two"
    );
}

#[tokio::test]
async fn a_stream_and_a_subscription_of_one_name_back_off_apart() {
    let (client, _handle) = mocked();
    let (ctx, _rx) = Context::test(client, stores(vec![], vec![]));
    let key = weir::topology::Key::new("shop", "orders");
    // Three failures of the stream…
    for n in 1..=3 {
        assert_eq!(ctx.failed(Kind::EventStream, &key), n);
    }
    // …are not the subscription's: its first failure waits the shortest backoff.
    assert_eq!(ctx.failed(Kind::Subscription, &key), 1);
    // Success of one forgets only its own count.
    ctx.succeeded(Kind::Subscription, &key);
    assert_eq!(ctx.failed(Kind::EventStream, &key), 4);
    assert_eq!(ctx.failed(Kind::Subscription, &key), 1);
}

/// Backoff and settling entries of objects that left the caches without a cleanup here (a
/// policy has no finalizer; a replica without the Lease runs none) are dropped, so neither
/// map grows with the objects a long-lived worker has seen come and go.
#[tokio::test]
async fn entries_of_departed_objects_are_forgotten() {
    let (client, _handle) = mocked();
    let (ctx, _rx) = Context::test(client, stores(vec![stream(true, false)], vec![]));
    let orders = weir::topology::Key::new("shop", "orders");
    let gone = weir::topology::Key::new("shop", "gone");
    for kind in [Kind::EventStream, Kind::ArchivePolicy, Kind::CachePolicy] {
        ctx.failed(kind, &orders);
        ctx.failed(kind, &gone);
        let now = std::time::Instant::now();
        ctx.settling
            .lock()
            .unwrap()
            .insert((kind, orders.clone()), now);
        ctx.settling
            .lock()
            .unwrap()
            .insert((kind, gone.clone()), now);
    }
    ctx.forget_departed();
    let kept = [(Kind::EventStream, orders.clone())];
    let failures: Vec<_> = ctx.failures.lock().unwrap().keys().cloned().collect();
    let settling: Vec<_> = ctx.settling.lock().unwrap().keys().cloned().collect();
    assert_eq!(failures, kept);
    assert_eq!(settling, kept);
    // The stream's count survived: its next failure is the second.
    assert_eq!(ctx.failed(Kind::EventStream, &orders), 2);
}
