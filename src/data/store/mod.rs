//! The PostgreSQL event store: appends with gap-free positions, per-subject versions and
//! dedup; reads by position, range and subject (time travel); the relay's checkpoint.

mod append;
pub(crate) mod archived;
pub use archived::block_weight;
mod codec;
mod keys;
pub use keys::SubjectKey;
pub mod locks;
pub mod notify;
pub mod pools;
mod progress;
pub mod tls;
pub use progress::Progress;
mod read;
pub mod segments;

pub use append::{
    AppendChain, AppendInput, AppendPath, AppendReport, Appended, Conflict, LOOKUP_SQL,
    PayloadBytes, RequestOutcome,
};
pub use codec::MAX_DECOMPRESSED_BYTES;
pub(crate) use codec::{decode_row, event_columns};

use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

/// Errors of the event store. `Unavailable` is transient (retry, answer 503); the others are not.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("schema migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored event at position {position} cannot be decoded: {message}")]
    Corrupt { position: i64, message: String },
    #[error("archive segment {segment} is damaged at byte {offset}: {message}")]
    ArchiveCorrupt {
        segment: String,
        offset: u64,
        message: String,
    },
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) {
            StoreError::Unavailable(e)
        } else {
            StoreError::Database(e)
        }
    }
}

/// Connection trouble, server shutdown and serialisation conflicts are worth retrying;
/// constraint violations and SQL errors are not.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08: connection exception; 40001/40P01: serialization failure/deadlock;
            // 57P01-03: admin shutdown, crash shutdown, cannot connect now; 53300: too many
            // connections; 25006: read-only transaction (a standby after failover).
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300" | "25006"
                )
        }
        _ => false,
    }
}

/// A handle on one event-store database (shared by every stream that names it).
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    stats: Option<Arc<PoolStats>>,
    /// Caches for reads of archived events (shared by the clones of this handle).
    pub(crate) archive: Arc<archived::ArchiveReader>,
    shared: Arc<Shared>,
}

/// Stream and subscription set-ups of one database running at once in this process. Each
/// holds a pool connection for a few statements; 4 of the default 10 leave the rest to
/// appends and reads while a thousand resources come up.
pub const PROVISION_SLOTS: usize = 4;
/// Archive runs of one database at once in this process. A run holds a connection of its
/// own (its lock and its work) for as long as it moves segments; two keep the disk busy
/// without N policies due in the same minute opening N connections.
pub const ARCHIVE_SLOTS: usize = 2;

/// What every stream of one database shares in this process: the sessions that are one per
/// database (notifications, locks), the bounds on set-up and archive work, the migration, and
/// the database's health as the pool's health check last saw it.
#[derive(Debug)]
struct Shared {
    notifier: notify::Notifier,
    locks: locks::Locks,
    provision: Arc<tokio::sync::Semaphore>,
    archive_slots: Arc<tokio::sync::Semaphore>,
    migrated: tokio::sync::OnceCell<()>,
    /// `None` while the database answers, else why not.
    health: tokio::sync::watch::Sender<Option<String>>,
}

impl Shared {
    fn new(pool: &PgPool) -> Shared {
        Shared {
            notifier: notify::Notifier::new(pool.clone()),
            locks: locks::Locks::new(pool.clone()),
            provision: Arc::new(tokio::sync::Semaphore::new(PROVISION_SLOTS)),
            archive_slots: Arc::new(tokio::sync::Semaphore::new(ARCHIVE_SLOTS)),
            migrated: tokio::sync::OnceCell::new(),
            health: tokio::sync::watch::channel(None).0,
        }
    }
}

/// The instruments of one pool (`weir_db_*{pool}`), fed by [`Store::acquire`].
pub struct PoolStats {
    pub waiting: prometheus::IntGauge,
    pub acquire: prometheus::Histogram,
    pub timeouts: prometheus::IntCounter,
}

impl std::fmt::Debug for PoolStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolStats").finish_non_exhaustive()
    }
}

