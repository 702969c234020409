//! TLS to PostgreSQL (rustls on ring) against a PostgreSQL started by this test with
//! `ssl = on` and `hostssl`-only access, its server certificate (for `localhost` only) signed
//! by a CA made here with the `openssl` command:
//!
//! - `sslmode=verify-full` with `spec.store.tls.caSecretRef` stores and reads back through
//!   `weir run`, and every backend of that stream is encrypted (`pg_stat_ssl`);
//! - the same CA with a URL naming `127.0.0.1` (not in the certificate) fails verification,
//!   and the stream's status names the connection and says so;
//! - a client certificate (`clientCertSecretRef`) logs in where `pg_hba.conf` says `cert`;
//! - a CA that did not sign the server's certificate fails verification.
//!
//! Also an https sink trusted through `SSL_CERT_FILE` (reqwest on rustls).
//!
//! Skipped (passing, saying why) only when the PostgreSQL server binaries, `runuser` (as root)
//! or `openssl` are missing.

mod common;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::certs::{make_ca, make_leaf};
use common::pg::{PgRunner, pg_bin_dir, running_as_root};
use common::*;
use serde_json::{Value, json};

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"))
}

/// A PostgreSQL cluster with TLS only; stopped (immediately) when dropped.
struct TlsPostgres {
    pg: PgRunner,
    data: PathBuf,
    port: u16,
    log: PathBuf,
    /// Certificates and the cluster, removed last.
    root: tempfile::TempDir,
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        self.pg.stop_now(&self.data);
    }
}

/// The role that logs in with a client certificate (its CN).
const CERT_USER: &str = "weir_cert";

impl TlsPostgres {
    fn start(bin: PathBuf, as_postgres: bool) -> Option<TlsPostgres> {
        let root = tempfile::Builder::new()
            .prefix("weir-pgtls-")
            .tempdir()
            .expect("tempdir");
        let dir = root.path();
        make_ca(dir, "ca");
        make_ca(dir, "other-ca");
        make_leaf(
            dir,
            "ca",
            "server",
            "localhost",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
        );
        make_leaf(
            dir,
            "ca",
            "client",
            CERT_USER,
            "extendedKeyUsage=clientAuth",
        );
        let pg = PgRunner::in_dir(bin, as_postgres, dir);
        let data = dir.join("data");
        let log = dir.join("pg.log");
        let port = free_port();
        let data_s = data.to_string_lossy().to_string();
        pg.run(
            "initdb",
            &["-D", &data_s, "-U", "postgres", "--auth=trust", "--no-sync"],
        );
        // The server's key must be private to its owner, or PostgreSQL refuses to start.
        std::fs::set_permissions(
            dir.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod server.key");
        let d = dir.to_string_lossy();
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{d}'\n\
             max_connections = 40\nshared_buffers = 16MB\nssl = on\n\
             ssl_cert_file = '{d}/server.crt'\nssl_key_file = '{d}/server.key'\n\
             ssl_ca_file = '{d}/ca.crt'\n"
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .expect("postgresql.conf");
        // TLS only over TCP: no `host` line, so a plain-text connection is refused. The
        // certificate role must present a client certificate signed by ssl_ca_file.
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 hostssl all {CERT_USER} 127.0.0.1/32 cert\n\
                 hostssl all all 127.0.0.1/32 trust\n"
            ),
        )
        .expect("pg_hba.conf");
        let log_s = log.to_string_lossy().to_string();
        pg.run(
            "pg_ctl",
            &["-D", &data_s, "-l", &log_s, "-w", "-t", "60", "start"],
        );
        let me = TlsPostgres {
            pg,
            data,
            port,
            log,
            root,
        };
        me.psql(&format!("CREATE ROLE {CERT_USER} LOGIN"));
        me.psql(&format!("CREATE DATABASE weir_cert OWNER {CERT_USER}"));
        Some(me)
    }

    fn dir(&self) -> &Path {
        self.root.path()
    }

    /// Runs SQL through the Unix socket (the test's own session, not TLS).
    fn psql(&self, sql: &str) -> String {
        let d = self.dir().to_string_lossy().to_string();
        let port = self.port.to_string();
        let out = self.pg.run(
            "psql",
            &[
                "-h", &d, "-p", &port, "-U", "postgres", "-d", "postgres", "-At", "-c", sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A Secret whose keys hold multi-line text (PEM), as `stringData` block scalars.
fn secret_yaml(name: &str, keys: &[(&str, &str)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: test}}\nstringData:\n"
    );
    for (k, v) in keys {
        y.push_str(&format!("  {k}: |\n"));
        for line in v.lines() {
            y.push_str(&format!("    {line}\n"));
        }
    }
    y
}

/// A stored EventStream on the database URL of Secret `secret` with store `tls`.
fn tls_stream(name: &str, secret: &str, tls: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  \
         broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: {}}}\n  \
         store:\n    urlSecretRef: {{name: {secret}, key: url}}\n    tls: {tls}\n",
        unique("weir.test.tls.")
    )
}

