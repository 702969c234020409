//! The prober's load, independent of Weir's code: a sender that publishes numbered events over
//! HTTP at a steady rate and notes every answer, and a receiver (the subscriptions' sink) that
//! notes every delivery it accepts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Partition keys (subjects). Even keys go to the stored stream, odd ones to the broker-only
/// stream, so a key's events stay in one stream.
pub const KEYS: u64 = 32;

/// What became of one publish.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Answer {
    Pending,
    /// 201 / 202 (`routed: true`).
    Accepted,
    /// 202 with `routed: false`: RabbitMQ had no queue for it.
    Unroutable,
    /// A 4xx: refused, must never be delivered.
    Refused(u16),
    /// A 5xx, no answer, or the client's timeout: may or may not be delivered.
    Unanswered(u16),
}

/// One event the sender published.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub stream: usize,
    pub key: u64,
    pub sent_at: Instant,
    pub answered_at: Option<Instant>,
    pub answer: Answer,
}

/// Every publish, indexed by the event's number.
#[derive(Clone, Default)]
pub struct Ledger(pub Arc<Mutex<Vec<Sent>>>);

/// The event id of number `n` in run `run`, and back.
pub fn event_id(run: &str, n: u64) -> String {
    format!("{run}-{n}")
}

pub fn event_number(run: &str, id: &str) -> Option<u64> {
    id.strip_prefix(run)?.strip_prefix('-')?.parse().ok()
}

/// The sender's targets: the ingest URL of each worker (replaced when a worker restarts) and
/// the streams, in the order of [`Sent::stream`].
#[derive(Clone)]
pub struct Targets {
    pub workers: Arc<RwLock<Vec<String>>>,
    pub streams: Vec<String>,
    pub ns: String,
}

/// Publishes at `rate` events/s until `stop`. Event `n` has subject `k{n % KEYS}`, goes to
/// stream `n % 2` and, alternating for each stream, to worker `(n / 2) % 2`. Each event is
/// published once (a failed publish is not retried: its fate is what the run measures).
pub async fn send(
    run: String,
    rate: u32,
    targets: Targets,
    ledger: Ledger,
    stop: CancellationToken,
) -> u64 {
    let client = super::common::http_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    // Publishes in flight. A stalled worker holds each request up to the client's 10 s
    // timeout: at 200/s that is 2,000 requests; past this bound the sender waits (its rate
    // drops, which the report shows) rather than piling up connections without end.
    let in_flight = Arc::new(Semaphore::new(4096));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let permit = in_flight.clone().acquire_owned().await.expect("semaphore");
        let (stream, key) = ((n % 2) as usize, n % KEYS);
        let worker = ((n / 2) % 2) as usize;
        let base = targets.workers.read().unwrap()[worker].clone();
        let url = format!(
            "{base}/v1/namespaces/{}/streams/{}/events",
            targets.ns, targets.streams[stream]
        );
        ledger.0.lock().unwrap().push(Sent {
            stream,
            key,
            sent_at: Instant::now(),
            answered_at: None,
            answer: Answer::Pending,
        });
        let body = serde_json::json!({
            "type": "probe.event",
            "id": event_id(&run, n),
            "subject": format!("k{key}"),
            "data": {"n": n},
        });
        let (client, ledger) = (client.clone(), ledger.clone());
        tokio::spawn(async move {
            let answer = match client.post(&url).json(&body).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    match status {
                        201 => Answer::Accepted,
                        202 => {
                            let v: serde_json::Value = r.json().await.unwrap_or_default();
                            if v["results"][0]["routed"] == false {
                                Answer::Unroutable
                            } else {
                                Answer::Accepted
                            }
                        }
                        400..=499 => Answer::Refused(status),
                        s => Answer::Unanswered(s),
                    }
                }
                Err(_) => Answer::Unanswered(0),
            };
            let mut l = ledger.0.lock().unwrap();
            let s = &mut l[n as usize];
            s.answer = answer;
            s.answered_at = Some(Instant::now());
            drop(permit);
        });
        n += 1;
    }
    // Every publish answered (or timed out) before the run is judged.
    let _ = in_flight.acquire_many(4096).await;
    n
}

/// How the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SinkMode {
    Ok,
    /// 500 to everything.
    Fail,
    /// Holds each request past the subscriptions' delivery timeout, then answers 500.
    Hang,
}

/// One accepted (2xx) delivery.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub id: String,
    pub subject: String,
    /// `weirposition` (0 on a broker-only stream).
    pub position: i64,
}

#[derive(Default)]
struct ReceiverState {
    mode: Option<SinkMode>,
    /// Accepted deliveries per subscription (its path), in the order they were accepted.
    got: HashMap<String, Vec<Delivery>>,
    refused: u64,
    last_accept: Option<Instant>,
}

/// The sink of every subscription: `POST /{subscription}`.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    st: Arc<Mutex<ReceiverState>>,
}

/// How long [`SinkMode::Hang`] holds a request: past the subscriptions' delivery timeout.
pub const HANG: Duration = Duration::from_secs(4);

impl Receiver {
    pub async fn start() -> Receiver {
        let st = Arc::new(Mutex::new(ReceiverState {
            mode: Some(SinkMode::Ok),
            ..Default::default()
        }));
        let s2 = st.clone();
        let app = axum::Router::new().route(
            "/{sub}",
            axum::routing::post(
                move |axum::extract::Path(sub): axum::extract::Path<String>, h: http::HeaderMap| {
                    let st = s2.clone();
                    async move {
                        let mode = st.lock().unwrap().mode.unwrap_or(SinkMode::Ok);
                        match mode {
                            SinkMode::Ok => {}
                            SinkMode::Fail => {
                                st.lock().unwrap().refused += 1;
                                return http::StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            SinkMode::Hang => {
                                tokio::time::sleep(HANG).await;
                                st.lock().unwrap().refused += 1;
                                return http::StatusCode::INTERNAL_SERVER_ERROR;
                            }
                        }
                        let hv = |k: &str| {
                            h.get(k)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string()
                        };
                        let d = Delivery {
                            id: hv("ce-id"),
                            subject: hv("ce-subject"),
                            position: hv("ce-weirposition").parse().unwrap_or(0),
                        };
                        let mut s = st.lock().unwrap();
                        s.got.entry(sub).or_default().push(d);
                        s.last_accept = Some(Instant::now());
                        http::StatusCode::OK
                    }
                },
            ),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let url = format!("http://{}", l.local_addr().expect("receiver address"));
        tokio::spawn(async move { axum::serve(l, app).await });
        Receiver { url, st }
    }

    pub fn set_mode(&self, m: SinkMode) {
        self.st.lock().unwrap().mode = Some(m);
    }

    /// Accepted deliveries of subscription `sub`, in order.
    pub fn got(&self, sub: &str) -> Vec<Delivery> {
        self.st
            .lock()
            .unwrap()
            .got
            .get(sub)
            .cloned()
            .unwrap_or_default()
    }

    /// Deliveries answered 500 (on purpose).
    pub fn refused(&self) -> u64 {
        self.st.lock().unwrap().refused
    }

    /// Accepted deliveries in all, and the time of the last one.
    pub fn activity(&self) -> (usize, Option<Instant>) {
        let s = self.st.lock().unwrap();
        (s.got.values().map(Vec::len).sum(), s.last_accept)
    }
}
