//! A sink that records every delivery with the stream it names (`weirstream`), and the count
//! of lost, duplicated and unexpected deliveries against what was published.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// An event by stream and id.
pub type EventKey = (String, String);

/// One request the sink received.
#[derive(Clone, Debug)]
pub struct Got {
    /// Answered 200 (a delivery), not a failure it was told to answer.
    pub ok: bool,
    pub stream: String,
    pub id: String,
    pub subject: String,
    pub position: i64,
    pub recorded: chrono::DateTime<chrono::FixedOffset>,
}

/// A sink recording what it received in order: 200 to everything, or (see
/// [`RecordingSink::start_failing`]) failures first.
pub struct RecordingSink {
    pub url: String,
    got: Arc<Mutex<Vec<Got>>>,
    /// Ids starting with this are answered 503 until [`RecordingSink::release`].
    held: Arc<Mutex<Option<String>>>,
}

impl RecordingSink {
    pub async fn start() -> RecordingSink {
        RecordingSink::start_failing(0).await
    }

    /// Answers 503 to the first `first` attempts of every event and 400 (not retryable) to
    /// every event whose id contains `poison`.
    pub async fn start_failing(first: u32) -> RecordingSink {
        RecordingSink::start_inner(first, None).await
    }

    /// Answers 503 to every event whose id starts with `prefix` until
    /// [`RecordingSink::release`], 200 to the others.
    pub async fn start_holding(prefix: &str) -> RecordingSink {
        RecordingSink::start_inner(0, Some(prefix.to_string())).await
    }

    /// Answers 200 to the held events from now on.
    pub fn release(&self) {
        *self.held.lock().unwrap() = None;
    }

    async fn start_inner(first: u32, held: Option<String>) -> RecordingSink {
        let held = Arc::new(Mutex::new(held));
        let h2 = held.clone();
        let got = Arc::new(Mutex::new(Vec::new()));
        let attempts = Arc::new(Mutex::new(BTreeMap::<EventKey, u32>::new()));
        let g2 = got.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |h: http::HeaderMap| {
                let got = g2.clone();
                let attempts = attempts.clone();
                let held = h2.clone();
                async move {
                    let hv = |k: &str| {
                        h.get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let recorded = chrono::DateTime::parse_from_rfc3339(&hv("ce-weirrecordedtime"))
                        .unwrap_or_default();
                    let (stream, id) = (hv("ce-weirstream"), hv("ce-id"));
                    let n = {
                        let mut a = attempts.lock().unwrap();
                        let n = a.entry((stream.clone(), id.clone())).or_default();
                        *n += 1;
                        *n
                    };
                    let is_held = held
                        .lock()
                        .unwrap()
                        .as_ref()
                        .is_some_and(|p| id.starts_with(p.as_str()));
                    let status = if id.contains("poison") {
                        http::StatusCode::BAD_REQUEST
                    } else if n <= first || is_held {
                        http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        http::StatusCode::OK
                    };
                    got.lock().unwrap().push(Got {
                        ok: status == http::StatusCode::OK,
                        stream,
                        id,
                        subject: hv("ce-subject"),
                        position: hv("ce-weirposition").parse().unwrap_or(0),
                        recorded,
                    });
                    status
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        RecordingSink { url, got, held }
    }

    /// The deliveries (requests answered 200) so far, in order.
    pub fn got(&self) -> Vec<Got> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.ok)
            .cloned()
            .collect()
    }

    /// Every request so far, failed ones included.
    pub fn requests(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Whether every one of `expected` was delivered.
    pub fn received_all(&self, expected: &BTreeSet<EventKey>) -> bool {
        let seen: BTreeSet<EventKey> = self
            .got()
            .iter()
            .map(|g| (g.stream.clone(), g.id.clone()))
            .collect();
        expected.is_subset(&seen)
    }
}

/// Lost, duplicated and unexpected deliveries against `expected`.
pub fn tally(got: &[Got], expected: &BTreeSet<EventKey>) -> (usize, usize, usize) {
    let mut counts: BTreeMap<EventKey, usize> = BTreeMap::new();
    for g in got {
        *counts.entry((g.stream.clone(), g.id.clone())).or_default() += 1;
    }
    let lost = expected.iter().filter(|k| !counts.contains_key(*k)).count();
    let duplicated = counts.values().filter(|n| **n > 1).count();
    let unexpected = counts.keys().filter(|k| !expected.contains(*k)).count();
    (lost, duplicated, unexpected)
}
