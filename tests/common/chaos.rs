//! Faults for tests: a TCP proxy that can be cut, blackholed or slowed, RabbitMQ killed with
//! SIGKILL and started again as `scripts/services.sh` starts it, and what `/proc` says of a
//! process (open files, resident memory).

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// What the proxy does with bytes, changeable while connections are open.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Flow {
    /// Bytes are held in both directions (nothing read, nothing written) while the sockets
    /// stay open: the peers see a connection that hangs, as behind a firewall that drops
    /// packets.
    pub stalled: bool,
    /// Every chunk is delivered this long after it was read, in each direction.
    pub latency: Duration,
}

/// A TCP proxy to `upstream` on a fixed local port. It can be cut (every connection closed, new
/// ones closed at once), blackholed ([`Flow::stalled`]) or slowed ([`Flow::latency`]).
pub struct ChaosProxy {
    pub port: u16,
    flow: watch::Sender<Flow>,
    /// Cancelled on a cut: every connection opened before it ends.
    conns: Arc<Mutex<CancellationToken>>,
    refusing: Arc<std::sync::atomic::AtomicBool>,
    /// Local port of each open upstream connection → the client's port on the proxy's side:
    /// what the upstream server reports as a client's port, mapped back to the client.
    links: Arc<Mutex<HashMap<u16, u16>>>,
}

/// Chunks read but not yet written, per direction of one connection: with a latency of 200 ms
/// and 16 KiB reads this is up to 16 MiB in flight, far beyond what a test sends in 200 ms;
/// when full, reading waits (back-pressure to the sender, as a slow network gives).
const CHUNKS_IN_FLIGHT: usize = 1024;

impl ChaosProxy {
    pub async fn start(upstream: &str) -> ChaosProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (flow, flow_rx) = watch::channel(Flow::default());
        let p = ChaosProxy {
            port,
            flow,
            conns: Arc::new(Mutex::new(CancellationToken::new())),
            refusing: Arc::default(),
            links: Arc::default(),
        };
        let (conns, refusing, links) = (p.conns.clone(), p.refusing.clone(), p.links.clone());
        let upstream = upstream.to_string();
        tokio::spawn(async move {
            while let Ok((inbound, peer)) = listener.accept().await {
                if refusing.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let stop = conns.lock().unwrap().clone();
                let (upstream, flow, links) = (upstream.clone(), flow_rx.clone(), links.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let local = outbound.local_addr().map(|a| a.port()).unwrap_or(0);
                    links.lock().unwrap().insert(local, peer.port());
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    // Either direction ending (a peer closed, a cut) ends the connection.
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = pump(ir, ow, flow.clone()) => {}
                        _ = pump(or, iw, flow) => {}
                    }
                    links.lock().unwrap().remove(&local);
                });
            }
        });
        p
    }

    /// Closes every connection and every new one until [`ChaosProxy::restore`].
    pub fn cut(&mut self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut conns = self.conns.lock().unwrap();
        conns.cancel();
        *conns = CancellationToken::new();
    }

    pub async fn restore(&mut self) {
        self.refusing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.set(Flow::default());
    }

    pub fn set(&self, flow: Flow) {
        self.flow.send_replace(flow);
    }

    /// The client's port for an upstream connection from local port `upstream_port`.
    pub fn client_port(&self, upstream_port: u16) -> Option<u16> {
        self.links.lock().unwrap().get(&upstream_port).copied()
    }

    /// Local ports of the open upstream connections.
    pub fn upstream_ports(&self) -> Vec<u16> {
        self.links.lock().unwrap().keys().copied().collect()
    }
}

/// Waits while the flow is stalled; the latency to apply then.
async fn flowing(flow: &mut watch::Receiver<Flow>) -> Duration {
    loop {
        let f = *flow.borrow_and_update();
        if !f.stalled {
            return f.latency;
        }
        if flow.changed().await.is_err() {
            return f.latency;
        }
    }
}

