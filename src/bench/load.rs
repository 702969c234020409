//! The load generator: concurrent HTTP publishers with an optional offered rate, latencies
//! recorded in an HDR histogram, progress on stderr.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

use super::BenchError;

pub struct LoadResult {
    pub events: usize,
    pub elapsed: Duration,
    /// Request latencies in microseconds.
    pub latency: Histogram<u64>,
    pub errors: usize,
}

impl LoadResult {
    pub fn events_per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A JSON payload of about `bytes` bytes.
pub fn payload(bytes: usize, i: usize) -> serde_json::Value {
    let pad = bytes.saturating_sub(48).max(1);
    json!({"orderId": format!("o-{i}"), "amount": i % 1000, "note": "x".repeat(pad)})
}

/// One load run: `events` events to `url` in requests of `batch`, from `concurrency` clients,
/// at `rate` events/s overall if set. `label` prefixes event ids (unique per run).
pub struct LoadSpec<'a> {
    pub url: &'a str,
    pub label: &'a str,
    pub events: usize,
    pub batch: usize,
    pub concurrency: usize,
    pub payload_bytes: usize,
    pub rate: Option<u64>,
    pub max_duration: Option<Duration>,
    pub show_progress: bool,
    /// Send real CloudEvents (`application/cloudevents-batch+json`) carrying their publish
    /// time in the [`super::sink::SENT_EXTENSION`] extension, for latency taken at a sink:
    /// the due time of a paced request, else the moment it is built.
    pub stamp: bool,
    /// Add `customer: {email, phone}` to every payload: the two fields the `ingest --pii`
    /// run encrypts (its plain stream gets them too, so both runs send the same bytes).
    pub customer: bool,
}

impl<'a> LoadSpec<'a> {
    /// `events` of `payload_bytes` each, `batch` per request, `concurrency` requests in flight,
    /// as fast as the worker answers: no pacing, no time cap, no progress line, plain JSON
    /// events without a sent stamp or customer fields. Set the rest with struct update syntax.
    pub fn new(
        url: &'a str,
        label: &'a str,
        events: usize,
        batch: usize,
        concurrency: usize,
        payload_bytes: usize,
    ) -> LoadSpec<'a> {
        LoadSpec {
            url,
            label,
            events,
            batch,
            concurrency,
            payload_bytes,
            rate: None,
            max_duration: None,
            show_progress: false,
            stamp: false,
            customer: false,
        }
    }
}

pub async fn publish(spec: &LoadSpec<'_>) -> Result<LoadResult, BenchError> {
    let &LoadSpec {
        url,
        label,
        events,
        batch,
        concurrency,
        payload_bytes,
        rate,
        max_duration,
        show_progress,
        stamp,
        customer,
    } = spec;
    let batch = batch.max(1);
    let requests = events.div_ceil(batch);
    let next = Arc::new(AtomicUsize::new(0));
    let done_events = Arc::new(AtomicUsize::new(0));
    // One shared client: connection reuse, as a real publisher would.
    let client = crate::tls_provider::http_client_builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let started = Instant::now();
    let deadline = max_duration.map(|d| started + d);
    let interval = rate.map(|r| Duration::from_secs_f64(batch as f64 / r.max(1) as f64));
    let mut body_template = payload(payload_bytes, 0);
    if customer {
        body_template["customer"] = json!({"email": "someone@example.com", "phone": "+1 555 0100"});
    }
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, next, done_events) = (client.clone(), next.clone(), done_events.clone());
        let (url, label, template) = (url.to_string(), label.to_string(), body_template.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| BenchError::Pipeline(e.to_string()))?;
            let mut errors = 0;
            loop {
                let r = next.fetch_add(1, Ordering::Relaxed);
                if r >= requests || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                // Open-loop pacing: request r is due at r × interval, whatever the latency.
                let due = interval.map(|iv| started + iv * r as u32);
                if let Some(due) = due {
                    tokio::time::sleep_until(due.into()).await;
                }
                let n = batch.min(events - r * batch);
                let t0 = due.unwrap_or_else(Instant::now).max(started);
                let sent = stamp.then(|| super::sink::stamp_of(t0).to_string());
                let body: Vec<_> = (0..n)
                    .map(|i| {
                        let id = format!("{label}-{r}-{i}");
                        let subject = format!("order-{}", (r * batch + i) % 1000);
                        match &sent {
                            Some(sent) => json!({"specversion": "1.0", "id": id,
                                "source": "/bench", "type": "order.created",
                                "subject": subject, "datacontenttype": "application/json",
                                super::sink::SENT_EXTENSION: sent, "data": template}),
                            None => json!({"type": "order.created", "id": id,
                                "subject": subject, "data": template}),
                        }
                    })
                    .collect();
                let content_type = if stamp {
                    "application/cloudevents-batch+json"
                } else {
                    "application/json"
                };
                let resp = client
                    .post(&url)
                    .header(http::header::CONTENT_TYPE, content_type)
                    .body(serde_json::to_vec(&body).unwrap_or_default())
                    .send()
                    .await;
                let ok = matches!(&resp, Ok(r) if r.status().is_success());
                let us = t0.elapsed().as_micros().max(1) as u64;
                let _ = hist.record(us.min(60_000_000));
                if ok {
                    done_events.fetch_add(n, Ordering::Relaxed);
                } else {
                    errors += 1;
                }
            }
            Ok::<_, BenchError>((hist, errors))
        }));
    }
    let progress = show_progress.then(|| spawn_progress(done_events.clone(), events, "events"));
    finish(tasks, progress, started, &done_events).await
}

