//! `ArchivePolicy` (`wap`): when stored events move to compressed archive segments.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An ArchivePolicy: moves the stored events of the selected EventStreams, once they are older
/// than `archiveAfter`, into zstd-compressed archive segments, and optionally deletes them
/// later. Exactly one of `streams` or `streamNames` selects the streams.
// Each `printcolumn(...)` repeats keys such as `type_`, which clippy takes for duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, KubeSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "ArchivePolicy",
    plural = "archivepolicies",
    namespaced,
    status = "ArchivePolicyStatus",
    shortname = "wap",
    category = "weir",
    doc = "An ArchivePolicy: moves the stored events of the selected EventStreams, once they are older than archiveAfter, into zstd-compressed archive segments, and optionally deletes them later.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Last Run", type_ = "date", json_path = ".status.lastRun"),
    printcolumn(
        name = "Archived",
        type_ = "string",
        json_path = ".status.archivedEvents"
    ),
    printcolumn(
        name = "Ratio",
        type_ = "string",
        json_path = ".status.compressionRatio"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.streams) != has(self.streamNames)")
    .message("exactly one of streams or streamNames must be set"))]
pub struct ArchivePolicySpec {
    /// Label selector over the EventStreams of this namespace that this policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<LabelSelector>,
    /// Names of the EventStreams of this namespace that this policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_names: Option<Vec<String>>,
    /// Age (by recorded time) after which stored events are archived, as a duration (`90d`).
    /// Default `90d`, or the operator's `EVENT_ARCHIVE_THRESHOLD` (days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_after: Option<String>,
    /// Age after which archived events are deleted, as a duration; must exceed
    /// `archiveAfter`. Default: never deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_after: Option<String>,
    /// How often the archiver runs, as a duration. Default `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Size of archive segments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<SegmentSpec>,
    /// Compression of archive segments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<ArchiveCompressionSpec>,
    /// Where segments are written. Default `{store: {}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<ArchiveDestination>,
}

/// Limits of one archive segment; a segment closes when either is reached.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SegmentSpec {
    /// Events per segment, at least 1. Default 100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_events: Option<u32>,
    /// Uncompressed bytes per segment, as a size. Default `64MiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<String>,
}

/// zstd compression of archive segments.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveCompressionSpec {
    /// zstd compression level, 1 (fastest) to 22 (smallest). Default 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 22))]
    pub level: Option<i32>,
    /// Whether a dictionary is trained per stream (better ratios for small events). Default
    /// `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dictionary: Option<bool>,
}

/// Where archive segments are written: exactly one of `store` or `volume`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.store) != has(self.volume)")
    .message("exactly one of store or volume must be set"))]
pub struct ArchiveDestination {
    /// The stream's own PostgreSQL database (`store: {}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreDestination>,
    /// A directory mounted into every Weir worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeDestination>,
}

/// Archive into the stream's own PostgreSQL database. Has no settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct StoreDestination {}

/// Archive into files under a directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeDestination {
    /// Absolute path of the directory, e.g. `/var/lib/weir/archive`.
    pub path: String,
}

/// Observed state of an ArchivePolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchivePolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions: `Ready`, `ArchiveHealthy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Option<Vec<Condition>>,
    /// When the archiver last finished a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<Time>,
    /// Events archived so far, as a string of digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_events: Option<String>,
    /// Bytes written to archive segments so far (compressed), as a string of digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_bytes: Option<String>,
    /// The archived events' size as CloudEvents JSON divided by archived bytes, as a decimal
    /// string (e.g. `"8.3"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_ratio: Option<String>,
}
