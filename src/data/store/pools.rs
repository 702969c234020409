//! One connection pool per distinct database, shared by every stream that names it.
//!
//! Each pool is health-checked in the background: a connection is acquired (timed) and a
//! query run on it; a connection that fails the query is closed instead of going back to the
//! pool, so the pool replaces it. The first successful check compares the connections this
//! process may open to that server (the sum of its pools' `maxConnections`) with the server's
//! `max_connections` and warns when they do not fit.

use crate::poison::MutexExt;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::tls::{connect_options, tls_failure};
use super::{PoolStats, Store, StoreError};
use crate::metrics::Metrics;
use crate::topology::{PoolPlan, StorePlan, TlsPlan};

/// Interval of the pool health checks: often enough that `weir_db_pool_up` and the acquire
/// latency reflect an outage within seconds, rare enough to cost nothing.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Limit of the health query itself once a connection is held.
const HEALTH_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// `maxConnections` of every pool, by pool label, with the server (`host:port`) it targets.
type Budget = Arc<Mutex<HashMap<String, (String, u32)>>>;

#[derive(Default)]
pub struct Pools {
    /// Keyed by the (first) write URL and the TLS plan (two streams naming one URL with
    /// different CAs or client certificates must not share connections). Pools are created
    /// lazily and never block on the database: a store that is down at start-up is retried by
    /// its stream, not by us.
    stores: Mutex<HashMap<(String, TlsPlan), Store>>,
    /// Present in a running process: pools are measured and health-checked.
    metrics: Option<Metrics>,
    budget: Budget,
}

impl Pools {
    /// Pools whose stats go to `metrics` and that are health-checked (needs a Tokio runtime
    /// when the first pool is created).
    pub fn new(metrics: Metrics) -> Pools {
        Pools {
            metrics: Some(metrics),
            ..Pools::default()
        }
    }

    /// The store for a plan's primary URL, creating its pool on first use. The first plan to
    /// name a URL sets the pool's size; later plans share it.
    pub fn store_for(&self, plan: &StorePlan) -> Result<Store, StoreError> {
        self.store_for_url(&plan.urls, &plan.tls, &plan.pool, Role::Write)
    }

    /// The store for a plan's read replica (`readUrlSecretRef`), if it has one: reads that
    /// accept eventual consistency go there, writes never do. Its pool has the plan's sizes.
    pub fn read_store_for(&self, plan: &StorePlan) -> Result<Option<Store>, StoreError> {
        match plan.read_urls.as_deref() {
            Some(urls) if !urls.is_empty() => self
                .store_for_url(urls, &plan.tls, &plan.pool, Role::Read)
                .map(Some),
            _ => Ok(None),
        }
    }

