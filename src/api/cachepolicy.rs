//! `CachePolicy` (`wcp`): how the read side caches the events of streams.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A CachePolicy: an in-memory cache in front of the read API of the selected EventStreams.
/// Exactly one of `streams` or `streamNames` selects the streams.
// Each `printcolumn(...)` repeats keys such as `type_`, which clippy takes for duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, KubeSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "CachePolicy",
    plural = "cachepolicies",
    namespaced,
    status = "CachePolicyStatus",
    shortname = "wcp",
    category = "weir",
    doc = "A CachePolicy: an in-memory cache in front of the read API of the selected EventStreams.",
    printcolumn(name = "Strategy", type_ = "string", json_path = ".spec.strategy"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Hit Ratio", type_ = "string", json_path = ".status.hitRatio"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.streams) != has(self.streamNames)")
    .message("exactly one of streams or streamNames must be set"))]
pub struct CachePolicySpec {
    /// Label selector over the EventStreams of this namespace that this policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<LabelSelector>,
    /// Names of the EventStreams of this namespace that this policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_names: Option<Vec<String>>,
    /// Eviction strategy: `LRU` (least recently used), `LFU` (least frequently used), `FIFO`
    /// (oldest inserted) or `TTL` (entries only expire after `ttl`). Default `LRU`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<CacheStrategy>,
    /// Largest number of cached entries per worker, at least 1. Default 1000, or the
    /// operator's `CACHE_MAX_ITEMS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_items: Option<u64>,
    /// Largest total size of cached entries per worker, as a size (`64MiB`). Default: only
    /// `maxItems` bounds the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<String>,
    /// How long an entry stays cached, as a duration. Default `300s`, or the operator's
    /// `CACHE_TTL` (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// Cache eviction strategy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum CacheStrategy {
    Lru,
    Lfu,
    Fifo,
    Ttl,
}

/// Observed state of a CachePolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachePolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions: `Ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Option<Vec<Condition>>,
    /// Cache hits divided by lookups, as a decimal string (e.g. `"0.97"`). Sampled on one
    /// worker replica, so it describes that replica's cache, not all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit_ratio: Option<String>,
    /// Entries the cache holds on the worker replica that wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
}
