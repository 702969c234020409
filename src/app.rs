//! Wiring of `weir run`: the folder source feeds the topology, the topology feeds the
//! engine, and the HTTP servers serve until the shutdown signal.
//!
//! Shutdown order (invariant 6): stop accepting publishes and let in-flight requests get their
//! answers, drain the batchers, stop relays, close the pools, then stop the admin server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::data::auth::Reviewer;
use crate::data::delivery::{SinkGuard, SinkPolicy};
use crate::data::http::{self, HttpState};
use crate::data::plane::{Desired, Plane};
use crate::metrics::Metrics;
use crate::server::ServerLimits;
use crate::source::folder::Loaded;
use crate::topology::Defaults;

pub struct RunConfig {
    pub dir: PathBuf,
    pub prune: bool,
    pub worker: WorkerConfig,
    pub admin_listen: SocketAddr,
    /// The admin API's bearer token file (`--admin-token-file`); `None`: open, loopback only.
    pub admin_token_file: Option<PathBuf>,
}

/// The worker's ingest side, configured alike in both modes.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub listen: SocketAddr,
    /// How long a publish may wait for durability before it is answered 503.
    pub request_timeout: Duration,
    /// Base URL shown as the streams' endpoint in status.
    pub public_url: Option<String>,
    /// Requests each stream's batcher may queue.
    pub batch_queue: usize,
    /// Timeouts and connection cap of both HTTP servers.
    pub server: ServerLimits,
}

/// What both modes serve: the data plane with the ingest port bound and the admin server
/// already answering (liveness works while the control plane is still starting; readiness
/// waits for the first applied topology).
pub struct Serving {
    pub plane: Arc<Plane>,
    ingest_listener: tokio::net::TcpListener,
    /// Base URL shown as the streams' endpoint in status.
    pub endpoint_base: String,
    /// The operator's TokenReview/SubjectAccessReview client; `None` standalone.
    reviewer: Option<Arc<dyn Reviewer>>,
    server: ServerLimits,
    /// Cancel, then await `admin_server`, as the last step of a shutdown.
    admin_stop: CancellationToken,
    admin_server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The ingest server, started by [`Serving::serve_ingest`].
pub struct Ingest(tokio::task::JoinHandle<std::io::Result<()>>);

/// What [`Serving::start`] needs: the same in both modes, filled from each mode's config.
pub struct ServeConfig {
    /// Requests each stream's batcher may queue.
    pub batch_queue: usize,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Base URL shown as the streams' endpoint in status.
    pub public_url: Option<String>,
    /// The operator's TokenReview/SubjectAccessReview client; `None` standalone (the modes
    /// that need one are refused at validation there).
    pub reviewer: Option<Arc<dyn Reviewer>>,
    /// What sinks may reach beyond the sink guard's default.
    pub sinks: SinkPolicy,
    /// Who may use the admin API's protected endpoints.
    pub admin_auth: admin::auth::AdminAuth,
    /// Timeouts and caps of both HTTP servers.
    pub server: ServerLimits,
}

impl Serving {
    pub async fn start(cfg: ServeConfig) -> anyhow::Result<Serving> {
        let ServeConfig {
            batch_queue,
            listen,
            admin_listen,
            public_url,
            reviewer,
            sinks,
            admin_auth,
            server,
        } = cfg;
        let ingest_listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the ingest port {listen}"))?;
        let admin_listener = tokio::net::TcpListener::bind(admin_listen)
            .await
            .with_context(|| format!("binding the admin port {admin_listen}"))?;
        let local = ingest_listener.local_addr()?;
        let admin_local = admin_listener.local_addr()?;
        tracing::info!(ingest = %local, admin = %admin_local, admin_auth = ?admin_auth, "listening");
        // Sinks may never reach this worker's own ports (see the guard).
        let guard = SinkGuard::new(sinks, &[local.port(), admin_local.port()]);
        let endpoint_base = public_url.unwrap_or_else(|| format!("http://{local}"));
        let plane = Arc::new(Plane::new(
            Metrics::new(),
            batch_queue,
            endpoint_base.clone(),
            guard,
        ));

        let admin_stop = CancellationToken::new();
        let app = admin::router(AdminState {
            plane: plane.clone(),
            auth: admin_auth,
        });
        let stop = admin_stop.clone();
        let admin_server = tokio::spawn(async move {
            crate::server::serve(admin_listener, app, server, stop, "admin").await
        });
        Ok(Serving {
            plane,
            ingest_listener,
            endpoint_base,
            reviewer,
            server,
            admin_stop,
            admin_server,
        })
    }

    /// Starts answering publishes and reads; the server stops accepting when `shutdown` is
    /// cancelled and answers what is in flight.
    pub fn serve_ingest(
        self,
        request_timeout: Duration,
        shutdown: CancellationToken,
    ) -> (Running, Ingest) {
        let app = http::router(HttpState {
            engine: self.plane.engine.clone(),
            plane: self.plane.clone(),
            request_timeout,
            reviewer: self.reviewer.clone(),
            body_read_timeout: self.server.body_read_timeout,
            body_budget: Arc::new(crate::data::ingest::budget::BodyBudget::new(
                self.server.body_memory,
            )),
            followers: Arc::new(http::Followers::new(self.server.follow)),
            shutdown: shutdown.clone(),
        });
        let listener = self.ingest_listener;
        let server = self.server;
        let ingest = tokio::spawn(async move {
            crate::server::serve(listener, app, server, shutdown, "ingest").await
        });
        (
            Running {
                plane: self.plane,
                admin_stop: self.admin_stop,
                admin_server: self.admin_server,
            },
            Ingest(ingest),
        )
    }

