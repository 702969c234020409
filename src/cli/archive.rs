//! `weir archive run|status|verify`: archive operations through a running `weir`'s admin API,
//! so they work the same against a cluster through `kubectl port-forward`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;

use super::client::{bar, failed, send, split};
use super::output::Output;

#[derive(Subcommand, Debug)]
pub enum ArchiveAction {
    /// Archive what is eligible now, with a progress bar.
    Run {
        /// `<namespace>/<stream>`.
        target: String,
    },
    /// Archive totals of every stream an ArchivePolicy selects.
    Status,
    /// Read every segment back: checksums, counts, position continuity with the hot table.
    /// Exits 1 on any problem.
    Verify {
        /// `<namespace>/<stream>`; every archived stream when omitted.
        target: Option<String>,
    },
}

/// How long `run` waits for a run that holds the stream (a scheduled one, or another
/// replica's) before giving up.
const BUSY_WAIT: Duration = Duration::from_secs(120);

pub async fn archive(
    admin: &str,
    token: Option<&str>,
    output: Output,
    action: ArchiveAction,
) -> anyhow::Result<ExitCode> {
    let client = super::client::http_client(token)?;
    let admin = admin.trim_end_matches('/');
    match action {
        ArchiveAction::Run { target } => {
            let (ns, name) = split(&target, "stream")?;
            // One segment per call, so a person sees progress between calls.
            let url =
                format!("{admin}/v1/namespaces/{ns}/streams/{name}/archive/run?maxSegments=1");
            let (mut events, mut segments, mut raw, mut stored) = (0u64, 0u64, 0u64, 0u64);
            let mut total = None::<u64>;
            let started = tokio::time::Instant::now();
            loop {
                let (status, body) = send(client.post(&url), &format!("POST {url}")).await?;
                if status == 409 {
                    if started.elapsed() > BUSY_WAIT {
                        bail!("{target} stayed busy with another archive run for {BUSY_WAIT:?}");
                    }
                    if output == Output::Table {
                        eprint!("\rwaiting for the archive run in progress to finish...");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                if !(200..300).contains(&status) {
                    bail!(failed(status, &body));
                }
                let n = body["events"].as_u64().unwrap_or(0);
                let s = body["segments"].as_u64().unwrap_or(0);
                let remaining = body["remaining"].as_u64().unwrap_or(0);
                events += n;
                segments += s;
                raw += body["rawBytes"].as_u64().unwrap_or(0);
                stored += body["storedBytes"].as_u64().unwrap_or(0);
                let all = *total.get_or_insert(events + remaining);
                if output == Output::Table {
                    bar("archiving", events, all);
                }
                if s == 0 || remaining == 0 {
                    break;
                }
            }
            let ratio = if stored > 0 {
                raw as f64 / stored as f64
            } else {
                0.0
            };
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({"segments": segments, "events": events,
                        "rawBytes": raw, "storedBytes": stored, "compressionRatio": ratio})
                );
            } else {
                eprintln!();
                println!(
                    "archived {events} events in {segments} segments: {raw} bytes -> {stored} bytes ({ratio:.1}x)"
                );
            }
        }
        ArchiveAction::Status => {
            let url = format!("{admin}/v1/archive");
            let (status, body) = send(client.get(&url), &format!("GET {url}")).await?;
            if !(200..300).contains(&status) {
                bail!(failed(status, &body));
            }
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<28} {:<24} {:>8} {:>10} {:>12} {:>12} {:>6} {:<20} {:>10} ERROR",
                "STREAM",
                "POLICY",
                "SEGMENTS",
                "EVENTS",
                "RAW",
                "STORED",
                "RATIO",
                "LAST RUN",
                "HOT FROM"
            );
            let empty = vec![];
            for s in body["streams"].as_array().unwrap_or(&empty) {
                let t = |k: &str| match &s[k] {
                    serde_json::Value::String(v) => v.clone(),
                    serde_json::Value::Null => "-".into(),
                    v => v.to_string(),
                };
                let ratio = s["compressionRatio"]
                    .as_f64()
                    .map_or("-".into(), |r| format!("{r:.1}"));
                let last: String = t("lastRun").chars().take(19).collect();
                println!(
                    "{:<28} {:<24} {:>8} {:>10} {:>12} {:>12} {:>6} {:<20} {:>10} {}",
                    t("stream"),
                    t("policy"),
                    t("segments"),
                    t("archivedEvents"),
                    t("rawBytes"),
                    t("storedBytes"),
                    ratio,
                    last,
                    t("hotFrom"),
                    s["lastError"]
                        .as_str()
                        .or(s["error"].as_str())
                        .unwrap_or("")
                );
            }
        }
        ArchiveAction::Verify { target } => {
            let streams: Vec<String> = match target {
                Some(t) => {
                    split(&t, "stream")?;
                    vec![t]
                }
                None => {
                    let url = format!("{admin}/v1/archive");
                    let (status, body) = send(client.get(&url), &format!("GET {url}")).await?;
                    if !(200..300).contains(&status) {
                        bail!(failed(status, &body));
                    }
                    body["streams"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| s["stream"].as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default()
                }
            };
            let mut problems = Vec::new();
            let mut reports = serde_json::Map::new();
            let all = streams.len() as u64;
            for (i, stream) in streams.iter().enumerate() {
                if output == Output::Table {
                    bar("verifying", i as u64, all);
                }
                let (ns, name) = split(stream, "stream")?;
                let url = format!("{admin}/v1/namespaces/{ns}/streams/{name}/archive/verify");
                let (status, body) = send(client.post(&url), &format!("POST {url}")).await?;
                if !(200..300).contains(&status) {
                    problems.push(format!("{stream}: {}", failed(status, &body)));
                    continue;
                }
                for p in body["problems"].as_array().into_iter().flatten() {
                    problems.push(format!("{stream}: {}", p.as_str().unwrap_or("")));
                }
                reports.insert(stream.clone(), body);
            }
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"streams": reports, "problems": problems})
                    )?
                );
            } else {
                bar("verifying", all, all);
                eprintln!();
                for (stream, r) in &reports {
                    println!(
                        "{stream}: {} segments, {} blocks, {} events checked",
                        r["segments"], r["blocks"], r["events"]
                    );
                }
                for p in &problems {
                    println!("PROBLEM {p}");
                }
                println!("{} problem(s) found", problems.len());
            }
            if !problems.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
