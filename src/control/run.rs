//! Wiring of `weir operator`: the Kubernetes watch feeds the topology, the topology feeds the
//! same data plane as standalone mode, and the HTTP servers serve until the shutdown signal.
//!
//! Startup: admin port first (`/readyz` answers 503), then wait for the four CRDs to be
//! established, then the Lease, the status writer and the controllers.
//! Shutdown (SIGTERM): the controllers stop taking work, ingest stops accepting and answers
//! what is in flight, subscriptions finish their deliveries, batchers drain, pools close,
//! queued statuses are written, then the Lease is released and the admin port closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::api::{ArchivePolicy, CachePolicy, EventStream, Subscription};
use crate::control::ControlError;
use crate::control::context::{Context, Settings, Stores, reporter};
use crate::control::leader::{self, LeaseConfig};
use crate::control::reconcile::{WeirResource, error_policy, reconcile};
use crate::control::refs::RefCache;
use crate::control::status_writer::{self, StatusQueue};
use crate::topology::Defaults;

/// Settings of `weir operator`.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    pub worker: crate::app::WorkerConfig,
    pub admin_listen: SocketAddr,
    /// TokenReview audience of admin API bearer tokens.
    pub admin_token_audience: String,
    pub lease: LeaseConfig,
    /// Resync of valid resources and maximum age of cached Secrets.
    pub refresh: Duration,
    /// Label selector of the worker Pods (Subscriptions' `status.selector`).
    pub pod_selector: String,
    /// Capacity of the status queue.
    pub status_queue: usize,
    /// Reconciles running at once per kind and namespace. Each one applies the whole
    /// topology under one lock, so more would only queue; 4 lets status work of several
    /// objects overlap the API round-trips.
    pub concurrency: u16,
}

/// Runs operator mode until `shutdown` is cancelled.
pub async fn run(
    cfg: OperatorConfig,
    defaults: Defaults,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    run_with_client(client, cfg, defaults, shutdown).await
}

