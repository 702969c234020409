//! Where resources come from.
//!
//! In standalone mode (`weir run -f DIR`, `weir validate -f DIR`) the resources are YAML
//! manifests in a folder: [`folder`] loads them into a [`crate::topology::Index`] and maps every
//! problem back to its file and document, and [`watch`] reloads the folder when it changes and
//! publishes each new snapshot to the engine, which applies it exactly as it applies Kubernetes
//! watch events.

mod decode;
pub mod folder;
mod report;
pub mod watch;
mod yaml;

use std::path::PathBuf;

pub use folder::{
    FileRecord, Loaded, ManifestProblem, Origin, ValidationReport, build_problems, load, reload,
    validate,
};
pub use watch::{DEFAULT_DEBOUNCE, spawn_folder_watch};

/// Why a manifest folder could not be read or watched at all.
///
/// A broken manifest is *not* an error of this kind: it is a [`ManifestProblem`] in
/// [`Loaded::problems`], so that one bad file never hides the others.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The folder itself (not one file in it) could not be read.
    #[error("cannot read manifest folder {}: {source}", path.display())]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The path given as the manifest folder is not a directory.
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The file-system watch on the folder could not be set up.
    #[error("cannot watch manifest folder {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}
