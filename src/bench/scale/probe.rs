//! What the scale benchmark reads off the worker and its backends: PostgreSQL sessions,
//! RSS and CPU from `/proc`, the worker's AMQP sockets and RabbitMQ's channels on them.

use super::*;

/// Samples the worker's sessions on the benchmark database in the background (the maximum
/// is kept), and answers one-off samples. Connects to the server's admin database, so its
/// own session is never counted; one connection at most (`max_connections(1)`).
pub(super) struct PgSampler {
    pool: sqlx::PgPool,
    db: String,
    max: Arc<AtomicI64>,
    cancel: CancellationToken,
}

impl PgSampler {
    pub(super) fn spawn(pg_url: &str, db: &str) -> Result<PgSampler, BenchError> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(pg_url)?;
        let s = PgSampler {
            pool,
            db: db.to_string(),
            max: Arc::new(AtomicI64::new(-1)),
            cancel: CancellationToken::new(),
        };
        let (pool, db, max, cancel) = (
            s.pool.clone(),
            s.db.clone(),
            s.max.clone(),
            s.cancel.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(PG_SAMPLE) => {}
                }
                // A refused sample (the server out of connections) is simply missing.
                if let Ok(c) = count_sessions(&pool, &db).await {
                    max.fetch_max(c, Ordering::Relaxed);
                }
            }
        });
        Ok(s)
    }

    /// The most sessions seen so far; `None` if no sample succeeded.
    pub(super) fn max(&self) -> Option<i64> {
        Some(self.max.load(Ordering::Relaxed)).filter(|&v| v >= 0)
    }

    pub(super) async fn sample(&self) -> Option<i64> {
        count_sessions(&self.pool, &self.db).await.ok()
    }

    /// The sessions now, grouped by state and the start of their query, most first.
    pub(super) async fn breakdown(&self) -> Option<String> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT coalesce(state, '?'), left(regexp_replace(query, '\\s+', ' ', 'g'), 48),
                    count(*)
             FROM pg_stat_activity WHERE datname = $1 GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 8",
        )
        .bind(&self.db)
        .fetch_all(&self.pool)
        .await
        .ok()?;
        let total: i64 = rows.iter().map(|r| r.2).sum();
        let parts: Vec<String> = rows
            .iter()
            .map(|(state, q, c)| format!("{c} {state} `{q}`"))
            .collect();
        Some(format!("{total} ({})", parts.join(", ")))
    }

    pub(super) fn stop(&self) {
        self.cancel.cancel();
    }
}

pub(super) async fn count_sessions(pool: &sqlx::PgPool, db: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
        .bind(db)
        .fetch_one(pool)
        .await
}

/// `VmRSS` of a process, in KiB.
pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `utime + stime` of a process, in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    // Field 3 (state) is then index 0, utime (14) index 11, stime (15) index 12.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux this runs on).
pub(super) fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

pub(super) fn amqp_port(amqp_url: &str) -> u16 {
    amqp_url
        .parse::<lapin::uri::AMQPUri>()
        .map_or(5672, |u| u.authority.port)
}

/// Local ports of the process's established TCP connections to `remote_port`: its sockets
/// (`/proc/PID/fd`) matched by inode against its network namespace's TCP tables.
pub(super) fn socket_ports(pid: u32, remote_port: u16) -> Option<HashSet<u16>> {
    let mut inodes = HashSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if let Ok(target) = std::fs::read_link(e.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let mut ports = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl, local, remote, state (01 = ESTABLISHED), …, inode (index 9).
            if f.len() > 9
                && f[3] == "01"
                && port(f[2]) == Some(remote_port)
                && inodes.contains(f[9])
                && let Some(local) = port(f[1])
            {
                ports.insert(local);
            }
        }
    }
    Some(ports)
}

