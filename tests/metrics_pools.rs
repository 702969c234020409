//! Read routing (CQRS): with `readUrlSecretRef`, reads go to the replica's pool and
//! `?consistency=strong` to the primary's; writes always go to the primary. Each pool is
//! measured under its own `pool` label.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn stream_with_replica(name: &str, read_secret: &str) -> String {
    stream_yaml(name, &unique("weir.test.rr."), "").replace(
        "store: {urlSecretRef: {name: pg, key: url}}",
        &format!(
            "store: {{urlSecretRef: {{name: pg, key: url}}, readUrlSecretRef: {{name: {read_secret}, key: url}}, \
             pool: {{connectTimeout: 1s}}}}"
        ),
    )
}

fn secret(name: &str, url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: test}}\nstringData: {{url: \"{url}\"}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_go_to_the_replica_unless_strong_and_writes_to_the_primary() {
    let db = fresh_database().await;
    let db_name = db.rsplit('/').next().unwrap().to_string();
    let m = Manifests::new(&db);
    // A replica that does not answer: eventual reads fail, strong reads and writes do not.
    let dead = format!("postgres://postgres@127.0.0.1:{}/{db_name}", free_port());
    m.write("read-dead.yaml", &secret("pg-dead", &dead));
    m.write("dead.yaml", &stream_with_replica("dead", "pg-dead"));
    // A replica that is the same database under another host name: reads answer from it.
    let alias = format!("postgres://postgres@localhost:5432/{db_name}");
    m.write("read-alias.yaml", &secret("pg-alias", &alias));
    m.write("alias.yaml", &stream_with_replica("alias", "pg-alias"));
    let w = Weir::start(m.path());
    // Store provisioned (reads and stored publishes need no broker).
    for stream in ["dead", "alias"] {
        let url = format!("{}?consistency=strong", w.events_url("test", stream));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while common::http_get(&url)
            .await
            .map(|r| r.status().as_u16())
            .ok()
            != Some(200)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{stream}: {}",
                w.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let c = common::http();
    for stream in ["dead", "alias"] {
        let r = c
            .post(w.events_url("test", stream))
            .json(&json!({"type": "t", "id": "e1", "subject": "s", "data": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "writes go to the primary");
    }

    let dead_url = w.events_url("test", "dead");
    let r = c
        .get(format!("{dead_url}/1"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "an eventual read goes to the (unreachable) replica"
    );
    for path in ["/1?consistency=strong", "?consistency=strong", ""] {
        let u = if path.is_empty() {
            format!(
                "{}/v1/namespaces/test/streams/dead/subjects/s/events?consistency=strong",
                w.url
            )
        } else {
            format!("{dead_url}{path}")
        };
        let r = c.get(&u).send().await.unwrap();
        assert_eq!(r.status(), 200, "{u}: a strong read goes to the primary");
    }
    let r = c
        .get(format!("{dead_url}/1?consistency=sometimes"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let alias_url = w.events_url("test", "alias");
    for u in [
        format!("{alias_url}/1"),
        format!("{alias_url}?from=1"),
        format!(
            "{}/v1/namespaces/test/streams/alias/subjects/s/events",
            w.url
        ),
    ] {
        let r = c.get(&u).send().await.unwrap();
        assert_eq!(r.status(), 200, "{u}");
        let body = r.text().await.unwrap();
        assert!(body.contains("\"e1\""), "{u}: {body}");
    }

    // Both read pools exist beside the primary's, labelled without credentials.
    let text = w.metrics().await;
    for label in [
        format!("127.0.0.1:5432/{db_name}"),
        format!("localhost:5432/{db_name}"),
    ] {
        assert!(
            text.contains(&format!(r#"weir_db_waiting{{pool="{label}"}}"#)),
            "{label}: {text}"
        );
    }
    assert!(
        text.contains("weir_db_acquire_timeouts_total{pool=\"127.0.0.1:"),
        "{text}"
    );
}

/// A TCP proxy to PostgreSQL on a fixed local port that can be cut and restored.
struct Proxy {
    port: u16,
    stop: tokio_util::sync::CancellationToken,
}

impl Proxy {
    async fn start() -> Proxy {
        let mut p = Proxy {
            port: free_port(),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        p.restore().await;
        p
    }

    fn cut(&mut self) {
        self.stop.cancel();
    }

    async fn restore(&mut self) {
        self.stop = tokio_util::sync::CancellationToken::new();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind proxy");
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
    }
}

/// The database the pool's connections reach now (`None` while none answers).
async fn reached(store: &weir::data::store::Store) -> Option<String> {
    let q = sqlx::query_scalar::<_, String>("SELECT current_database()").fetch_one(store.pool());
    tokio::time::timeout(Duration::from_secs(2), q)
        .await
        .ok()?
        .ok()
}

async fn until_reached(store: &weir::data::store::Store, db: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        if reached(store).await.as_deref() == Some(db) {
            eprintln!(
                "reached {db} after {:?}",
                within - (deadline - std::time::Instant::now())
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never reached {db}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn plan(urls: Vec<String>, read_urls: Option<Vec<String>>) -> weir::topology::StorePlan {
    weir::topology::StorePlan {
        urls,
        read_urls,
        pool: weir::topology::PoolPlan {
            size: 1,
            max_connections: 4,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
        },
        tls: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_fail_over_writes_stay_and_reads_fail_back() {
    let one = fresh_database().await;
    let two = fresh_database().await;
    let name = |u: &str| u.rsplit('/').next().unwrap().to_string();
    let (n1, n2) = (name(&one), name(&two));
    let mut proxy = Proxy::start().await;
    let via_proxy = format!("postgres://postgres@127.0.0.1:{}/{n1}", proxy.port);
    let pools = weir::data::store::pools::Pools::new(weir::metrics::Metrics::new());

    // The first URL does not answer: the write side moves to the next one.
    let dead = format!("postgres://postgres@127.0.0.1:{}/{n1}", free_port());
    let p = plan(vec![dead, two.clone()], None);
    let store = pools.store_for(&p).unwrap();
    until_reached(&store, &n2, Duration::from_secs(30)).await;

    // Write and read pools over [proxy → one, two], both starting on one.
    let w = pools
        .store_for(&plan(vec![via_proxy.clone(), two.clone()], None))
        .unwrap();
    // (Another URL string for the same server: pools are per distinct URL.)
    let read_via_proxy = format!("{via_proxy}?application_name=weir-reader");
    let r = pools
        .read_store_for(&plan(
            vec![one.clone()],
            Some(vec![read_via_proxy, two.clone()]),
        ))
        .unwrap()
        .unwrap();
    until_reached(&w, &n1, Duration::from_secs(30)).await;
    until_reached(&r, &n1, Duration::from_secs(30)).await;

    proxy.cut();
    until_reached(&w, &n2, Duration::from_secs(30)).await;
    until_reached(&r, &n2, Duration::from_secs(30)).await;

    proxy.restore().await;
    // Reads fail back to the preferred first URL; writes stay on the new primary.
    until_reached(&r, &n1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    for _ in 0..5 {
        assert_eq!(
            reached(&w).await.as_deref(),
            Some(n2.as_str()),
            "writes stay"
        );
    }
}
