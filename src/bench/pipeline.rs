//! A private `weir run` pipeline for one benchmark: a fresh database, fresh exchanges, a
//! child process of this binary, all removed on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection as _;

use super::BenchError;

pub struct Pipeline {
    child: Option<Child>,
    pub url: String,
    pub admin: String,
    db_name: String,
    admin_db_url: String,
    dir: tempfile::TempDir,
    pub suffix: String,
}

/// A loopback port for a child process to listen on, free when this returns.
///
/// Not a port the kernel hands out for `bind(0)`: those come from the ephemeral range, which
/// outgoing connections (to PostgreSQL, RabbitMQ, the sinks) draw from too, so one of them
/// could take the port between this pick and the child's bind ("Address already in use").
/// Below the range (Linux's default starts at 32768) only listeners take ports. A per-process
/// counter, started at a point set by the pid, keeps one process's picks distinct; the bind
/// check skips ports already listened on. The window stays clear of RabbitMQ's
/// 15671/15672/15692 and 25672, which must be free when the broker restarts.
pub fn listen_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 16_000;
    const SPAN: u32 = 9_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        // Below 25,000: the sum fits in a u16.
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {LOW}..{}", LOW + SPAN),
    ))
}

/// The URL of database `name` on the server of `url`.
pub fn with_database(url: &str, name: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && !url[..i].ends_with('/') => {
            format!("{}/{name}", &url[..i])
        }
        _ => format!("{}/{name}", url.trim_end_matches('/')),
    }
}

/// A fresh database for one benchmark run (its name carries the run's suffix).
pub struct Database {
    pub url: String,
    pub name: String,
    pub suffix: String,
}

impl Database {
    pub async fn create(pg_url: &str) -> Result<Database, BenchError> {
        let suffix = format!("{:x}", rand::random::<u32>());
        let name = format!("weir_bench_{suffix}");
        let mut admin = sqlx::PgConnection::connect(pg_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        Ok(Database {
            url: with_database(pg_url, &name),
            name,
            suffix,
        })
    }
}

impl Pipeline {
    /// The worker's `/metrics` text, or `None` when it does not answer.
    pub async fn metrics_text(&self) -> Option<String> {
        crate::tls_provider::http_client()
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// Creates the database, writes the manifests and starts `weir run`. `streams` is YAML
    /// appended after the Secrets (EventStreams in namespace `bench`).
    pub async fn start(
        pg_url: &str,
        amqp_url: &str,
        streams: impl Fn(&str) -> String,
    ) -> Result<Pipeline, BenchError> {
        let db = Database::create(pg_url).await?;
        Self::start_on(db, pg_url, amqp_url, streams).await
    }

    /// Starts `weir run` on a database prepared by the caller.
    pub async fn start_on(
        db: Database,
        pg_url: &str,
        amqp_url: &str,
        streams: impl Fn(&str) -> String,
    ) -> Result<Pipeline, BenchError> {
        let Database {
            url: db_url,
            name: db_name,
            suffix,
        } = db;
        let dir = tempfile::tempdir()?;
        let manifests = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: bench}}\nstringData: {{url: \"{amqp_url}\"}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: pg, namespace: bench}}\nstringData: {{url: \"{db_url}\"}}\n---\n{}",
            streams(&suffix)
        );
        std::fs::write(dir.path().join("bench.yaml"), manifests)?;
        let (port, admin_port) = (listen_port()?, listen_port()?);
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .arg("run")
            .arg("-f")
            .arg(dir.path())
            // A manifest the benchmark removes (a subscription) takes its queues with it.
            .arg("--prune")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin_port}"))
            // The benchmark's sinks listen on this machine's loopback.
            .arg("--allow-loopback-sinks")
            // lapin logs every channel the broker closes at ERROR, including the expected
            // NOT_FOUND answers to the passive declares Weir makes when it removes a
            // subscription; Weir reports real broker failures itself.
            .env("RUST_LOG", "error,lapin::channel=off")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Pipeline {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            db_name,
            admin_db_url: pg_url.to_string(),
            dir,
            suffix,
        })
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the child has exited (it should run until [`Pipeline::stop`]).
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>, BenchError> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    pub fn events_url(&self, stream: &str) -> String {
        format!("{}/v1/namespaces/bench/streams/{stream}/events", self.url)
    }

    /// Adds (or replaces) a manifest file in the watched folder; the pipeline applies it live.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<(), BenchError> {
        Ok(std::fs::write(self.dir.path().join(file), yaml)?)
    }

    /// Removes a manifest file: the pipeline deletes its resources (and, with
    /// `deletionPolicy: Delete`, their queues).
    pub fn remove_manifest(&self, file: &str) -> Result<(), BenchError> {
        Ok(std::fs::remove_file(self.dir.path().join(file))?)
    }

    /// Waits up to `limit` until no resource named `name` is listed any more; false if it
    /// still is.
    pub async fn wait_gone(&self, name: &str, limit: Duration) -> bool {
        let client = crate::tls_provider::http_client();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(r) = client.get(format!("{}/v1/status", self.admin)).send().await
                && let Ok(v) = r.json::<serde_json::Value>().await
                && v["resources"]
                    .as_array()
                    .is_some_and(|rs| !rs.iter().any(|r| r["name"] == name))
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Waits until every listed stream reports Ready.
    pub async fn wait_ready(&self, streams: &[&str]) -> Result<(), BenchError> {
        let client = crate::tls_provider::http_client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{}/v1/status", self.admin)).send().await
                && let Ok(v) = r.json::<serde_json::Value>().await
            {
                let ready = |name: &str| {
                    v["resources"].as_array().is_some_and(|rs| {
                        rs.iter().any(|r| r["name"] == name && r["ready"] == true)
                    })
                };
                if streams.iter().all(|s| ready(s)) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(BenchError::Pipeline(
                    "the pipeline did not become ready in 60 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the child and drops the database.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait()?.is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut admin = sqlx::PgConnection::connect(&self.admin_db_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.db_name
        )))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_urls() {
        assert_eq!(
            super::with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            super::with_database("postgres://u@h:1", "x"),
            "postgres://u@h:1/x"
        );
    }
}
