use std::collections::BTreeMap;

use super::*;
use crate::data::event::ExtValue;

fn event() -> CloudEvent {
    CloudEvent {
        id: "e 1".into(),
        source: "/s".into(),
        ty: "order.created".into(),
        datacontenttype: Some("application/json".into()),
        dataschema: None,
        subject: Some("ö".into()),
        time: None,
        extensions: BTreeMap::from([("weirposition".into(), ExtValue::String("7".into()))]),
        data: Some(Data::Json(bytes::Bytes::from_static(b"{\"a\":1}"))),
    }
}

/// A sink answering `status` with `body` and `headers`, recording what it received.
async fn sink(
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: &'static str,
) -> (
    String,
    tokio::sync::mpsc::Receiver<(HeaderMap, bytes::Bytes)>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |h: HeaderMap, b: bytes::Bytes| {
            let tx = tx.clone();
            let headers = headers.clone();
            async move {
                let _ = tx.send((h, b)).await;
                let mut r = axum::response::Response::new(axum::body::Body::from(body));
                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                for (k, v) in headers {
                    r.headers_mut().insert(k, HeaderValue::from_static(v));
                }
                r
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, rx)
}

/// The guard of these tests: their sinks listen on loopback.
fn local() -> std::sync::Arc<SinkGuard> {
    SinkGuard::new(
        crate::data::delivery::guard::SinkPolicy {
            allow_loopback: true,
            allow: vec![],
        },
        &[],
    )
}

fn sender(url: &str, format: SinkFormat) -> Sender {
    Sender::to_url(
        url,
        format,
        Some("tok".into()),
        Duration::from_secs(2),
        &local(),
    )
    .unwrap()
}

#[tokio::test]
async fn binary_mode_sends_ce_headers_and_the_data() {
    let (url, mut rx) = sink(202, vec![], "").await;
    let (out, _) = sender(&url, SinkFormat::Binary)
        .send(&event(), &Outgoing::default())
        .await;
    assert!(
        matches!(
            out,
            Outcome::Delivered {
                status: 202,
                reply: None
            }
        ),
        "{out:?}"
    );
    let (h, b) = rx.recv().await.unwrap();
    assert_eq!(h["ce-id"], "e%201");
    assert_eq!(h["ce-subject"], "%C3%B6");
    assert_eq!(h["ce-weirposition"], "7");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["authorization"], "Bearer tok");
    assert_eq!(&b[..], b"{\"a\":1}");
}

#[tokio::test]
async fn structured_mode_sends_the_json_format() {
    let (url, mut rx) = sink(200, vec![], "").await;
    sender(&url, SinkFormat::Structured)
        .send(&event(), &Outgoing::default())
        .await;
    let (h, b) = rx.recv().await.unwrap();
    assert_eq!(h["content-type"], "application/cloudevents+json");
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["id"], "e 1");
    assert_eq!(v["data"]["a"], 1);
}

#[tokio::test]
async fn statuses_are_classified() {
    for (status, retryable) in [
        (400, false),
        (401, false),
        (404, true),
        (409, true),
        (429, true),
        (500, true),
        (503, true),
    ] {
        let (url, _rx) = sink(status, vec![("retry-after", "3")], "nope").await;
        let (out, _) = sender(&url, SinkFormat::Binary)
            .send(&event(), &Outgoing::default())
            .await;
        let Outcome::Failed(f) = out else {
            panic!("{status}: delivered")
        };
        assert_eq!(f.retryable, retryable, "{status}");
        assert_eq!(f.code, status.to_string());
        assert_eq!(f.data, "nope");
        let want = matches!(status, 429 | 503).then(|| Duration::from_secs(3));
        assert_eq!(f.retry_after, want, "{status}");
    }
    // Nothing listens on port 1.
    let (out, _) = sender("http://127.0.0.1:1/", SinkFormat::Binary)
        .send(&event(), &Outgoing::default())
        .await;
    let Outcome::Failed(f) = out else {
        panic!("delivered")
    };
    assert!(f.retryable);
    assert_eq!(f.code, "connect");
}

#[tokio::test]
async fn a_cloudevent_in_a_2xx_is_a_reply() {
    let (url, _rx) = sink(
        200,
        vec![
            ("ce-specversion", "1.0"),
            ("ce-id", "r1"),
            ("ce-source", "/pay"),
            ("ce-type", "payment.done"),
            ("content-type", "application/json"),
        ],
        "{\"ok\":true}",
    )
    .await;
    let (out, _) = sender(&url, SinkFormat::Binary)
        .send(&event(), &Outgoing::default())
        .await;
    let Outcome::Delivered { reply: Some(r), .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(r.ty, "payment.done");
    assert_eq!(r.id, "r1");
    // A plain JSON answer is not a reply.
    let (url, _rx) = sink(
        200,
        vec![("content-type", "application/json")],
        "{\"type\":\"x\"}",
    )
    .await;
    let (out, _) = sender(&url, SinkFormat::Binary)
        .send(&event(), &Outgoing::default())
        .await;
    assert!(
        matches!(out, Outcome::Delivered { reply: None, .. }),
        "{out:?}"
    );
}

#[tokio::test]
async fn no_answer_within_the_timeout_is_a_retryable_timeout() {
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(|| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    let s = Sender::to_url(
        &url,
        SinkFormat::Binary,
        None,
        Duration::from_millis(200),
        &local(),
    )
    .unwrap();
    let (out, took) = s.send(&event(), &Outgoing::default()).await;
    let Outcome::Failed(f) = out else {
        panic!("delivered")
    };
    assert_eq!(f.code, "timeout");
    assert!(f.retryable);
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn other_schemes_fail_clearly() {
    let err = Sender::to_url(
        "ftp://x/",
        SinkFormat::Binary,
        None,
        Duration::from_secs(1),
        &local(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("http:// or https://"), "{err}");
    assert!(
        Sender::to_url(
            "https://x/",
            SinkFormat::Binary,
            None,
            Duration::from_secs(1),
            &local(),
        )
        .is_ok()
    );
}

#[tokio::test]
async fn a_refused_connection_names_its_cause() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = Sender::to_url(
        &format!("http://127.0.0.1:{port}/"),
        SinkFormat::Binary,
        None,
        Duration::from_secs(2),
        &local(),
    )
    .unwrap();
    let (out, _) = s.send(&event(), &Outgoing::default()).await;
    let Outcome::Failed(f) = out else {
        panic!("delivered")
    };
    assert_eq!(f.code, "connect");
    assert!(f.data.to_lowercase().contains("refused"), "{}", f.data);
}

#[test]
fn json_data_without_a_type_is_sent_as_json() {
    let mut ev = event();
    ev.datacontenttype = None;
    assert_eq!(
        binary_headers(&ev)[header::CONTENT_TYPE],
        "application/json"
    );
    ev.data = Some(Data::Binary(bytes::Bytes::from_static(b"\x00\x01")));
    assert!(binary_headers(&ev).get(header::CONTENT_TYPE).is_none());
    ev.datacontenttype = Some("text/csv".into());
    assert_eq!(binary_headers(&ev)[header::CONTENT_TYPE], "text/csv");
}

#[test]
fn error_data_is_cut_at_a_char_boundary() {
    let s = "é".repeat(1000);
    let c = cut(&s);
    assert!(c.len() <= ERROR_DATA_MAX && c.len() >= ERROR_DATA_MAX - 1);
}
