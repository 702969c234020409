//! RabbitMQ: two connections per broker URL (data and topology, see `Inner` for what
//! shares each), the exchanges and queues Weir declares, and confirmed publishing.
//!
//! A [`Broker`] is a cheap handle shared by every stream and subscription that uses the same
//! URL. One resource's refusal (a 404, a 406) is that resource's answer only: it never closes
//! a channel another resource uses, and never becomes another resource's error. It connects
//! on first use and, when the connection breaks, connects again on the next
//! use with capped exponential backoff; it never panics or stops the process because RabbitMQ
//! is away. Operations then fail with [`BrokerError::Unavailable`], which callers answer with
//! 503 and `Retry-After`.
//!
//! [`Broker::publish`] returns only when every message has a publisher confirm: a message
//! reported [`Routing::Routed`] or [`Routing::Unroutable`] is safely with the broker (or, if
//! unroutable, known to have reached no queue). How events travel (the CloudEvents AMQP
//! binding) is described at [`to_message`].

mod codec;
mod error;
mod link;
mod management;
mod publisher;
mod tls;

use crate::poison::MutexExt;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::ShortString;
use lapin::{Channel, ExchangeKind};
use tokio::time::Instant;

pub use codec::{
    DATA_KIND_HEADER, HEADER_PREFIX, HEADER_PREFIX_ALT, MAX_SHORT_STRING, data_for, from_delivery,
    from_properties, to_message,
};
pub use error::{BrokerError, validate_url};
/// AMQP header tables and values, as used in [`OutMessage::headers`] and queue arguments.
pub use lapin::types::{AMQPValue, FieldTable};
pub use management::{ManagedCounts, Management, QueueTable};

use crate::topology::{QueueType, TlsPlan};
use error::classify;
use link::Link;
use publisher::Publisher;

/// How long a topology operation (declare, bind, delete, count) may take, connection
/// included, before it is reported unavailable.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Topology operations in flight at once per broker URL (and so the most channels the
/// topology connection has open). Each is one round trip that RabbitMQ serves in about a
/// millisecond (a quorum queue's declare: a few, it waits for its Raft group), so 16 keep
/// provisioning at thousands of operations a second — 1,000 subscriptions of ~8 operations
/// each come up in seconds — while 1,000 resources provisioning at once queue here instead
/// of opening 1,000 channels (each an Erlang process and its memory on the broker, against a
/// `channel_max` of 2,047 per connection).
const TOPOLOGY_OPS: usize = 16;

/// How long an operation may wait for one of the [`TOPOLOGY_OPS`] slots before it is
/// reported unavailable. Waiting is fair (first come, first served), and an operation that
/// holds a slot gives it back within [`OP_TIMEOUT`], so this is only reached when the broker
/// answers nothing for several rounds of slots; the callers retry later.
const TOPOLOGY_WAIT: Duration = Duration::from_secs(60);

/// The name a connection shows in RabbitMQ's management UI unless told otherwise.
pub const DEFAULT_CONNECTION_NAME: &str = "weir";

/// One message to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct OutMessage {
    /// Topic exchange routing key (for events: the event type).
    pub routing_key: String,
    /// Application headers (for events: the `cloudEvents:*` attributes).
    pub headers: FieldTable,
    pub body: Bytes,
    /// The `message-id` property (for events: the event id). Left out if over 255 bytes.
    pub message_id: String,
    /// The `content-type` property. Left out if over 255 bytes.
    pub content_type: Option<String>,
    /// The `timestamp` property, seconds since the Unix epoch.
    pub timestamp: Option<u64>,
}

/// What the broker did with a confirmed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// At least one queue took it.
    Routed,
    /// No queue is bound for it: RabbitMQ returned it (`mandatory`) and dropped it.
    Unroutable,
}

/// Message and consumer counts of a queue, as a passive declare reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery (RabbitMQ does not count unacknowledged ones here).
    pub messages: u32,
    pub consumers: u32,
}

