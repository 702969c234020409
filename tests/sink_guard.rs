//! The sink guard (SSRF) end to end: real `weir run` workers, the real PostgreSQL and
//! RabbitMQ, and sinks inside the test that count every request they get. A refused sink is
//! refused at validation (the subscription reports InvalidSpec, naming the field) or at
//! delivery (the event dead-letters at once with code `refused` and the reason); either way
//! the sink records no hit.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A sink answering every request with `status` (and `location`, if given) that counts them.
struct Counted {
    url: String,
    hits: Arc<AtomicUsize>,
}

impl Counted {
    async fn start(bind: SocketAddr, status: u16, location: Option<String>) -> Counted {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = axum::Router::new().fallback(move || {
            let h = h.clone();
            let location = location.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                let mut r = axum::response::Response::new(axum::body::Body::from("moved"));
                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                if let Some(l) = location {
                    r.headers_mut()
                        .insert(http::header::LOCATION, l.parse().unwrap());
                }
                r
            }
        });
        let l = tokio::net::TcpListener::bind(bind)
            .await
            .expect("bind a sink");
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        Counted {
            url: format!("http://{addr}/"),
            hits,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// The subscription `name` of this run: dead-letter queues are named after the namespace and
/// the subscription only, so a name reused by another run would read that run's dead letters.
fn sub(name: &str) -> String {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    format!("{name}-{}", RUN.get_or_init(|| unique("")))
}

fn subscription(name: &str, sink: &str) -> String {
    let name = sub(name);
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}, namespace: test}}\n\
         spec:\n  stream: orders\n  sink: {{uri: \"{sink}\"}}\n  startFrom: earliest\n  \
         delivery: {{retry: 3, backoffDelay: 50ms, backoffMax: 100ms}}\n"
    )
}

/// A folder with the stream `test/orders` on a fresh database, and a unique exchange.
async fn folder() -> Manifests {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write(
        "stream.yaml",
        &stream_yaml("orders", &unique("weir.test.guard."), ""),
    );
    m
}

async fn publish_one(weir: &Weir) {
    let ev = json!({"specversion": "1.0", "id": unique("g-"), "source": "/t",
        "type": "order.created", "data": {"n": 1}});
    assert_eq!(publish_event(&weir.url, "test", "orders", &ev).await, 201);
}

/// Waits for the subscription to report InvalidSpec; its message.
async fn invalid_spec(weir: &Weir, name: &str) -> String {
    let name = &sub(name);
    eventually(
        20,
        &format!("{name} reported InvalidSpec"),
        || weir.log_text(),
        || async {
            let s = Some(subscription_status(weir, name).await).filter(|s| !s.is_null())?;
            let ready = s["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")?
                .clone();
            (ready["reason"] == "InvalidSpec")
                .then(|| ready["message"].as_str().unwrap_or("").to_string())
        },
    )
    .await
}

/// Waits for the subscription's first dead letter (read through the admin API).
async fn dead_letter(weir: &Weir, name: &str) -> Value {
    let name = &sub(name);
    let url = format!(
        "{}/v1/namespaces/test/subscriptions/{name}/deadletters?limit=10",
        weir.admin
    );
    eventually(
        30,
        &format!("a dead letter of {name}"),
        || weir.log_text(),
        || async {
            let v: Value = common::http_get(&url).await.ok()?.json().await.ok()?;
            v["deadLetters"].as_array()?.first().cloned()
        },
    )
    .await
}

/// An address of this machine that is not loopback: the source address of its default route
/// (a UDP "connect" picks it without sending anything).
fn non_loopback_address() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A private (RFC 1918) address added to the loopback interface for the test's sink, removed
/// when dropped: in-cluster sinks live on such addresses, and the machine may have none of its
/// own. Needs root and `ip`; `Err` says why it could not be added.
struct PrivateAddress {
    ip: IpAddr,
}

impl PrivateAddress {
    /// 10.254.x.y, from the process id, so concurrent test binaries do not share one.
    fn add() -> Result<PrivateAddress, String> {
        let pid = std::process::id();
        let ip: IpAddr = format!("10.254.{}.{}", (pid >> 8) % 256, pid % 254 + 1)
            .parse()
            .map_err(|e| format!("{e}"))?;
        let out = std::process::Command::new("ip")
            .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .output()
            .map_err(|e| format!("running ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip addr add {ip}/32 dev lo: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(PrivateAddress { ip })
    }
}

impl Drop for PrivateAddress {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.ip), "dev", "lo"])
            .output();
    }
}

