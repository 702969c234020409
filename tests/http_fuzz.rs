//! HTTP-level fuzzing of a running worker (`weir run` with RabbitMQ and PostgreSQL): 100,000
//! malformed or hostile requests (random methods, paths with dot segments and bad
//! percent-encoding, absurd query strings, random and oversized headers, hundreds of `ce-`
//! extensions, content types, truncated, oversized, deeply nested, non-UTF-8 and damaged
//! bodies, broken chunked encoding, garbage request lines) sent over raw TCP from 32
//! connections. It must answer every one without a 5xx (not even the 503 of backpressure:
//! nothing here should reach it), stay up, still store a normal publish and read it back, and
//! its resident memory must come back to within [`RSS_BOUND`] of its baseline.
//!
//! `WEIR_HTTP_FUZZ_REQUESTS` (default 100000) and `WEIR_HTTP_FUZZ_SEED` (default: drawn and
//! printed) change the run; the table of status codes is printed. RELIABILITY.md records a run.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Connections sending at once: enough to keep both cores busy and to have requests overlap
/// in the batcher, few enough that the body memory budget (32 MiB) holds every body in
/// flight (32 × the 64 KiB maxRequestBytes) so no 503 is owed.
const CONNECTIONS: usize = 32;
/// Resident memory may end this far above its baseline: allocator caches, the read cache
/// (its 64 MiB default capacity is far from reached by the few events stored) and metrics.
const RSS_BOUND: u64 = 48 * 1024 * 1024;
/// One request may take this long before the run fails (a hang is a finding).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_REQUEST_BYTES: usize = 64 * 1024;

fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

// ---------------------------------------------------------------------------------------------
// Requests

/// One request as bytes, and what sending it takes.
struct Request {
    bytes: Vec<u8>,
    /// Send this, then close the write side: a body cut short (answered or dropped).
    half_close: bool,
    what: &'static str,
}

fn pick<'a, T>(rng: &mut StdRng, xs: &'a [T]) -> &'a T {
    &xs[rng.random_range(0..xs.len())]
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random()).collect()
}

fn random_token(rng: &mut StdRng, max: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~";
    let n = rng.random_range(1..=max);
    (0..n).map(|_| *pick(rng, CHARS) as char).collect()
}

fn valid_event(rng: &mut StdRng) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("fz-{}", rng.random::<u64>()),
        "source": "/fuzz",
        "type": pick(rng, &["order.created", "t", "x.y"]),
        "subject": format!("s-{}", rng.random_range(0..50)),
        "data": {"orderId": "o-1", "amount": rng.random_range(0..100)},
    })
}

/// A body: valid, damaged, deep, wide, non-UTF-8, random.
fn body(rng: &mut StdRng) -> (Vec<u8>, &'static str) {
    match rng.random_range(0..12) {
        0 => (valid_event(rng).to_string().into_bytes(), "valid"),
        1 => {
            let mut b = valid_event(rng).to_string().into_bytes();
            let cut = rng.random_range(0..b.len());
            b.truncate(cut);
            (b, "truncated json")
        }
        2 => {
            let depth = *pick(rng, &[64usize, 127, 128, 129, 1000, 100_000 / 2]);
            let open = pick(rng, &["[", "{\"a\":"]);
            let mut b = open.repeat(depth).into_bytes();
            if rng.random_bool(0.5) {
                b.extend(std::iter::repeat_n(if *open == "[" { b']' } else { b'}' }, depth));
            }
            (b, "deep json")
        }
        3 => {
            // An event with thousands of extensions.
            let mut ev = valid_event(rng);
            let n = rng.random_range(100..3000);
            for i in 0..n {
                ev[format!("x{i}")] = json!(i);
            }
            (ev.to_string().into_bytes(), "many extensions")
        }
        4 => {
            // Invalid UTF-8 inside JSON strings and keys.
            let mut b = valid_event(rng).to_string().into_bytes();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..b.len());
                b.insert(i, *pick(rng, &[0xff, 0xc3, 0x80, 0xed, 0xf4]));
            }
            (b, "invalid utf-8")
        }
        5 => (random_bytes(rng, 2048), "random bytes"),
        6 => {
            let evs: Vec<Value> = (0..rng.random_range(0..50))
                .map(|_| valid_event(rng))
                .collect();
            (Value::from(evs).to_string().into_bytes(), "batch")
        }
        7 => {
            let mut b = valid_event(rng).to_string().into_bytes();
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            (b, "damaged json")
        }
        8 => (
            vec![b'x'; rng.random_range(MAX_REQUEST_BYTES..MAX_REQUEST_BYTES * 2)],
            "oversized",
        ),
        9 => (
            format!(
                "{{\"specversion\":\"1.0\",\"id\":\"{}\",\"source\":\"/f\",\"type\":\"t\",\"data_base64\":\"{}\"}}",
                rng.random::<u32>(),
                random_token(rng, 64)
            )
            .into_bytes(),
            "bad base64",
        ),
        10 if rng.random_bool(0.5) => {
            // U+0000 in an attribute (PostgreSQL text cannot hold it).
            let mut ev = valid_event(rng);
            let field = *pick(rng, &["id", "source", "type", "subject", "correlationid"]);
            ev[field] = json!(format!("nul\u{0}{}", rng.random::<u16>()));
            (ev.to_string().into_bytes(), "nul attribute")
        }
        10 => (
            json!({"type": "t", "data": {"a": 1}, "correlationID": "x", "extra": [1, 2]})
                .to_string()
                .into_bytes(),
            "plain with unknown members",
        ),
        _ => (Vec::new(), "empty"),
    }
}