    /// The pool is keyed and labelled by the first URL; the others are failover targets.
    fn store_for_url(
        &self,
        urls: &[String],
        tls: &TlsPlan,
        sizes: &PoolPlan,
        role: Role,
    ) -> Result<Store, StoreError> {
        let url = urls.first().cloned().unwrap_or_default();
        // The lock only guards the map; no await happens under it.
        let mut stores = self.stores.locked();
        let key = (url, tls.clone());
        if let Some(s) = stores.get(&key) {
            return Ok(s.clone());
        }
        let url = &key.0;
        let opts = connect_options(url, tls).map_err(StoreError::Database)?;
        let pool: PgPool = PgPoolOptions::new()
            .max_connections(sizes.max_connections.max(1))
            .min_connections(sizes.size.min(sizes.max_connections))
            .idle_timeout(Some(sizes.idle_timeout))
            .acquire_timeout(sizes.connect_timeout)
            .test_before_acquire(false)
            .connect_lazy_with(opts.clone());
        let label = pool_label(url);
        let store = match &self.metrics {
            Some(m) => {
                let stats = Arc::new(PoolStats {
                    waiting: m.db_waiting.with_label_values(&[label.as_str()]),
                    acquire: m.db_acquire_duration.clone(),
                    timeouts: m.db_acquire_timeouts.with_label_values(&[label.as_str()]),
                });
                let store = Store::with_stats(pool, stats);
                let server = format!("{}:{}", opts.get_host(), opts.get_port());
                self.budget
                    .locked()
                    .insert(label.clone(), (server.clone(), sizes.max_connections));
                let targets = urls
                    .iter()
                    .map(|u| connect_options(u, tls))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(StoreError::Database)?;
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(health(
                        store.clone(),
                        Check {
                            label,
                            server,
                            budget: self.budget.clone(),
                            up: m.db_pool_up.clone(),
                            lag: m.db_replica_lag.clone(),
                            connect_timeout: sizes.connect_timeout,
                            targets,
                            role,
                        },
                    ));
                }
                store
            }
            None => Store::new(pool),
        };
        stores.insert(key, store.clone());
        Ok(store)
    }

    /// Closes every pool (graceful shutdown, after the batchers have flushed).
    pub async fn close_all(&self) {
        let stores: Vec<Store> = {
            let stores = self.stores.locked();
            stores.values().cloned().collect()
        };
        for s in stores {
            s.close().await;
        }
    }

    /// `(url-free label, pool)` pairs for metrics.
    pub fn snapshot(&self) -> Vec<(String, PgPool)> {
        let stores = self.stores.locked();
        stores
            .iter()
            .map(|((url, _), s)| (pool_label(url), s.pool().clone()))
            .collect()
    }
}

/// A label for a pool that never leaks credentials: `host:port/database`.
pub fn pool_label(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("postgres")
        ),
        Err(_) => "invalid".to_string(),
    }
}

/// Which side of the store a pool serves; it decides how failover behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Needs a writable primary (`pg_is_in_recovery()` false). After a failover it stays on
    /// the new primary: moving back on its own could write to two primaries (split brain).
    Write,
    /// Any server that answers; prefers the first URL again as soon as it answers.
    Read,
}

/// What the health loop of one pool needs.
struct Check {
    label: String,
    server: String,
    budget: Budget,
    up: prometheus::IntGaugeVec,
    lag: prometheus::GaugeVec,
    connect_timeout: Duration,
    /// The pool's URLs in failover order (the first is where it starts).
    targets: Vec<PgConnectOptions>,
    role: Role,
}

