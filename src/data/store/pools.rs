//! One connection pool per distinct database, shared by every stream that names it.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{Store, StoreError};
use crate::topology::StorePlan;

#[derive(Default)]
pub struct Pools {
    /// Keyed by the (first) write URL. Pools are created lazily and never block on the
    /// database: a store that is down at start-up is retried by its stream, not by us.
    stores: Mutex<HashMap<String, Store>>,
}

impl Pools {
    /// The store for a plan's primary URL, creating its pool on first use. The first plan to
    /// name a URL sets the pool's size; later plans share it.
    pub fn store_for(&self, plan: &StorePlan) -> Result<Store, StoreError> {
        let url = plan.urls.first().cloned().unwrap_or_default();
        // The lock only guards the map; no await happens under it.
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stores.get(&url) {
            return Ok(s.clone());
        }
        let opts = PgConnectOptions::from_str(&url).map_err(StoreError::Database)?;
        let pool: PgPool = PgPoolOptions::new()
            .max_connections(plan.pool.max_connections.max(1))
            .min_connections(plan.pool.size.min(plan.pool.max_connections))
            .idle_timeout(Some(plan.pool.idle_timeout))
            .acquire_timeout(plan.pool.connect_timeout)
            .test_before_acquire(false)
            .connect_lazy_with(opts);
        let store = Store::new(pool);
        stores.insert(url, store.clone());
        Ok(store)
    }

    /// Closes every pool (graceful shutdown, after the batchers have flushed).
    pub async fn close_all(&self) {
        let stores: Vec<Store> = {
            let stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
            stores.values().cloned().collect()
        };
        for s in stores {
            s.pool().close().await;
        }
    }

    /// `(url-free label, pool)` pairs for metrics.
    pub fn snapshot(&self) -> Vec<(String, PgPool)> {
        let stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        stores
            .iter()
            .map(|(url, s)| (pool_label(url), s.pool().clone()))
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
