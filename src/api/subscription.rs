//! `Subscription` (`wsub`): who receives which events of a stream, how, and from where.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::common::{DeletionPolicy, SecretKeyRef, free_form_object_list};

/// A Subscription: delivers the events of one EventStream (or of several, through one queue)
/// that match its filters to a sink, with retries, dead-lettering, optional per-key ordering
/// and replay from the store. `stream`, or `streams` and/or `streamSelector`, name the streams
/// read.
// Each `printcolumn(...)` repeats keys such as `type_`, which clippy takes for duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, KubeSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "Subscription",
    namespaced,
    status = "SubscriptionStatus",
    shortname = "wsub",
    category = "weir",
    doc = "A Subscription: delivers the events of one EventStream (or of several, through one queue) that match its filters to a sink, with retries, dead-lettering, optional per-key ordering and replay from the store.",
    scale(
        spec_replicas_path = ".spec.consumers",
        status_replicas_path = ".status.consumers",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Stream", type_ = "string", json_path = ".spec.stream"),
    printcolumn(name = "Streams", type_ = "string", json_path = ".status.streams"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Backlog", type_ = "integer", json_path = ".status.backlog"),
    printcolumn(name = "Consumers", type_ = "integer", json_path = ".status.consumers"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "has(self.stream) != (has(self.streams) || has(self.streamSelector))"
).message("either stream, or streams and/or streamSelector must be set"))]
pub struct SubscriptionSpec {
    /// Name of the EventStream, in the same namespace, whose events this subscription receives.
    /// Set either `stream`, or `streams` and/or `streamSelector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Names of several EventStreams of this namespace read through one queue. They must share
    /// one broker (same URL and TLS settings, same `queueType`); `startFrom` other than
    /// `latest` needs a store on each. Delivered events carry the extension `weirstream` (the
    /// name of the stream they come from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub streams: Option<Vec<String>>,
    /// Label selector over the EventStreams of this namespace read through one queue, as
    /// `streams` but kept up to date: a stream that starts matching is bound (and its history
    /// replayed from `startFrom`), one that stops matching is unbound. Alone, it must select at
    /// least one stream. With `streams` beside it, the subscription reads the listed streams and
    /// every selected one (a stream both listed and selected once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_selector: Option<LabelSelector>,
    /// Filters in Knative's dialect; an event is delivered only if every filter matches. Each
    /// filter has exactly one operator: `exact`, `prefix` or `suffix` (a map of attribute name
    /// to value, all entries must match), `all` or `any` (a list of filters), or `not` (one
    /// filter). Attributes are any CloudEvents attribute or extension. Default none (every event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object_list")]
    pub filters: Option<Vec<serde_json::Value>>,
    /// Where events are delivered. Required.
    pub sink: SinkSpec,
    /// Timeouts, retries and dead-lettering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
    /// Where delivery starts when the subscription is created: `latest` (new events only),
    /// `earliest` (the whole stored history), an RFC 3339 time (events recorded at or after it)
    /// or a stream position as a string of digits (events at or after it). Anything but
    /// `latest` needs a stream with a store. Default `latest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_from: Option<String>,
    /// `none` (events are delivered concurrently, in any order) or `perKey` (events sharing a
    /// `partitionKey` value reach the sink one at a time, in position order). Default `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<DeliveryOrdering>,
    /// The attribute `perKey` ordering keys on. Default `subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    /// With `perKey` ordering: number of parallel lanes keys are spread over; 1 makes delivery
    /// strictly serial. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub partitions: Option<u32>,
    /// Deliveries in flight at once in each worker Pod (the `/scale` subresource's replicas;
    /// `status.selector` selects the worker Pods, and every worker runs every subscription).
    /// With `ordering: none` each worker consumes the queue with this prefetch, so up to
    /// `consumers` times the number of workers are in flight across the cluster; with
    /// `perKey` each lane delivers one event at a time in one worker, so this caps the lanes
    /// a worker delivers at once and `partitions` caps the cluster. `0` scales the
    /// subscription to zero: no worker consumes or catches up, while its queues stay bound
    /// (events accumulate, `status.backlog` keeps counting them) until it is scaled up again.
    /// Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<u32>,
    /// Delivery rate limit per worker. Default unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<SubscriptionRateLimit>,
    /// If set, a CloudEvent returned in the body of the sink's 2xx response is published into
    /// this stream. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplySpec>,
    /// What happens to the subscription's queues when it is deleted: `Delete` removes them,
    /// `Retain` keeps them. Default `Delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,
}

impl SubscriptionSpec {
    /// The streams named by `stream` or `streams` (not those `streamSelector` picks).
    pub fn named_streams(&self) -> impl Iterator<Item = &str> {
        self.stream
            .iter()
            .chain(self.streams.iter().flatten())
            .map(String::as_str)
    }
}