/// After a failed check, the next comes sooner: failover should not wait a full interval.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The health check loop of one pool; ends when the pool is closed. With several URLs it
/// also fails over (and, for reads, back).
async fn health(store: Store, c: Check) {
    let up = c.up.with_label_values(&[c.label.as_str()]);
    let lag = c.lag.with_label_values(&[c.label.as_str()]);
    let mut budget_checked = false;
    let mut current = 0usize;
    while !store.pool().is_closed() {
        let checked = match tokio::time::timeout(c.connect_timeout, store.acquire()).await {
            Ok(Ok(mut conn)) => {
                // One round trip: the server's connection limit, whether it is a standby and
                // how far behind the primary its replay is.
                let q = sqlx::query_as::<_, (String, bool, f64)>(
                    "SELECT current_setting('max_connections'), pg_is_in_recovery(),
                            CASE WHEN pg_is_in_recovery()
                                 THEN COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8, 0)
                                 ELSE 0 END",
                );
                match tokio::time::timeout(HEALTH_QUERY_TIMEOUT, q.fetch_one(&mut *conn)).await {
                    Ok(Ok((max, standby, behind))) => {
                        lag.set(behind);
                        if !budget_checked {
                            budget_checked = true;
                            check_budget(&c.server, &c.budget, max.trim().parse().unwrap_or(0));
                        }
                        // A write pool on a standby is as good as down.
                        if standby && c.role == Role::Write {
                            Err("the server is a standby (read-only)".to_string())
                        } else {
                            Ok(())
                        }
                    }
                    Ok(Err(e)) => {
                        // A connection that cannot answer is not returned to the pool.
                        conn.close_on_drop();
                        Err(e.to_string())
                    }
                    Err(_) => {
                        conn.close_on_drop();
                        Err("the health query did not answer".to_string())
                    }
                }
            }
            // A failed handshake names the connection: "certificate verification failed" on
            // its own would not say which of a stream's URLs, or with which sslmode.
            Ok(Err(e)) => {
                Err(tls_failure(&store.pool().connect_options(), &e)
                    .unwrap_or_else(|| e.to_string()))
            }
            Err(_) => Err("no connection within the connect timeout".to_string()),
        };
        // A pool whose every connection is busy could not lend one to the check: that says
        // the pool is loaded, not that the database is down. The state stays as it was.
        let busy = checked.is_err()
            && store.pool().num_idle() == 0
            && store.pool().size() >= store.pool().options().get_max_connections();
        let ok = checked.is_ok() || (busy && store.unavailable().is_none());
        // Said once per change of state (or of the error), not once per check.
        let error = if busy {
            store.unavailable()
        } else {
            checked.err()
        };
        let was_down = store.unavailable().is_some();
        if store.set_health(error.clone()) {
            match &error {
                Some(e) => tracing::warn!(pool = %c.label, error = %e, "database unavailable"),
                None if was_down => tracing::info!(pool = %c.label, "database available again"),
                None => {}
            }
        }
        up.set(i64::from(ok));
        if c.targets.len() > 1 {
            let order: Vec<usize> = match (ok, c.role) {
                // Down: every other URL, in order after the current one.
                (false, _) => (1..c.targets.len())
                    .map(|k| (current + k) % c.targets.len())
                    .collect(),
                // Reads fail back to an earlier (preferred) URL once it answers.
                (true, Role::Read) => (0..current).collect(),
                (true, Role::Write) => Vec::new(),
            };
            for k in order {
                if usable(&c.targets[k], c.role, c.connect_timeout).await {
                    tracing::warn!(
                        pool = %c.label,
                        from = current + 1,
                        to = k + 1,
                        role = ?c.role,
                        "database failover: the pool now connects to URL #{} of its list",
                        k + 1
                    );
                    store.pool().set_connect_options(c.targets[k].clone());
                    current = k;
                    // Idle connections still point at the old server: close them.
                    // Bounded by the idle count: the pool may warm new ones meanwhile.
                    for _ in 0..store.pool().num_idle() {
                        let Some(mut conn) = store.pool().try_acquire() else {
                            break;
                        };
                        conn.close_on_drop();
                    }
                    break;
                }
            }
        }
        tokio::time::sleep(if ok { HEALTH_INTERVAL } else { RETRY_INTERVAL }).await;
    }
}

/// Whether a server answers and can serve `role` (a write needs a primary).
async fn usable(opts: &PgConnectOptions, role: Role, timeout: Duration) -> bool {
    use sqlx::Connection as _;
    let probe = async {
        let mut conn = sqlx::PgConnection::connect_with(opts).await?;
        let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await?;
        conn.close().await.ok();
        Ok::<_, sqlx::Error>(!(standby && role == Role::Write))
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(true)))
}

/// Warns when the pools of this process to `server` may open more connections than the
/// server accepts (every replica opens as many).
fn check_budget(server: &str, budget: &Budget, max_connections: u32) {
    if max_connections == 0 {
        return;
    }
    let (sum, pools) = {
        let b = budget.locked();
        let mine: Vec<(String, u32)> = b
            .iter()
            .filter(|(_, (s, _))| s == server)
            .map(|(l, (_, n))| (l.clone(), *n))
            .collect();
        (mine.iter().map(|(_, n)| *n).sum::<u32>(), mine)
    };
    if sum > max_connections {
        let list: Vec<String> = pools.iter().map(|(l, n)| format!("{l}={n}")).collect();
        tracing::warn!(
            server,
            max_connections,
            pools = %list.join(", "),
            "the database pools of this process may open {sum} connections to {server}, more than \
             its max_connections ({max_connections}); lower the streams' store.pool.maxConnections \
             (every replica opens as many)"
        );
    }
}
