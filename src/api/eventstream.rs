//! `EventStream` (`wes`): where events enter, how they are checked, batched, stored and published.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConfigMapKeyRef, DeletionPolicy, SecretKeyRef, SecretRef, TlsSpec, free_form_object,
};

/// An EventStream: an HTTP endpoint that accepts CloudEvents, checks them, batches them, stores
/// them in PostgreSQL (optional) and publishes them to a RabbitMQ exchange.
// Each `printcolumn(...)` repeats keys such as `type_`, which clippy takes for duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "EventStream",
    namespaced,
    status = "EventStreamStatus",
    shortname = "wes",
    category = "weir",
    doc = "An EventStream: an HTTP endpoint that accepts CloudEvents, checks them, batches them, stores them in PostgreSQL (optional) and publishes them to a RabbitMQ exchange.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(name = "Head", type_ = "string", json_path = ".status.head"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EventStreamSpec {
    /// The RabbitMQ broker the stream publishes to. Required.
    pub broker: BrokerSpec,
    /// The PostgreSQL event store. Absent: a broker-only stream (events are published straight
    /// to RabbitMQ and cannot be replayed). `store: {}` uses the operator-wide default database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreSpec>,
    /// How accepted requests are grouped into one store transaction or one publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<BatchingSpec>,
    /// Checks applied to every published event before it is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationSpec>,
    /// Compression of stored payloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionSpec>,
    /// Who may publish and how fast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<IngestSpec>,
    /// Encryption of personal data inside event payloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pii: Option<PiiSpec>,
    /// What happens to the exchange, the queues and the stored events when the EventStream is
    /// deleted: `Retain` keeps them, `Delete` removes them. Default `Retain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,
}

/// The RabbitMQ side of a stream.
#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSpec {
    /// Secret key holding the broker URL: `amqp://` (plain text) or `amqps://` (TLS, verified
    /// against the system's roots plus `tls.caSecretRef`; a failed verification is an error,
    /// never a plain-text fallback). Required.
    pub url_secret_ref: SecretKeyRef,
    /// Name of the topic exchange the stream publishes to. Default `weir.<namespace>.<name>`.
    /// Must start with `weir.<namespace>.` unless the operator allows custom exchanges
    /// (`--allow-custom-exchanges`); another namespace's `weir.` names are always refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// Type of the queues Weir declares for this stream's subscriptions: `quorum` (replicated,
    /// durable) or `classic`. Default `quorum`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_type: Option<QueueType>,
    /// Extra trust and a client certificate for an `amqps://` URL. Refused with `amqp://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// RabbitMQ queue type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum QueueType {
    Quorum,
    Classic,
}

/// The PostgreSQL side of a stream.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreSpec {
    /// Secret key holding the PostgreSQL URL (`postgres://...`), or several URLs separated by
    /// commas, tried in order (failover). Absent: the operator-wide default database.
    /// TLS (`sslmode=require`, `verify-ca`, `verify-full`, certificate options) is refused
    /// until TLS support lands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the URL (or comma-separated URLs) of a read replica used by the read
    /// API. Absent: reads go to the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_url_secret_ref: Option<SecretKeyRef>,
    /// Connection pool of each Weir worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolSpec>,
    /// Extra trust and a client certificate for the primary and read URLs. Every URL must then
    /// ask for TLS (`sslmode=require`, `verify-ca` or `verify-full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// A connection pool. `size` must not exceed `maxConnections`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
// The message is the one `weir validate` and the operator give for the same mistake.
#[x_kube(validation = Rule::new(
    "(has(self.size) ? self.size : 2) <= (has(self.maxConnections) ? self.maxConnections : 10)"
).message(Message::Expression(
    "'size (' + string(has(self.size) ? self.size : 2) + ') must not exceed maxConnections (' + string(has(self.maxConnections) ? self.maxConnections : 10) + ')'".into()
)))]
pub struct PoolSpec {
    /// Connections kept open (warm) per worker. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// Upper bound of connections per worker. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// How long an unused connection above `size` stays open, as a duration (`30s`, `5m`).
    /// Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// How long to wait for a new connection, as a duration (`10s`). Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
}

/// Batching of accepted requests.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchingSpec {
    /// Events per batch, at least 1. A request is never split: a larger request is one batch.
    /// Default 50, or the operator's `EVENT_BATCH_SIZE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_events: Option<u32>,
    /// Bytes per batch, as a size (`1MiB`, `512KiB`). Default `1MiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<String>,
    /// Upper bound on how long a request waits for others to join its batch, as a duration
    /// (`5ms`). Default `5ms`, or the operator's `EVENT_BATCH_TIMEOUT` (milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<String>,
}