/// [`run`] with a given client (tests point it at a test API server).
pub async fn run_with_client(
    client: Client,
    cfg: OperatorConfig,
    defaults: Defaults,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The API server authenticates service account tokens (TokenReview) for
    // `ingest.auth.mode: ServiceAccounts`.
    // Archive `volume` destinations must be volumes mounted into the Pod (the mount table
    // does not change during a Pod's life: read once).
    let defaults = Defaults {
        token_review: true,
        archive_mounts: Some(Arc::new(crate::topology::mounts::Mounts::read())),
        ..defaults
    };
    // One reviewer (and so one pair of caches) for the ingest and admin APIs.
    let reviewer: Arc<dyn crate::data::auth::Reviewer> =
        Arc::new(crate::control::review::KubeReviewer::new(client.clone()));
    // Admin first: liveness answers while the CRDs are awaited, readiness does not.
    let serving = crate::app::Serving::start(crate::app::ServeConfig {
        batch_queue: cfg.worker.batch_queue,
        listen: cfg.worker.listen,
        admin_listen: cfg.admin_listen,
        public_url: cfg.worker.public_url.clone(),
        reviewer: Some(reviewer.clone()),
        sinks: defaults.sinks.clone(),
        admin_auth: crate::admin::auth::AdminAuth::Kube {
            reviewer,
            audience: cfg.admin_token_audience.clone(),
        },
        server: cfg.worker.server,
    })
    .await?;

    let established = tokio::select! {
        r = wait_for_crds(&client) => r,
        _ = shutdown.cancelled() => {
            serving.stop_admin().await;
            return Ok(());
        }
    };
    established?;

    let leader_flag = Arc::new(AtomicBool::new(false));
    let (leader_tx, leader_rx) = watch::channel(false);
    let lease_stop = CancellationToken::new();
    let lease_task = leader::start(
        client.clone(),
        cfg.lease.clone(),
        leader_flag.clone(),
        leader_tx,
        lease_stop.clone(),
    )
    .await?;

    let endpoint_base = serving.endpoint_base.clone();
    let (running, ingest) = serving.serve_ingest(cfg.worker.request_timeout, shutdown.clone());
    let plane = running.plane.clone();
    let (status, status_rx) = StatusQueue::new(cfg.status_queue, &plane.engine.metrics.registry);
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(status_writer::run(
        client.clone(),
        status_rx,
        status.counter.clone(),
        leader_flag.clone(),
        writer_stop.clone(),
    ));

    // One controller per kind and namespace (or one per kind for all namespaces).
    let scopes: Vec<Option<String>> = if cfg.namespaces.is_empty() {
        vec![None]
    } else {
        cfg.namespaces.iter().cloned().map(Some).collect()
    };
    let wc = watcher::Config::default();
    // Woken when an object leaves a cache (see [`controller`]).
    let removed = Arc::new(Notify::new());
    let mut stream_ctls = Vec::new();
    let mut sub_ctls = Vec::new();
    let mut ap_ctls = Vec::new();
    let mut cp_ctls = Vec::new();
    let mut stores = Stores::default();
    for ns in &scopes {
        let es = controller(api::<EventStream>(&client, ns), &wc, &removed);
        stores.streams.push(es.store());
        stream_ctls.push(es);
        let subs = controller(api::<Subscription>(&client, ns), &wc, &removed);
        let sub_store = subs.store();
        stores.subscriptions.push(sub_store.clone());
        // A change of a stream (created, edited, being deleted) re-checks its subscriptions:
        // those naming it, and every one with a selector (a label added or removed changes
        // its set of streams either way).
        let subs = subs.watches(api::<EventStream>(&client, ns), wc.clone(), move |es| {
            let ns = es.namespace();
            let name = es.name_any();
            sub_store
                .state()
                .into_iter()
                .filter(|s| {
                    s.namespace() == ns
                        && (s.spec.stream_selector.is_some()
                            || s.spec.named_streams().any(|n| n == name))
                })
                .map(|s| ObjectRef::from_obj(s.as_ref()))
                .collect::<Vec<_>>()
        });
        sub_ctls.push(subs);
        let ap = controller(api::<ArchivePolicy>(&client, ns), &wc, &removed);
        stores.archive_policies.push(ap.store());
        ap_ctls.push(ap);
        let cp = controller(api::<CachePolicy>(&client, ns), &wc, &removed);
        stores.cache_policies.push(cp.store());
        cp_ctls.push(cp);
    }

    let syncs = crate::control::context::syncs_counter(&plane.engine.metrics.registry);
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter(Some(cfg.lease.identity.clone()))),
        client: client.clone(),
        builder: std::sync::Mutex::new(crate::topology::Builder::new(defaults)),
        plane,
        stores,
        refs: RefCache::default(),
        status,
        settings: Settings {
            refresh: cfg.refresh,
            endpoint_base,
            pod_selector: cfg.pod_selector.clone(),
            ..Settings::default()
        },
        leader: leader_flag,
        apply_lock: tokio::sync::Mutex::new(()),
        cleaned: std::sync::Mutex::new(Default::default()),
        failures: std::sync::Mutex::new(Default::default()),
        settling: std::sync::Mutex::new(Default::default()),
        last_sync: std::sync::Mutex::new(None),
        syncs,
    });

    // With no resource at all no reconcile runs: apply the (empty) topology once the caches
    // are filled, so that readiness reflects "loaded".
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::control::reconcile::sync(&ctx, None).await {
                tracing::warn!(error = %e, "initial apply");
            }
        });
    }

    // Objects that left a cache: apply the topology without them on this replica. No
    // reconcile runs for an object that is gone, and only the Lease holder runs the
    // finalizer's cleanup, so without this a replica would keep running a deleted
    // subscription, and a deleted ArchivePolicy or CachePolicy (no finalizer) would stay in
    // force everywhere.
    {
        let ctx = ctx.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = removed.notified() => {}
                    _ = stop.cancelled() => return,
                }
                // Several deletions in a burst (a namespace, `kubectl delete -f`) make one
                // apply: later notifications coalesce into the one permit `Notify` keeps.
                tokio::time::sleep(REMOVAL_SETTLE).await;
                if let Err(e) = crate::control::reconcile::sync(&ctx, None).await {
                    tracing::warn!(error = %e, "apply after a deletion");
                }
            }
        });
    }

    let config = kube::runtime::controller::Config::default().concurrency(cfg.concurrency);
    let mut runs = Vec::new();
    for c in stream_ctls {
        runs.push(drive(c, &ctx, &config, &leader_rx, &shutdown).boxed());
    }
    for c in sub_ctls {
        runs.push(drive(c, &ctx, &config, &leader_rx, &shutdown).boxed());
    }
    for c in ap_ctls {
        runs.push(drive(c, &ctx, &config, &leader_rx, &shutdown).boxed());
    }
    for c in cp_ctls {
        runs.push(drive(c, &ctx, &config, &leader_rx, &shutdown).boxed());
    }
    futures::future::join_all(runs).await;

    // Controllers are done (shutdown). Same order as standalone mode from here on; queued
    // statuses are written and the Lease released before the admin port closes.
    running.stop_data(ingest).await;
    writer_stop.cancel();
    let _ = writer.await;
    lease_stop.cancel();
    let _ = lease_task.await;
    running.stop_admin().await;
    Ok(())
}

