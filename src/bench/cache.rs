//! The `cache` scenario: Zipf-distributed subject reads through each caching strategy beside
//! the same reads of a stream without a cache.

use super::load::{self, payload};
use super::pipeline::Pipeline;
use super::report::{Measurement, Report};
use super::scenarios::{stream_yaml, versions};
use super::{BenchArgs, BenchError};

/// Events stored per subject by the `cache` scenario.
const CACHE_EVENTS_PER_SUBJECT: usize = 3;
/// Events per request while the `cache` scenario stores its subjects.
const CACHE_LOAD_BATCH: usize = 100;
/// Exponent of the Zipf distribution of subject reads (the classic web-cache workload).
const ZIPF_S: f64 = 1.0;
/// Seeds of the read sequences: the same reads for every strategy and the baseline.
const ZIPF_SEED: u64 = 0x5eed_cace;
const ZIPF_WARMUP_SEED: u64 = 0x5eed_0001;
/// `ttl` of the TTL strategy's policy: short enough that entries expire during a run
/// (the other strategies keep the default 300 s, which a run never reaches).
const TTL_STRATEGY_TTL: &str = "5s";

/// The strategies measured, with their CachePolicy `strategy` value and stream name.
const CACHE_STRATEGIES: [(&str, &str); 4] = [
    ("LRU", "reads-lru"),
    ("LFU", "reads-lfu"),
    ("FIFO", "reads-fifo"),
    ("TTL", "reads-ttl"),
];
const NO_CACHE_STREAM: &str = "reads-nocache";

/// The sum of `weir_cache_requests_total{policy,result}` samples in a scrape.
async fn cache_lookups(admin: &str, policy: &str) -> Result<(f64, f64), BenchError> {
    let text = crate::tls_provider::http_client()
        .get(format!("{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let get = |result: &str| -> f64 {
        let want = format!(
            r#"weir_cache_requests_total{{namespace="bench",policy="{policy}",result="{result}"}}"#
        );
        text.lines()
            .find(|l| l.starts_with(&want))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    Ok((get("hit"), get("miss")))
}

/// Stores `subjects × CACHE_EVENTS_PER_SUBJECT` events in a stream, in batched publishes.
async fn store_subjects(
    client: &reqwest::Client,
    url: &str,
    subjects: usize,
    payload_bytes: usize,
) -> Result<(), BenchError> {
    let data = payload(payload_bytes, 0);
    let all: Vec<usize> = (0..subjects * CACHE_EVENTS_PER_SUBJECT).collect();
    for chunk in all.chunks(CACHE_LOAD_BATCH) {
        let body: Vec<_> = chunk
            .iter()
            .map(|i| {
                serde_json::json!({"type": "order.updated", "id": format!("c-{i}"),
                                   "subject": format!("subject-{}", i % subjects), "data": data})
            })
            .collect();
        let r = client.post(url).json(&body).send().await?;
        if !r.status().is_success() {
            return Err(BenchError::Pipeline(format!(
                "storing the subjects: {} answered {}",
                url,
                r.status()
            )));
        }
    }
    Ok(())
}

pub async fn cache(args: &BenchArgs) -> Result<Vec<Report>, BenchError> {
    super::own_pipeline(
        args,
        "the cache scenario starts its own pipeline (its streams and CachePolicies)",
    )?;
    let versions = versions(&args.pg_url).await;
    let subjects = args.subjects.max(1);
    let items = args.cache_items.max(1);
    eprintln!("starting a weir pipeline…");
    let pipe = Pipeline::start(&args.pg_url, &args.amqp_url, |_| {
        let store = "  store: {urlSecretRef: {name: pg, key: url}}\n";
        let mut docs = vec![stream_yaml(NO_CACHE_STREAM, store)];
        for (strategy, stream) in CACHE_STRATEGIES {
            let ttl = if strategy == "TTL" {
                TTL_STRATEGY_TTL
            } else {
                "300s"
            };
            docs.push(stream_yaml(stream, store));
            docs.push(format!(
                "apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: cache-{}, namespace: bench}}\n\
                 spec: {{streamNames: [{stream}], strategy: {strategy}, maxItems: {items}, ttl: {ttl}}}\n",
                strategy.to_lowercase()
            ));
        }
        docs.join("---\n")
    })
    .await?;
    let mut streams = vec![NO_CACHE_STREAM];
    streams.extend(CACHE_STRATEGIES.iter().map(|(_, s)| *s));
    pipe.wait_ready(&streams).await?;

    let client = crate::tls_provider::http_client();
    for (i, stream) in streams.iter().enumerate() {
        eprint!(
            "\rstoring {subjects} subjects × {CACHE_EVENTS_PER_SUBJECT} events in stream {}/{}…   ",
            i + 1,
            streams.len()
        );
        store_subjects(&client, &pipe.events_url(stream), subjects, args.payload).await?;
    }
    eprintln!();

    let reads = args.events.max(1);
    let order = load::zipf_sequence(subjects, ZIPF_S, reads, ZIPF_SEED);
    let warmup = load::zipf_sequence(
        subjects,
        ZIPF_S,
        (reads / 10).clamp(500, 20_000),
        ZIPF_WARMUP_SEED,
    );
    let concurrency = args.concurrency.max(1);
    let subject_urls = |stream: &str| -> Vec<String> {
        (0..subjects)
            .map(|k| {
                format!(
                    "{}/v1/namespaces/bench/streams/{stream}/subjects/subject-{k}/events",
                    pipe.url
                )
            })
            .collect()
    };
    // Warm-up first (it also waits out the start of the cache's invalidation listener,
    // before which the cache is bypassed), then the measured reads.
    let label = "no cache";
    let urls = subject_urls(NO_CACHE_STREAM);
    eprintln!("cache {label}: warm-up ({} reads)", warmup.len());
    load::read(&urls, &warmup, concurrency, false).await?;
    eprintln!("cache {label}: {reads} reads, {concurrency} clients");
    let r = load::read(&urls, &order, concurrency, true).await?;
    let baseline = Measurement::from_load(&format!("no cache ({concurrency} clients)"), &r, None);
    let mut reports = vec![];
    for (strategy, stream) in CACHE_STRATEGIES {
        let policy = format!("cache-{}", strategy.to_lowercase());
        let label = format!("{strategy} (maxItems {items})");
        let urls = subject_urls(stream);
        eprintln!("cache {label}: warm-up ({} reads)", warmup.len());
        load::read(&urls, &warmup, concurrency, false).await?;
        // Counted from the warm-up's end: the ratio of a cache that has filled.
        let (h0, m0) = cache_lookups(&pipe.admin, &policy).await?;
        eprintln!("cache {label}: {reads} reads, {concurrency} clients");
        let r = load::read(&urls, &order, concurrency, true).await?;
        let (h1, m1) = cache_lookups(&pipe.admin, &policy).await?;
        let lookups = (h1 - h0) + (m1 - m0);
        let mut weir = Measurement::from_load(
            &format!("weir {strategy} ({concurrency} clients)"),
            &r,
            None,
        );
        weir.hit_ratio = (lookups > 0.0).then(|| (h1 - h0) / lookups);
        reports.push(Report::new(
            "cache",
            format!("{strategy} maxItems={items} subjects={subjects}"),
            weir,
            baseline.clone(),
            versions.clone(),
        ));
    }
    pipe.stop().await?;
    Ok(reports)
}
