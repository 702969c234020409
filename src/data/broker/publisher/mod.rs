//! Confirmed publishing over a small pool of channels.
//!
//! Each publishing channel belongs to one worker task; callers hand it a job (the messages of
//! one `publish` call) through a bounded queue and wait for the answer. A worker publishes in
//! *rounds*: it takes the jobs waiting for it (up to [`ROUND_MESSAGES`] messages), publishes
//! all their messages in order on its channel, pipelined (at most [`WINDOW`] unconfirmed),
//! and answers every job of the round once every message of the round has its confirmation.
//!
//! Why rounds: lapin hands a `basic.return` (an unroutable `mandatory` message) to whichever
//! confirmation completes next on the channel, which need not be the returned message's own
//! (RabbitMQ confirms unroutable messages at once and routed ones when their queues have them,
//! so confirms complete out of order). The returned message is always received before the
//! confirmation of the message it belongs to, so once a round is fully confirmed every return
//! of the round has been seen, and each is given back to the round's first not-yet-returned
//! message with the same exchange, routing key and message id (messages that share these
//! route alike).
//!
//! Why workers rather than publishing from the caller's task: a caller may give up (its
//! deadline passes, its future is dropped) while confirmations are outstanding; the channel's
//! state must still be settled before the next round uses it.
//!
//! When the channel or connection breaks, the messages of a job that have no confirmation are
//! published again, in order, on a new channel (at-least-once: a message may then be in the
//! queue twice) until the job's deadline. A nack is the broker's answer, not a failure of the
//! link, and is reported as [`BrokerError::Nacked`] without resending.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::codec::truncate_short;
use super::error::{BrokerError, classify};
use super::link::Link;
use super::{OutMessage, Routing};
use round::{RoundEnd, run_round};

mod round;

/// Publishing channels per broker URL. One channel already carries tens of thousands of
/// messages a second; a few let a new round start while others wait for their confirms (a
/// quorum queue confirms after a disk write and replication), and let RabbitMQ spread the
/// channel work over its schedulers. More would only add connection memory: a stream's
/// batcher and relay each keep at most one call in flight.
pub(crate) const CHANNELS: usize = 4;

/// Unconfirmed messages allowed per channel. At ~20k messages/s and a confirm latency of a
/// few milliseconds, ~100-200 are in flight; 512 leaves headroom while bounding what lapin
/// buffers for one channel (its frame queue has no bound of its own).
pub(crate) const WINDOW: usize = 512;

/// A round gathers waiting jobs up to this many messages (a larger job is a round alone).
/// Answers go out at the end of a round, so this bounds the extra latency a small job sees
/// from sharing a round with others.
pub(crate) const ROUND_MESSAGES: usize = 512;

/// Jobs waiting per worker. A job is one caller (a stream's batch, a relay page) that is
/// waiting anyway; when all workers are this far behind, callers wait (until their deadline)
/// instead of queueing more work the broker cannot take.
const JOB_QUEUE: usize = 64;

/// Wait before retrying when no retry time is known (e.g. a channel could not be opened).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Shortest wait between two attempts to get a channel.
const MIN_PAUSE: Duration = Duration::from_millis(10);

/// How long `confirm.select` may take on a fresh channel.
const SELECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A message ready to be sent (and sent again after a broken channel).
struct Prepared {
    routing_key: ShortString,
    message_id: Option<ShortString>,
    props: BasicProperties,
    body: Bytes,
}

