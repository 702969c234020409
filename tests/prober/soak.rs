//! The soak: the prober's pipeline (two workers, a stored and a broker-only stream, a perKey
//! and an unordered subscription each) under steady mixed load and no faults — publishes,
//! deliveries, reads through a cache, an archiver on a short schedule — for
//! `WEIR_SOAK_SECONDS` (default 3600) at `WEIR_SOAK_RATE` events/s (default 100), with a line
//! of resources and latencies every `WEIR_SOAK_EVERY` seconds (default 60).
//!
//! Pass (the run split in sixths, so a shorter run keeps the shape of the hour): after a
//! warm-up (the first sixth: 10 minutes of an hour), the reference is the maxima of the second
//! sixth (minutes 10–20); over the last third (the last 20 minutes) the workers' RSS stays
//! within 20 % of its reference maximum, PostgreSQL connections within 2 and RabbitMQ channels
//! within 4 of theirs. Open files are judged by their typical level, not single samples: the
//! median of the last third within 16 of the reference median, and the last sample within 16
//! of the reference maximum. (A worker's open files include the connections its clients hold:
//! a burst of publishers reconnecting doubles them for a minute and they close again, while a
//! leak raises every later sample.) And every answered event delivered, as in the prober.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::load::{self, Answer, Ledger};
use crate::report::{self, Sample};
use crate::{NS, Rig, env_u64};

/// The p-th percentile (0–100) of `v` in ms (sorted in place).
fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

/// Reads while the load runs: a page from a random position (old positions come from the
/// archive) and a key's subject page (served from the cache between its appends), 20 a
/// second. Each read's end time, latency and success go to `out`.
async fn read_load(
    rig_targets: load::Targets,
    ledger: Ledger,
    out: Reads,
    stop: CancellationToken,
) {
    let client = crate::common::http();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut i = 0u64;
    let mut stored = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Stored events answered so far: the range of positions to read (counted once a
        // second, not per read: the ledger is the sender's too).
        if i.is_multiple_of(20) {
            stored = ledger
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.stream == 0 && s.answer == Answer::Accepted)
                .count() as u64;
        }
        if stored == 0 {
            i += 1;
            continue;
        }
        let base = rig_targets.workers.read().unwrap()[(i % 2) as usize].clone();
        let stream = format!(
            "{base}/v1/namespaces/{NS}/streams/{}",
            rig_targets.streams[0]
        );
        let url = if i.is_multiple_of(2) {
            let from = 1 + rand::random::<u64>() % stored;
            format!("{stream}/events?from={from}&limit=10")
        } else {
            let key = 2 * (rand::random::<u64>() % (load::KEYS / 2));
            format!("{stream}/subjects/k{key}/events?limit=20")
        };
        let t = Instant::now();
        let ok = client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        out.lock().unwrap().push((Instant::now(), t.elapsed(), ok));
        i += 1;
    }
}

/// Every read: when it ended, how long it took, whether it was answered 2xx.
type Reads = Arc<Mutex<Vec<(Instant, Duration, bool)>>>;

