//! The validated, kube-free model of what should run. Every duration and size is parsed,
//! every default is filled and every Secret/ConfigMap reference is resolved: `data/` takes
//! these values as they are.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// `namespace/name` of a namespaced resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Key {
        Key {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum QueueType {
    Quorum,
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` queue argument.
    pub fn as_arg(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DeletionPolicy {
    Retain,
    Delete,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BrokerPlan {
    /// `amqp://` or `amqps://` URL, resolved from the Secret.
    pub url: String,
    /// Topic exchange name (default `weir.<namespace>.<name>`).
    pub exchange: String,
    pub queue_type: QueueType,
    /// Extra trust and client certificate (`spec.broker.tls`).
    pub tls: TlsPlan,
}

/// Extra trust and a client certificate of one TLS connection (`spec.*.tls`), already checked
/// to be well-formed PEM at build time.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsPlan {
    /// PEM CA certificates trusted in addition to the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate for mutual TLS.
    pub client: Option<ClientCertPlan>,
}

/// A client certificate chain and its private key, both PEM.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientCertPlan {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsPlan {
    /// Whether nothing beyond the URL and the system's roots is asked for.
    pub fn is_empty(&self) -> bool {
        self.ca_pem.is_none() && self.client.is_none()
    }
}

// Plans are logged and compared; key material and certificates are never printed.
impl fmt::Debug for TlsPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPlan")
            .field(
                "ca_pem",
                &self.ca_pem.as_ref().map(|p| format!("{} bytes", p.len())),
            )
            .field("client", &self.client)
            .finish()
    }
}