/// A line added to `/etc/hosts`, removed when dropped (a panicking test included).
struct HostsLine {
    line: String,
}

impl HostsLine {
    fn add(line: String) -> Result<HostsLine, String> {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/hosts")
            .map_err(|e| format!("/etc/hosts is not writable: {e}"))?;
        writeln!(f, "{line}").map_err(|e| format!("writing /etc/hosts: {e}"))?;
        Ok(HostsLine { line })
    }
}

impl Drop for HostsLine {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read_to_string("/etc/hosts") {
            let kept: String = text
                .lines()
                .filter(|l| *l != self.line)
                .map(|l| format!("{l}\n"))
                .collect();
            // Written in place (not renamed): /etc/hosts is often a bind mount.
            let _ = std::fs::write("/etc/hosts", kept);
        }
    }
}

/// A worker run as in a deployment (no loopback switch): literal loopback, link-local and
/// `localhost` sinks are invalid specs; a name that `/etc/hosts` resolves to 127.0.0.1 is
/// refused at delivery and dead-letters at once saying why; a sink on this machine's
/// non-loopback address is delivered to, except on the worker's own admin port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployed_worker_refuses_sinks_aimed_at_itself_or_the_node() {
    let m = folder().await;
    let local = Counted::start("127.0.0.1:0".parse().unwrap(), 200, None).await;
    let port = local
        .url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();

    // Refused at validation.
    let invalid = [
        (
            "loop",
            local.url.clone(),
            "spec.sink.uri",
            "127.0.0.1 is loopback",
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "spec.sink.uri",
            "169.254.169.254 is link-local",
        ),
        (
            "named",
            format!("http://localhost:{port}/"),
            "spec.sink.uri",
            "(resolved from localhost) is loopback",
        ),
        (
            "mapped",
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            "spec.sink.uri",
            "127.0.0.1 is loopback",
        ),
    ];
    for (name, sink, _, _) in &invalid {
        m.write(&format!("{name}.yaml"), &subscription(name, sink));
    }
    // A dead-letter sink is a sink too.
    m.write(
        "dls.yaml",
        &subscription("dls", "http://10.255.255.1/").replace(
            "backoffMax: 100ms}",
            "backoffMax: 100ms, deadLetterSink: {uri: \"http://0.0.0.0:9090/\"}}",
        ),
    );

    // Refused at delivery: a public-looking name that resolves to 127.0.0.1.
    let hosts = {
        let name = format!("{}.example", unique("weir-ssrf-"));
        HostsLine::add(format!("127.0.0.1 {name}")).map(|h| (h, name))
    };
    match &hosts {
        Ok((_, name)) => m.write(
            "rebind.yaml",
            &subscription("rebind", &format!("http://{name}:{port}/")),
        ),
        Err(why) => println!("SKIPPED (the hosts-file name): {why}"),
    }

    // Delivered: a sink on this machine's non-loopback address; refused: the same address on
    // the worker's own admin port.
    // A private address when one can be added (the case the issue names: 10/8, 172.16/12 and
    // 192.168/16 stay allowed), else the machine's own non-loopback address.
    let added = PrivateAddress::add();
    let private = match &added {
        Ok(p) => {
            assert!(matches!(p.ip, IpAddr::V4(v4) if v4.is_private()));
            Some(p.ip)
        }
        Err(why) => {
            println!("no private address could be added ({why}): using the machine's own");
            non_loopback_address()
        }
    };
    let mut weir = Weir::start_guarded(m.path(), &[]);
    let admin_port = weir.admin.rsplit(':').next().unwrap().to_string();
    let remote = match private {
        Some(ip) => {
            let s = Counted::start(SocketAddr::new(ip, 0), 200, None).await;
            m.write("private.yaml", &subscription("private", &s.url));
            m.write(
                "self.yaml",
                &subscription(
                    "self",
                    &format!(
                        "http://{}/v1/namespaces/test/subscriptions/{}/deadletters/redrive",
                        SocketAddr::new(ip, admin_port.parse().unwrap()),
                        sub("private")
                    ),
                ),
            );
            Some(s)
        }
        None => {
            println!("SKIPPED (delivery to a non-loopback address): this machine has none");
            None
        }
    };
    weir.wait_ready("test", "orders").await;
    publish_one(&weir).await;

    for (name, sink, field, reason) in &invalid {
        let msg = invalid_spec(&weir, name).await;
        assert!(
            msg.contains(&format!("{field}: \"{sink}\": sink address"))
                && msg.contains(reason)
                && msg.contains("refused (see --sink-allow-cidrs"),
            "{name}: {msg}"
        );
    }
    let msg = invalid_spec(&weir, "dls").await;
    assert!(
        msg.contains("spec.delivery.deadLetterSink.uri: \"http://0.0.0.0:9090/\": sink address 0.0.0.0 is unspecified: refused"),
        "{msg}"
    );

    if let Ok((_, name)) = &hosts {
        let d = dead_letter(&weir, "rebind").await;
        assert_eq!(d["errorCode"], "refused", "{d}");
        // Permanent: no retry was spent on it.
        assert_eq!(d["attempts"], "1", "{d}");
        let data = d["errorData"].as_str().unwrap();
        assert!(
            data.starts_with(&format!(
                "sink address 127.0.0.1 (resolved from {name}) is loopback: refused"
            )),
            "{data}"
        );
    }

    if let Some(remote) = &remote {
        eventually(
            30,
            "delivery to the non-loopback sink",
            || weir.log_text(),
            || async { (remote.hits() >= 1).then_some(()) },
        )
        .await;
        let d = dead_letter(&weir, "self").await;
        assert_eq!(d["errorCode"], "refused", "{d}");
        assert_eq!(d["attempts"], "1", "{d}");
        let data = d["errorData"].as_str().unwrap();
        assert!(
            data.contains(&format!(
                "port {admin_port} is this worker's own ingest or admin port"
            )),
            "{data}"
        );
        // The redrive the sink aimed at was never made: nothing of `private` was touched, and
        // its one event was delivered exactly once.
        assert_eq!(remote.hits(), 1);
    }

    // Nothing reached the loopback sink, through any name.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(local.hits(), 0, "a refused sink was reached");
    drop(hosts);
}