    /// Stops the admin server (a shutdown before ingest ever started).
    pub async fn stop_admin(self) {
        self.admin_stop.cancel();
        let _ = self.admin_server.await;
    }
}

/// The plane and the admin server once ingest runs.
pub struct Running {
    pub plane: Arc<Plane>,
    admin_stop: CancellationToken,
    admin_server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Waits for ingest to stop (its shutdown token was cancelled) while subscriptions and
    /// archivers stop, then drains the streams and closes the pools. The server's graceful
    /// shutdown waits (up to the drain timeout) for in-flight requests, which wait for their
    /// batches to commit; started
    /// deliveries finish, and their replies reach the still-running batchers, before the
    /// streams drain.
    pub async fn stop_data(&self, ingest: Ingest) {
        let (ingest, (), ()) = tokio::join!(
            ingest.0,
            self.plane.subscriptions.shutdown(),
            self.plane.archives.shutdown()
        );
        match ingest {
            Ok(Err(e)) => tracing::warn!(error = %e, "ingest server"),
            Err(e) => tracing::warn!(error = %e, "ingest server task"),
            Ok(Ok(())) => {}
        }
        self.plane.engine.shutdown().await;
    }

    /// The last step of a shutdown: the admin port closes.
    pub async fn stop_admin(self) {
        self.admin_stop.cancel();
        let _ = self.admin_server.await;
        tracing::info!("stopped");
    }
}

/// Runs standalone mode until `shutdown` is cancelled.
pub async fn run(
    cfg: RunConfig,
    defaults: Defaults,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let admin_auth = standalone_admin_auth(cfg.admin_token_file.as_deref(), cfg.admin_listen)?;
    let serving = Serving::start(ServeConfig {
        batch_queue: cfg.worker.batch_queue,
        listen: cfg.worker.listen,
        admin_listen: cfg.admin_listen,
        public_url: cfg.worker.public_url.clone(),
        // Standalone has no API server to review tokens with: modes that need one are refused
        // at validation.
        reviewer: None,
        sinks: defaults.sinks.clone(),
        admin_auth,
        server: cfg.worker.server,
    })
    .await?;

    let watch_stop = shutdown.child_token();
    let mut rx = match crate::source::watch::spawn_folder_watch(
        cfg.dir.clone(),
        crate::source::watch::DEFAULT_DEBOUNCE,
        watch_stop.clone(),
    ) {
        Ok(rx) => rx,
        Err(e) => {
            serving.stop_admin().await;
            return Err(anyhow::Error::new(e)
                .context(format!("loading manifests from {}", cfg.dir.display())));
        }
    };
    let (running, ingest) = serving.serve_ingest(cfg.worker.request_timeout, shutdown.clone());

    let mut builder = crate::topology::Builder::new(defaults);
    loop {
        let loaded = rx.borrow_and_update().clone();
        apply(&loaded, &mut builder, &running.plane, cfg.prune).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = rx.changed() => if changed.is_err() { break },
        }
    }

    watch_stop.cancel();
    running.stop_data(ingest).await;
    running.stop_admin().await;
    Ok(())
}

/// The admin API's protection standalone: the token file when given (read once now, so a
/// missing or empty file stops the start rather than every later request); without one the
/// admin API is open, which is allowed only on a loopback address: anyone who reaches a wider
/// one could read dead-letter payloads and purge them.
fn standalone_admin_auth(
    token_file: Option<&std::path::Path>,
    admin_listen: SocketAddr,
) -> anyhow::Result<admin::auth::AdminAuth> {
    match token_file {
        Some(path) => {
            admin::auth::read_token_file(path).context("--admin-token-file")?;
            Ok(admin::auth::AdminAuth::TokenFile(path.to_path_buf()))
        }
        None if admin_listen.ip().is_loopback() => Ok(admin::auth::AdminAuth::Open),
        None => anyhow::bail!(
            "the admin listener {admin_listen} is not a loopback address and no admin token is \
             set: anyone who reaches it could read, redrive and purge dead letters. Set \
             --admin-token-file (WEIR_ADMIN_TOKEN_FILE), or bind it to 127.0.0.1 (the default)"
        ),
    }
}

/// Applies one snapshot of the folder: valid resources run, invalid ones keep their previous
/// version (and say why in status), absent ones stop. Problems are logged with the file and
/// document they come from.
async fn apply(
    loaded: &Loaded,
    builder: &mut crate::topology::Builder,
    plane: &Plane,
    prune: bool,
) {
    let metrics = &plane.engine.metrics;
    metrics.observe_sync("load", loaded.took);
    let started = std::time::Instant::now();
    let built = builder.build(&loaded.index);
    metrics.count_plans(builder.last);
    metrics.observe_sync("build", started.elapsed());
    for r in built.reports.iter().filter(|r| !r.is_valid()) {
        let origin = loaded
            .origins
            .get(&(r.kind, r.key.clone()))
            .map(|o| format!("{} doc {}: ", o.file.display(), o.doc))
            .unwrap_or_default();
        for p in &r.problems {
            tracing::warn!("{origin}{} {}: {p}", r.kind, r.key);
        }
    }
    for p in &loaded.problems {
        tracing::warn!("{p}");
    }
    let desired = Desired {
        built,
        broken: loaded.broken.clone(),
        deleting_streams: Default::default(),
        source_problems: loaded.problems.iter().map(ToString::to_string).collect(),
    };
    let started = std::time::Instant::now();
    let report = plane.apply(desired, prune).await;
    metrics.observe_sync("apply", started.elapsed());
    for e in report.stream_errors.values().chain(&report.errors) {
        tracing::error!(error = %e, "applying the topology");
    }
}