impl fmt::Debug for ClientCertPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertPlan")
            .field("cert_pem", &format!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolPlan {
    /// Connections kept open (warm) per worker.
    pub size: u32,
    /// Upper bound of connections per worker.
    pub max_connections: u32,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for PoolPlan {
    fn default() -> Self {
        PoolPlan {
            size: 2,
            max_connections: 10,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct StorePlan {
    /// One or more PostgreSQL URLs (comma-separated in the Secret: failover order).
    pub urls: Vec<String>,
    /// Replica URLs for the read side, if any.
    pub read_urls: Option<Vec<String>>,
    pub pool: PoolPlan,
    /// Extra trust and client certificate of every URL (`spec.store.tls`).
    pub tls: TlsPlan,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BatchingPlan {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_delay: Duration,
}

impl Default for BatchingPlan {
    fn default() -> Self {
        BatchingPlan {
            max_events: 50,
            max_bytes: 1024 * 1024,
            max_delay: Duration::from_millis(5),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SchemaPlan {
    /// The event `type` this schema applies to.
    pub event_type: String,
    /// If set, the schema applies only to events carrying this `dataschema`.
    pub dataschema: Option<String>,
    /// The JSON Schema document (resolved from a ConfigMap when `schemaFrom` was used).
    pub schema: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValidationPlan {
    pub max_event_bytes: usize,
    pub max_request_bytes: usize,
    pub required_extensions: Vec<String>,
    pub allow_unknown_types: bool,
    pub schemas: Vec<SchemaPlan>,
}

impl Default for ValidationPlan {
    fn default() -> Self {
        ValidationPlan {
            max_event_bytes: 256 * 1024,
            max_request_bytes: 4 * 1024 * 1024,
            required_extensions: Vec::new(),
            allow_unknown_types: true,
            schemas: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct CompressionPlan {
    /// Payloads at least this large are stored zstd-compressed.
    pub min_bytes: usize,
    pub level: i32,
}

impl Default for CompressionPlan {
    fn default() -> Self {
        CompressionPlan {
            min_bytes: 4 * 1024,
            level: 3,
        }
    }
}

/// One EventStream, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamPlan {
    pub key: Key,
    pub generation: i64,
    pub labels: BTreeMap<String, String>,
    pub broker: BrokerPlan,
    /// `None`: a broker-only stream.
    pub store: Option<StorePlan>,
    pub batching: BatchingPlan,
    pub validation: ValidationPlan,
    pub compression: CompressionPlan,
    pub deletion_policy: DeletionPolicy,
    /// `spec.ingest.rateLimit`; `None`: unlimited.
    pub rate_limit: Option<RateLimitPlan>,
    /// Who may publish and read. A change of it alone (a rotated token) is applied to the
    /// running stream in place, without restarting it.
    pub access: AccessPlan,
    /// `spec.pii`: fields encrypted per subject; `None` when none are listed.
    pub pii: Option<crate::topology::pii::PiiPlan>,
}

impl StreamPlan {
    /// Whether `other` differs from this plan only in what can change while the stream runs:
    /// who may publish and read (swapped in place) and the labels (they decide, at build
    /// time, which policies and subscriptions select the stream; restarting the stream for
    /// them would refuse its publishes while it reconnects).
    pub fn same_runtime(&self, other: &StreamPlan) -> bool {
        let mut a = self.clone();
        a.access = other.access.clone();
        a.labels = other.labels.clone();
        a == *other
    }
}

/// Who may publish to and read from a stream (`spec.ingest.auth`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AccessPlan {
    /// Anyone who reaches the endpoint.
    #[default]
    Open,
    /// Bearer tokens from Secrets, by publisher (and reader) name.
    Tokens {
        publishers: Vec<(String, Token)>,
        readers: Vec<(String, Token)>,
    },
    /// Kubernetes service accounts, as `(namespace, name)`, whose tokens the API server
    /// authenticates for `audience`.
    ServiceAccounts {
        audience: String,
        publishers: BTreeSet<(String, String)>,
        readers: BTreeSet<(String, String)>,
    },
}

/// A bearer token read from a Secret. Never shown by `Debug` (plans are logged in tests and
/// at debug level).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: String) -> Token {
        Token(token)
    }

    /// Whether `candidate` is this token, compared with [`same_token`].
    pub fn matches(&self, candidate: &str) -> bool {
        same_token(candidate, &self.0)
    }
}

/// Compares two bearer tokens in constant time: both sides are hashed first, so neither the
/// position of the first differing byte nor the expected token's length shows in the time
/// taken. Every token check of Weir (stream tokens, the admin token) goes through here.
pub fn same_token(given: &str, expected: &str) -> bool {
    use sha2::Digest as _;
    use subtle::ConstantTimeEq as _;
    let a = sha2::Sha256::digest(given.as_bytes());
    let b = sha2::Sha256::digest(expected.as_bytes());
    a[..].ct_eq(&b[..]).into()
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// A token bucket counted in events, per stream and worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitPlan {
    /// Sustained rate: the bucket refills one event every `1 / events_per_second` s.
    pub events_per_second: std::num::NonZeroU32,
    /// The bucket's size: the most events accepted at once, and the largest request that
    /// can ever pass.
    pub burst: std::num::NonZeroU32,
}

/// Everything that should run: one plan per valid resource.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Topology {
    /// Shared with the builder's memo and the running streams: a plan that did not change
    /// between two builds is the same allocation, so applying it is a pointer comparison.
    pub streams: BTreeMap<Key, Arc<StreamPlan>>,
    pub subscriptions: BTreeMap<Key, Arc<SubscriptionPlan>>,
    pub archive_policies: BTreeMap<Key, ArchivePlan>,
    pub cache_policies: BTreeMap<Key, CachePlan>,
}

/// CloudEvents HTTP content mode used towards a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SinkFormat {
    /// Attributes in `ce-` headers, data as the body.
    Binary,
    /// The whole event as `application/cloudevents+json`.
    Structured,
}

/// Where a subscription delivers.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkPlan {
    /// Absolute `http://` or `https://` URL (a Service `ref` is resolved to
    /// `http://<name>.<namespace>.svc:<port><path>`).
    pub url: String,
    pub format: SinkFormat,
    /// Bearer token sent in `Authorization`, resolved from the Secret.
    pub auth_token: Option<String>,
}

/// How the delay between delivery attempts grows (both with ±20% jitter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum BackoffPolicy {
    /// delay × 2^n.
    Exponential,
    /// delay × n.
    Linear,
}

/// Where events go once every attempt failed (besides the dead-letter queue).
#[derive(Clone, Debug, PartialEq)]
pub enum DeadLetterPlan {
    /// POSTed to this URL.
    Sink(String),
    /// Published into this EventStream.
    Stream(Key),
}

/// Timeouts, retries and dead-lettering of a subscription's deliveries.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryPlan {
    /// Limit of one attempt.
    pub timeout: Duration,
    /// Retries after the first attempt: attempts = retry + 1.
    pub retry: u32,
    pub backoff_policy: BackoffPolicy,
    pub backoff_delay: Duration,
    /// Cap of the delay between attempts.
    pub backoff_max: Duration,
    /// Longest honoured `Retry-After`.
    pub retry_after_max: Duration,
    pub dead_letter: Option<DeadLetterPlan>,
    /// `spec.delivery.pii: Envelope`: personal-data fields are delivered encrypted.
    pub pii_envelope: bool,
}

impl Default for DeliveryPlan {
    fn default() -> Self {
        DeliveryPlan {
            timeout: Duration::from_secs(10),
            retry: 5,
            backoff_policy: BackoffPolicy::Exponential,
            backoff_delay: Duration::from_millis(200),
            backoff_max: Duration::from_secs(300),
            retry_after_max: Duration::from_secs(120),
            dead_letter: None,
            pii_envelope: false,
        }
    }
}

/// Where delivery starts when the subscription is first created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartFrom {
    /// New events only.
    Latest,
    /// The whole stored history.
    Earliest,
    /// Events recorded (`weirrecordedtime`) at or after this time.
    Time(chrono::DateTime<chrono::Utc>),
    /// Events at or after this stream position (>= 1).
    Position(i64),
}

/// Delivery ordering of a subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderingPlan {
    /// Deliveries run concurrently, in any order.
    None,
    /// Events sharing the value of `partition_key` reach the sink one at a time, in position
    /// order, spread over `partitions` lanes.
    PerKey {
        partition_key: String,
        partitions: u32,
    },
}

/// One Subscription, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct SubscriptionPlan {
    pub key: Key,
    pub generation: i64,
    /// The EventStreams (same namespace) whose events are delivered, sorted, at least one;
    /// exactly one unless `multi`.
    pub streams: Vec<Key>,
    /// Named by `streams` or `streamSelector` (even if they name one stream): the queue is
    /// named after the subscription alone, its set of streams may change while it runs, and
    /// delivered events carry `weirstream`.
    pub multi: bool,
    /// ANDed; empty: every event.
    pub filters: Vec<crate::topology::filter::Filter>,
    pub sink: SinkPlan,
    pub delivery: DeliveryPlan,
    pub start_from: StartFrom,
    pub ordering: OrderingPlan,
    /// Deliveries in flight per worker; 0: scaled to zero (queues provisioned, nothing
    /// consumed).
    pub consumers: u32,
    /// Deliveries started per second per worker; `None`: unlimited.
    pub rate_limit: Option<u32>,
    /// Stream that 2xx CloudEvent replies are published into.
    pub reply: Option<Key>,
    pub deletion_policy: DeletionPolicy,
}

impl SubscriptionPlan {
    /// The first of the streams read (the only one unless `multi`).
    pub fn stream(&self) -> &Key {
        // Built with at least one stream (a plan without any is refused).
        &self.streams[0]
    }
}

/// Where archive segments are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchiveDestinationPlan {
    /// The stream's own PostgreSQL database.
    Store,
    /// Files under this absolute directory.
    Volume(std::path::PathBuf),
}

