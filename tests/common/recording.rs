//! A sink that records every request it receives (the CloudEvents headers, the body, the
//! stream it names in `weirstream`), answers as the test tells it, and counts lost, duplicated
//! and unexpected deliveries against what was published.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An event by stream and id.
pub type EventKey = (String, String);

/// How the sink answers.
#[derive(Clone, Debug)]
pub enum Answer {
    /// 200 to everything.
    Ok,
    /// 503 to the first `n` attempts of every event, then 200.
    FailFirst(u32),
    /// This status, with this body, to everything.
    Status(u16, &'static str),
    /// 500 with this probability, else 200.
    Random(f64),
    /// 200 after this long.
    Slow(Duration),
}

/// One request the sink received.
#[derive(Clone, Debug)]
pub struct Got {
    /// Answered 200 (a delivery), not a failure it was told to answer.
    pub ok: bool,
    pub stream: String,
    pub id: String,
    pub ty: String,
    pub subject: String,
    pub position: i64,
    pub recorded: chrono::DateTime<chrono::FixedOffset>,
    /// When the answer was decided (after a [`Answer::Slow`] wait).
    pub at: Instant,
    /// The `ce-*` headers.
    pub headers: BTreeMap<String, String>,
    pub body: bytes::Bytes,
}

impl Got {
    /// The body as JSON (`data` in binary mode), null if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

struct State {
    answer: Answer,
    /// Ids containing `poison` are answered 400 (not retryable).
    poison: bool,
    /// Ids starting with this are answered 503 until [`RecordingSink::release`].
    held: Option<String>,
    attempts: BTreeMap<EventKey, u32>,
    got: Vec<Got>,
}

/// A sink recording what it received, in order.
#[derive(Clone)]
pub struct RecordingSink {
    pub url: String,
    st: Arc<Mutex<State>>,
}

impl RecordingSink {
    /// Answers 200 to everything.
    pub async fn start() -> RecordingSink {
        RecordingSink::start_with(Answer::Ok).await
    }

    /// Answers as `answer` says.
    pub async fn start_with(answer: Answer) -> RecordingSink {
        RecordingSink::start_inner(answer, false, None).await
    }

    /// Answers 503 to the first `first` attempts of every event and 400 (not retryable) to
    /// every event whose id contains `poison`.
    pub async fn start_failing(first: u32) -> RecordingSink {
        RecordingSink::start_inner(Answer::FailFirst(first), true, None).await
    }

    /// Answers 503 to every event whose id starts with `prefix` until
    /// [`RecordingSink::release`], 200 to the others.
    pub async fn start_holding(prefix: &str) -> RecordingSink {
        RecordingSink::start_inner(Answer::Ok, false, Some(prefix.to_string())).await
    }

    /// Answers 200 to the held events from now on.
    pub fn release(&self) {
        self.st.lock().unwrap().held = None;
    }

    /// Answers as `answer` says from now on.
    pub fn set_answer(&self, answer: Answer) {
        self.st.lock().unwrap().answer = answer;
    }

    async fn start_inner(answer: Answer, poison: bool, held: Option<String>) -> RecordingSink {
        let st = Arc::new(Mutex::new(State {
            answer,
            poison,
            held,
            attempts: BTreeMap::new(),
            got: Vec::new(),
        }));
        let s2 = st.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |h: http::HeaderMap, body: bytes::Bytes| {
                let st = s2.clone();
                async move {
                    let hv = |k: &str| {
                        h.get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let (stream, id) = (hv("ce-weirstream"), hv("ce-id"));
                    let (answer, n, poisoned, is_held) = {
                        let mut s = st.lock().unwrap();
                        let n = s.attempts.entry((stream.clone(), id.clone())).or_default();
                        *n += 1;
                        let n = *n;
                        let is_held = s.held.as_ref().is_some_and(|p| id.starts_with(p.as_str()));
                        (
                            s.answer.clone(),
                            n,
                            s.poison && id.contains("poison"),
                            is_held,
                        )
                    };
                    let (status, text) = if poisoned {
                        (400, "poison")
                    } else if is_held {
                        (503, "held")
                    } else {
                        match answer {
                            Answer::Ok => (200, ""),
                            Answer::FailFirst(k) if n <= k => (503, "not yet"),
                            Answer::FailFirst(_) => (200, ""),
                            Answer::Status(s, b) => (s, b),
                            Answer::Random(p) if rand::random::<f64>() < p => (500, "flaky"),
                            Answer::Random(_) => (200, ""),
                            Answer::Slow(d) => {
                                tokio::time::sleep(d).await;
                                (200, "")
                            }
                        }
                    };
                    let headers = h
                        .iter()
                        .filter(|(k, _)| k.as_str().starts_with("ce-"))
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                        .collect();
                    st.lock().unwrap().got.push(Got {
                        ok: status == 200,
                        stream,
                        id,
                        ty: hv("ce-type"),
                        subject: hv("ce-subject"),
                        position: hv("ce-weirposition").parse().unwrap_or(0),
                        recorded: chrono::DateTime::parse_from_rfc3339(&hv("ce-weirrecordedtime"))
                            .unwrap_or_default(),
                        at: Instant::now(),
                        headers,
                        body,
                    });
                    let status = http::StatusCode::from_u16(status)
                        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
                    (status, text)
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        RecordingSink { url, st }
    }

    /// The deliveries (requests answered 200) so far, in order.
    pub fn got(&self) -> Vec<Got> {
        let s = self.st.lock().unwrap();
        s.got.iter().filter(|g| g.ok).cloned().collect()
    }

    /// Every request so far, failed ones included.
    pub fn requests(&self) -> Vec<Got> {
        self.st.lock().unwrap().got.clone()
    }

    /// Distinct ids answered 200.
    pub fn delivered(&self) -> BTreeSet<String> {
        let s = self.st.lock().unwrap();
        s.got
            .iter()
            .filter(|g| g.ok)
            .map(|g| g.id.clone())
            .collect()
    }

    /// How many distinct ids were answered 200, without copying what the sink received.
    pub fn delivered_count(&self) -> usize {
        let s = self.st.lock().unwrap();
        s.got
            .iter()
            .filter(|g| g.ok)
            .map(|g| g.id.as_str())
            .collect::<HashSet<_>>()
            .len()
    }

    /// Whether every one of `expected` was delivered.
    pub fn received_all(&self, expected: &BTreeSet<EventKey>) -> bool {
        let s = self.st.lock().unwrap();
        let seen: BTreeSet<EventKey> = s
            .got
            .iter()
            .filter(|g| g.ok)
            .map(|g| (g.stream.clone(), g.id.clone()))
            .collect();
        expected.is_subset(&seen)
    }

    /// Waits until the sink has been sent at least `n` requests, answered however.
    pub async fn wait_attempts(&self, n: usize) {
        super::eventually_ok(30, &format!("{n} attempts"), || async {
            let got = self.requests();
            if got.len() >= n {
                Ok(())
            } else {
                Err(format!("{} so far: {got:?}", got.len()))
            }
        })
        .await
    }

    /// Waits until `n` distinct ids were answered 200, with `context` (a process's log, say)
    /// in the failure.
    pub async fn wait_delivered(&self, n: usize, secs: u64, context: impl Fn() -> String) {
        let seen = || format!("only {}\n{}", self.delivered_count(), context());
        super::eventually(secs, &format!("{n} events delivered"), seen, || async {
            (self.delivered_count() >= n).then_some(())
        })
        .await
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
