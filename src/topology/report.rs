//! What is wrong with a resource: one [`Report`] per resource, its [`Problem`]s by field path,
//! and the [`Reason`] each one gives its `Ready=False` condition. Shared by the builder, the
//! filter parser and both sources.

use std::fmt;

use crate::topology::Key;
use crate::topology::index::Kind;

/// The problems of one resource (none: the resource is valid and has a plan).
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub kind: Kind,
    pub key: Key,
    /// `metadata.generation` of the resource checked (0 when the source sets none).
    pub generation: i64,
    pub problems: Vec<Problem>,
}

impl Report {
    /// Whether the resource has no problem (and so has a plan).
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One thing wrong with a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where, e.g. `spec.batching.maxDelay` or `spec.filters[1].any[0].exact`.
    pub path: String,
    /// What is wrong, naming the offending value (never a Secret's value).
    pub message: String,
    pub reason: Reason,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a resource is not valid; used as the reason of its `Ready=False` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Reason {
    /// The spec itself is wrong; only an edit of the resource fixes it.
    InvalidSpec,
    /// A referenced Secret, or a key of it, does not exist (yet).
    SecretNotFound,
    /// A referenced ConfigMap, or a key of it, does not exist (yet).
    ConfigMapNotFound,
    /// A referenced EventStream does not exist (yet).
    StreamNotFound,
    /// An older policy of the same kind already selects the stream.
    PolicyConflict,
}

impl Reason {
    /// The reason as a condition `reason` (CamelCase).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidSpec => "InvalidSpec",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::ConfigMapNotFound => "ConfigMapNotFound",
            Reason::StreamNotFound => "StreamNotFound",
            Reason::PolicyConflict => "PolicyConflict",
        }
    }

    /// Whether only an edit of the resource itself can fix the problem. The others wait on
    /// another object appearing or going away, so a controller should retry them.
    pub fn is_permanent(self) -> bool {
        matches!(self, Reason::InvalidSpec)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