/// The sum of metric `name`'s samples whose labels contain `label` over both workers.
async fn metric_sum(rig: &Rig, name: &str, label: &str) -> f64 {
    let mut sum = 0.0;
    for w in &rig.workers {
        let text = w.metrics().await;
        sum += text
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    sum
}

pub async fn soak() {
    let seconds = env_u64("WEIR_SOAK_SECONDS", 3600);
    let rate = env_u64("WEIR_SOAK_RATE", 100) as u32;
    let every = Duration::from_secs(env_u64("WEIR_SOAK_EVERY", 60));
    eprintln!(
        "[soak] WEIR_SOAK_SECONDS={seconds} WEIR_SOAK_RATE={rate} WEIR_SOAK_EVERY={}",
        every.as_secs()
    );
    let rig = Rig::start(
        "apiVersion: weir.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: soak-cache, namespace: test}\n\
         spec: {streamNames: [{stored}], strategy: LRU, maxItems: 1000, ttl: 300s}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {name: soak-archive, namespace: test}\n\
         spec: {streamNames: [{stored}], archiveAfter: 60s, schedule: 15s, segment: {maxEvents: 1000}}\n",
    )
    .await;
    let started = Instant::now();
    let ledger = Ledger::default();
    let stop = CancellationToken::new();
    let sender = tokio::spawn(load::send(
        rig.run.clone(),
        rate,
        rig.targets.clone(),
        ledger.clone(),
        stop.clone(),
    ));
    let reads = Reads::default();
    let reader = tokio::spawn(read_load(
        rig.targets.clone(),
        ledger.clone(),
        reads.clone(),
        stop.clone(),
    ));
    let mut samples = Vec::<Sample>::new();
    let sampler = rig.sampler();
    let mut minute = 0;
    eprintln!(
        "[soak] | min | RSS MiB (each) | fds | pg conns | channels | publish p50/p99 ms | read p50/p99 ms | delivered |"
    );
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(every).await;
        minute += 1;
        let s = sampler.sample(started).await;
        let window_start = Instant::now() - every;
        let mut lat: Vec<Duration> = ledger
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|x| x.sent_at >= window_start)
            .filter_map(|x| x.answered_at.map(|a| a - x.sent_at))
            .collect();
        let mut read_lat: Vec<Duration> = reads
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 >= window_start)
            .map(|r| r.1)
            .collect();
        let (delivered, _) = rig.receiver.activity();
        // Each worker's share: a growth in one only (its cache, its subscriptions' lanes)
        // reads differently from one in both.
        let each: Vec<String> = rig
            .pids
            .lock()
            .unwrap()
            .iter()
            .map(|p| {
                crate::common::chaos::rss_kib(*p)
                    .map_or("–".into(), |k| format!("{:.0}", k as f64 / 1024.0))
            })
            .collect();
        eprintln!(
            "[soak] | {minute} | {:.1} ({}) | {} | {} | {} | {:.1}/{:.1} | {:.1}/{:.1} | {delivered} |",
            s.rss_mib.unwrap_or(f64::NAN),
            each.join(" + "),
            s.fds.unwrap_or(0),
            s.pg_conns.unwrap_or(-1),
            s.channels.map_or(-1, |c| c as i64),
            pct(&mut lat, 50.0),
            pct(&mut lat, 99.0),
            pct(&mut read_lat, 50.0),
            pct(&mut read_lat, 99.0),
        );
        samples.push(s);
    }
    stop.cancel();
    sender.await.unwrap();
    reader.await.unwrap();
    let reads = reads.lock().unwrap().clone();
    let drained = rig.drain(&ledger, Duration::from_secs(300)).await;
    let tallies = rig.tallies(&ledger);
    let dlq = rig.dlq().await;
    let l = ledger.0.lock().unwrap().clone();
    let mut read_lat: Vec<Duration> = reads.iter().map(|r| r.1).collect();
    let read_failed = reads.iter().filter(|r| !r.2).count();
    let mut pub_lat: Vec<Duration> = l
        .iter()
        .filter_map(|x| x.answered_at.map(|a| a - x.sent_at))
        .collect();
    eprintln!(
        "\n[soak] {} events, drained in {:.0}s; publish p50/p95/p99 {:.1}/{:.1}/{:.1} ms; \
         {} reads ({read_failed} failed) p50/p95/p99 {:.1}/{:.1}/{:.1} ms\n",
        l.len(),
        drained.as_secs_f64(),
        pct(&mut pub_lat, 50.0),
        pct(&mut pub_lat, 95.0),
        pct(&mut pub_lat, 99.0),
        reads.len(),
        pct(&mut read_lat, 50.0),
        pct(&mut read_lat, 95.0),
        pct(&mut read_lat, 99.0),
    );
    eprintln!("{}", report::counts_table(&l, &rig.subs, &tallies, &dlq));
    let cache_hits = metric_sum(&rig, "weir_cache_requests_total", "result=\"hit\"").await;
    let cache_misses = metric_sum(&rig, "weir_cache_requests_total", "result=\"miss\"").await;
    let archived = metric_sum(&rig, "weir_archive_events_total", "").await;
    eprintln!("[soak] cache hits {cache_hits}, misses {cache_misses}; events archived {archived}");
    let verdict = growth(&samples, Duration::from_secs(seconds));
    eprintln!("[soak] {verdict:?}");
    for (s, t) in rig.subs.iter().zip(&tallies) {
        assert!(
            t.clean(),
            "{}: missing {}, unexpected {}, order {}",
            s.name,
            t.missing.len(),
            t.unexpected.len(),
            t.order_violations.len()
        );
    }
    assert_eq!(read_failed, 0, "reads failed");
    assert!(cache_hits > 0.0, "the reads never hit the cache");
    assert!(archived > 0.0, "nothing was archived");
    assert!(verdict.is_ok(), "{verdict:?}");
}