/// The destination of deliveries: exactly one of `uri` or `ref`.
#[derive(Serialize, Deserialize, Clone, Debug, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.uri) != has(self.ref)")
    .message("exactly one of uri or ref must be set"))]
pub struct SinkSpec {
    /// Absolute `http://` or `https://` URL events are POSTed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// A Service in the subscription's namespace events are POSTed to.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub ref_: Option<ServiceRef>,
    /// CloudEvents HTTP content mode: `binary` (attributes in `ce-` headers, data as the body)
    /// or `structured` (the whole event as `application/cloudevents+json`). Default `binary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SinkFormat>,
    /// Secret key holding a bearer token sent to the sink in `Authorization`. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<SecretKeyRef>,
}

/// A Kubernetes Service in the subscription's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// Kind of the referenced object; only `Service` is supported. Default `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name of the Service.
    pub name: String,
    /// Port of the Service. Default 80.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// HTTP path, starting with `/`. Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// CloudEvents HTTP content mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SinkFormat {
    Binary,
    Structured,
}

/// Delivery ordering.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DeliveryOrdering {
    None,
    PerKey,
}

/// Timeouts, retries and dead-lettering of deliveries.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// How long one delivery attempt may take, as a duration. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Retries after the first attempt (attempts = retry + 1). Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<u32>,
    /// `exponential` (delay × 2^n) or `linear` (delay × n), both with ±20% jitter. Default
    /// `exponential`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_policy: Option<BackoffPolicy>,
    /// Base delay between attempts, as a duration. Default `200ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_delay: Option<String>,
    /// Upper bound of the delay between attempts, as a duration. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<String>,
    /// Longest `Retry-After` (on 429 and 503) that is honoured, as a duration; a longer one is
    /// capped. Default `2m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_max: Option<String>,
    /// Where events go when every attempt failed. Default none: they stay in the subscription's
    /// dead-letter queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_sink: Option<DeadLetterSinkSpec>,
    /// What the sink receives of the stream's personal-data fields (`spec.pii.fields` of the
    /// EventStream): `Decrypt` (default) sends the plaintext, or the redaction marker
    /// `weir:pii:forgotten` for a forgotten subject; `Envelope` sends the encrypted
    /// envelopes as stored, for a sink that must never hold personal data. No effect on a
    /// stream without pii fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pii: Option<PiiDelivery>,
}

/// What a sink receives of personal-data fields.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PiiDelivery {
    /// The plaintext values (the redaction marker for a forgotten subject).
    Decrypt,
    /// The encrypted envelopes, as stored.
    Envelope,
}

/// Backoff between delivery attempts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BackoffPolicy {
    Exponential,
    Linear,
}

/// A dead-letter destination: exactly one of `uri`, `ref` or `stream`.
#[derive(Serialize, Deserialize, Clone, Debug, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.uri), has(self.ref), has(self.stream)].filter(x, x).size() == 1"
).message("exactly one of uri, ref or stream must be set"))]
pub struct DeadLetterSinkSpec {
    /// Absolute `http://` or `https://` URL dead-lettered events are POSTed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// A Service in the subscription's namespace dead-lettered events are POSTed to.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub ref_: Option<ServiceRef>,
    /// Name of an EventStream in the same namespace dead-lettered events are published into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
}

/// Delivery rate limit.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionRateLimit {
    /// Deliveries started per second per worker; 0 means unlimited. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_per_second: Option<u32>,
}

/// Where sink replies are published.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplySpec {
    /// Name of an EventStream in the same namespace.
    pub stream: String,
}

/// Observed state of a Subscription.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions: `Ready`, `SinkReachable`, `CaughtUp`, `Ordering`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Option<Vec<Condition>>,
    /// Name of the RabbitMQ queue the streams publish the subscription's events into: the
    /// queue it consumes (`ordering: none`), or its intake queue, whose events one worker at
    /// a time moves to the partition queues (`ordering: perKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The partition queues consumed under `ordering: perKey`, one lane each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_queues: Option<Vec<String>>,
    /// Name of the RabbitMQ queue holding dead-lettered events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,
    /// Deliveries in flight at once per worker, as applied (the `/scale` status replicas); 0
    /// when scaled to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<u32>,
    /// Label selector of the subscription's workers (the `/scale` label selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Events accepted for the subscription and not yet settled, sampled every few seconds:
    /// messages ready or unacknowledged in its queues (every worker's deliveries in flight,
    /// as RabbitMQ's management API reports them; without that API, this worker's only),
    /// plus retries waiting in its delay queues. Scaled to zero before its catch-up ran, the
    /// stored events the catch-up will replay count instead of its queue when they are more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<u64>,
    /// Last delivered stream position, as a string of digits (replay progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// The EventStreams the subscription reads, by name, sorted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<Vec<String>>,
    /// Something to know that is not a failure, e.g. that a catch-up was skipped because the
    /// subscription's queue already existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
}