/// A handle to one RabbitMQ (one AMQP URL). Clones share the connection and the publishing
/// channels. The first publish starts the publishing workers on the current Tokio runtime;
/// they stop when the last handle is dropped.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// Who shares what, per broker URL (one [`Broker`] and its clones):
///
/// - `link`, the *data connection*: the publishing channels (a few, shared by every stream
///   and subscription that publishes here; see [`publisher`] for how one caller's refusal is
///   kept from the others) and the channels [`Broker::open_channel`] hands out, each owned by
///   one consumer or one caller. A channel the broker closes there concerns only its owner.
/// - `topology`, the *topology connection*: declares, binds, deletes and passive declares.
///   These are the operations RabbitMQ refuses by closing the channel (404 for a queue that
///   is not there, 406 for other arguments), many times a minute at scale (every missing
///   retry bucket a backlog sample looks for). A channel runs one operation at a time, so a
///   refusal closes a channel no other operation is using, and the error goes to that
///   operation's caller only. Keeping them off the data connection keeps that churn (and the
///   connection turnover it causes, see [`link::Link::channel`]) away from consumers and
///   publishers.
struct Inner {
    link: Arc<Link>,
    publisher: OnceLock<Publisher>,
    topology: Topology,
    /// The broker's management API, when it can be addressed (see [`Management`]).
    management: Option<Management>,
}

/// The topology connection and its channels.
struct Topology {
    link: Link,
    /// One permit per operation in flight: see [`TOPOLOGY_OPS`].
    permits: tokio::sync::Semaphore,
    /// Channels of operations that succeeded, with the id of their connection, for the next
    /// operation (opening one is a round trip). At most [`TOPOLOGY_OPS`]: a channel is here
    /// only while no operation holds it. Used by one operation at a time, never shared by two.
    idle: std::sync::Mutex<Vec<(u64, Channel)>>,
}

impl Topology {
    /// A channel for one operation: an idle one of the current connection, or a new one.
    async fn take(&self) -> Result<(Channel, u64), BrokerError> {
        let current = self.link.current_id();
        let idle = {
            let mut idle = self.idle.locked();
            // Channels of a retired or lost connection are dropped (closing them lets a
            // retired connection close).
            idle.retain(|(id, ch)| Some(*id) == current && ch.status().connected());
            idle.pop()
        };
        match idle {
            Some((id, ch)) => Ok((ch, id)),
            None => self.link.channel().await,
        }
    }

    /// Keeps the channel of an operation that succeeded for the next one.
    fn give_back(&self, ch: Channel, id: u64) {
        if ch.status().connected() {
            let mut idle = self.idle.locked();
            if idle.len() < TOPOLOGY_OPS {
                idle.push((id, ch));
            }
        }
    }
}

