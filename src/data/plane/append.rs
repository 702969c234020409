//! Appending to a running stream: the one path every event takes into Weir, whether it comes
//! from a publisher (`POST .../events`), a subscriber's reply, or a dead letter routed to a
//! stream. The target stream's validation runs, then the batcher (stored streams: the answer
//! waits for the commit) or a confirmed publish (broker-only streams), then the read caches of
//! this worker forget what the append made stale.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::data::batcher::{BatchError, Joining, SubmitError};
use crate::data::broker::{Routing, to_message};
use crate::data::delivery::{Appender, DeliveryError};
use crate::data::engine::{Backend, Engine, StreamRuntime};
use crate::data::event::CloudEvent;
use crate::data::problem::HttpProblem;
use crate::data::store::{Appended, Conflict};
use crate::data::tracecontext::Ingest;
use crate::topology::Key;

/// How long an append of a reply or a failed event may wait for durability (a publisher's
/// append waits for its request timeout instead).
const INTERNAL_APPEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What a durable append gives back, per event in request order.
#[derive(Debug)]
pub enum AppendOutcome {
    /// Stored: positions (and versions), duplicates named.
    Stored(Vec<Appended>),
    /// Broker-only: confirmed by the broker, routed to a queue or not.
    Published(Vec<Routing>),
}

/// Why an append did not happen. Nothing of the request was written, except that
/// [`AppendError::Unavailable`] cannot promise it (a commit may land as a connection breaks;
/// `(source, id)` deduplication makes the retry safe).
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The stream does not run in this worker.
    #[error("stream {0} is not running here")]
    NotFound(Key),
    /// The stream's validation refuses an event: retrying cannot help.
    #[error("{}", .0.detail)]
    Invalid(HttpProblem),
    /// An `expectedversion` did not match, or the id belongs to another publisher's event:
    /// retrying the same request cannot help.
    #[error("{}", conflict_text(.0))]
    Conflict(Conflict),
    /// Overloaded, shutting down, the store or broker unreachable, or the deadline passed:
    /// worth retrying later.
    #[error("{0}")]
    Unavailable(String),
    /// The store refused the write for a reason retrying will not change.
    #[error("storing the events failed: {0}")]
    Failed(String),
    /// Personal-data encryption could not be done (a key missing from the Secret, the
    /// key store unavailable): answered with this problem.
    #[error("{}", .0.detail)]
    Problem(HttpProblem),
}

fn conflict_text(c: &Conflict) -> String {
    match c {
        Conflict::Version { subject, .. } => format!("version conflict on subject {subject}"),
        Conflict::ForeignId { source, id, .. } => {
            format!("event {id:?} of source {source:?} was stored by another publisher")
        }
    }
}

/// The append path over the engine's running streams.
pub struct Appends {
    engine: Arc<Engine>,
}

impl Appends {
    pub fn new(engine: Arc<Engine>) -> Appends {
        Appends { engine }
    }

    /// Appends `events` to the running stream `rt`, durably, before `deadline`. `joining`
    /// is the publisher's announcement to the stream's batcher (taken before its body was
    /// read, so a forming batch waits for it): it ends once the events are queued. `trace`
    /// gives each event the trace context it carries from here on (after validation, so
    /// `requiredExtensions: [traceparent]` still asks the publisher for one).
    pub async fn append(
        &self,
        rt: &StreamRuntime,
        mut events: Vec<CloudEvent>,
        deadline: Instant,
        joining: Option<Joining>,
        trace: &Ingest,
    ) -> Result<AppendOutcome, AppendError> {
        if let Err(p) = rt.validator.check(&events) {
            return Err(AppendError::Invalid(p));
        }
        trace.stamp(&mut events);
        match &rt.backend {
            Backend::Stored { .. } => self.store(rt, events, deadline, joining).await,
            Backend::BrokerOnly { inflight } => {
                drop(joining);
                let Ok(_permit) = inflight.clone().try_acquire_owned() else {
                    return Err(AppendError::Unavailable(
                        "the stream is overloaded: too many publishes in flight".into(),
                    ));
                };
                self.publish(rt, &events, deadline).await
            }
        }
    }