/// The message of a stream's StoreReady condition once it is down and says `what`.
async fn store_failure(w: &Weir, stream: &str, what: &str) -> String {
    eventually(
        30,
        &format!("{stream} to report {what:?}"),
        || w.log_text(),
        || async {
            let v: Value = http_get(format!("{}/v1/status", w.admin))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let r = v["resources"]
                .as_array()?
                .iter()
                .find(|r| r["kind"] == "EventStream" && r["name"] == stream)?
                .clone();
            r["conditions"].as_array()?.iter().find_map(|c| {
                let m = c["message"].as_str().unwrap_or_default();
                (c["status"] == "False" && m.contains(what)).then(|| m.to_string())
            })
        },
    )
    .await
}

/// Publishes `n` events to `stream` and reads them back (ids in order).
async fn publish_and_read(w: &mut Weir, stream: &str, n: usize) {
    w.wait_readable("test", stream).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{stream}-{i}");
        let ev = json!({"specversion": "1.0", "type": "t", "source": "/tls", "id": id,
                        "subject": "s", "data": {"i": i}});
        assert_eq!(
            publish_event(&w.url, "test", stream, &ev).await,
            201,
            "publish {id}"
        );
        ids.push(id);
    }
    let page: Value = http_get(format!("{}?from=1&limit=100", w.events_url("test", stream)))
        .await
        .expect("read")
        .json()
        .await
        .expect("read body");
    // A CloudEvents batch: an array of events.
    let got: Vec<&str> = page
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(got, ids, "read back from {stream}");
}

#[tokio::test]
async fn postgres_over_tls_verifies_the_server_and_presents_client_certificates() {
    let Some(bin) = pg_bin_dir() else {
        eprintln!("skipped: no PostgreSQL server binaries (set WEIR_TEST_PG_BIN)");
        return;
    };
    let as_postgres = running_as_root();
    if as_postgres && Command::new("runuser").arg("--help").output().is_err() {
        eprintln!("skipped: running as root without runuser");
        return;
    }
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: no openssl command to make certificates");
        return;
    }
    let Some(pg) = TlsPostgres::start(bin, as_postgres) else {
        return;
    };
    let port = pg.port;
    let ca = read(pg.dir(), "ca.crt");
    let url = |host: &str, user: &str, db: &str, app: &str| {
        format!("postgres://{user}@{host}:{port}/{db}?sslmode=verify-full&application_name={app}")
    };

    let m = Manifests::new("postgres://unused@127.0.0.1:1/unused");
    m.write(
        "tls-secrets.yaml",
        &[
            secret_yaml("pg-ca", &[("ca.crt", &ca)]),
            secret_yaml(
                "pg-other-ca",
                &[("ca.crt", &read(pg.dir(), "other-ca.crt"))],
            ),
            secret_yaml(
                "pg-client",
                &[
                    ("tls.crt", &read(pg.dir(), "client.crt")),
                    ("tls.key", &read(pg.dir(), "client.key")),
                ],
            ),
            secret_yaml(
                "pg-full",
                &[(
                    "url",
                    &url("localhost", "postgres", "postgres", "weir-full"),
                )],
            ),
            secret_yaml(
                "pg-ip",
                &[("url", &url("127.0.0.1", "postgres", "postgres", "weir-ip"))],
            ),
            secret_yaml(
                "pg-cert",
                &[(
                    "url",
                    &url("localhost", CERT_USER, "weir_cert", "weir-cert"),
                )],
            ),
            secret_yaml(
                "pg-wrong",
                &[(
                    "url",
                    &url("localhost", "postgres", "postgres", "weir-wrong"),
                )],
            ),
        ]
        .join("---\n"),
    );
    let ca_ref = "{caSecretRef: {name: pg-ca, key: ca.crt}}";
    m.write(
        "streams.yaml",
        &[
            tls_stream("full", "pg-full", ca_ref),
            tls_stream("wrong-host", "pg-ip", ca_ref),
            tls_stream(
                "client-cert",
                "pg-cert",
                "{caSecretRef: {name: pg-ca, key: ca.crt}, clientCertSecretRef: {name: pg-client}}",
            ),
            tls_stream(
                "wrong-ca",
                "pg-wrong",
                "{caSecretRef: {name: pg-other-ca, key: ca.crt}}",
            ),
        ]
        .join("---\n"),
    );
    let mut w = Weir::start(m.path());

    // verify-full with the CA: stores, reads back, and every backend is encrypted.
    publish_and_read(&mut w, "full", 3).await;
    publish_and_read(&mut w, "client-cert", 2).await;
    let ssl_of = |app: &str| {
        pg.psql(&format!(
            "SELECT s.ssl || ' ' || s.version || ' ' || coalesce(s.client_dn, '-') \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = '{app}' ORDER BY 1"
        ))
    };
    for (app, client_dn) in [("weir-full", "-"), ("weir-cert", "/CN=weir_cert")] {
        let rows = ssl_of(app);
        let rows: Vec<&str> = rows.lines().collect();
        // The pool's connections, the notification session and the lock session at least.
        assert!(rows.len() >= 2, "{app}: backends {rows:?}");
        for r in &rows {
            assert!(
                r.starts_with("true TLSv1.") && r.ends_with(client_dn),
                "{app}: backend not encrypted as expected: {r:?} (all: {rows:?})"
            );
        }
    }
    // No Weir backend of this cluster in plain text (the server would refuse them anyway:
    // hostssl only; this says the check above saw every one).
    assert_eq!(
        pg.psql(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name LIKE 'weir-%' AND NOT s.ssl"
        ),
        "0"
    );

    // A host name the certificate does not name: verification fails, named and explained.
    let msg = store_failure(&w, "wrong-host", "certificate verification failed").await;
    eprintln!("wrong host name: {msg}");
    assert!(
        msg.contains(&format!(
            "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full"
        )),
        "{msg}"
    );
    assert!(msg.contains("NotValidForName"), "{msg}");
    // A CA that did not sign the server's certificate.
    let msg = store_failure(&w, "wrong-ca", "certificate verification failed").await;
    eprintln!("wrong CA: {msg}");
    assert!(
        msg.contains(&format!("postgres://postgres@localhost:{port}/postgres"))
            && msg.contains("UnknownIssuer"),
        "{msg}"
    );
    // Neither ever connected.
    assert_eq!(
        pg.psql(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name IN ('weir-ip', 'weir-wrong')"
        ),
        "0",
        "server log:\n{}",
        pg.log_text()
    );
    w.terminate();
}