/// One AMQP connection outside a [`Broker`] (the bench tools' own consumers), made the same
/// way: `amqps://` is TLS with the system's roots (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured),
/// never plain text.
pub async fn connect(url: &str, connection_name: &str) -> Result<lapin::Connection, BrokerError> {
    let uri = error::parse_url(url)?;
    let transport = tls::Transport::new(&uri, &TlsPlan::default())?;
    let props = lapin::ConnectionProperties::default().with_connection_name(connection_name.into());
    transport.connect(uri, props).await
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL holds a password: it is never printed.
        f.debug_struct("Broker")
            .field("connected", &self.inner.link.is_connected())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A handle for `url` (`amqp://user:pass@host:port/vhost`). Nothing connects yet; an
    /// invalid URL is reported by the first operation ([`validate_url`] checks it earlier).
    pub fn new(url: String) -> Broker {
        Broker::with_name(url, DEFAULT_CONNECTION_NAME)
    }

    /// Like [`Broker::new`], with the connection name RabbitMQ shows for this handle's
    /// connection.
    pub fn with_name(url: String, connection_name: &str) -> Broker {
        Broker::with_tls(url, TlsPlan::default(), connection_name)
    }

    /// Like [`Broker::with_name`], with extra trust and a client certificate for an
    /// `amqps://` URL (`spec.broker.tls`). Every connection of the handle (data, topology)
    /// and its management API lookups use them. With an `amqp://` URL, `tls` must be empty
    /// (the first operation fails otherwise: certificates are never silently unused).
    pub fn with_tls(url: String, tls: TlsPlan, connection_name: &str) -> Broker {
        let tls = Arc::new(tls);
        Broker {
            inner: Arc::new(Inner {
                management: Management::for_amqp_url(&url, &tls),
                topology: Topology {
                    link: Link::new(
                        url.clone(),
                        tls.clone(),
                        format!("{connection_name} (topology)"),
                    ),
                    permits: tokio::sync::Semaphore::new(TOPOLOGY_OPS),
                    idle: std::sync::Mutex::new(Vec::new()),
                },
                link: Arc::new(Link::new(url, tls, connection_name.to_string())),
                publisher: OnceLock::new(),
            }),
        }
    }

    /// True while the connection is open. Never waits: when there is no connection it
    /// starts an attempt in the background (subject to the backoff), so that a broker that
    /// came back is seen as healthy again even when nothing is being published.
    pub async fn healthy(&self) -> bool {
        if self.inner.link.is_connected() {
            return true;
        }
        self.inner.link.connect_in_background();
        false
    }

    /// Connects if needed (a healthcheck). While backing off after a failed attempt, answers
    /// the last error without trying again.
    pub async fn check(&self) -> Result<(), BrokerError> {
        match tokio::time::timeout(OP_TIMEOUT, self.inner.link.connection()).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(BrokerError::Unavailable("connect: no answer".into())),
        }
    }

    /// Declares a durable topic exchange. Idempotent.
    pub async fn declare_exchange(&self, name: &str) -> Result<(), BrokerError> {
        let name = short("exchange name", name)?;
        self.op("exchange.declare", async |ch: &Channel| {
            let options = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            ch.exchange_declare(name, ExchangeKind::Topic, options, FieldTable::default())
                .await
        })
        .await
    }

    /// Deletes an exchange. Deleting an exchange that does not exist succeeds.
    pub async fn delete_exchange(&self, name: &str) -> Result<(), BrokerError> {
        let name = short("exchange name", name)?;
        let r = self
            .op("exchange.delete", async |ch: &Channel| {
                ch.exchange_delete(name, ExchangeDeleteOptions::default())
                    .await
            })
            .await;
        not_found_is_ok(r, ())
    }

    /// Declares a durable queue of the given type with extra arguments (e.g.
    /// `x-dead-letter-exchange`); `x-queue-type` is set from `queue_type`. Idempotent while
    /// the arguments stay the same; a queue that exists with other arguments is
    /// [`BrokerError::Protocol`] 406.
    pub async fn declare_queue(
        &self,
        name: &str,
        queue_type: QueueType,
        mut args: FieldTable,
    ) -> Result<(), BrokerError> {
        let name = short("queue name", name)?;
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(queue_type.as_arg().into()),
        );
        self.op("queue.declare", async |ch: &Channel| {
            ch.queue_declare(name, QueueDeclareOptions::durable(), args)
                .await
                .map(|_| ())
        })
        .await
    }

    /// Binds a queue to an exchange with a topic pattern. Idempotent.
    pub async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), BrokerError> {
        let (queue, exchange, routing_key) = binding(queue, exchange, routing_key)?;
        self.op("queue.bind", async |ch: &Channel| {
            ch.queue_bind(
                queue,
                exchange,
                routing_key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        })
        .await
    }

    /// Removes a binding. Removing a binding that does not exist succeeds.
    pub async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), BrokerError> {
        let (queue, exchange, routing_key) = binding(queue, exchange, routing_key)?;
        let r = self
            .op("queue.unbind", async |ch: &Channel| {
                ch.queue_unbind(queue, exchange, routing_key, FieldTable::default())
                    .await
            })
            .await;
        not_found_is_ok(r, ())
    }

    /// Deletes a queue and its messages. Deleting a queue that does not exist succeeds.
    pub async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        let name = short("queue name", name)?;
        let r = self
            .op("queue.delete", async |ch: &Channel| {
                ch.queue_delete(name, QueueDeleteOptions::default())
                    .await
                    .map(|_| ())
            })
            .await;
        not_found_is_ok(r, ())
    }

    /// Ready messages and consumers of a queue (passive declare); `None` if it does not
    /// exist.
    pub async fn queue_counts(&self, name: &str) -> Result<Option<QueueCounts>, BrokerError> {
        let name = short("queue name", name)?;
        let r = self
            .op("queue.declare (passive)", async |ch: &Channel| {
                let options = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                ch.queue_declare(name, options, FieldTable::default())
                    .await
                    .map(|q| {
                        Some(QueueCounts {
                            messages: q.message_count(),
                            consumers: q.consumer_count(),
                        })
                    })
            })
            .await;
        not_found_is_ok(r, None)
    }

    /// Counts of every queue of the vhost from the management API (a list shared by every
    /// caller for a couple of seconds); an error if the API is off or did not answer.
    pub async fn managed_queues(
        &self,
    ) -> Result<std::sync::Arc<management::QueueTable>, BrokerError> {
        match &self.inner.management {
            Some(m) => m.queues().await,
            None => Err(BrokerError::Unavailable("management API turned off".into())),
        }
    }

    /// A new channel on this broker's data connection, for consumers. The caller owns it and
    /// shares it with nobody: an error the broker closes it with is the caller's alone. When
    /// it breaks, open another.
    pub async fn open_channel(&self) -> Result<Channel, BrokerError> {
        match tokio::time::timeout(OP_TIMEOUT, self.inner.link.channel()).await {
            Ok(r) => r.map(|(ch, _)| ch),
            Err(_) => Err(BrokerError::Unavailable("open channel: no answer".into())),
        }
    }

    /// Publishes `msgs` to `exchange` — persistent, `mandatory`, with publisher confirms —
    /// and returns, in slice order, whether each was routed, once every message is
    /// confirmed.
    ///
    /// The messages of one call go out on one channel in slice order. If the connection
    /// breaks first, the unconfirmed ones are sent again (so a queue may hold a message
    /// twice) until `deadline`; after it the answer is [`BrokerError::Unavailable`], and
    /// nothing may be assumed about any message of the call. A nack from the broker is
    /// [`BrokerError::Nacked`].
    pub async fn publish(
        &self,
        exchange: &str,
        msgs: &[OutMessage],
        deadline: Instant,
    ) -> Result<Vec<Routing>, BrokerError> {
        self.inner
            .publisher
            .get_or_init(|| Publisher::start(self.inner.link.clone()))
            .publish(exchange, msgs, deadline)
            .await
    }

    /// Runs one topology operation on a channel of the topology connection that no other
    /// operation uses meanwhile (see [`Inner`]), at most [`TOPOLOGY_OPS`] at once.
    ///
    /// A refusal (404, 406: [`BrokerError::Protocol`]) closes that channel and is this
    /// operation's answer only; a channel whose operation succeeded serves the next one.
    async fn op<T>(
        &self,
        what: &'static str,
        f: impl AsyncFnOnce(&Channel) -> lapin::Result<T>,
    ) -> Result<T, BrokerError> {
        let topology = &self.inner.topology;
        let _permit = match tokio::time::timeout(TOPOLOGY_WAIT, topology.permits.acquire()).await {
            Ok(Ok(p)) => p,
            // The semaphore is never closed; answered like a broker that is away.
            Ok(Err(_)) => return Err(BrokerError::Unavailable(format!("{what}: closed"))),
            Err(_) => {
                return Err(BrokerError::Unavailable(format!(
                    "{what}: no answer (waited {}s behind {TOPOLOGY_OPS} operations in flight)",
                    TOPOLOGY_WAIT.as_secs()
                )));
            }
        };
        let run = async {
            let (ch, conn) = topology.take().await?;
            match f(&ch).await {
                Ok(v) => {
                    topology.give_back(ch, conn);
                    Ok(v)
                }
                // The channel is closed (refused) or broken: it is dropped here, and the
                // error, whatever it names, is this operation's.
                Err(e) => {
                    let err = classify(what, &e);
                    if matches!(err, BrokerError::Unavailable(_)) {
                        topology.link.record_if_disconnected(&err);
                    }
                    Err(err)
                }
            }
        };
        match tokio::time::timeout(OP_TIMEOUT, run).await {
            Ok(r) => r,
            Err(_) => Err(BrokerError::Unavailable(format!("{what}: no answer"))),
        }
    }
}

/// The three names of a binding, each checked to fit an AMQP short string.
fn binding(
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(ShortString, ShortString, ShortString), BrokerError> {
    Ok((
        short("queue name", queue)?,
        short("exchange name", exchange)?,
        short("routing key", routing_key)?,
    ))
}

fn short(what: &'static str, s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s).map_err(|e| BrokerError::InvalidName {
        what,
        message: e.to_string(),
    })
}

/// RabbitMQ answers 404 when deleting or inspecting something already gone: for idempotent
/// operations that is success.
fn not_found_is_ok<T>(r: Result<T, BrokerError>, gone: T) -> Result<T, BrokerError> {
    match r {
        Err(BrokerError::Protocol { code: 404, .. }) => Ok(gone),
        other => other,
    }
}
