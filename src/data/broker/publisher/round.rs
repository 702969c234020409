//! One round on the wire: every unconfirmed message of the round's jobs published in order,
//! pipelined up to [`WINDOW`], each confirmation recorded, and the round's returns given back
//! to the messages they belong to (see the parent module for why rounds).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{Channel, Confirmation};

use super::{Job, Outcome, Prepared, WINDOW};
use crate::data::broker::error::{BrokerError, classify};

pub(super) enum RoundEnd {
    /// Every message of the round has its confirmation.
    Complete,
    /// The channel broke; messages without a confirmation must be sent again.
    Broken(BrokerError),
    /// No confirmation came before the last deadline of the round.
    Stalled,
}

type ConfirmFuture<'a> = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send + 'a>>;

/// Publishes one message and resolves to its confirmation.
///
/// lapin's `basic_publish` registers the delivery tag and queues the frames synchronously,
/// before its first suspension point; the caller polls the returned future once right away,
/// in message order, so that messages go out in order while many confirmations are awaited
/// together.
fn send<'a>(ch: &'a Channel, exchange: &ShortString, msg: &Prepared) -> ConfirmFuture<'a> {
    let exchange = exchange.clone();
    let routing_key = msg.routing_key.clone();
    let props = msg.props.clone();
    let body = msg.body.clone();
    Box::pin(async move {
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        ch.basic_publish(exchange, routing_key, options, &body, props)
            .await?
            .await
    })
}

/// Publishes every unconfirmed message of `round` and records each confirmation.
pub(super) async fn run_round(ch: &Channel, round: &mut [Job]) -> RoundEnd {
    let Some(last_deadline) = round.iter().map(|j| j.deadline).max() else {
        return RoundEnd::Complete;
    };
    let mut inflight: VecDeque<(usize, usize, ConfirmFuture<'_>)> = VecDeque::new();
    let mut results: Vec<(usize, usize, lapin::Result<Confirmation>)> = Vec::new();
    let mut broken = false;
    'send: for (j, job) in round.iter().enumerate() {
        for (m, msg) in job.msgs.iter().enumerate() {
            if job.outcomes[m] != Outcome::Pending {
                continue;
            }
            if broken {
                break 'send;
            }
            if inflight.len() >= WINDOW
                && let Some((jj, mm, fut)) = inflight.pop_front()
            {
                match tokio::time::timeout_at(last_deadline, fut).await {
                    Ok(r) => {
                        broken |= r.is_err();
                        results.push((jj, mm, r));
                    }
                    Err(_) => return RoundEnd::Stalled,
                }
            }
            let mut fut = send(ch, &job.exchange, msg);
            match futures::poll!(fut.as_mut()) {
                Poll::Ready(r) => {
                    broken |= r.is_err();
                    results.push((j, m, r));
                }
                Poll::Pending => inflight.push_back((j, m, fut)),
            }
        }
    }
    while let Some((j, m, fut)) = inflight.pop_front() {
        match tokio::time::timeout_at(last_deadline, fut).await {
            Ok(r) => results.push((j, m, r)),
            Err(_) => return RoundEnd::Stalled,
        }
    }
    // Publish order, whatever order the answers came in.
    results.sort_by_key(|(j, m, _)| (*j, *m));

    let mut failure: Option<BrokerError> = None;
    let mut confirmed: Vec<(usize, usize)> = Vec::with_capacity(results.len());
    let mut returned: Vec<BasicReturnMessage> = Vec::new();
    for (j, m, r) in results {
        match r {
            Ok(Confirmation::Ack(ret)) => {
                round[j].outcomes[m] = Outcome::Routed;
                confirmed.push((j, m));
                returned.extend(ret);
            }
            Ok(Confirmation::Nack(ret)) => {
                round[j].outcomes[m] = Outcome::Nacked;
                confirmed.push((j, m));
                returned.extend(ret);
            }
            Ok(Confirmation::NotRequested) => {
                // Only possible if the channel lost confirm mode; treat it as broken.
                failure.get_or_insert(BrokerError::Unavailable(
                    "channel is not in confirm mode".into(),
                ));
            }
            Err(e) => {
                // Prefer the broker's reason (e.g. 404 no exchange) over the state errors
                // of the messages that followed it on the closed channel.
                let err = classify("publish", &e);
                let better = matches!(err, BrokerError::Protocol { .. })
                    && !matches!(failure, Some(BrokerError::Protocol { .. }));
                if failure.is_none() || better {
                    failure = Some(err);
                }
            }
        }
    }

    let sent: Vec<Identity<'_>> = confirmed
        .iter()
        .map(|&(j, m)| Identity {
            exchange: round[j].exchange.as_str(),
            routing_key: round[j].msgs[m].routing_key.as_str(),
            message_id: round[j].msgs[m]
                .message_id
                .as_ref()
                .map(ShortString::as_str),
        })
        .collect();
    let back: Vec<Identity<'_>> = returned
        .iter()
        .map(|r| Identity {
            exchange: r.delivery.exchange.as_str(),
            routing_key: r.delivery.routing_key.as_str(),
            message_id: r
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str),
        })
        .collect();
    let marks = attribute_returns(&sent, &back);
    for (&(j, m), was_returned) in confirmed.iter().zip(marks) {
        if was_returned && round[j].outcomes[m] == Outcome::Routed {
            round[j].outcomes[m] = Outcome::Unroutable;
        }
    }

    match failure {
        Some(err) => RoundEnd::Broken(err),
        None => RoundEnd::Complete,
    }
}

/// What tells messages apart for routing: the same exchange and routing key route alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    message_id: Option<&'a str>,
}

/// Which of the `sent` messages (in publish order) the `returned` messages belong to: each
/// return goes to the first sent message with the same identity that has no return yet.
fn attribute_returns(sent: &[Identity<'_>], returned: &[Identity<'_>]) -> Vec<bool> {
    let mut marks = vec![false; sent.len()];
    for r in returned {
        match (0..sent.len()).find(|&i| !marks[i] && sent[i] == *r) {
            Some(i) => marks[i] = true,
            None => tracing::debug!(?r, "returned message matches nothing of its round"),
        }
    }
    marks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id<'a>(rk: &'a str, mid: &'a str) -> Identity<'a> {
        Identity {
            exchange: "x",
            routing_key: rk,
            message_id: Some(mid),
        }
    }

    #[test]
    fn returns_find_their_own_message_whatever_confirm_carried_them() {
        let sent = [id("a", "1"), id("b", "2"), id("a", "3"), id("c", "4")];
        // Returned in any order (lapin attached them to other confirmations).
        let marks = attribute_returns(&sent, &[id("c", "4"), id("b", "2")]);
        assert_eq!(marks, vec![false, true, false, true]);
    }

    #[test]
    fn identical_messages_are_matched_once_each() {
        let sent = [id("a", "1"), id("a", "1"), id("a", "1")];
        let marks = attribute_returns(&sent, &[id("a", "1"), id("a", "1")]);
        assert_eq!(marks, vec![true, true, false]);
        // A return that matches nothing (it belongs to a message whose confirmation was
        // lost with the channel) marks nothing.
        let marks = attribute_returns(&sent[..1], &[id("z", "9")]);
        assert_eq!(marks, vec![false]);
    }
}
