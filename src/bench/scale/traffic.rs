//! The paced traffic phase, and the progress line of long phases.

use super::*;

pub(super) struct Traffic {
    pub(super) started: Instant,
    pub(super) sent: usize,
    pub(super) errors: usize,
}

/// Publishes `rate × duration` events, one per request, paced open-loop (event i is due at
/// i ÷ rate) and spread round-robin over `streams`, each stamped with its due time.
pub(super) async fn traffic(
    pipe: &Pipeline,
    streams: &[String],
    rate: u64,
    duration: Duration,
    payload_bytes: usize,
    sink: &Sink,
    label: &str,
) -> Result<Traffic, BenchError> {
    let total = ((rate as f64 * duration.as_secs_f64()).round() as usize).max(1);
    let urls: Vec<String> = streams.iter().map(|s| pipe.events_url(s)).collect();
    let client = crate::tls_provider::http_client_builder()
        .pool_max_idle_per_host(PUBLISH_IN_FLIGHT)
        .timeout(PUBLISH_TIMEOUT)
        .build()?;
    let limit = Arc::new(Semaphore::new(PUBLISH_IN_FLIGHT));
    let sent = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let data = payload(payload_bytes, 0);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let mut progress = Progress::new();
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let body = json!({
            "specversion": "1.0", "id": format!("{label}-{i}"), "source": "/bench",
            "type": "order.created", "subject": format!("order-{i}"),
            "datacontenttype": "application/json",
            sink::SENT_EXTENSION: sink::stamp_of(due).to_string(), "data": data,
        });
        let url = urls[i % urls.len()].clone();
        let (client, ok, failed) = (client.clone(), sent.clone(), errors.clone());
        tasks.spawn(async move {
            let r = client
                .post(url)
                .header(http::header::CONTENT_TYPE, "application/cloudevents+json")
                .body(serde_json::to_vec(&body).unwrap_or_default())
                .send()
                .await;
            if matches!(&r, Ok(r) if r.status().is_success()) {
                ok.fetch_add(1, Ordering::Relaxed);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
        // Reap finished requests so the set stays as small as the requests in flight.
        while tasks.try_join_next().is_some() {}
        // Only the time advances the line in a log: a change of counts is no news here.
        progress.show((0, 0), || {
            format!(
                "  sent {}/{total} · errors {} · delivered {}",
                sent.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed),
                sink.delivered()
            )
        });
    }
    while tasks.join_next().await.is_some() {}
    let (sent, errors) = (sent.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    progress.finish(&format!("  sent {sent}/{total} · errors {errors}"));
    Ok(Traffic {
        started,
        sent,
        errors,
    })
}

/// Progress on stderr. On a terminal, one line rewritten twice a second; otherwise (a log, a
/// test's captured output) a new line when the watched counts change, else every 10 s, so a
/// long wait does not fill the log.
pub(super) struct Progress {
    pub(super) tty: bool,
    pub(super) last: Instant,
    pub(super) key: Option<(usize, usize)>,
    /// A line rewritten in place is on screen (a newline must end it).
    pub(super) open: bool,
}

impl Progress {
    pub(super) fn new() -> Progress {
        use std::io::IsTerminal as _;
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            key: None,
            open: false,
        }
    }

    pub(super) fn show(&mut self, key: (usize, usize), line: impl FnOnce() -> String) {
        let age = self.last.elapsed();
        if self.tty && age >= Duration::from_millis(500) {
            eprint!("\r{}   ", line());
            self.open = true;
        } else if !self.tty
            && ((self.key != Some(key) && age >= Duration::from_millis(500))
                || age >= Duration::from_secs(10))
        {
            eprintln!("{}", line());
            self.key = Some(key);
        } else {
            return;
        }
        self.last = Instant::now();
    }

    /// Ends a line left open.
    pub(super) fn end(&mut self) {
        if self.open {
            eprintln!();
            self.open = false;
        }
    }

    pub(super) fn finish(&mut self, line: &str) {
        if self.open {
            eprintln!("\r{line}   ");
            self.open = false;
        } else {
            eprintln!("{line}");
        }
    }
}
