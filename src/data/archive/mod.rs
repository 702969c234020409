//! Archiving (ArchivePolicy): old events move from the hot table into zstd segments and stay
//! readable through the same read paths.
//!
//! - [`format`]: the segment bytes (blocks, index, checksums) and dictionary training.
//! - [`archiver`]: one archive run of one stream, and `deleteAfter`.
//! - [`verify`]: reading every segment of a stream back and checking it.
//! - [`manager`]: the schedule of every (policy, stream) pair of this process.
//!
//! Their SQL is in the store: `store::segments` (a run's statements, the totals, what verify
//! reads) and `store::archived` (reads of archived events).

pub mod archiver;
pub mod format;
pub mod manager;
pub mod verify;

pub use archiver::{RunReport, Settings};
pub use manager::{Archives, StreamArchive};
pub use verify::VerifyReport;

use crate::data::store::StoreError;

/// Errors of the archive subsystem.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A store error (transient ones are retried at the next scheduled run).
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encoding a segment: {0}")]
    Encode(String),
    #[error("writing segment file {path}: {source}")]
    Volume {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another run here) is archiving this stream right now.
    #[error("an archive run of this stream is already in progress")]
    Busy,
    /// The hot table did not hold the rows the segment was built from (nothing was changed).
    #[error("the hot rows {first}..={last} changed while being archived ({deleted} deleted)")]
    Moved { first: i64, last: i64, deleted: u64 },
    #[error("stream {0} is not selected by an ArchivePolicy here")]
    NotArchived(String),
    #[error("stream {0} is not running (no store yet)")]
    NotRunning(String),
}

impl From<sqlx::Error> for ArchiveError {
    fn from(e: sqlx::Error) -> Self {
        ArchiveError::Store(e.into())
    }
}