/// Copies `from` to `to` through the flow settings: a reader that stamps each chunk and a
/// writer that holds it until its time (so latency delays bytes without throttling them).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    flow: watch::Receiver<Flow>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let mut read_flow = flow.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            flowing(&mut read_flow).await;
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let mut write_flow = flow;
    let writer = async move {
        while let Some((read_at, chunk)) = rx.recv().await {
            let latency = flowing(&mut write_flow).await;
            let due = read_at + latency;
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            // A blackhole that began while this chunk waited holds it too.
            flowing(&mut write_flow).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// The pid of RabbitMQ's Erlang VM (the `beam.smp` running `rabbit`).
pub fn rabbitmq_beam_pid() -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-f", "beam.smp.*rabbit"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether RabbitMQ answers: the node pings, an AMQP handshake gets its `Connection.Start`, and
/// the management API answers (Weir reads backlogs from it).
pub async fn rabbitmq_answers() -> bool {
    let ping = tokio::task::spawn_blocking(|| {
        Command::new("rabbitmq-diagnostics")
            .args(["-q", "ping"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .await
    .unwrap_or(false);
    if !ping {
        return false;
    }
    let amqp = async {
        let mut s = TcpStream::connect("127.0.0.1:5672").await.ok()?;
        s.write_all(b"AMQP\x00\x00\x09\x01").await.ok()?;
        let mut b = [0u8; 8];
        (s.read(&mut b).await.ok()? > 0).then_some(())
    };
    if tokio::time::timeout(Duration::from_secs(5), amqp)
        .await
        .ok()
        .flatten()
        .is_none()
    {
        return false;
    }
    super::http()
        .get("http://127.0.0.1:15672/api/overview")
        .basic_auth("guest", Some("guest"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Starts RabbitMQ as `scripts/services.sh` does (`rabbitmq-server -detached`, which reads
/// the same `rabbitmq.conf` and enabled plugins), with its 20,000 open files.
fn start_rabbitmq() {
    let _ = Command::new("sh")
        .args(["-c", "ulimit -n 20000; rabbitmq-server -detached"])
        .status();
}

/// RabbitMQ killed with SIGKILL (the node's VM, not `stop_app`). Dropping it, or
/// [`RabbitKilled::restart`], starts the node again; the holder keeps
/// [`super::rabbitmq_restart_lock`] meanwhile, so other test binaries that restart RabbitMQ
/// wait.
pub struct RabbitKilled {
    _lock: std::fs::File,
    started: bool,
}

impl RabbitKilled {
    pub async fn kill() -> RabbitKilled {
        let lock = tokio::task::spawn_blocking(super::rabbitmq_restart_lock)
            .await
            .expect("the lock task");
        let pid = rabbitmq_beam_pid().expect("RabbitMQ's beam.smp runs");
        signal(pid, "KILL");
        // Wait until the VM is gone, so the start below does not find the old node.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        RabbitKilled {
            _lock: lock,
            started: false,
        }
    }

    /// Starts the node and waits (up to 3 minutes) until it answers; how long that took.
    pub async fn restart(mut self) -> Duration {
        let t = Instant::now();
        tokio::task::spawn_blocking(start_rabbitmq)
            .await
            .expect("start task");
        self.started = true;
        let deadline = Instant::now() + Duration::from_secs(180);
        while !rabbitmq_answers().await {
            assert!(
                Instant::now() < deadline,
                "RabbitMQ does not answer 3 minutes after its restart"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        t.elapsed()
    }
}

impl Drop for RabbitKilled {
    fn drop(&mut self) {
        if !self.started && rabbitmq_beam_pid().is_none() {
            start_rabbitmq();
        }
    }
}

/// Sends signal `sig` (`KILL`, `STOP`, `CONT`, …) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status();
}

/// Open file descriptors of process `pid` (None once it is gone).
pub fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// Resident memory of process `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The pid of the process with an established TCP connection from local port `port` (`ss`).
pub fn pid_with_local_port(port: u16) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-Htnp", "state", "established", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("pid=")? + 4;
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Process `pid`'s TCP sockets counted by state and port (`ss`): connections to one of its
/// listening ports by that port (`:8080`), the others by the peer's port (`→:5432`). Where a
/// growth of open files comes from.
pub fn tcp_summary(pid: u32) -> String {
    let Ok(out) = Command::new("ss").args(["-Htanp"]).output() else {
        return "ss failed".into();
    };
    let tag = format!("pid={pid},");
    let text = String::from_utf8_lossy(&out.stdout);
    let port = |addr: &str| addr.rsplit(':').next().unwrap_or("?").to_string();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.contains(&tag))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.len() >= 5)
        .collect();
    let listening: Vec<String> = rows
        .iter()
        .filter(|c| c[0] == "LISTEN")
        .map(|c| port(c[3]))
        .collect();
    let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for c in &rows {
        let local = port(c[3]);
        let key = if listening.contains(&local) {
            format!(":{local}")
        } else {
            format!("→:{}", port(c[4]))
        };
        *counts.entry((c[0].to_string(), key)).or_default() += 1;
    }
    counts
        .iter()
        .map(|((state, port), n)| format!("{state} {port} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