fn path(rng: &mut StdRng) -> String {
    let ns = pick(
        rng,
        &[
            "test", "test", "test", "test", "test", "test", "..", "%2e%2e", "te%73t", "%zz", "%",
            "%C3%28", "", "t%00",
        ],
    );
    let stream = pick(
        rng,
        &[
            "fz", "fz", "fz", "fz", "fz", "fzb", "nope", "fz%2F..", "%FF%FE", "fz;x=1", "fz%20",
            "a%2",
        ],
    )
    .to_string();
    let tail = match rng.random_range(0..12) {
        0 => "/events".to_string(),
        1 | 8 | 9 => format!(
            "/events/{}",
            pick(
                rng,
                &["1", "0", "-1", "99999999999999999999", "abc", "1.5", "%31"]
            )
        ),
        2 | 10 | 11 => format!(
            "/subjects/{}/events",
            pick(
                rng,
                &["s-1", "%2F", "..%2F..", "%FF", "a%zz", "%00", "s%001"]
            )
        ),
        3 => "/events/".to_string(),
        4 => "//events".to_string(),
        5 => format!("/{}", "a/".repeat(rng.random_range(1..200))),
        6 => format!("/events/{}", "9".repeat(rng.random_range(1..400))),
        _ => "/events".to_string(),
    };
    let mut p = match rng.random_range(0..10) {
        0 => format!(
            "/v1/namespaces/{ns}/correlations/{}/events",
            random_token(rng, 40)
        ),
        1 => format!("/v1/../v1/namespaces/{ns}/streams/{stream}{tail}"),
        2 => pick(
            rng,
            &[
                "/",
                "*",
                "/v1",
                "/metrics",
                "/v1/status",
                "http://evil/x",
                "/%",
            ],
        )
        .to_string(),
        _ => format!("/v1/namespaces/{ns}/streams/{stream}{tail}"),
    };
    if rng.random_bool(0.4) {
        p.push('?');
        p.push_str(&query(rng));
    }
    p
}

fn query(rng: &mut StdRng) -> String {
    match rng.random_range(0..6) {
        0 => format!(
            "from={}&limit={}",
            pick(
                rng,
                &["1", "0", "-5", "abc", "99999999999999999999", "", "%31"]
            ),
            pick(rng, &["10", "0", "-1", "1001", "1000000", "x", ""])
        ),
        1 => format!(
            "asOf={}&version={}",
            pick(
                rng,
                &["2024-05-01T00:00:00Z", "yesterday", "", "%zz", "9999-99-99"]
            ),
            pick(rng, &["1", "-3", "abc", "18446744073709551616"])
        ),
        2 => (0..rng.random_range(1..2000))
            .map(|i| format!("p{i}={i}"))
            .collect::<Vec<_>>()
            .join("&"),
        3 => "consistency=bogus&&&==&from=1&from=2".to_string(),
        4 => "a".repeat(rng.random_range(1..20_000)),
        _ => random_token(rng, 200),
    }
}

