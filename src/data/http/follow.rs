//! Live follow: `?follow=true` on a stream's or a subject's events answers
//! `text/event-stream` (Server-Sent Events): the stored events from the start asked for (hot
//! and archived, read like any page), then each new one as it commits, one message per event
//! with `id:` = its position. A client that reconnects with `Last-Event-ID` resumes after that
//! position: no gap, no repeat.
//!
//! - **Woken by the store, not by polling.** A follower waits on the stream's head as the
//!   database's notification session announces it (one `LISTEN` per database and process,
//!   shared with relays and caches, fanned out in process by a `watch` that keeps only the
//!   highest head): each append wakes it once at most, however many commits it missed, and it
//!   reads what is new. When the session reconnects (notifications may have been lost) every
//!   follower reads again.
//! - Followers read the primary: the notifications come from there, and a replica may not
//!   have an announced event yet.
//! - **Bounded memory.** Events wait for the connection in a buffer of `--follow-buffer`
//!   bytes. A client that leaves it full for `--follow-stall-timeout` is disconnected: no
//!   more events are read for it, a last `event: error` message after its buffer tells it to
//!   reconnect with `Last-Event-ID`, and its connection is closed one more stall timeout later, whether
//!   that was written or not: a client that reads again by then gets it (after what the
//!   connection had sent already), one that reads nothing would otherwise hold its
//!   connection for ever.
//! - **Heartbeats.** A `: keep-alive` comment every `--follow-heartbeat` while no event comes,
//!   so proxies do not close an idle follow.
//! - **A cap.** At most `--max-followers` follows per worker; more are answered 503 with
//!   `Retry-After`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{HttpState, reveal, store_problem};
use crate::data::engine::StreamRuntime;
use crate::data::event::{StoredEvent, to_structured_json};
use crate::data::problem::HttpProblem;
use crate::data::store::Store;
use crate::server::{CloseConnection, FollowLimits};

/// Events read from the store at a time while a follower catches up. One page is what a
/// follower holds outside its buffer; 100 keeps that small for large events and the reads
/// few for a follower far behind.
const PAGE: i64 = 100;
/// `Retry-After` of a follow refused over the cap: followers come and go slowly, so a client
/// retrying sooner would mostly be refused again.
const CAP_RETRY_AFTER_SECS: u64 = 5;
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// The worker's followers: the cap and the bounds of each.
pub struct Followers {
    slots: Arc<Semaphore>,
    limits: FollowLimits,
}

impl Followers {
    pub fn new(limits: FollowLimits) -> Followers {
        Followers {
            slots: Arc::new(Semaphore::new(limits.max_followers.max(1))),
            limits,
        }
    }
}

/// What a follower reads.
pub(super) enum Target {
    /// The stream's events from this position.
    Stream { from: i64 },
    /// A subject's events from this version.
    Subject { subject: String, from: i64 },
}

/// `follow=true|false` (absent: false).
pub(super) fn wants_follow(v: Option<&str>) -> Result<bool, HttpProblem> {
    match v {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(HttpProblem::bad_request(format!(
            "query parameter follow: expected true or false, got {other:?}"
        ))),
    }
}

/// The `Last-Event-ID` a reconnecting client sends: the position of the last event it got.
pub(super) fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, HttpProblem> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or_default().trim();
    if s.is_empty() {
        // The EventSource specification: an empty id resets the client's last id.
        return Ok(None);
    }
    match s.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(Some(n)),
        _ => Err(HttpProblem::bad_request(format!(
            "header Last-Event-ID: expected the position of an event, got {s:?}"
        ))),
    }
}