/// `weir run --allow-loopback-sinks` (local development): loopback sinks work, but the
/// worker's own admin and ingest ports stay refused, by address and by name; and a redirect
/// is not followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_loopback_allowed_the_workers_own_ports_stay_refused_and_redirects_are_not_followed() {
    let m = folder().await;
    let mut weir = Weir::start(m.path());
    weir.wait_ready("test", "orders").await;
    let admin_port = weir.admin.rsplit(':').next().unwrap().to_string();

    let target = Counted::start("127.0.0.1:0".parse().unwrap(), 200, None).await;
    let redirect = Counted::start(
        "127.0.0.1:0".parse().unwrap(),
        302,
        Some(format!("{}{}", target.url, "landed")),
    )
    .await;
    let plain = Counted::start("127.0.0.1:0".parse().unwrap(), 200, None).await;
    let own = [
        (
            "admin",
            format!(
                "{}/v1/namespaces/test/subscriptions/{}/deadletters/redrive",
                weir.admin,
                sub("plain")
            ),
            admin_port.clone(),
        ),
        (
            "admin-by-name",
            format!("http://localhost:{admin_port}/v1/status"),
            admin_port.clone(),
        ),
        (
            "ingest",
            format!("{}/v1/namespaces/test/streams/orders/events", weir.url),
            weir.url.rsplit(':').next().unwrap().to_string(),
        ),
    ];
    for (name, sink, _) in &own {
        m.write(&format!("{name}.yaml"), &subscription(name, sink));
    }
    m.write("redirect.yaml", &subscription("redirect", &redirect.url));
    m.write("plain.yaml", &subscription("plain", &plain.url));
    publish_one(&weir).await;

    eventually(
        30,
        "delivery to the loopback sink",
        || weir.log_text(),
        || async { (plain.hits() >= 1).then_some(()) },
    )
    .await;
    for (name, _, port) in &own {
        let d = dead_letter(&weir, name).await;
        assert_eq!(d["errorCode"], "refused", "{name}: {d}");
        assert_eq!(d["attempts"], "1", "{name}: {d}");
        let data = d["errorData"].as_str().unwrap();
        assert!(
            data.contains(&format!(
                "port {port} is this worker's own ingest or admin port: refused"
            )),
            "{name}: {data}"
        );
    }
    let d = dead_letter(&weir, "redirect").await;
    assert_eq!(d["errorCode"], "302", "{d}");
    assert_eq!(d["attempts"], "1", "{d}");
    assert_eq!(
        d["errorData"],
        format!("redirect to {}landed not followed", target.url),
        "{d}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(redirect.hits(), 1);
    assert_eq!(target.hits(), 0, "the redirect was followed");
    // The sinks aimed at the worker itself changed nothing: the stream holds the one event.
    let page: Value = common::http_get(format!(
        "{}?from=1&limit=10",
        weir.events_url("test", "orders")
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(page.as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(plain.hits(), 1);
}