/// The growth criterion of the module's doc: Ok with the figures, or Err naming what grew.
fn growth(samples: &[Sample], run: Duration) -> Result<String, String> {
    let sixth = run / 6;
    let reference: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= sixth && s.at < 2 * sixth)
        .collect();
    let last: Vec<&Sample> = samples.iter().filter(|s| s.at >= 4 * sixth).collect();
    if reference.is_empty() || last.is_empty() {
        return Err(format!("too few samples ({}) to judge", samples.len()));
    }
    let max = |v: &[&Sample], f: &dyn Fn(&Sample) -> Option<f64>| {
        v.iter().filter_map(|s| f(s)).fold(f64::MIN, f64::max)
    };
    let median = |v: &[&Sample], f: &dyn Fn(&Sample) -> Option<f64>| {
        let mut x: Vec<f64> = v.iter().filter_map(|s| f(s)).collect();
        x.sort_by(f64::total_cmp);
        x.get(x.len() / 2).copied().unwrap_or(f64::MIN)
    };
    let fds = |s: &Sample| s.fds.map(|v| v as f64);
    let final_sample = last.last().map(|s| vec![*s]).unwrap_or_default();
    // What, how it is read from a sample, how the windows are summed up (the reference's,
    // the judged one's), the factor and the slack allowed over the reference.
    type Stat<'a> = &'a dyn Fn(&[&Sample], &dyn Fn(&Sample) -> Option<f64>) -> f64;
    type Check<'a> = (
        &'a str,
        &'a dyn Fn(&Sample) -> Option<f64>,
        Stat<'a>,
        &'a [&'a Sample],
        f64,
        f64,
    );
    let checks: [Check; 5] = [
        ("RSS MiB", &|s| s.rss_mib, &max, &last, 1.20, 0.0),
        ("open fds (median)", &fds, &median, &last, 1.0, 16.0),
        (
            "open fds (last sample)",
            &fds,
            &max,
            &final_sample,
            1.0,
            16.0,
        ),
        (
            "PostgreSQL connections",
            &|s| s.pg_conns.map(|v| v as f64),
            &max,
            &last,
            1.0,
            2.0,
        ),
        (
            "RabbitMQ channels",
            &|s| s.channels.map(|v| v as f64),
            &max,
            &last,
            1.0,
            4.0,
        ),
    ];
    let mut report = Vec::new();
    let mut grew = Vec::new();
    for (name, f, stat, judged, factor, slack) in checks {
        let (r, l) = (stat(&reference, f), stat(judged, f));
        let bound = r * factor + slack;
        report.push(format!(
            "{name}: reference {r:.1}, judged {l:.1} (bound {bound:.1})"
        ));
        if l > bound {
            grew.push(name);
        }
    }
    if grew.is_empty() {
        Ok(report.join("; "))
    } else {
        Err(format!("grew: {grew:?}; {}", report.join("; ")))
    }
}