/// Checks applied to published events.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationSpec {
    /// Largest accepted event (attributes and data), as a size. Default `256KiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_event_bytes: Option<String>,
    /// Largest accepted request body, checked before parsing, as a size. Default `4MiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<String>,
    /// Extension attributes every event must carry (lowercase names, e.g. `correlationid`).
    /// Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_extensions: Option<Vec<String>>,
    /// Whether events whose `type` has no schema below are accepted. Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_unknown_types: Option<bool>,
    /// JSON Schemas that event data must satisfy, per event type. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schemas: Option<Vec<EventSchemaSpec>>,
}

/// The JSON Schema for one event type, given inline (`schema`) or from a ConfigMap
/// (`schemaFrom`): exactly one of the two.
#[derive(Serialize, Deserialize, Clone, Debug, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.schema) != has(self.schemaFrom)")
    .message("exactly one of schema or schemaFrom must be set"))]
pub struct EventSchemaSpec {
    /// The event `type` this schema applies to, e.g. `order.created`.
    #[serde(rename = "type")]
    pub type_: String,
    /// If set, the schema applies only to events whose `dataschema` attribute equals this
    /// value (versioned events); a matching entry wins over one without `dataschema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    /// The JSON Schema (draft 2020-12 unless it says otherwise with `$schema`), inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub schema: Option<serde_json::Value>,
    /// Where to read the JSON Schema from instead (JSON or YAML text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_from: Option<SchemaSource>,
}

/// Source of a JSON Schema document.
#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaSource {
    /// ConfigMap key holding the schema as JSON or YAML text.
    pub config_map_key_ref: ConfigMapKeyRef,
}

/// Compression of stored payloads.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompressionSpec {
    /// Payloads at least this large are stored zstd-compressed, as a size. Default `4KiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_bytes: Option<String>,
    /// zstd compression level, 1 (fastest) to 22 (smallest). Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 22))]
    pub level: Option<i32>,
}

/// Access control and rate limiting of the publish endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestSpec {
    /// How publishers authenticate. Default `{mode: None}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// Rate limit of the whole stream, per worker. Default unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
}

/// Who may publish to and read from the stream (`docs/security.md`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.mode) || self.mode != 'Tokens' || has(self.tokensSecretRef)")
    .message("mode Tokens requires tokensSecretRef"))]
pub struct AuthSpec {
    /// `None` (anyone who reaches the endpoint may publish and read), `Tokens` (a bearer token
    /// from `tokensSecretRef`) or `ServiceAccounts` (a Kubernetes service account token of one
    /// of `serviceAccounts`, checked with the TokenReview API; operator mode only). Default
    /// `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<AuthMode>,
    /// Secret whose every key is a publisher's name and whose value is that publisher's
    /// bearer token. Required with mode `Tokens`. Publishers may also read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_secret_ref: Option<SecretRef>,
    /// Service accounts allowed to publish (and read) with mode `ServiceAccounts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<Vec<ServiceAccountRef>>,
    /// Audience the service account tokens must be issued for (mode `ServiceAccounts`), e.g.
    /// from a projected token volume with `audience: weir`. Default `weir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Callers who may read the stream (page, one event, subject, correlation trace) but not
    /// publish to it, in the stream's mode. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readers: Option<ReadersSpec>,
}

/// Read-only access to a stream.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadersSpec {
    /// Mode `Tokens`: a Secret whose every key is a reader's name and whose value is that
    /// reader's bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_secret_ref: Option<SecretRef>,
    /// Mode `ServiceAccounts`: service accounts that may read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<Vec<ServiceAccountRef>>,
}

/// Publisher authentication mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AuthMode {
    None,
    Tokens,
    ServiceAccounts,
}

/// A Kubernetes service account.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Namespace of the service account.
    pub namespace: String,
    /// Name of the service account.
    pub name: String,
}

/// A token-bucket rate limit.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Sustained events per second; 0 means unlimited. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_per_second: Option<u32>,
    /// The bucket's size: the most events accepted at once, and so the largest request
    /// that can ever pass (a larger one is answered 413); 0 means equal to
    /// `eventsPerSecond`. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// Encryption of personal data inside event payloads.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PiiSpec {
    /// JSON pointers into event data whose values are to be encrypted before storage, e.g.
    /// `/customer/email`. Not supported yet: a non-empty list is refused (InvalidSpec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    /// Secret key holding the encryption key. Required when `fields` is not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_ref: Option<SecretKeyRef>,
}

/// Observed state of an EventStream.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventStreamStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions: `Ready`, `BrokerReady`, `StoreReady`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Option<Vec<Condition>>,
    /// URL that publishers POST events to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Name of the RabbitMQ exchange the stream publishes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// Last stored position, as a string of digits (sampled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
}