    async fn store(
        &self,
        rt: &StreamRuntime,
        mut events: Vec<CloudEvent>,
        deadline: Instant,
        joining: Option<Joining>,
    ) -> Result<AppendOutcome, AppendError> {
        let unavailable = |s: &str| AppendError::Unavailable(s.to_string());
        let Some(batcher) = rt.batcher() else {
            return Err(unavailable("the stream is shutting down"));
        };
        if rt.stream_id().is_none() {
            let why = rt
                .health
                .error()
                .unwrap_or_else(|| "the event store is not provisioned yet".into());
            return Err(AppendError::Unavailable(why));
        }
        // Personal-data fields are encrypted here, after validation saw the plaintext and
        // before anything is stored, relayed or archived.
        if let (Some(pii), Some(id)) = (&rt.pii, rt.stream_id()) {
            let sealed = tokio::time::timeout_at(deadline, pii.seal(id, &mut events)).await;
            match sealed {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let p = e.problem();
                    return Err(if p.status == 422 {
                        AppendError::Invalid(p)
                    } else {
                        AppendError::Problem(p)
                    });
                }
                Err(_) => return Err(unavailable("the subjects' data keys were not read in time")),
            }
        }
        // Subjects and correlations whose cached reads this append makes stale (only
        // collected when a cache serves the stream).
        let (subjects, correlations): (Vec<String>, Vec<String>) =
            if self.engine.caches.covers(&rt.plan.key) {
                (
                    events.iter().filter_map(|e| e.subject.clone()).collect(),
                    events.iter().filter_map(|e| e.correlation_id()).collect(),
                )
            } else {
                (Vec::new(), Vec::new())
            };
        let rx = batcher.submit(events, deadline).map_err(|e| match e {
            SubmitError::Overloaded => {
                unavailable("the stream is overloaded: its batch queue is full")
            }
            SubmitError::ShuttingDown => unavailable("the stream is shutting down"),
        })?;
        // Queued: the batch being formed no longer needs to wait for this request.
        drop(joining);
        let reply = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(BatchError::ShuttingDown),
            Err(_) => Err(BatchError::DeadlineExceeded),
        };
        match reply {
            Ok(Ok(results)) => {
                // Before the answer: a read on this worker after it sees the append.
                if let Some(id) = rt.stream_id() {
                    self.engine.caches.appended(
                        &rt.plan.key,
                        id,
                        subjects.iter().map(String::as_str),
                        correlations.iter().map(String::as_str),
                    );
                }
                Ok(AppendOutcome::Stored(results))
            }
            Ok(Err(conflict)) => Err(AppendError::Conflict(conflict)),
            Err(BatchError::Failed(e)) => Err(AppendError::Failed(e)),
            Err(e) => Err(AppendError::Unavailable(e.to_string())),
        }
    }

    async fn publish(
        &self,
        rt: &StreamRuntime,
        events: &[CloudEvent],
        deadline: Instant,
    ) -> Result<AppendOutcome, AppendError> {
        let msgs: Vec<_> = events.iter().map(to_message).collect();
        let key = &rt.plan.key;
        let m = &self.engine.metrics.broker_publish;
        let count = |outcome: &str, n: usize| {
            m.with_label_values(&[&key.namespace, &key.name, outcome])
                .inc_by(n as u64)
        };
        match rt
            .broker
            .publish(&rt.plan.broker.exchange, &msgs, deadline)
            .await
        {
            Ok(routing) => {
                let routed = routing
                    .iter()
                    .filter(|r| matches!(r, Routing::Routed))
                    .count();
                count("routed", routed);
                count("unroutable", routing.len() - routed);
                Ok(AppendOutcome::Published(routing))
            }
            Err(e) => {
                count("failed", events.len());
                Err(AppendError::Unavailable(format!(
                    "the broker did not confirm: {e}"
                )))
            }
        }
    }
}

/// Replies and dead letters routed to a stream take the same path as a publisher's events.
impl Appender for Appends {
    fn append<'a>(
        &'a self,
        stream: &'a Key,
        events: Vec<CloudEvent>,
    ) -> Pin<Box<dyn Future<Output = Result<(), DeliveryError>> + Send + 'a>> {
        Box::pin(async move {
            let err = |message: String| DeliveryError::Append {
                stream: stream.clone(),
                message,
            };
            let rt = self
                .engine
                .stream(&stream.namespace, &stream.name)
                .ok_or_else(|| err("the stream is not running".into()))?;
            let deadline = Instant::now() + INTERNAL_APPEND_TIMEOUT;
            match Appends::append(self, &rt, events, deadline, None, &Ingest::internal()).await {
                Ok(_) => Ok(()),
                Err(AppendError::Invalid(p)) => Err(DeliveryError::Rejected(format!(
                    "stream {stream} refuses the event: {}",
                    p.detail
                ))),
                Err(AppendError::Conflict(c)) => Err(DeliveryError::Rejected(format!(
                    "stream {stream}: {}",
                    conflict_text(&c)
                ))),
                Err(e) => Err(err(e.to_string())),
            }
        })
    }
}