fn content_type(rng: &mut StdRng) -> Option<String> {
    let cts = [
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "application/json",
        "application/json; charset=latin1",
        "application/cloudevents+avro",
        "text/plain",
        "application/octet-stream",
        "multipart/form-data; boundary=x",
        ";;;",
        "application/json; charset=\"utf-8\"; x=",
        "",
    ];
    match rng.random_range(0..10) {
        0 => None,
        1 => Some(random_token(rng, 300)),
        _ => Some(pick(rng, &cts).to_string()),
    }
}

fn build(rng: &mut StdRng) -> Request {
    // Garbage request lines and broken framing: a small share, each on its own terms.
    match rng.random_range(0..100) {
        0 => {
            return Request {
                bytes: random_bytes(rng, 512),
                half_close: true,
                what: "garbage request",
            };
        }
        1 => {
            return Request {
                bytes: format!("GET {} HTTP/9.9\r\nHost: x\r\n\r\n", path(rng)).into_bytes(),
                half_close: true,
                what: "bad version",
            };
        }
        2 => {
            let (b, _) = body(rng);
            let mut bytes = format!(
                "POST /v1/namespaces/test/streams/fz/events HTTP/1.1\r\nHost: x\r\n\
                 content-type: application/cloudevents+json\r\ncontent-length: {}\r\n\r\n",
                b.len() + rng.random_range(1..1000)
            )
            .into_bytes();
            bytes.extend(b);
            return Request {
                bytes,
                half_close: true,
                what: "truncated body",
            };
        }
        3 => {
            let mut bytes = b"POST /v1/namespaces/test/streams/fz/events HTTP/1.1\r\nHost: x\r\n\
                 content-type: application/cloudevents+json\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec();
            bytes.extend(
                pick(
                    rng,
                    &[
                        "zz\r\n{}\r\n0\r\n\r\n",
                        "ffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
                        "2\r\n{}\r\n",
                        "-1\r\n\r\n",
                    ],
                )
                .as_bytes(),
            );
            return Request {
                bytes,
                half_close: true,
                what: "bad chunks",
            };
        }
        4 => {
            // Content-Length and Transfer-Encoding together, or two Content-Lengths.
            let bytes = pick(
                rng,
                &[
                    "POST /v1/namespaces/test/streams/fz/events HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}x",
                    "POST /v1/namespaces/test/streams/fz/events HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                    "GET /v1/namespaces/test/streams/fz/events HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
                    "GET /v1/namespaces/test/streams/fz/events HTTP/1.1\r\nHost: x\r\n: empty\r\n\r\n",
                ],
            );
            return Request {
                bytes: bytes.as_bytes().to_vec(),
                half_close: true,
                what: "bad framing",
            };
        }
        _ => {}
    }
    let method = match rng.random_range(0..10) {
        0..=5 => "POST",
        6..=7 => "GET",
        _ => *pick(
            rng,
            &[
                "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO", "CONNECT",
            ],
        ),
    };
    // Most publishes go where the parsers are; the rest, and reads, try the router too.
    let target = match (method, rng.random_range(0..10)) {
        ("POST", 0..=5) => "/v1/namespaces/test/streams/fz/events".to_string(),
        ("POST", 6..=7) => "/v1/namespaces/test/streams/fzb/events".to_string(),
        _ => path(rng),
    };
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let is_post = method == "POST";
    if let Some(ct) = content_type(rng).filter(|_| is_post || rng.random_bool(0.1)) {
        head.push_str(&format!("content-type: {ct}\r\n"));
    }
    let mut what = "request";
    // `ce-` headers: a handful, or hundreds of extensions.
    if rng.random_bool(0.3) {
        what = "ce headers";
        for (k, v) in [
            ("specversion", "1.0"),
            ("id", "b-1"),
            ("source", "/b"),
            ("type", "t"),
        ] {
            if rng.random_bool(0.8) {
                head.push_str(&format!("ce-{k}: {v}\r\n"));
            }
        }
        let n = if rng.random_bool(0.2) {
            rng.random_range(100..900)
        } else {
            rng.random_range(0..5)
        };
        for i in 0..n {
            let v = pick(rng, &["v", "%zz", "%FF%FE", "%", "%C3%A9", "a b", ""]);
            head.push_str(&format!("ce-x{i}: {v}\r\n"));
        }
        if rng.random_bool(0.1) {
            head.push_str("ce-id: again\r\n");
        }
    }
    // Random headers, now and then huge or with bytes outside ASCII.
    for _ in 0..rng.random_range(0..4) {
        match rng.random_range(0..5) {
            0 => head.push_str(&format!(
                "x-{}: {}\r\n",
                random_token(rng, 20),
                random_token(rng, 100)
            )),
            1 => head.push_str(&format!(
                "x-big: {}\r\n",
                "b".repeat(rng.random_range(1..100_000))
            )),
            2 => head.push_str("authorization: Bearer nonsense\r\n"),
            3 => head.push_str("accept-encoding: gzip, br, zstd\r\n"),
            _ => head.push_str("expect: 100-continue-please\r\n"),
        }
    }
    let mut bytes = Vec::new();
    if is_post || rng.random_bool(0.05) {
        let (b, kind) = body(rng);
        if what == "request" {
            what = kind;
        }
        if rng.random_bool(0.1) {
            // Chunked, in random pieces.
            head.push_str("transfer-encoding: chunked\r\n\r\n");
            bytes.extend(head.into_bytes());
            let mut rest = &b[..];
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len().min(4096));
                bytes.extend(format!("{n:x}\r\n").into_bytes());
                bytes.extend(&rest[..n]);
                bytes.extend(b"\r\n");
                rest = &rest[n..];
            }
            bytes.extend(b"0\r\n\r\n");
        } else {
            head.push_str(&format!("content-length: {}\r\n\r\n", b.len()));
            bytes.extend(head.into_bytes());
            bytes.extend(b);
        }
    } else {
        head.push_str("\r\n");
        bytes.extend(head.into_bytes());
    }
    Request {
        bytes,
        half_close: false,
        what,
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client over one connection (raw: reqwest would refuse to send most of
// the above).

#[derive(Debug)]
enum Outcome {
    Status(u16),
    /// The server closed without an answer (allowed only for broken framing).
    Closed,
}

async fn read_response(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<(Outcome, bool)> {
    loop {
        // Headers.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok((Outcome::Closed, true));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
                .map(|v| v.trim().to_string())
        };
        let close = header("connection").is_some_and(|v| v == "close");
        buf.drain(..end);
        if status == 100 {
            continue;
        }
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let line_end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    fill(conn, buf).await?;
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&buf[..line_end])
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim(),
                    16,
                )
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
                while buf.len() < line_end + 2 + size + 2 {
                    fill(conn, buf).await?;
                }
                buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < len {
                fill(conn, buf).await?;
            }
            buf.drain(..len);
        }
        return Ok((Outcome::Status(status), close));
    }
}

