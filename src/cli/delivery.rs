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

/// How often `tail` asks for new events once it reached the head.
const TAIL_POLL: Duration = Duration::from_millis(500);

pub async fn tail(
    url: &str,
    token: Option<&str>,
    output: Output,
    target: &str,
    from: i64,
) -> anyhow::Result<ExitCode> {
    let (ns, stream) = split(target, "stream")?;
    let client = client::http_client(token)?;
    let mut next = from.max(1);
    loop {
        let u = format!(
            "{}/v1/namespaces/{ns}/streams/{stream}/events?from={next}&limit=500",
            url.trim_end_matches('/')
        );
        let body = answer(client.get(&u), &format!("GET {u}")).await?;
        let empty = vec![];
        let events = body.as_array().unwrap_or(&empty);
        for ev in events {
            print_event(ev, output);
            if let Some(p) = ev["weirposition"]
                .as_str()
                .and_then(|p| p.parse::<i64>().ok())
            {
                next = next.max(p + 1);
            }
        }
        if events.is_empty() {
            tokio::time::sleep(TAIL_POLL).await;
        }
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
