//! The raw resources a source (Kubernetes watch or manifest folder) has seen, before any
//! validation: the input of [`crate::topology::build::build`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::api;
use crate::topology::Key;

/// Every resource the topology is built from, keyed by namespace/name. The objects are shared
/// (`Arc`) with the source's caches: an index of N objects costs N pointers, not N copies.
#[derive(Default, Clone, Debug)]
pub struct Index {
    /// EventStreams by namespace/name (likewise for the three kinds below).
    pub streams: BTreeMap<Key, Arc<api::EventStream>>,
    pub subscriptions: BTreeMap<Key, Arc<api::Subscription>>,
    pub archive_policies: BTreeMap<Key, Arc<api::ArchivePolicy>>,
    pub cache_policies: BTreeMap<Key, Arc<api::CachePolicy>>,
    /// Secrets with their values decoded (the bytes of `data`, or `stringData` as UTF-8).
    pub secrets: BTreeMap<Key, BTreeMap<String, Vec<u8>>>,
    /// ConfigMaps' `data`.
    pub config_maps: BTreeMap<Key, BTreeMap<String, String>>,
}

/// The four Weir kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Kind {
    EventStream,
    Subscription,
    ArchivePolicy,
    CachePolicy,
}

impl Kind {
    /// All kinds, in the order resources are reported.
    pub const ALL: [Kind; 4] = [
        Kind::EventStream,
        Kind::Subscription,
        Kind::ArchivePolicy,
        Kind::CachePolicy,
    ];

    /// The kind's name as in `kind:` of a manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::EventStream => "EventStream",
            Kind::Subscription => "Subscription",
            Kind::ArchivePolicy => "ArchivePolicy",
            Kind::CachePolicy => "CachePolicy",
        }
    }

    /// The kind named `name` (as in `kind:` of a manifest), if it is a Weir kind.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
