//! The reviewer against a scripted API server (tower-test): what it asks, what it caches.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

use super::*;

/// What the scripted server saw: requests per path, and the last body.
#[derive(Default)]
struct Seen {
    token_reviews: AtomicUsize,
    access_reviews: AtomicUsize,
    last: std::sync::Mutex<Value>,
}

/// A client whose API server authenticates the token `good` for audience `weir` as
/// `system:serviceaccount:shop:ops`, allows `update` and nothing else, and answers 500 to
/// the token `boom`.
fn scripted() -> (Client, Arc<Seen>) {
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            *s.last.lock().unwrap() = body.clone();
            let (code, status) = if path.ends_with("/tokenreviews") {
                s.token_reviews.fetch_add(1, Ordering::SeqCst);
                let token = body["spec"]["token"].as_str().unwrap_or_default();
                let aud = body["spec"]["audiences"][0].as_str().unwrap_or_default();
                match (token, aud) {
                    ("boom", _) => (500, Value::Null),
                    ("good", "weir") => (
                        201,
                        json!({"authenticated": true, "audiences": ["weir"],
                               "user": {"username": "system:serviceaccount:shop:ops", "uid": "u1",
                                        "groups": ["system:serviceaccounts"]}}),
                    ),
                    // A server that ignores the audience asked for.
                    ("other-audience", _) => (
                        201,
                        json!({"authenticated": true, "audiences": ["api"],
                               "user": {"username": "system:serviceaccount:shop:ops"}}),
                    ),
                    _ => (201, json!({"authenticated": false, "error": "invalid"})),
                }
            } else {
                s.access_reviews.fetch_add(1, Ordering::SeqCst);
                let verb = &body["spec"]["resourceAttributes"]["verb"];
                (201, json!({"allowed": verb == "update"}))
            };
            let mut answer = body;
            answer["status"] = status;
            let answer = if code == 500 {
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "etcd is gone", "reason": "InternalError", "code": 500})
            } else {
                answer
            };
            send.send_response(
                Response::builder()
                    .status(StatusCode::from_u16(code).unwrap())
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, "default"), seen)
}

fn check(verb: &str) -> AccessCheck {
    AccessCheck {
        namespace: "shop".into(),
        verb: verb.into(),
        group: "weir.dev".into(),
        resource: "subscriptions".into(),
        subresource: "deadletters".into(),
        name: "notify".into(),
    }
}

#[tokio::test]
async fn a_positive_token_review_is_cached_a_negative_one_is_not() {
    let (client, seen) = scripted();
    let r = KubeReviewer::new(client);
    let user = r.review("good", "weir").await.unwrap().unwrap();
    assert_eq!(user.username, "system:serviceaccount:shop:ops");
    assert_eq!(user.uid, "u1");
    assert_eq!(user.groups, ["system:serviceaccounts"]);
    let sent = seen.last.lock().unwrap().clone();
    assert_eq!(sent["spec"]["audiences"], json!(["weir"]));
    assert_eq!(sent["spec"]["token"], "good");
    assert_eq!(r.review("good", "weir").await.unwrap(), Some(user));
    assert_eq!(
        seen.token_reviews.load(Ordering::SeqCst),
        1,
        "second answer from the cache"
    );

    // Another audience is another question.
    assert_eq!(r.review("good", "other").await.unwrap(), None);
    assert_eq!(r.review("bogus", "weir").await.unwrap(), None);
    assert_eq!(r.review("bogus", "weir").await.unwrap(), None);
    assert_eq!(
        seen.token_reviews.load(Ordering::SeqCst),
        4,
        "negatives are asked again"
    );
}

#[tokio::test]
async fn an_answer_for_another_audience_does_not_authenticate() {
    let (client, _) = scripted();
    let r = KubeReviewer::new(client);
    assert_eq!(r.review("other-audience", "weir").await.unwrap(), None);
}

#[tokio::test]
async fn api_errors_are_errors_not_answers() {
    let (client, _) = scripted();
    let r = KubeReviewer::new(client);
    let e = r.review("boom", "weir").await.unwrap_err();
    assert!(e.0.contains("TokenReview"), "{e}");
}

#[tokio::test]
async fn access_reviews_send_the_user_and_cache_only_allowed() {
    let (client, seen) = scripted();
    let r = KubeReviewer::new(client);
    let user = r.review("good", "weir").await.unwrap().unwrap();
    assert!(r.allowed(&user, &check("update")).await.unwrap());
    let sent = seen.last.lock().unwrap().clone();
    assert_eq!(sent["kind"], "SubjectAccessReview");
    assert_eq!(sent["spec"]["user"], "system:serviceaccount:shop:ops");
    assert_eq!(sent["spec"]["uid"], "u1");
    assert_eq!(sent["spec"]["groups"], json!(["system:serviceaccounts"]));
    assert_eq!(
        sent["spec"]["resourceAttributes"],
        json!({"namespace": "shop", "verb": "update", "group": "weir.dev",
               "resource": "subscriptions", "subresource": "deadletters", "name": "notify"})
    );
    assert!(r.allowed(&user, &check("update")).await.unwrap());
    assert_eq!(seen.access_reviews.load(Ordering::SeqCst), 1);

    assert!(!r.allowed(&user, &check("delete")).await.unwrap());
    assert!(!r.allowed(&user, &check("delete")).await.unwrap());
    assert_eq!(seen.access_reviews.load(Ordering::SeqCst), 3);

    // Another user (other groups) is asked about separately.
    let other = ReviewedUser {
        groups: vec!["system:authenticated".into()],
        ..user.clone()
    };
    assert!(r.allowed(&other, &check("update")).await.unwrap());
    assert_eq!(seen.access_reviews.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn cached_answers_expire() {
    // moka keeps its own clock (Tokio's paused time does not reach it): a real short TTL.
    let (client, seen) = scripted();
    let r = KubeReviewer::with_ttl(client, Duration::from_millis(300));
    let user = r.review("good", "weir").await.unwrap().unwrap();
    assert!(r.allowed(&user, &check("update")).await.unwrap());
    r.review("good", "weir").await.unwrap();
    assert!(r.allowed(&user, &check("update")).await.unwrap());
    assert_eq!(seen.token_reviews.load(Ordering::SeqCst), 1);
    assert_eq!(seen.access_reviews.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.review("good", "weir").await.unwrap();
    assert!(r.allowed(&user, &check("update")).await.unwrap());
    assert_eq!(seen.token_reviews.load(Ordering::SeqCst), 2);
    assert_eq!(seen.access_reviews.load(Ordering::SeqCst), 2);
}

#[test]
fn cache_keys_keep_fields_apart_and_hold_no_token() {
    assert_ne!(token_key("ab", "c"), token_key("a", "bc"));
    let k = token_key("secret-token", "weir");
    assert!(!k.windows(6).any(|w| w == b"secret"));
    let u = |groups: &[&str]| ReviewedUser {
        username: "u".into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..Default::default()
    };
    assert_ne!(
        access_key(&u(&["a,b"]), &check("get")),
        access_key(&u(&["a", "b"]), &check("get"))
    );
}
