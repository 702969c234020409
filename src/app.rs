//! Wiring of `weir run`: the folder source feeds the topology, the topology feeds the
//! engine, and the HTTP servers serve until the shutdown signal.
//!
//! Shutdown order (invariant 6): stop accepting publishes and let in-flight requests get their
//! answers, drain the batchers, stop relays, close the pools, then stop the admin server.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::data::archive::Archives;
use crate::data::engine::Engine;
use crate::data::http::{self, HttpState};
use crate::data::subscriptions::Subscriptions;
use crate::metrics::Metrics;
use crate::source::folder::Loaded;
use crate::status::StatusBoard;
use crate::topology::index::Kind;
use crate::topology::{Defaults, Key};

pub struct RunConfig {
    pub dir: PathBuf,
    pub prune: bool,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub request_timeout: Duration,
    /// Base URL shown as the streams' endpoint in status.
    pub public_url: Option<String>,
    /// Requests each stream's batcher may queue.
    pub batch_queue: usize,
}

/// What both modes serve: the data plane, subscriptions and the status board, with the
/// ingest port bound and the admin server already answering (liveness works while the
/// control plane is still starting; readiness waits for the first applied topology).
pub struct Serving {
    pub engine: Arc<Engine>,
    pub subscriptions: Arc<Subscriptions>,
    pub archives: Arc<Archives>,
    pub board: Arc<StatusBoard>,
    pub ingest_listener: tokio::net::TcpListener,
    /// Base URL shown as the streams' endpoint in status.
    pub endpoint_base: String,
    /// Cancel, then await `admin_server`, as the last step of a shutdown.
    pub admin_stop: CancellationToken,
    pub admin_server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Serving {
    pub async fn start(
        batch_queue: usize,
        listen: SocketAddr,
        admin_listen: SocketAddr,
        public_url: Option<String>,
    ) -> anyhow::Result<Serving> {
        let mut engine = Engine::new(Metrics::new());
        engine.limits.queue_requests = batch_queue.max(1);
        let engine = Arc::new(engine);
        let board = Arc::new(StatusBoard::default());
        let subscriptions = Arc::new(Subscriptions::new(engine.clone()));
        board.attach_subscriptions(subscriptions.clone());
        let archives = Arc::new(Archives::new(engine.clone()));
        board.attach_archives(archives.clone());

        let ingest_listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the ingest port {listen}"))?;
        let admin_listener = tokio::net::TcpListener::bind(admin_listen)
            .await
            .with_context(|| format!("binding the admin port {admin_listen}"))?;
        let local = ingest_listener.local_addr()?;
        tracing::info!(ingest = %local, admin = %admin_listener.local_addr()?, "listening");
        let endpoint_base = public_url.unwrap_or_else(|| format!("http://{local}"));

        let admin_stop = CancellationToken::new();
        let app = admin::router(AdminState {
            engine: engine.clone(),
            board: board.clone(),
            subscriptions: subscriptions.clone(),
            archives: archives.clone(),
        });
        let stop = admin_stop.clone();
        let admin_server = tokio::spawn(async move {
            axum::serve(admin_listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        Ok(Serving {
            engine,
            subscriptions,
            archives,
            board,
            ingest_listener,
            endpoint_base,
            admin_stop,
            admin_server,
        })
    }
}

/// Runs standalone mode until `shutdown` is cancelled.
pub async fn run(
    cfg: RunConfig,
    defaults: Defaults,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Serving {
        engine,
        subscriptions,
        archives,
        board,
        ingest_listener,
        endpoint_base,
        admin_stop,
        admin_server,
    } = Serving::start(
        cfg.batch_queue,
        cfg.listen,
        cfg.admin_listen,
        cfg.public_url.clone(),
    )
    .await?;

    let watch_stop = shutdown.child_token();
    let mut rx = crate::source::watch::spawn_folder_watch(
        cfg.dir.clone(),
        crate::source::watch::DEFAULT_DEBOUNCE,
        watch_stop.clone(),
    )
    .with_context(|| format!("loading manifests from {}", cfg.dir.display()))?;

    let ingest_server = {
        let app = http::router(HttpState {
            engine: engine.clone(),
            request_timeout: cfg.request_timeout,
        });
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(ingest_listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };

    loop {
        let loaded = rx.borrow_and_update().clone();
        apply(
            &loaded,
            &defaults,
            &engine,
            &subscriptions,
            &archives,
            &board,
            cfg.prune,
            &endpoint_base,
        )
        .await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = rx.changed() => if changed.is_err() { break },
        }
    }

    watch_stop.cancel();
    // Axum's graceful shutdown stops accepting and waits for in-flight requests, which wait
    // for their batches to commit.
    // Subscriptions stop taking messages at the same time; their started deliveries finish
    // (and replies reach the still-running batchers) before the streams drain and the pools
    // close.
    let (ingest, (), ()) =
        tokio::join!(ingest_server, subscriptions.shutdown(), archives.shutdown());
    match ingest {
        Ok(Err(e)) => tracing::warn!(error = %e, "ingest server"),
        Err(e) => tracing::warn!(error = %e, "ingest server task"),
        Ok(Ok(())) => {}
    }
    engine.shutdown().await;
    admin_stop.cancel();
    let _ = admin_server.await;
    tracing::info!("stopped");
    Ok(())
}

/// Applies one snapshot of the folder: valid resources run, invalid ones keep their previous
/// version (and say why in status), absent ones stop.
// Each argument is a separate part of the process the apply moves to the new topology.
#[allow(clippy::too_many_arguments)]
async fn apply(
    loaded: &Loaded,
    defaults: &Defaults,
    engine: &Engine,
    subscriptions: &Subscriptions,
    archives: &Archives,
    board: &StatusBoard,
    prune: bool,
    endpoint_base: &str,
) {
    let built = crate::topology::build::build(&loaded.index, defaults);
    let mut kept: BTreeSet<(Kind, Key)> = loaded.broken.clone();
    for r in &built.reports {
        if !r.problems.is_empty() {
            let origin = loaded
                .origins
                .get(&(r.kind, r.key.clone()))
                .map(|o| format!("{} doc {}: ", o.file.display(), o.doc))
                .unwrap_or_default();
            for p in &r.problems {
                tracing::warn!("{origin}{} {}: {p}", r.kind, r.key);
            }
            kept.insert((r.kind, r.key.clone()));
        }
    }
    for p in &loaded.problems {
        tracing::warn!("{p}");
    }
    let keep_streams: BTreeSet<Key> = kept
        .iter()
        .filter(|(k, _)| *k == Kind::EventStream)
        .map(|(_, key)| key.clone())
        .collect();
    for e in engine
        .apply(&built.topology.streams, &keep_streams, prune)
        .await
    {
        tracing::error!(error = %e, "applying the topology");
    }
    engine
        .caches
        .apply(&built.topology.cache_policies, &engine.streams());
    let keep_subscriptions: BTreeSet<Key> = kept
        .iter()
        .filter(|(k, _)| *k == Kind::Subscription)
        .map(|(_, key)| key.clone())
        .collect();
    for e in subscriptions
        .apply(&built.topology.subscriptions, &keep_subscriptions, prune)
        .await
    {
        tracing::error!(error = %e, "applying the subscriptions");
    }
    archives.apply(&built.topology.archive_policies);
    board.update(
        built.reports,
        kept,
        loaded.problems.iter().map(ToString::to_string).collect(),
        endpoint_base.to_string(),
    );
}