/// Starts a follow of `target` on the stream `rt` (store id `id`), which the caller may
/// read. `resume_after`: the `Last-Event-ID`, which wins over the query's start.
pub(super) async fn follow(
    st: &HttpState,
    rt: Arc<StreamRuntime>,
    id: i64,
    target: Target,
    resume_after: Option<i64>,
    close: Option<CloseConnection>,
) -> Result<Response, HttpProblem> {
    let store = rt
        .store()
        .cloned()
        .ok_or_else(|| HttpProblem::internal("no store"))?;
    let cursor = match (target, resume_after) {
        (Target::Stream { from }, None) => Cursor::Stream { next: from },
        (Target::Stream { .. }, Some(last)) => Cursor::Stream { next: last + 1 },
        (Target::Subject { subject, from }, None) => Cursor::Subject {
            subject,
            next: from,
        },
        (Target::Subject { subject, .. }, Some(last)) => {
            // The subject's next version is the one after the event at that position.
            let ev = store.read_one(id, last).await.map_err(store_problem)?;
            match ev.and_then(|e| {
                (e.event.subject.as_deref() == Some(subject.as_str())).then_some(e.version)
            }) {
                Some(Some(v)) => Cursor::Subject {
                    subject,
                    next: v + 1,
                },
                _ if last == 0 => Cursor::Subject { subject, next: 1 },
                _ => {
                    return Err(HttpProblem::bad_request(format!(
                        "header Last-Event-ID: position {last} is not an event of subject \
                         {subject:?}"
                    )));
                }
            }
        }
    };
    let Ok(slot) = st.followers.slots.clone().try_acquire_owned() else {
        return Err(HttpProblem::unavailable(
            format!(
                "this worker serves {} followers already: retry later or on another replica",
                st.followers.limits.max_followers
            ),
            CAP_RETRY_AFTER_SECS,
        ));
    };
    let limits = st.followers.limits;
    // The buffer's room in bytes: every frame holds permits for its size (at least one, so
    // the number of frames is bounded too), given back when the connection takes it.
    let room = Arc::new(Semaphore::new(limits.buffer.max(1)));
    // Unbounded as a channel, bounded by `room`: a frame is only sent with its permits.
    let (tx, rx) = mpsc::unbounded_channel();
    let key = rt.plan.key.clone();
    let labels = [key.namespace.clone(), key.name.clone()];
    let metrics = st.engine.metrics.clone();
    let follower = Follower {
        store,
        rt,
        id,
        cursor,
        out: Outbox {
            tx,
            room,
            cap: limits.buffer.max(1),
        },
        stall_timeout: limits.stall_timeout,
        heartbeat: limits.heartbeat,
        shutdown: st.shutdown.clone(),
        last: resume_after.unwrap_or(0),
    };
    tokio::spawn(async move {
        let gauge = metrics.followers.with_label_values(&labels);
        gauge.inc();
        let mut follower = follower;
        let end = follower.run().await;
        gauge.dec();
        // No more reading for this follower: its place is free while its last message goes.
        drop(slot);
        let reason = match &end {
            End::Gone => None,
            End::Stalled => Some("stalled"),
            End::Shutdown => Some("shutdown"),
            End::Failed(_) => Some("error"),
        };
        if let Some(reason) = reason {
            metrics
                .follow_ends
                .with_label_values(&[&labels[0], &labels[1], reason])
                .inc();
        }
        let last = follower.last;
        let problem = match end {
            End::Gone => return,
            End::Stalled => {
                tracing::info!(
                    stream = %key,
                    last,
                    "follower disconnected: it read nothing for {:?}",
                    follower.stall_timeout
                );
                HttpProblem::unavailable(
                    format!(
                        "the client did not read for {}s: reconnect with Last-Event-ID: {last}",
                        follower.stall_timeout.as_secs_f64()
                    ),
                    super::RETRY_AFTER_SECS,
                )
            }
            End::Shutdown => HttpProblem::unavailable(
                format!("the worker is stopping: reconnect with Last-Event-ID: {last}"),
                super::RETRY_AFTER_SECS,
            ),
            End::Failed(p) => {
                let mut p = p;
                p.detail = format!("{}; reconnect with Last-Event-ID: {last}", p.detail);
                p
            }
        };
        // After what is buffered (the client resumes after `last`, which it then has), and
        // beyond the buffer's room: one message.
        let _ = follower.out.tx.send(Frame {
            bytes: error_message(&problem, last),
            _room: None,
        });
        let grace = follower.stall_timeout;
        // The body ends after the last message.
        drop(follower);
        if let Some(close) = close {
            // Written by now to a client that reads; one that does not is cut.
            tokio::time::sleep(grace).await;
            close.0.cancel();
        }
    });
    let mut resp = Response::new(Body::from_stream(body(rx)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies that buffer responses (nginx) would hold the events back.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // The connection ends with the follow: it may be closed under a stalled client, which
    // must never cut a request that came after on the same connection.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// A frame waiting for the connection, with its room in the buffer (none for the last
/// message, which may exceed it).
struct Frame {
    bytes: Bytes,
    _room: Option<OwnedSemaphorePermit>,
}

/// The response body: the buffered frames in order, until the follower ends.
fn body(
    rx: mpsc::UnboundedReceiver<Frame>,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    futures::stream::unfold(rx, |mut rx| async move {
        // The frame's room is given back here: the connection holds its bytes now.
        let f = rx.recv().await?;
        Some((Ok(f.bytes), rx))
    })
}

/// `event: error` with the problem (and the position to resume after) as data.
fn error_message(problem: &HttpProblem, last: i64) -> Bytes {
    let mut v = serde_json::to_value(problem).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("lastEventId".into(), last.into());
    }
    Bytes::from(format!("event: error\ndata: {v}\n\n"))
}

/// One event as an SSE message: `id:` its position, `data:` its structured CloudEvent JSON,
/// one `data:` line per line of it (a JSON payload keeps its bytes, line breaks included; a
/// client joins the lines with `\n`).
fn event_message(ev: &StoredEvent) -> Bytes {
    let json = to_structured_json(&ev.to_cloud_event());
    let mut out = Vec::with_capacity(json.len() + 32);
    out.extend_from_slice(format!("id: {}\n", ev.position).as_bytes());
    let mut rest: &[u8] = &json;
    loop {
        let end = rest
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
            .unwrap_or(rest.len());
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&rest[..end]);
        out.push(b'\n');
        if end == rest.len() {
            break;
        }
        // `\r\n` is one line break.
        let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
    out.push(b'\n');
    Bytes::from(out)
}

enum Cursor {
    Stream { next: i64 },
    Subject { subject: String, next: i64 },
}

/// Why a follow ended.
#[derive(Debug)]
enum End {
    /// The client went away.
    Gone,
    /// The client left its buffer full for the stall timeout.
    Stalled,
    /// The worker is stopping (or the store closing).
    Shutdown,
    Failed(HttpProblem),
}

struct Outbox {
    tx: mpsc::UnboundedSender<Frame>,
    room: Arc<Semaphore>,
    cap: usize,
}

struct Follower {
    store: Store,
    rt: Arc<StreamRuntime>,
    id: i64,
    cursor: Cursor,
    out: Outbox,
    stall_timeout: Duration,
    heartbeat: Duration,
    shutdown: CancellationToken,
    /// The position of the last event sent.
    last: i64,
}

impl Follower {
    async fn run(&mut self) -> End {
        // Subscribed before the first read: an append after it is announced.
        let mut notes = self.store.notifier().appended(self.id);
        let mut resyncs = notes.borrow_and_update().resyncs;
        let mut read = true;
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + self.heartbeat, self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The head announced when the last read began: that read saw every event up to it.
        let mut announced = 0;
        loop {
            if read {
                let a = *notes.borrow_and_update();
                resyncs = a.resyncs;
                announced = a.head;
                let page = tokio::select! {
                    _ = self.shutdown.cancelled() => return End::Shutdown,
                    _ = self.out.tx.closed() => return End::Gone,
                    p = self.read_page() => p,
                };
                let events = match page {
                    Ok(e) => e,
                    Err(p) => return End::Failed(p),
                };
                let full = events.len() as i64 == PAGE;
                for ev in &events {
                    if let Err(end) = self.push(event_message(ev)).await {
                        return end;
                    }
                    self.last = ev.position;
                    match &mut self.cursor {
                        Cursor::Stream { next } => *next = ev.position + 1,
                        Cursor::Subject { next, .. } => {
                            *next = ev.version.map_or(*next, |v| v + 1);
                        }
                    }
                }
                if !events.is_empty() {
                    heartbeat.reset();
                }
                // A full page: more may be there already.
                read = full;
                if read {
                    continue;
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return End::Shutdown,
                _ = self.out.tx.closed() => return End::Gone,
                _ = heartbeat.tick() => {
                    if let Err(end) = self.push(Bytes::from_static(KEEP_ALIVE)).await {
                        return end;
                    }
                }
                changed = notes.changed() => {
                    if changed.is_err() {
                        // The store is closing.
                        return End::Shutdown;
                    }
                    let a = *notes.borrow();
                    // A reconnect of the session may have lost notifications: read.
                    read = a.resyncs != resyncs || a.head > announced;
                }
            }
        }
    }

    async fn read_page(&self) -> Result<Vec<StoredEvent>, HttpProblem> {
        let mut events = match &self.cursor {
            Cursor::Stream { next } => self.store.read_range(self.id, *next, PAGE).await,
            Cursor::Subject { subject, next } => {
                self.store
                    .read_subject(self.id, subject, *next, PAGE, None, None)
                    .await
            }
        }
        .map_err(store_problem)?;
        reveal(&self.rt, self.id, &mut events).await?;
        Ok(events)
    }

    async fn push(&self, bytes: Bytes) -> Result<(), End> {
        self.out
            .push(bytes, self.stall_timeout, &self.shutdown)
            .await
    }
}

impl Outbox {
    /// Puts a frame in the buffer, waiting at most `stall` for room.
    async fn push(
        &self,
        bytes: Bytes,
        stall: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        let n = u32::try_from(bytes.len().clamp(1, self.cap)).unwrap_or(u32::MAX);
        let deadline = Instant::now() + stall;
        let room = tokio::select! {
            _ = shutdown.cancelled() => return Err(End::Shutdown),
            _ = self.tx.closed() => return Err(End::Gone),
            r = tokio::time::timeout_at(deadline, self.room.clone().acquire_many_owned(n)) => r,
        };
        let room = match room {
            Ok(Ok(p)) => p,
            // The semaphore is never closed.
            Ok(Err(_)) => return Err(End::Gone),
            Err(_) => return Err(End::Stalled),
        };
        self.tx
            .send(Frame {
                bytes,
                _room: Some(room),
            })
            .map_err(|_| End::Gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_id_is_a_position() {
        let mut h = HeaderMap::new();
        assert_eq!(last_event_id(&h).unwrap(), None);
        h.insert("last-event-id", HeaderValue::from_static("41"));
        assert_eq!(last_event_id(&h).unwrap(), Some(41));
        h.insert("last-event-id", HeaderValue::from_static(""));
        assert_eq!(last_event_id(&h).unwrap(), None);
        h.insert("last-event-id", HeaderValue::from_static("x"));
        assert!(last_event_id(&h).is_err());
        h.insert("last-event-id", HeaderValue::from_static("-1"));
        assert!(last_event_id(&h).is_err());
    }

    #[test]
    fn event_data_lines_never_carry_a_line_break() {
        let mut ev = crate::data::event::CloudEvent::bare("e-1");
        ev.datacontenttype = Some("application/json".into());
        ev.data = Some(crate::data::event::Data::Json(Bytes::from_static(
            b"{\r\n \"a\": 1,\n \"b\": 2}",
        )));
        let stored = StoredEvent {
            position: 9,
            version: None,
            recorded_time: chrono::Utc::now(),
            event: ev,
        };
        let m = String::from_utf8(event_message(&stored).to_vec()).unwrap();
        assert!(m.starts_with("id: 9\ndata: {"), "{m}");
        assert!(m.ends_with("\n\n"), "{m}");
        let body = m.trim_end_matches('\n');
        assert!(!body.contains('\r'), "{m}");
        let lines: Vec<&str> = body.lines().collect();
        assert!(lines[1..].iter().all(|l| l.starts_with("data: ")), "{m}");
        // Joined as a client does, the lines are the event's JSON again.
        let joined: Vec<&str> = lines[1..].iter().map(|l| &l[6..]).collect();
        let v: serde_json::Value = serde_json::from_str(&joined.join("\n")).unwrap();
        assert_eq!(v["data"]["b"], 2);
        assert_eq!(v["weirposition"], "9");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_buffer_stalls_after_the_timeout_and_reading_frees_room() {
        use futures::StreamExt as _;
        let (tx, rx) = mpsc::unbounded_channel();
        let out = Outbox {
            tx,
            room: Arc::new(Semaphore::new(100)),
            cap: 100,
        };
        let stop = CancellationToken::new();
        let stall = Duration::from_secs(30);
        let frame = || Bytes::from(vec![b'x'; 40]);
        out.push(frame(), stall, &stop).await.unwrap();
        out.push(frame(), stall, &stop).await.unwrap();
        // 80 of 100 bytes used: a third frame waits, and gives up after the stall timeout.
        let started = Instant::now();
        assert!(matches!(
            out.push(frame(), stall, &stop).await,
            Err(End::Stalled)
        ));
        assert_eq!(started.elapsed(), stall);
        // A frame larger than the whole buffer still goes, alone.
        let mut body = Box::pin(body(rx));
        assert_eq!(body.next().await.unwrap().unwrap().len(), 40);
        assert_eq!(body.next().await.unwrap().unwrap().len(), 40);
        out.push(Bytes::from(vec![b'y'; 500]), stall, &stop)
            .await
            .unwrap();
        assert_eq!(body.next().await.unwrap().unwrap().len(), 500);
        // The client gone, a push says so at once.
        drop(body);
        assert!(matches!(
            out.push(frame(), stall, &stop).await,
            Err(End::Gone)
        ));
        stop.cancel();
    }

    #[test]
    fn follow_flag_is_true_or_false() {
        assert!(!wants_follow(None).unwrap());
        assert!(wants_follow(Some("true")).unwrap());
        assert!(!wants_follow(Some("false")).unwrap());
        assert!(wants_follow(Some("yes")).is_err());
    }

    #[test]
    fn error_message_names_the_position_to_resume_after() {
        let p = HttpProblem::unavailable("stop", 1);
        let m = String::from_utf8(error_message(&p, 7).to_vec()).unwrap();
        assert!(m.starts_with("event: error\ndata: {"), "{m}");
        assert!(m.ends_with("}\n\n"), "{m}");
        let data: serde_json::Value =
            serde_json::from_str(m.trim_start_matches("event: error\ndata: ").trim()).unwrap();
        assert_eq!(data["lastEventId"], 7);
        assert_eq!(data["status"], 503);
    }
}
