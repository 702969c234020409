//! Watches the manifest folder and publishes a new [`Loaded`] snapshot after every change.
//!
//! Any relevant change reloads the whole folder: a snapshot is cheap to build and a full reload
//! cannot drift from what `weir validate` says about the same folder. Changes are debounced so
//! that an editor's write-and-rename, or a burst of files copied at once, is one reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, event::AccessKind, event::AccessMode};
use notify_debouncer_full::{DebounceEventResult, DebouncedEvent, new_debouncer};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::SourceError;
use super::folder::{self, Loaded, is_manifest_name};

/// Quiet time after the last change before the folder is reloaded. Long enough to cover an
/// editor's save (write a temporary file, rename it over the manifest) and a `cp -r` of a few
/// files; short enough that an edit feels applied at once.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(300);

/// The shortest debounce [`spawn_folder_watch`] uses, whatever it is given.
pub const MIN_DEBOUNCE: Duration = Duration::from_millis(20);

/// Loads `dir`, then watches it (recursively) and publishes a new snapshot once the folder has
/// been quiet for `debounce` after a change, until `shutdown` is cancelled or every receiver is
/// dropped.
///
/// The receiver starts with the first load. A reload that fails as a whole (the folder was
/// removed) is logged and publishes nothing: the previous snapshot stays in force. Must be called
/// from within a Tokio runtime.
pub fn spawn_folder_watch(
    dir: PathBuf,
    debounce: Duration,
    shutdown: CancellationToken,
) -> Result<watch::Receiver<Arc<Loaded>>, SourceError> {
    // One pending signal already means "reload everything after the last change", so a second
    // one would only cause a redundant reload: capacity 1, and `try_send` drops the surplus.
    // This also keeps the notify callback, which runs on the debouncer's thread, non-blocking.
    let (signal_tx, signal_rx) = mpsc::channel::<()>(1);
    // A floor keeps the debouncer's tick (below) from turning into a busy loop.
    let debounce = debounce.max(MIN_DEBOUNCE);
    // Two stages. notify-debouncer-full releases each path's events once that path has been
    // quiet for `per_path` (it stitches a rename's two halves together and folds a file's
    // create-write-close into one change), checking every `per_path / 2`. Different paths of one
    // burst therefore come out at different checks, so `run` then waits until no release has
    // come for `debounce` before it reloads: changes less than about `debounce - per_path / 2`
    // apart are one reload, and a reload follows the last change after at most
    // `per_path * 1.5 + debounce`.
    let per_path = debounce / 4;
    let tick = per_path / 2;
    let mut debouncer = new_debouncer(per_path, Some(tick), move |result: DebounceEventResult| {
        let relevant = match result {
            Ok(events) => events.iter().any(is_relevant),
            Err(errors) => {
                for error in errors {
                    tracing::warn!(%error, "manifest folder watch error; reloading to be safe");
                }
                true
            }
        };
        if relevant {
            let _ = signal_tx.try_send(());
        }
    })
    .map_err(|source| SourceError::Watch {
        path: dir.clone(),
        source,
    })?;
    debouncer
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|source| SourceError::Watch {
            path: dir.clone(),
            source,
        })?;

    // Load after the watch is in place, so that a change made during the first load is not
    // missed: it triggers a reload.
    let first = folder::load(&dir)?;
    log_problems(&first);
    let (tx, rx) = watch::channel(Arc::new(first));

    tokio::spawn(async move {
        // Dropped when the task ends, which stops the debouncer's thread and the watch.
        let _debouncer = debouncer;
        run(dir, debounce, signal_rx, tx, shutdown).await;
    });
    Ok(rx)
}

async fn run(
    dir: PathBuf,
    debounce: Duration,
    mut signals: mpsc::Receiver<()>,
    tx: watch::Sender<Arc<Loaded>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
            signal = signals.recv() => if signal.is_none() { return },
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(debounce) => break,
                signal = signals.recv() => if signal.is_none() { break },
            }
        }
        let previous = tx.borrow().clone();
        let reload_dir = dir.clone();
        // Reading files blocks; keep it off the async workers.
        let result =
            tokio::task::spawn_blocking(move || folder::reload(&reload_dir, &previous)).await;
        match result {
            Ok(Ok(loaded)) => {
                log_problems(&loaded);
                tracing::info!(
                    dir = %dir.display(),
                    revision = loaded.revision,
                    resources = loaded.resource_count(),
                    problems = loaded.problems.len(),
                    "manifest folder reloaded"
                );
                if tx.send(Arc::new(loaded)).is_err() {
                    return;
                }
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "manifest folder reload failed; keeping the previous snapshot");
            }
            Err(error) => {
                tracing::error!(%error, "manifest folder reload panicked; keeping the previous snapshot");
            }
        }
    }
}

fn log_problems(loaded: &Loaded) {
    for problem in &loaded.problems {
        tracing::warn!(%problem, "manifest problem");
    }
}

/// Whether an event may change what the folder defines. Our own reads (open, close without
/// write) are not changes and would otherwise make every reload trigger the next one; editor
/// swap and backup files are not manifests.
fn is_relevant(event: &DebouncedEvent) -> bool {
    if event.need_rescan() {
        return true;
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    event.paths.iter().any(|p| is_relevant_path(p))
}

/// A manifest; a path without an extension (a directory created, renamed or removed); or part of
/// the `..data` link swap with which Kubernetes updates a ConfigMap mounted as a volume.
fn is_relevant_path(path: &Path) -> bool {
    is_manifest_name(path)
        || path.extension().is_none()
        || path
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with(".."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::Event;
    use notify::event::{CreateKind, ModifyKind};
    use std::time::Instant;

    fn event(kind: EventKind, path: &str) -> DebouncedEvent {
        DebouncedEvent::new(
            Event::new(kind).add_path(PathBuf::from(path)),
            Instant::now(),
        )
    }

    #[test]
    fn relevance() {
        let create = EventKind::Create(CreateKind::File);
        assert!(is_relevant(&event(create, "/m/a.yaml")));
        assert!(is_relevant(&event(create, "/m/sub")));
        assert!(is_relevant(&event(create, "/m/..data_tmp")));
        assert!(!is_relevant(&event(create, "/m/.a.yaml.swp")));
        assert!(!is_relevant(&event(create, "/m/a.yaml~")));
        assert!(!is_relevant(&event(
            EventKind::Modify(ModifyKind::Any),
            "/m/a.yaml.tmp"
        )));
        assert!(!is_relevant(&event(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            "/m/a.yaml"
        )));
        assert!(is_relevant(&event(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            "/m/a.yaml"
        )));
    }
}
