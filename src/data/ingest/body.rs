//! Reading a publish body whole, within the stream's `maxRequestBytes`, the body read timeout
//! and the worker's body memory ([`super::budget`]).

use axum::body::Body;
use bytes::Bytes;
use tokio::time::{Duration, Instant};

use super::budget::{BodyHold, FREE_BYTES, Spent};
use crate::data::http::RETRY_AFTER_SECS;
use crate::data::problem::HttpProblem;

/// Why a request body could not be taken in whole.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// More than the stream's limit arrived: the client's request is too large (413).
    TooLarge,
    /// The body ended or broke before it was complete (truncated, bad chunk encoding, the
    /// client reset the connection): a fault of the request or its transport, not of its
    /// size (400). The text is the transport's reason.
    Unreadable(String),
    /// The body had not arrived whole by the deadline (408); `received` bytes had.
    TimedOut { after: Duration, received: usize },
    /// The worker's memory for bodies in flight is in use by other bodies (503).
    OverBudget(Spent),
}

impl BodyError {
    pub fn problem(&self, limit: usize) -> HttpProblem {
        match self {
            BodyError::TooLarge => HttpProblem::payload_too_large(None, limit),
            BodyError::Unreadable(cause) => HttpProblem::unreadable_body(cause),
            BodyError::TimedOut { after, received } => {
                HttpProblem::request_timeout(*after, *received)
            }
            BodyError::OverBudget(spent) => HttpProblem::unavailable(
                format!(
                    "{spent}: this request's body was refused past its first {FREE_BYTES} \
                     bytes; retry, or send smaller requests"
                ),
                RETRY_AFTER_SECS,
            ),
        }
    }
}

/// Reads a request body of at most `limit` bytes, telling a body that exceeds the limit
/// apart from one that cannot be read (`axum::body::to_bytes` reports both as one opaque
/// error). Stops reading at the first byte over the limit, so an oversized body never
/// costs more than `limit` bytes of memory, and at `deadline`, so a slow one holds what it
/// sent for at most the body read timeout.
pub async fn read_body(
    body: Body,
    limit: usize,
    deadline: Instant,
    hold: &mut BodyHold,
) -> Result<Bytes, BodyError> {
    use futures::StreamExt as _;
    let started = Instant::now();
    let mut stream = body.into_data_stream();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await else {
            return Err(BodyError::TimedOut {
                after: deadline.saturating_duration_since(started),
                received: len,
            });
        };
        let Some(frame) = next else { break };
        let chunk = frame.map_err(|e| BodyError::Unreadable(error_chain(&e)))?;
        len = len.saturating_add(chunk.len());
        if len > limit {
            return Err(BodyError::TooLarge);
        }
        hold.grow_to(len).map_err(BodyError::OverBudget)?;
        chunks.push(chunk);
    }
    // Most bodies arrive in one frame: that one is handed on without a copy.
    if chunks.len() == 1 {
        return Ok(chunks.swap_remove(0));
    }
    let mut all = Vec::with_capacity(len);
    for c in &chunks {
        all.extend_from_slice(c);
    }
    Ok(Bytes::from(all))
}

/// An error and its causes on one line (hyper's body errors say what happened only in
/// their source, e.g. "error reading a body from connection: invalid chunk size line").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ingest::budget::BodyBudget;

    fn body_of(parts: Vec<Result<&'static [u8], std::io::Error>>) -> Body {
        Body::from_stream(futures::stream::iter(
            parts.into_iter().map(|p| p.map(Bytes::from_static)),
        ))
    }

    fn hold() -> BodyHold {
        BodyBudget::new(1 << 20).hold()
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let b = body_of(vec![Ok(b"ab"), Ok(b"cd"), Ok(b"e")]);
        assert_eq!(
            read_body(b, 5, far(), &mut hold()).await,
            Ok(Bytes::from_static(b"abcde"))
        );
        let b = body_of(vec![]);
        assert_eq!(read_body(b, 5, far(), &mut hold()).await, Ok(Bytes::new()));
    }

    #[tokio::test]
    async fn only_a_body_over_the_limit_is_too_large() {
        let b = body_of(vec![Ok(b"abc"), Ok(b"def")]);
        assert_eq!(
            read_body(b, 5, far(), &mut hold()).await,
            Err(BodyError::TooLarge)
        );
        let broken = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cut short");
        let b = body_of(vec![Ok(b"abc"), Err(broken)]);
        match read_body(b, 5, far(), &mut hold()).await {
            Err(BodyError::Unreadable(why)) => assert!(why.contains("cut short"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_still_arriving_at_the_deadline_times_out() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let body = Body::from_stream(tokio_stream_of(rx));
        tx.send(Ok(Bytes::from_static(b"abc"))).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        // The sender stays open and silent: the read ends at the deadline, not before.
        let got = read_body(body, 1000, deadline, &mut hold()).await;
        assert_eq!(
            got,
            Err(BodyError::TimedOut {
                after: Duration::from_secs(30),
                received: 3
            })
        );
        assert!(Instant::now() >= deadline);
        assert_eq!(
            BodyError::TimedOut {
                after: Duration::from_secs(30),
                received: 3
            }
            .problem(1000)
            .status,
            408
        );
        drop(tx);
    }

    fn tokio_stream_of(
        mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