/// Counts a task as waiting for a connection until dropped (also when the wait is cancelled).
struct Waiting<'a>(&'a prometheus::IntGauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The embedded migrations (`migrations/`), applied at start-up. sqlx takes an advisory
/// lock while migrating, so several processes starting at once are safe.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Store {
    pub fn new(pool: PgPool) -> Store {
        Store {
            shared: Arc::new(Shared::new(&pool)),
            pool,
            stats: None,
            archive: Arc::default(),
        }
    }

    /// A store whose connection acquisitions are measured.
    pub fn with_stats(pool: PgPool, stats: Arc<PoolStats>) -> Store {
        Store {
            shared: Arc::new(Shared::new(&pool)),
            pool,
            stats: Some(stats),
            archive: Arc::default(),
        }
    }

    /// The database's notification session (one per database and process).
    pub fn notifier(&self) -> &notify::Notifier {
        &self.shared.notifier
    }

    /// The database's lock session (one per database and process).
    pub fn locks(&self) -> &locks::Locks {
        &self.shared.locks
    }

    /// A set-up slot of this database (see [`PROVISION_SLOTS`]).
    pub async fn provision_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        // The semaphore is never closed.
        loop {
            if let Ok(p) = self.shared.provision.clone().acquire_owned().await {
                return p;
            }
        }
    }

    /// An archive slot of this database (see [`ARCHIVE_SLOTS`]).
    pub async fn archive_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        loop {
            if let Ok(p) = self.shared.archive_slots.clone().acquire_owned().await {
                return p;
            }
        }
    }

    /// Why the database does not answer, if the pool's health check says so.
    pub fn unavailable(&self) -> Option<String> {
        self.shared.health.borrow().clone()
    }

    /// The database's health, to wait for a change.
    pub fn health(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.shared.health.subscribe()
    }

    /// Records what the pool's health check saw; answers whether it changed.
    pub(crate) fn set_health(&self, error: Option<String>) -> bool {
        self.shared.health.send_if_modified(|h| {
            if *h == error {
                return false;
            }
            *h = error;
            true
        })
    }

    /// Stops the per-database sessions (shutdown, with the pool).
    pub async fn close(&self) {
        self.shared.notifier.close();
        self.shared.locks.close();
        self.pool.close().await;
    }

    /// A connection from the pool: time to acquire, waiters and timeouts are measured.
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        let Some(stats) = &self.stats else {
            return Ok(self.pool.acquire().await?);
        };
        stats.waiting.inc();
        let waiting = Waiting(&stats.waiting);
        let started = std::time::Instant::now();
        let r = self.pool.acquire().await;
        drop(waiting);
        stats.acquire.observe(started.elapsed().as_secs_f64());
        if matches!(r, Err(sqlx::Error::PoolTimedOut)) {
            stats.timeouts.inc();
        }
        Ok(r?)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations once per database and process (every stream of the database
    /// calls this; the first to get here migrates, the others wait for it; a failure is
    /// tried again by the next caller).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.shared
            .migrated
            .get_or_try_init(|| async {
                MIGRATOR.run(&self.pool).await?;
                Ok::<_, StoreError>(())
            })
            .await?;
        Ok(())
    }

    /// The stream's id in this database, creating its rows on first use.
    pub async fn ensure_stream(&self, namespace: &str, name: &str) -> Result<i64, StoreError> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO weir_streams (namespace, name) VALUES ($1, $2)
             ON CONFLICT (namespace, name) DO UPDATE SET name = EXCLUDED.name
             RETURNING stream_id",
        )
        .bind(namespace)
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        sqlx::query(
            "INSERT INTO weir_relay_checkpoints (stream_id) VALUES ($1) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// The last stored position (0 for an empty stream).
    pub async fn head(&self, stream_id: i64) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT head FROM weir_streams WHERE stream_id = $1")
                .bind(stream_id)
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or(0),
        )
    }

    /// Removes a stream's events, dedup keys, subjects and checkpoint (deletionPolicy Delete).
    pub async fn delete_stream(&self, namespace: &str, name: &str) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM weir_streams WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