/// One ArchivePolicy, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchivePlan {
    pub key: Key,
    pub generation: i64,
    /// The selected streams (all with a store), sorted.
    pub streams: Vec<Key>,
    /// Events recorded longer ago than this are archived.
    pub archive_after: Duration,
    /// Archived events recorded longer ago than this are deleted; always > `archive_after`.
    pub delete_after: Option<Duration>,
    /// Interval between archiver runs.
    pub schedule: Duration,
    pub segment_max_events: usize,
    pub segment_max_bytes: usize,
    pub compression_level: i32,
    /// Train a zstd dictionary per stream.
    pub dictionary: bool,
    pub destination: ArchiveDestinationPlan,
}

/// Eviction strategy of a read cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum CacheStrategy {
    Lru,
    Lfu,
    Fifo,
    /// No eviction by use: entries leave only when `ttl` expires (or the cache is full).
    Ttl,
}

/// One CachePolicy, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct CachePlan {
    pub key: Key,
    pub generation: i64,
    /// The selected streams (all with a store), sorted.
    pub streams: Vec<Key>,
    pub strategy: CacheStrategy,
    /// Entries per worker, at least 1.
    pub max_items: u64,
    /// Total bytes per worker, if bounded by size too.
    pub max_bytes: Option<u64>,
    pub ttl: Duration,
}
