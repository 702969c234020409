//! Waiting for every resource to report Ready on `/v1/status`, and saying why not.

use super::*;

/// What watching `/v1/status` for a set of resources saw.
pub(super) struct Watch {
    /// From the watch's start until all were Ready; `None` when the limit passed first.
    pub(super) ready_after: Option<Duration>,
    pub(super) elapsed: Duration,
    pub(super) worst: Duration,
    pub(super) polls: usize,
    pub(super) timeouts: usize,
    pub(super) ready: usize,
    /// Per resource not Ready at the last answer: why (its first False condition).
    pub(super) not_ready: HashMap<String, String>,
    /// The last poll's failure, when it had one.
    pub(super) last_error: Option<String>,
    /// When `/v1/status` last answered (from the watch's start), if it ever did: the age
    /// of `not_ready`.
    pub(super) last_answer: Option<Duration>,
}

/// Polls `/v1/status` until every resource in `names` (namespace `bench`) is Ready or
/// `limit` has passed since `since`, showing progress. Fails only when the worker exits.
pub(super) async fn watch_ready(
    pipe: &mut Pipeline,
    client: &reqwest::Client,
    names: &[String],
    since: Instant,
    limit: Duration,
    tag: &str,
) -> Result<Watch, BenchError> {
    let url = format!("{}/v1/status", pipe.admin);
    let mut w = Watch {
        ready_after: None,
        elapsed: Duration::ZERO,
        worst: Duration::ZERO,
        polls: 0,
        timeouts: 0,
        ready: 0,
        not_ready: names
            .iter()
            .map(|n| (n.clone(), "not listed yet".to_string()))
            .collect(),
        last_error: None,
        last_answer: None,
    };
    let mut progress = Progress::new();
    loop {
        if let Some(status) = pipe.exited()? {
            progress.end();
            return Err(BenchError::Pipeline(format!(
                "{tag}: weir run exited ({status}) {:.1} s after the watch began, with {}/{} resources Ready",
                since.elapsed().as_secs_f64(),
                w.ready,
                names.len()
            )));
        }
        let t0 = Instant::now();
        let answer = async {
            client
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .json::<serde_json::Value>()
                .await
        }
        .await;
        let took = t0.elapsed();
        w.polls += 1;
        match answer {
            Ok(v) => {
                w.last_answer = Some(since.elapsed());
                w.worst = w.worst.max(took);
                w.last_error = None;
                readiness(&v, names, &mut w);
            }
            Err(e) if e.is_timeout() => {
                w.worst = w.worst.max(took);
                w.timeouts += 1;
                w.last_error = Some(format!("no answer in {STATUS_TIMEOUT:?}"));
            }
            // Refused before the admin port listens; not an answer time.
            Err(e) => w.last_error = Some(e.to_string()),
        }
        w.elapsed = since.elapsed();
        if w.ready == names.len() {
            w.ready_after = Some(w.elapsed);
            progress.finish(&format!(
                "  {tag}: {}/{} Ready after {:.2} s · worst /v1/status {:.0} ms",
                w.ready,
                names.len(),
                w.elapsed.as_secs_f64(),
                w.worst.as_secs_f64() * 1e3
            ));
            return Ok(w);
        }
        if w.elapsed >= limit {
            progress.end();
            return Ok(w);
        }
        progress.show((w.ready, w.timeouts), || {
            format!(
                "  {tag}: {}/{} Ready at {:.1} s · worst /v1/status {:.0} ms · {} polls timed out",
                w.ready,
                names.len(),
                w.elapsed.as_secs_f64(),
                w.worst.as_secs_f64() * 1e3,
                w.timeouts
            )
        });
        tokio::time::sleep(STATUS_POLL).await;
    }
}

/// Counts the Ready ones of `names` in a `/v1/status` answer and notes why the others are not.
pub(super) fn readiness(v: &serde_json::Value, names: &[String], w: &mut Watch) {
    let mut listed: HashMap<&str, &serde_json::Value> = HashMap::new();
    for r in v["resources"].as_array().into_iter().flatten() {
        if r["namespace"] == "bench"
            && let Some(name) = r["name"].as_str()
        {
            listed.insert(name, r);
        }
    }
    w.ready = 0;
    w.not_ready.clear();
    for name in names {
        match listed.get(name.as_str()) {
            Some(r) if r["ready"] == true => w.ready += 1,
            Some(r) => {
                let why = r["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["status"] != "True")
                    .map_or_else(
                        || "not Ready (no False condition)".to_string(),
                        |c| {
                            format!(
                                "{}=False {}: {}",
                                c["type"].as_str().unwrap_or("?"),
                                c["reason"].as_str().unwrap_or(""),
                                c["message"].as_str().unwrap_or("")
                            )
                        },
                    );
                w.not_ready.insert(name.clone(), why);
            }
            None => {
                w.not_ready.insert(name.clone(), "not listed".into());
            }
        }
    }
}

/// The error of a watch that timed out: how long, how many, which (and why), how the admin
/// API and PostgreSQL looked.
pub(super) async fn not_ready_error(
    tag: &str,
    w: &Watch,
    names: &[String],
    startup_max: Option<i64>,
    amqp_connections: Option<usize>,
    sampler: &PgSampler,
) -> BenchError {
    let shown: Vec<String> = names
        .iter()
        .filter_map(|n| w.not_ready.get(n).map(|why| format!("    {n}: {why}")))
        .take(NOT_READY_SHOWN)
        .collect();
    let missing = names.len() - w.ready;
    let more = missing.saturating_sub(shown.len());
    let sessions = sampler.breakdown().await.unwrap_or_default();
    BenchError::Pipeline(format!(
        "{tag}: {missing} of {} resources not Ready after {:.1} s\n  \
         /v1/status: {} polls, {} timed out (> {:?}), worst {:.0} ms{}\n  \
         PostgreSQL sessions of the worker: max {} during the wait; now {}\n  \
         AMQP connections of the worker now: {}\n  \
         not Ready {}:\n{}{}",
        names.len(),
        w.elapsed.as_secs_f64(),
        w.polls,
        w.timeouts,
        STATUS_TIMEOUT,
        w.worst.as_secs_f64() * 1e3,
        w.last_error
            .as_ref()
            .map_or_else(String::new, |e| format!("; last poll: {e}")),
        startup_max.map_or_else(|| "-".into(), |v| v.to_string()),
        if sessions.is_empty() {
            "-".to_string()
        } else {
            sessions
        },
        amqp_connections.map_or_else(|| "-".into(), |c| c.to_string()),
        match w.last_answer {
            Some(t) => format!("at the last /v1/status answer ({:.1} s)", t.as_secs_f64()),
            None => "(/v1/status never answered)".into(),
        },
        shown.join("\n"),
        if more > 0 {
            format!("\n    … and {more} more")
        } else {
            String::new()
        }
    ))
}