/// RabbitMQ's management API, for channel counts and the clean-up of the run's queues and
/// exchanges. At `WEIR_RABBITMQ_MANAGEMENT_URL` if set (as the worker's), else port 15672 of
/// the AMQP host, with the AMQP URL's credentials and vhost.
pub(super) struct Management {
    client: reqwest::Client,
    base: String,
    vhost: String,
    user: String,
    password: String,
}

impl Management {
    pub(super) fn for_amqp_url(amqp_url: &str) -> Option<Management> {
        let uri = amqp_url.parse::<lapin::uri::AMQPUri>().ok()?;
        let base = match std::env::var("WEIR_RABBITMQ_MANAGEMENT_URL") {
            Ok(v) if v == "off" => return None,
            Ok(v) => v.trim_end_matches('/').to_string(),
            // Like the broker's own lookups (data::broker::Management): HTTPS for amqps://.
            Err(_) if uri.scheme == lapin::uri::AMQPScheme::AMQPS => {
                format!("https://{}:15671", uri.authority.host)
            }
            Err(_) => format!("http://{}:15672", uri.authority.host),
        };
        let client = crate::tls_provider::http_client_builder()
            .timeout(MANAGEMENT_TIMEOUT)
            .build()
            .ok()?;
        Some(Management {
            client,
            base,
            vhost: encode(&uri.vhost),
            user: uri.authority.userinfo.username,
            password: uri.authority.userinfo.password,
        })
    }

    pub(super) async fn get(&self, path: &str) -> Result<serde_json::Value, BenchError> {
        Ok(self
            .client
            .get(format!("{}/api/{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Channels open on the connections whose client port is in `ports`.
    pub(super) async fn channels_on(&self, ports: &HashSet<u16>) -> Result<usize, BenchError> {
        let v = self
            .get(&format!(
                "vhosts/{}/channels?columns=connection_details",
                self.vhost
            ))
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter(|c| {
                c["connection_details"]["peer_port"]
                    .as_u64()
                    .is_some_and(|p| ports.contains(&(p as u16)))
            })
            .count())
    }

    /// Deletes the queues and exchanges whose name contains one of `needles`; how many.
    pub(super) async fn sweep(&self, needles: &[String]) -> Result<usize, BenchError> {
        let mut deleted = 0;
        for kind in ["queues", "exchanges"] {
            let v = self
                .get(&format!("{kind}/{}?columns=name", self.vhost))
                .await?;
            for name in v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|q| q["name"].as_str())
            {
                if !needles.iter().any(|n| name.contains(n.as_str())) {
                    continue;
                }
                let r = self
                    .client
                    .delete(format!(
                        "{}/api/{kind}/{}/{}",
                        self.base,
                        self.vhost,
                        encode(name)
                    ))
                    .basic_auth(&self.user, Some(&self.password))
                    .send()
                    .await?;
                if r.status().is_success() {
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }
}

pub(super) fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `(sum, count)` of `weir_topology_sync_seconds` by phase, from the worker's `/metrics`.
pub(super) async fn sync_phases(
    pipe: &super::Pipeline,
) -> Option<std::collections::BTreeMap<String, (f64, f64)>> {
    Some(parse_sync_phases(&pipe.metrics_text().await?))
}

/// The `_sum` and `_count` samples of `weir_topology_sync_seconds{phase}` in a scrape.
pub(super) fn parse_sync_phases(text: &str) -> std::collections::BTreeMap<String, (f64, f64)> {
    let mut out = std::collections::BTreeMap::<String, (f64, f64)>::new();
    for line in text.lines() {
        let (is_sum, rest) = if let Some(r) = line.strip_prefix("weir_topology_sync_seconds_sum{") {
            (true, r)
        } else if let Some(r) = line.strip_prefix("weir_topology_sync_seconds_count{") {
            (false, r)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(phase) = labels
            .strip_prefix("phase=\"")
            .and_then(|p| p.strip_suffix('"'))
        else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let e = out.entry(phase.to_string()).or_default();
        if is_sum {
            e.0 = v;
        } else {
            e.1 = v;
        }
    }
    out
}
