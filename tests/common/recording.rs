//! A sink that records every delivery with the stream it names (`weirstream`), and the count
//! of lost, duplicated and unexpected deliveries against what was published.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// An event by stream and id.
pub type EventKey = (String, String);

/// One delivery the sink received.
#[derive(Clone, Debug)]
pub struct Got {
    pub stream: String,
    pub id: String,
    pub subject: String,
    pub position: i64,
    pub recorded: chrono::DateTime<chrono::FixedOffset>,
}

/// A sink answering 200 to everything, recording what it received in order.
pub struct RecordingSink {
    pub url: String,
    got: Arc<Mutex<Vec<Got>>>,
}

impl RecordingSink {
    pub async fn start() -> RecordingSink {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g2 = got.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |h: http::HeaderMap| {
                let got = g2.clone();
                async move {
                    let hv = |k: &str| {
                        h.get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let recorded =
                        chrono::DateTime::parse_from_rfc3339(&hv("ce-weirrecordedtime"))
                            .unwrap_or_default();
                    got.lock().unwrap().push(Got {
                        stream: hv("ce-weirstream"),
                        id: hv("ce-id"),
                        subject: hv("ce-subject"),
                        position: hv("ce-weirposition").parse().unwrap_or(0),
                        recorded,
                    });
                    http::StatusCode::OK
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        RecordingSink { url, got }
    }

    /// Everything received so far, in order.
    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Whether every one of `expected` was received.
    pub fn received_all(&self, expected: &BTreeSet<EventKey>) -> bool {
        let seen: BTreeSet<EventKey> = self
            .got
            .lock()
            .unwrap()
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