async fn fill(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = conn.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

type Table = Arc<Mutex<BTreeMap<String, u64>>>;
/// Per kind of request: how many, their total and their longest time to an answer.
type Times = Arc<Mutex<BTreeMap<&'static str, (u64, Duration, Duration)>>>;

fn count(table: &Table, key: String) {
    *table.lock().unwrap().entry(key).or_default() += 1;
}

/// One connection's share of the run.
async fn worker(
    addr: String,
    seed: u64,
    n: usize,
    table: Table,
    times: Times,
    findings: Arc<Mutex<Vec<String>>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::new();
    for _ in 0..n {
        let req = build(&mut rng);
        let sent_at = Instant::now();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
            if req.half_close {
                // On its own connection: the server answers or closes, then this one is gone.
                let mut c = TcpStream::connect(&addr).await?;
                // A write the server cut short (it answered and closed) is fine.
                let _ = c.write_all(&req.bytes).await;
                let _ = c.shutdown().await;
                let mut b = Vec::new();
                return read_response(&mut c, &mut b).await.map(|(o, _)| o);
            }
            // A kept-alive connection the server closed meanwhile is retried once on a new
            // one, as clients do.
            for attempt in 0..2 {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => {
                        buf.clear();
                        conn.insert(TcpStream::connect(&addr).await?)
                    }
                };
                let sent = c.write_all(&req.bytes).await;
                let read = match sent {
                    Ok(()) => read_response(c, &mut buf).await,
                    Err(e) => Err(e),
                };
                match read {
                    Ok((Outcome::Closed, _)) | Err(_) if attempt == 0 => {
                        conn = None;
                        continue;
                    }
                    Ok((outcome, close)) => {
                        if close || matches!(outcome, Outcome::Closed) {
                            conn = None;
                        }
                        return Ok(outcome);
                    }
                    Err(e) => {
                        conn = None;
                        return Err(e);
                    }
                }
            }
            unreachable!("the second attempt returns")
        })
        .await;
        let key = match result {
            Ok(Ok(Outcome::Status(s))) => {
                if s >= 500 {
                    findings.lock().unwrap().push(format!(
                        "{s} for {} request: {}",
                        req.what,
                        String::from_utf8_lossy(&req.bytes[..req.bytes.len().min(600)])
                    ));
                }
                s.to_string()
            }
            // No answer: the connection was closed or reset, which a server may do to a
            // request it will not read (broken framing, a body it refuses unread). Counted,
            // and bounded below by the share of answered requests.
            Ok(Ok(Outcome::Closed)) => "closed, no answer".to_string(),
            Ok(Err(_)) => "reset, no answer".to_string(),
            Err(_) => {
                findings.lock().unwrap().push(format!(
                    "no answer in {REQUEST_TIMEOUT:?}: {} request: {}",
                    req.what,
                    String::from_utf8_lossy(&req.bytes[..req.bytes.len().min(600)])
                ));
                conn = None;
                "timeout".to_string()
            }
        };
        count(&table, key);
        let took = sent_at.elapsed();
        let mut t = times.lock().unwrap();
        let e = t.entry(req.what).or_default();
        e.0 += 1;
        e.1 += took;
        e.2 = e.2.max(took);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_hostile_requests_get_no_5xx_and_leave_the_worker_well() {
    let requests: usize = std::env::var("WEIR_HTTP_FUZZ_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed: u64 = std::env::var("WEIR_HTTP_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("http fuzz: seed {seed} (WEIR_HTTP_FUZZ_SEED={seed} replays it), {requests} requests");

    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let ex = unique("weir.test.fuzz.");
    m.write(
        "fz.yaml",
        &stream_yaml(
            "fz",
            &ex,
            "  validation:\n    maxRequestBytes: 64KiB\n    maxEventBytes: 32KiB\n    allowUnknownTypes: true\n    \
             schemas:\n      - type: order.created\n        schema:\n          type: object\n          \
             required: [orderId, amount]\n          properties:\n            orderId: {type: string}\n            \
             amount: {type: number, minimum: 0}\n",
        ),
    );
    m.write("fzb.yaml", &broker_only_yaml("fzb", &format!("{ex}.b")));
    let mut w = Weir::start(m.path());
    w.wait_ready("test", "fz").await;
    w.wait_ready("test", "fzb").await;
    let pid = w.child.id();
    let addr = w.url.trim_start_matches("http://").to_string();

    let run = |n: usize, seed: u64| {
        let table: Table = Arc::default();
        let times: Times = Arc::default();
        let findings: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|i| {
                let share = n / CONNECTIONS + usize::from(i < n % CONNECTIONS);
                tokio::spawn(worker(
                    addr.clone(),
                    seed.wrapping_add(i as u64),
                    share,
                    table.clone(),
                    times.clone(),
                    findings.clone(),
                ))
            })
            .collect();
        async move {
            for t in tasks {
                t.await.expect("a fuzz connection task");
            }
            let t = table.lock().unwrap().clone();
            let f = findings.lock().unwrap().clone();
            let times = times.lock().unwrap().clone();
            (t, f, times)
        }
    };

    // Warm-up, so the baseline includes what any traffic allocates once (pools, caches).
    let (_, warm_findings, _) = run(5_000, seed ^ 0x5eed).await;
    assert!(warm_findings.is_empty(), "warm-up: {warm_findings:#?}");
    let baseline = vm_rss(pid);

    let started = Instant::now();
    let (table, findings, times) = run(requests, seed).await;
    let took = started.elapsed();
    let peak_after = vm_rss(pid);

    println!(
        "http fuzz: {requests} requests in {took:.1?} ({:.0}/s)",
        requests as f64 / took.as_secs_f64()
    );
    println!("| status | requests |\n|---|---|");
    for (k, v) in &table {
        println!("| {k} | {v} |");
    }
    println!("| request kind | requests | mean ms | max ms |\n|---|---|---|---|");
    for (what, (n, total, max)) in &times {
        println!(
            "| {what} | {n} | {:.2} | {:.0} |",
            total.as_secs_f64() * 1000.0 / *n as f64,
            max.as_secs_f64() * 1000.0
        );
    }
    assert!(
        w.child.try_wait().expect("the worker's state").is_none(),
        "the worker died; log:\n{}",
        w.log_text()
    );
    assert!(
        findings.is_empty(),
        "{} findings (first 20): {:#?}\nlog:\n{}",
        findings.len(),
        &findings[..findings.len().min(20)],
        w.log_text()
    );
    let answered: u64 = table
        .iter()
        .filter(|(k, _)| k.parse::<u16>().is_ok())
        .map(|(_, v)| v)
        .sum();
    assert!(
        answered as usize >= requests * 95 / 100,
        "too few answers: {table:?}"
    );
    assert!(
        table
            .keys()
            .all(|k| k.parse::<u16>().map_or(true, |s| s < 500)),
        "5xx answers: {table:?}"
    );

    // Still a working worker: a normal publish is stored and read back.
    let ev = json!({"specversion": "1.0", "id": "after-fuzz", "source": "/fuzz", "type": "t", "data": {"ok": true}});
    let stored = http()
        .post(w.events_url("test", "fz"))
        .header("content-type", "application/cloudevents+json")
        .body(ev.to_string())
        .send()
        .await
        .expect("a publish after the fuzz");
    assert_eq!(stored.status(), 201, "{}", w.log_text());
    let answer: Value = stored.json().await.expect("a publish answer");
    let position = answer["results"][0]["position"]
        .as_i64()
        .expect("a position");
    let read: Value = http_get(format!(
        "{}/{position}?consistency=strong",
        w.events_url("test", "fz")
    ))
    .await
    .expect("read")
    .json()
    .await
    .expect("an event");
    assert_eq!(
        read["id"], "after-fuzz",
        "the publish after the fuzz reads back"
    );
    assert_eq!(
        publish_event(&w.url, "test", "fzb", &ev).await,
        202,
        "the broker-only stream after the fuzz"
    );

    // Memory comes back near its baseline.
    let after = eventually(
        30,
        "RSS back near its baseline",
        || format!("baseline {baseline}, now {}", vm_rss(pid)),
        || async {
            let now = vm_rss(pid);
            (now <= baseline + RSS_BOUND).then_some(now)
        },
    )
    .await;
    println!(
        "http fuzz: RSS baseline {:.1} MiB, right after {:.1} MiB, settled {:.1} MiB (bound +{} MiB)",
        baseline as f64 / 1048576.0,
        peak_after as f64 / 1048576.0,
        after as f64 / 1048576.0,
        RSS_BOUND / 1048576
    );
}