/// One read run: GET `urls[order[i]]` for every `i`, from `concurrency` clients taking the
/// next index in turn (so every run with the same `order` makes the same reads). A read that
/// does not answer 2xx counts as an error.
pub async fn read(
    urls: &[String],
    order: &[u32],
    concurrency: usize,
    show_progress: bool,
) -> Result<LoadResult, BenchError> {
    let urls: Arc<[String]> = urls.into();
    let order: Arc<[u32]> = order.into();
    let total = order.len();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let client = crate::tls_provider::http_client_builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let started = Instant::now();
    // One task per client: `concurrency` bounds the reads in flight.
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, next, done) = (client.clone(), next.clone(), done.clone());
        let (urls, order) = (urls.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| BenchError::Pipeline(e.to_string()))?;
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&k) = order.get(i) else { break };
                let Some(url) = urls.get(k as usize) else {
                    errors += 1;
                    continue;
                };
                let t0 = Instant::now();
                // The body is read to the end: the time includes the transfer.
                let ok = match client.get(url).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                let us = t0.elapsed().as_micros().max(1) as u64;
                let _ = hist.record(us.min(60_000_000));
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors += 1;
                }
            }
            Ok::<_, BenchError>((hist, errors))
        }));
    }
    let progress = show_progress.then(|| spawn_progress(done.clone(), total, "reads"));
    finish(tasks, progress, started, &done).await
}

/// Zipf-distributed ranks in `0..n` (rank 0 the most frequent), exponent `s`, sampled by
/// inverting the cumulative distribution (a table of `n` floats) with a seeded RNG, so a
/// given seed always yields the same sequence.
pub fn zipf_sequence(n: usize, s: f64, len: usize, seed: u64) -> Vec<u32> {
    use rand::{Rng, SeedableRng};
    let n = n.max(1);
    let mut cdf = Vec::with_capacity(n);
    let mut sum = 0.0;
    for k in 1..=n {
        sum += 1.0 / (k as f64).powf(s);
        cdf.push(sum);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            let u = rng.random::<f64>() * sum;
            // The first rank whose cumulative weight reaches u.
            cdf.partition_point(|&c| c < u).min(n - 1) as u32
        })
        .collect()
}

/// Prints `done/total unit` on stderr every half second until aborted.
fn spawn_progress(
    done: Arc<AtomicUsize>,
    total: usize,
    unit: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let d = done.load(Ordering::Relaxed);
            eprint!(
                "\r  {d}/{total} {unit} ({:.0}%)   ",
                100.0 * d as f64 / total.max(1) as f64
            );
        }
    })
}

type Worker = tokio::task::JoinHandle<Result<(Histogram<u64>, usize), BenchError>>;

/// Waits for the workers and merges their latencies and error counts; `done` counts what
/// succeeded.
async fn finish(
    tasks: Vec<Worker>,
    progress: Option<tokio::task::JoinHandle<()>>,
    started: Instant,
    done: &AtomicUsize,
) -> Result<LoadResult, BenchError> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| BenchError::Pipeline(e.to_string()))?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await.map_err(|e| BenchError::Pipeline(e.to_string()))??;
        let _ = latency.add(h);
        errors += e;
    }
    let elapsed = started.elapsed();
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    Ok(LoadResult {
        events: done.load(Ordering::Relaxed),
        elapsed,
        latency,
        errors,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn zipf_is_seeded_skewed_and_in_range() {
        let a = super::zipf_sequence(1000, 1.0, 20_000, 7);
        assert_eq!(a, super::zipf_sequence(1000, 1.0, 20_000, 7));
        assert!(a.iter().all(|&k| k < 1000));
        let count = |r: u32| a.iter().filter(|&&k| k == r).count() as f64;
        // P(rank 1) = 1/H(1000) ≈ 0.134; rank 2 half of it, rank 10 a tenth.
        let p0 = count(0) / a.len() as f64;
        assert!((0.12..0.15).contains(&p0), "p(rank 1) = {p0}");
        assert!(count(0) > 1.6 * count(1) && count(1) > 3.0 * count(9));
    }
}