/// A minimal HTTPS sink: answers every request 200 and keeps each request (head, lower-cased,
/// and body).
fn https_sink(dir: &Path) -> (u16, Arc<Mutex<Vec<String>>>) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    weir::tls_provider::install_crypto_provider();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .expect("server.crt")
        .collect::<Result<_, _>>()
        .expect("server.crt PEM");
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("server.key");
    let config = Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config"),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the sink");
    let port = listener.local_addr().expect("address").port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut tcp) = stream else { continue };
            let (config, kept) = (config.clone(), kept.clone());
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, &mut tcp);
                // One request after another on the connection (keep-alive).
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match tls.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    // Binary content mode: the id is a header (ce-id), the body the data.
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match tls.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                    kept.lock()
                        .expect("bodies")
                        .push(format!("{head}\n\n{body}"));
                    buf.drain(..end + 4 + len);
                    if tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .and_then(|_| tls.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, bodies)
}

#[tokio::test]
async fn https_sink_trusted_through_ssl_cert_file() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: no openssl command to make certificates");
        return;
    }
    let certs = tempfile::tempdir().expect("tempdir");
    make_ca(certs.path(), "ca");
    make_leaf(
        certs.path(),
        "ca",
        "server",
        "localhost",
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
    );
    let (port, bodies) = https_sink(certs.path());

    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let exchange = unique("weir.test.tlssink.");
    m.write("stream.yaml", &stream_yaml("orders", &exchange, ""));
    m.write(
        "sub.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: tls-sink, namespace: test}}\n\
             spec:\n  stream: orders\n  sink: {{uri: \"https://localhost:{port}/\"}}\n"
        ),
    );
    let ca_file = certs.path().join("ca.crt");
    let ca_file = ca_file.to_string_lossy().to_string();
    let mut w = Weir::start_with(m.path(), &[("SSL_CERT_FILE", &ca_file)]);
    w.wait_ready("test", "orders").await;
    let status_url = format!("{}/v1/status", w.admin);
    // The subscription's conditions say why a delivery failed.
    let status = || {
        Command::new("curl")
            .args(["-s", &status_url])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    let ev = json!({"specversion": "1.0", "type": "t", "source": "/tls", "id": "over-tls",
                    "subject": "s", "data": {"x": 1}});
    assert_eq!(publish_event(&w.url, "test", "orders", &ev).await, 201);
    eventually(
        30,
        "the event at the https sink",
        || format!("{}\n{}", w.log_text(), status()),
        || async {
            bodies
                .lock()
                .expect("bodies")
                .iter()
                .any(|b| b.contains("over-tls"))
                .then_some(())
        },
    )
    .await;
    w.terminate();
}