impl Prepared {
    fn new(m: &OutMessage) -> Prepared {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(m.headers.clone());
        // An id or content type too long for the AMQP property is left out of it: the
        // CloudEvents headers still carry it.
        let message_id = ShortString::try_new(m.message_id.as_str()).ok();
        if let Some(id) = &message_id {
            props = props.with_message_id(id.clone());
        }
        if let Some(ct) = m
            .content_type
            .as_deref()
            .and_then(|ct| ShortString::try_new(ct).ok())
        {
            props = props.with_content_type(ct);
        }
        if let Some(ts) = m.timestamp {
            props = props.with_timestamp(ts);
        }
        Prepared {
            // Cut to the limit, so the conversion cannot fail.
            routing_key: ShortString::try_new(truncate_short(&m.routing_key)).unwrap_or_default(),
            message_id,
            props,
            body: m.body.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Pending,
    Routed,
    Unroutable,
    Nacked,
}

/// One `publish` call.
struct Job {
    exchange: ShortString,
    msgs: Vec<Prepared>,
    outcomes: Vec<Outcome>,
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<Routing>, BrokerError>>,
    /// Set after a channel error in a shared round: the job then runs alone, so that an
    /// error caused by one job (a missing exchange, an oversized message) is answered to
    /// that job only.
    isolate: bool,
    last_error: Option<BrokerError>,
}

impl Job {
    fn unsent(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| **o == Outcome::Pending)
            .count()
    }

    fn answer(self, result: Result<Vec<Routing>, BrokerError>) {
        // The caller may have given up; then nobody needs the answer.
        let _ = self.reply.send(result);
    }

    fn expire(self) {
        let cause = self.last_error.as_ref().map_or_else(
            || "no confirmation before the deadline".to_string(),
            |e| format!("no confirmation before the deadline (last error: {e})"),
        );
        self.answer(Err(BrokerError::Unavailable(cause)));
    }
}

/// The worker pool of one broker URL.
pub(crate) struct Publisher {
    senders: Vec<mpsc::Sender<Job>>,
    next: AtomicUsize,
    link: Arc<Link>,
}

impl Publisher {
    /// Starts the workers on the current Tokio runtime.
    pub(crate) fn start(link: Arc<Link>) -> Publisher {
        let senders = (0..CHANNELS)
            .map(|id| {
                let (tx, rx) = mpsc::channel(JOB_QUEUE);
                let worker = Worker {
                    id,
                    link: link.clone(),
                    rx,
                    channel: None,
                    carry: VecDeque::new(),
                };
                tokio::spawn(worker.run());
                tx
            })
            .collect();
        Publisher {
            senders,
            next: AtomicUsize::new(0),
            link,
        }
    }

    pub(crate) async fn publish(
        &self,
        exchange: &str,
        msgs: &[OutMessage],
        deadline: Instant,
    ) -> Result<Vec<Routing>, BrokerError> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let exchange = ShortString::try_new(exchange).map_err(|e| BrokerError::InvalidName {
            what: "exchange name",
            message: e.to_string(),
        })?;
        let timed_out = || {
            BrokerError::Unavailable(match self.link.last_error() {
                Some(e) => format!("no confirmation before the deadline (last error: {e})"),
                None => "no confirmation before the deadline".to_string(),
            })
        };
        if deadline <= Instant::now() {
            return Err(timed_out());
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            exchange,
            msgs: msgs.iter().map(Prepared::new).collect(),
            outcomes: vec![Outcome::Pending; msgs.len()],
            deadline,
            reply,
            isolate: false,
            last_error: None,
        };
        let stopped = || BrokerError::Unavailable("publisher stopped".into());
        match tokio::time::timeout_at(deadline, self.pick().send(job)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(stopped()),
            Err(_) => return Err(timed_out()),
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(timed_out()),
        }
    }

    /// The worker with the shortest queue, ties broken round-robin.
    fn pick(&self) -> &mpsc::Sender<Job> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.senders.len();
        (0..n)
            .map(|i| &self.senders[(start + i) % n])
            .max_by_key(|s| s.capacity())
            .unwrap_or(&self.senders[start % n])
    }
}

struct Worker {
    id: usize,
    link: Arc<Link>,
    rx: mpsc::Receiver<Job>,
    channel: Option<Channel>,
    /// Jobs taken from the queue and not answered yet, oldest first.
    carry: VecDeque<Job>,
}

impl Worker {
    async fn run(mut self) {
        loop {
            if self.carry.is_empty() {
                match self.rx.recv().await {
                    Some(job) => self.carry.push_back(job),
                    // Every handle is gone and nothing is left to answer.
                    None => return,
                }
            }
            self.expire();
            if self.carry.is_empty() {
                continue;
            }
            let channel = match self.channel().await {
                Ok(ch) => ch,
                Err(err) if !err.is_transient() => {
                    // A bad URL or refused credentials: waiting will not help.
                    for job in std::mem::take(&mut self.carry) {
                        job.answer(Err(err.clone()));
                    }
                    continue;
                }
                Err(err) => {
                    self.wait_for_retry(err).await;
                    continue;
                }
            };
            let mut round = self.take_round();
            let end = run_round(&channel, &mut round).await;
            self.settle(round, end);
        }
    }

    /// Answers jobs whose caller has given up or whose deadline has passed.
    fn expire(&mut self) {
        let now = Instant::now();
        for job in std::mem::take(&mut self.carry) {
            if job.reply.is_closed() {
                continue;
            }
            if job.deadline <= now {
                job.expire();
            } else {
                self.carry.push_back(job);
            }
        }
    }