/// Regression: an event with U+0000 in an attribute reached PostgreSQL, which refused it and
/// with it the whole group commit: a 500 for that publisher and for every other one whose
/// events shared the batch. It is a 400 now, and the events around it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_an_attribute_is_a_400_and_spoils_no_batch() {
    let db = fresh_database().await;
    let m = Manifests::new(&db);
    let ex = unique("weir.test.fuzz.");
    // A long batching delay, so the good events and the bad one meet in one batch.
    m.write(
        "nul.yaml",
        &stream_yaml("nul", &ex, "  batching:\n    maxDelay: 200ms\n"),
    );
    let mut w = Weir::start(m.path());
    w.wait_readable("test", "nul").await;
    let publish = |id: String| {
        let url = w.url.clone();
        async move {
            let ev = json!({"specversion": "1.0", "id": id, "source": "/n", "type": "t", "subject": "s"});
            publish_event(&url, "test", "nul", &ev).await
        }
    };
    let (good1, bad, good2) = tokio::join!(
        publish("good-1".into()),
        publish("bad\u{0}id".into()),
        publish("good-2".into())
    );
    assert_eq!((good1, bad, good2), (201, 400, 201), "{}", w.log_text());
    for (url, what) in [
        (
            format!(
                "{}/v1/namespaces/test/streams/nul/subjects/s%00/events",
                w.url
            ),
            "a subject",
        ),
        (
            format!("{}/v1/namespaces/test/correlations/c%00/events", w.url),
            "a correlation id",
        ),
    ] {
        let status = http_get(&url).await.expect("read").status();
        assert_eq!(status, 400, "{what} with NUL: {url}");
    }
}
