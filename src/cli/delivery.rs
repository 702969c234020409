//! The delivery commands of the CLI: `weir dlq`, `weir tail` and `weir sink`. The first two
//! talk to a running `weir` over HTTP (admin API and read API), so they work the same against
//! a cluster through `kubectl port-forward`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;

use super::client::{self, answer, bar, split};
use super::output::Output;

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// List dead letters with their error context (they stay in the queue).
    List {
        /// `<namespace>/<subscription>`.
        target: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter in full.
    Show {
        /// `<namespace>/<subscription>`.
        target: String,
        /// The event id.
        id: String,
    },
    /// Move every dead letter back to the subscription's queue (attempts start over).
    Redrive {
        /// `<namespace>/<subscription>`.
        target: String,
    },
    /// Delete every dead letter.
    Purge {
        /// `<namespace>/<subscription>`.
        target: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn dlq(
    admin: &str,
    token: Option<&str>,
    output: Output,
    action: DlqAction,
) -> anyhow::Result<ExitCode> {
    let client = super::client::http_client(token)?;
    let base = |target: &str| -> anyhow::Result<String> {
        let (ns, name) = split(target, "subscription")?;
        Ok(format!(
            "{}/v1/namespaces/{ns}/subscriptions/{name}/deadletters",
            admin.trim_end_matches('/')
        ))
    };
    match action {
        DlqAction::List { target, limit } => {
            let url = format!("{}?limit={limit}", base(&target)?);
            let body = answer(client.get(&url), &format!("GET {url}")).await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<36} {:<24} {:<9} {:<5} {:<8} ERROR",
                "ID", "TYPE", "POSITION", "CODE", "ATTEMPTS"
            );
            let empty = vec![];
            for d in body["deadLetters"].as_array().unwrap_or(&empty) {
                let s = |k: &str| d[k].as_str().unwrap_or("").to_string();
                let data: String = s("errorData")
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(60)
                    .collect();
                println!(
                    "{:<36} {:<24} {:<9} {:<5} {:<8} {}",
                    s("id"),
                    s("type"),
                    s("position"),
                    s("errorCode"),
                    s("attempts"),
                    data
                );
            }
        }
        DlqAction::Show { target, id } => {
            let url = format!(
                "{}/{}",
                base(&target)?,
                percent_encoding::utf8_percent_encode(&id, percent_encoding::NON_ALPHANUMERIC)
            );
            let body = answer(client.get(&url), &format!("GET {url}")).await?;
            println!("{}", serde_json::to_string_pretty(&body)?);
        }
        DlqAction::Redrive { target } => {
            // In chunks, so a person sees progress; bounded by the count at the start so
            // letters that fail again meanwhile are not chased forever.
            const CHUNK: u64 = 100;
            let url = format!("{}/redrive?limit={CHUNK}", base(&target)?);
            let (mut done, mut total) = (0u64, None::<u64>);
            loop {
                let body = answer(client.post(&url), &format!("POST {url}")).await?;
                let n = body["redriven"].as_u64().unwrap_or(0);
                let remaining = body["remaining"].as_u64().unwrap_or(0);
                done += n;
                let all = *total.get_or_insert(done + remaining);
                if output == Output::Table {
                    bar("redriving", done, all);
                }
                if n == 0 || remaining == 0 || done >= all {
                    break;
                }
            }
            if output == Output::Json {
                println!("{}", serde_json::json!({ "redriven": done }));
            } else {
                eprintln!();
                println!("redriven: {done}");
            }
        }
        DlqAction::Purge { target, yes } => {
            if !yes {
                eprint!("delete every dead letter of {target}? [y/N] ");
                let _ = std::io::stderr().flush();
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                if !matches!(line.trim(), "y" | "Y" | "yes") {
                    eprintln!("nothing deleted");
                    return Ok(ExitCode::FAILURE);
                }
            }
            let url = base(&target)?;
            let body = answer(client.delete(&url), &format!("DELETE {url}")).await?;
            if output == Output::Json {
                println!("{body}");
            } else {
                println!("purged: {}", body["purged"]);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reconnect backoff of `tail`: from 200 ms, doubling, capped at 5 s (a worker restarting
/// is back within seconds; a dead one is not hammered).
const TAIL_RETRY_BASE: Duration = Duration::from_millis(200);
const TAIL_RETRY_MAX: Duration = Duration::from_secs(5);
/// The longest SSE line `tail` holds while it waits for the rest of it: an event is at most
/// the stream's maxEventBytes (a few MiB), encoded as JSON.
const TAIL_MAX_LINE: usize = 64 * 1024 * 1024;

/// Prints a stream's events from `from`, then follows new ones over Server-Sent Events
/// (`?follow=true`). A dropped connection, or a worker that ends the follow, is reconnected
/// with `Last-Event-ID`: nothing is printed twice, nothing is skipped.
pub async fn tail(
    url: &str,
    token: Option<&str>,
    output: Output,
    target: &str,
    from: i64,
) -> anyhow::Result<ExitCode> {
    let (ns, stream) = split(target, "stream")?;
    let client = client::http_client(token)?;
    let u = format!(
        "{}/v1/namespaces/{ns}/streams/{stream}/events?from={}&follow=true",
        url.trim_end_matches('/'),
        from.max(1)
    );
    let mut last: Option<i64> = None;
    let mut connected = false;
    let mut failures = 0u32;
    loop {
        let mut rb = client
            .get(&u)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(l) = last {
            rb = rb.header("last-event-id", l.to_string());
        }
        let mut wait = None;
        match rb.send().await {
            // The first connection must work: a wrong URL is said, not retried for ever.
            Err(e) if !connected => return Err(e).with_context(|| format!("GET {u}")),
            Err(e) => eprintln!("tail: {e}; reconnecting"),
            Ok(r) if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                wait = r
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                eprintln!(
                    "tail: 503: {}; retrying",
                    body["detail"].as_str().unwrap_or("")
                );
            }
            Ok(r) if !r.status().is_success() => {
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                return Err(client::failed(status, &body));
            }
            Ok(r) => {
                connected = true;
                let printed = follow_events(r, output, &mut last).await;
                if printed > 0 {
                    failures = 0;
                }
            }
        }
        failures = failures.saturating_add(1);
        let delay =
            wait.unwrap_or_else(|| crate::data::backoff(TAIL_RETRY_BASE, TAIL_RETRY_MAX, failures));
        tokio::time::sleep(delay).await;
    }
}

/// Prints the events of one follow response until it ends; `last` follows the ids. Returns
/// how many were printed.
async fn follow_events(mut r: reqwest::Response, output: Output, last: &mut Option<i64>) -> usize {
    let mut parser = SseParser::default();
    let mut printed = 0;
    loop {
        let chunk = match r.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => {
                eprintln!("tail: the connection ended; reconnecting");
                return printed;
            }
            Err(e) => {
                eprintln!("tail: {e}; reconnecting");
                return printed;
            }
        };
        for msg in parser.feed(&chunk) {
            match msg {
                Ok(m) if m.event == "error" => {
                    let v: serde_json::Value = serde_json::from_str(&m.data).unwrap_or_default();
                    eprintln!(
                        "tail: {}; reconnecting",
                        v["detail"].as_str().unwrap_or(&m.data)
                    );
                    return printed;
                }
                Ok(m) => match serde_json::from_str::<serde_json::Value>(&m.data) {
                    Ok(ev) => {
                        print_event(&ev, output);
                        printed += 1;
                        if let Some(id) = m.id.and_then(|i| i.parse::<i64>().ok()) {
                            *last = Some(id);
                        }
                    }
                    Err(e) => eprintln!("tail: an event that is not JSON: {e}"),
                },
                Err(e) => {
                    eprintln!("tail: {e}; reconnecting");
                    return printed;
                }
            }
        }
    }
}

/// One Server-Sent Events message.
#[derive(Debug, Default, PartialEq, Eq)]
struct SseMessage {
    event: String,
    id: Option<String>,
    data: String,
}

/// The Server-Sent Events wire format, as far as Weir uses it: `event:`, `id:`, `data:`
/// (several joined by `\n`), comments, and a blank line ending each message.
#[derive(Default)]
struct SseParser {
    line: Vec<u8>,
    current: SseMessage,
    has_data: bool,
}

impl SseParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<anyhow::Result<SseMessage>> {
        let mut out = vec![];
        for &b in bytes {
            if b != b'\n' {
                if self.line.len() >= TAIL_MAX_LINE {
                    out.push(Err(anyhow::anyhow!(
                        "an event line over {TAIL_MAX_LINE} bytes"
                    )));
                    self.line.clear();
                    return out;
                }
                self.line.push(b);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                let m = std::mem::take(&mut self.current);
                if std::mem::take(&mut self.has_data) {
                    out.push(Ok(m));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (&*line, ""),
            };
            match field {
                "event" => self.current.event = value.to_string(),
                "id" => self.current.id = Some(value.to_string()),
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        out
    }
}

fn print_event(ev: &serde_json::Value, output: Output) {
    if output == Output::Json {
        println!("{ev}");
        return;
    }
    let s = |k: &str| ev[k].as_str().unwrap_or("").to_string();
    let data = if ev["data"].is_null() {
        ev["data_base64"]
            .as_str()
            .map(|b| format!("(base64) {b}"))
            .unwrap_or_default()
    } else {
        ev["data"].to_string()
    };
    println!(
        "{:>8} {} {:<24} {:<20} {} {}",
        s("weirposition"),
        s("weirrecordedtime"),
        s("type"),
        s("subject"),
        s("id"),
        data
    );
}

/// Answers 200 to every POST and prints the CloudEvent it carries (binary or structured).
pub async fn sink(listen: SocketAddr, output: Output) -> anyhow::Result<ExitCode> {
    let app = axum::Router::new().fallback(
        move |mut headers: http::HeaderMap, body: bytes::Bytes| async move {
            // Weir's own attributes (position, version, commit time) are refused from
            // publishers by the parser; a sink receives them, so they are set aside and put
            // back.
            let mut weir_attrs = vec![];
            for name in ["weirposition", "weirversion", "weirrecordedtime"] {
                if let Some(v) = headers.remove(format!("ce-{name}").as_str())
                    && let Ok(v) = v.to_str()
                {
                    weir_attrs.push((name, v.to_string()));
                }
            }
            let ctx = crate::data::ingest::IngestContext::new("", "", chrono::Utc::now());
            match crate::data::ingest::parse_request(&headers, &body, &ctx) {
                Ok(mut events) => {
                    for ev in &mut events {
                        for (k, v) in &weir_attrs {
                            ev.extensions.insert(
                                k.to_string(),
                                crate::data::event::ExtValue::String(v.clone()),
                            );
                        }
                    }
                    for ev in &events {
                        let json = crate::data::event::to_structured_json(ev);
                        let v: serde_json::Value =
                            serde_json::from_slice(&json).unwrap_or_default();
                        if output == Output::Json {
                            println!("{v}");
                        } else {
                            println!("☁️  cloudevent");
                            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                        }
                    }
                    http::StatusCode::OK
                }
                Err(p) => {
                    eprintln!("not a CloudEvent: {}", p.detail);
                    http::StatusCode::BAD_REQUEST
                }
            }
        },
    );
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("listening on http://{}", l.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    crate::shutdown::on_signal(stop.clone());
    axum::serve(l, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_messages_are_cut_on_blank_lines_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.feed(b": keep-alive\n\nid: 3\nda").is_empty());
        let got: Vec<_> = p
            .feed(b"ta: {\"a\":\r\ndata: 1}\n\nevent: error\ndata: {}\n\n")
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            got,
            vec![
                SseMessage {
                    event: String::new(),
                    id: Some("3".into()),
                    data: "{\"a\":\n1}".into()
                },
                SseMessage {
                    event: "error".into(),
                    id: None,
                    data: "{}".into()
                }
            ]
        );
    }
}