    async fn wait_for_retry(&mut self, err: BrokerError) {
        for job in &mut self.carry {
            job.last_error = Some(err.clone());
        }
        let retry_at = self
            .link
            .retry_at()
            .await
            .unwrap_or_else(|| Instant::now() + RETRY_PAUSE);
        let earliest_deadline = self.carry.iter().map(|j| j.deadline).min();
        let wake = earliest_deadline.map_or(retry_at, |d| d.min(retry_at));
        // Never spin, whatever the clock says.
        tokio::time::sleep_until(wake.max(Instant::now() + MIN_PAUSE)).await;
    }

    /// The worker's channel in confirm mode, opened if needed.
    async fn channel(&mut self) -> Result<Channel, BrokerError> {
        if let Some(ch) = &self.channel {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
            self.channel = None;
        }
        let (ch, _) = self.link.channel().await?;
        match tokio::time::timeout(
            SELECT_TIMEOUT,
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // Whatever it says, a failure to set up the channel is no job's fault: it is
                // never answered to the jobs as their own error (only retried until their
                // deadline), and is the link's only if the connection is down.
                let err = match classify("confirm.select", &e) {
                    BrokerError::Protocol { code, text } => {
                        BrokerError::Unavailable(format!("confirm.select refused: {code} {text}"))
                    }
                    other => other,
                };
                self.link.record_if_disconnected(&err);
                return Err(err);
            }
            Err(_) => return Err(BrokerError::Unavailable("confirm.select: no answer".into())),
        }
        tracing::debug!(
            worker = self.id,
            channel = ch.id(),
            "publishing channel open"
        );
        self.channel = Some(ch.clone());
        Ok(ch)
    }

    /// The next jobs to publish together: the oldest job, then more while the round stays
    /// under [`ROUND_MESSAGES`] messages. An isolated job is a round alone.
    fn take_round(&mut self) -> Vec<Job> {
        let mut round = Vec::new();
        let mut size = 0;
        while let Some(front) = self.carry.front() {
            if !round.is_empty() && (front.isolate || size + front.unsent() > ROUND_MESSAGES) {
                return round;
            }
            let Some(job) = self.carry.pop_front() else {
                break;
            };
            size += job.unsent();
            let isolate = job.isolate;
            round.push(job);
            if isolate {
                return round;
            }
        }
        while size < ROUND_MESSAGES {
            match self.rx.try_recv() {
                Ok(job) if size + job.unsent() > ROUND_MESSAGES => {
                    self.carry.push_back(job);
                    break;
                }
                Ok(job) => {
                    size += job.unsent();
                    round.push(job);
                }
                Err(_) => break,
            }
        }
        round
    }

    /// Answers the jobs a round finished and keeps the others for another attempt.
    fn settle(&mut self, round: Vec<Job>, end: RoundEnd) {
        let alone = round.len() == 1;
        let mut again = Vec::new();
        for mut job in round {
            let nacked = job
                .outcomes
                .iter()
                .filter(|o| **o == Outcome::Nacked)
                .count();
            if nacked > 0 {
                job.answer(Err(BrokerError::Nacked { count: nacked }));
                continue;
            }
            if job.unsent() == 0 {
                let routing = job
                    .outcomes
                    .iter()
                    .map(|o| match o {
                        Outcome::Unroutable => Routing::Unroutable,
                        _ => Routing::Routed,
                    })
                    .collect();
                job.answer(Ok(routing));
                continue;
            }
            match &end {
                RoundEnd::Stalled => job.expire(),
                RoundEnd::Broken(err @ BrokerError::Protocol { .. }) if alone || job.isolate => {
                    job.answer(Err(err.clone()));
                }
                RoundEnd::Broken(err @ BrokerError::Protocol { .. }) => {
                    job.isolate = true;
                    job.last_error = Some(err.clone());
                    again.push(job);
                }
                RoundEnd::Broken(err) => {
                    job.last_error = Some(err.clone());
                    again.push(job);
                }
                RoundEnd::Complete => {
                    // Every message got an answer, so nothing is pending; kept for safety.
                    again.push(job);
                }
            }
        }
        for job in again.into_iter().rev() {
            self.carry.push_front(job);
        }
        match end {
            RoundEnd::Complete => {}
            RoundEnd::Broken(err) => {
                tracing::warn!(worker = self.id, error = %err, "publishing channel broke");
                // A refusal (e.g. 404 for one job's missing exchange) stays with the jobs of
                // the round, which were answered or isolated above; only a lost connection is
                // every caller's news.
                if !matches!(err, BrokerError::Protocol { .. }) {
                    self.link.record_if_disconnected(&err);
                }
                self.channel = None;
            }
            RoundEnd::Stalled => {
                tracing::warn!(
                    worker = self.id,
                    "no publisher confirms before the deadline"
                );
                // Dropping the last handle closes the channel; a new one starts clean.
                self.channel = None;
            }
        }
    }
}

#[cfg(test)]
mod tests;