/// How long after a deletion the topology is applied: long enough for the rest of a burst
/// of deletions to arrive, short enough that a deleted resource stops promptly.
const REMOVAL_SETTLE: Duration = Duration::from_millis(200);

/// A controller of `K` whose watch also wakes `removed` when an object leaves the cache: on a
/// deletion, and on a relist (objects deleted while the watch was down vanish then). The
/// reflector updates the cache before the event passes on, so the apply that follows sees the
/// cache without the object.
fn controller<K: WeirResource>(
    api: Api<K>,
    wc: &watcher::Config,
    removed: &Arc<Notify>,
) -> Controller<K> {
    let (reader, writer) = kube::runtime::reflector::store();
    let removed = removed.clone();
    let events = reflector(writer, watcher(api, wc.clone()))
        .inspect(move |event| {
            if matches!(
                event,
                Ok(watcher::Event::Delete(_)) | Ok(watcher::Event::InitDone)
            ) {
                removed.notify_one();
            }
        })
        .applied_objects();
    Controller::for_stream(events, reader)
}

fn api<K: WeirResource>(client: &Client, ns: &Option<String>) -> Api<K> {
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Every change of leadership, as a stream (a new holder writes every status at once).
fn leader_changes(rx: watch::Receiver<bool>) -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

async fn drive<K: WeirResource>(
    ctl: Controller<K>,
    ctx: &Arc<Context>,
    config: &kube::runtime::controller::Config,
    leader_rx: &watch::Receiver<bool>,
    shutdown: &CancellationToken,
) {
    let stop = shutdown.clone();
    ctl.with_config(config.clone())
        .reconcile_all_on(leader_changes(leader_rx.clone()))
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile::<K>, error_policy::<K>, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                // Watch errors (one malformed object, a dropped connection) are logged;
                // the watcher recovers by itself and never stops.
                tracing::debug!(kind = %K::KIND, error = %e, "controller");
            }
        })
        .await;
}

/// The four CRDs' names.
fn crd_names() -> Vec<String> {
    crate::api::crds::all()
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect()
}

/// Waits (polling with `get`, the only CRD verb Weir needs) until every Weir CRD reports
/// `Established=True`.
async fn wait_for_crds(client: &Client) -> Result<(), ControlError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut logged = false;
    loop {
        let mut missing = None;
        for name in crd_names() {
            let established = match api.get_opt(&name).await {
                Ok(Some(crd)) => crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True"),
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(error = %e, crd = %name, "reading CRD");
                    false
                }
            };
            if !established {
                missing = Some(name);
                break;
            }
        }
        match missing {
            None => {
                tracing::info!("CRDs established");
                return Ok(());
            }
            Some(name) => {
                if !logged {
                    tracing::info!(crd = %name, "waiting for the CRD to be established");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}
