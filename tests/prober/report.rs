//! What a run found: per subscription, the deliveries checked against the sender's ledger;
//! resource samples over the run; the tables printed at the end.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::chaos::{self, ChaosProxy};
use crate::disrupt::{ALL, Applied};
use crate::load::{Answer, Delivery, Sent, event_number};

/// A subscription of the run: its name, the stream it reads (index in the ledger), its order.
#[derive(Clone, Debug)]
pub struct Sub {
    pub name: String,
    pub stream: usize,
    pub per_key: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Distinct events accepted by the sink.
    pub delivered: usize,
    /// Answered 2xx, never delivered (event numbers).
    pub missing: Vec<u64>,
    /// Delivered but never sent, sent to another stream, or refused (4xx / unroutable).
    pub unexpected: Vec<String>,
    /// Events delivered more than once, and the extra deliveries in all.
    pub duplicated: usize,
    pub extra_deliveries: usize,
    /// Published without a 2xx (5xx, timeout, no answer), delivered anyway.
    pub unanswered_delivered: usize,
    /// perKey: an event delivered (first) before another of its key that was answered before
    /// it was even sent, or (stored stream) positions out of order within a key.
    pub order_violations: Vec<String>,
}

impl Tally {
    pub fn clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.order_violations.is_empty()
    }
}

/// Checks `got` (a subscription's accepted deliveries, in order) against the ledger.
pub fn tally(run: &str, ledger: &[Sent], sub: &Sub, got: &[Delivery]) -> Tally {
    let mut t = Tally::default();
    let mut counts: HashMap<u64, u32> = HashMap::new();
    // First deliveries per key, in order: (event number, position).
    let mut firsts: HashMap<&str, Vec<(u64, i64)>> = HashMap::new();
    for d in got {
        let n = event_number(run, &d.id).filter(|n| {
            ledger
                .get(*n as usize)
                .is_some_and(|s| s.stream == sub.stream)
        });
        let Some(n) = n else {
            t.unexpected.push(d.id.clone());
            continue;
        };
        let c = counts.entry(n).or_insert(0);
        *c += 1;
        if *c > 1 {
            t.extra_deliveries += 1;
            if *c == 2 {
                t.duplicated += 1;
            }
            continue;
        }
        match ledger[n as usize].answer {
            Answer::Accepted => {}
            Answer::Refused(_) | Answer::Unroutable => t.unexpected.push(d.id.clone()),
            Answer::Unanswered(_) | Answer::Pending => t.unanswered_delivered += 1,
        }
        firsts
            .entry(d.subject.as_str())
            .or_default()
            .push((n, d.position));
    }
    t.delivered = counts.len();
    t.missing = ledger
        .iter()
        .enumerate()
        .filter(|(n, s)| {
            s.stream == sub.stream
                && s.answer == Answer::Accepted
                && !counts.contains_key(&(*n as u64))
        })
        .map(|(n, _)| n as u64)
        .collect();
    if sub.per_key {
        for (key, list) in &firsts {
            check_order(key, list, ledger, &mut t.order_violations);
        }
    }
    t
}

/// One key's first deliveries in order. Answered events: none may come after an event that
/// was sent only after it was answered (suffix minimum of answer times against each send
/// time). Stored events: positions increase.
fn check_order(key: &str, list: &[(u64, i64)], ledger: &[Sent], out: &mut Vec<String>) {
    let mut earliest_answer_after: Option<(Instant, u64)> = None;
    for &(n, _) in list.iter().rev() {
        let s = &ledger[n as usize];
        if let Some((answered, m)) = earliest_answer_after
            && answered < s.sent_at
        {
            out.push(format!(
                "{key}: event {n} delivered before event {m}, which was answered before {n} was sent"
            ));
        }
        if s.answer == Answer::Accepted
            && let Some(a) = s.answered_at
            && earliest_answer_after.is_none_or(|(e, _)| a < e)
        {
            earliest_answer_after = Some((a, n));
        }
    }
    for w in list.windows(2) {
        if w[0].1 > 0 && w[1].1 > 0 && w[0].1 >= w[1].1 {
            out.push(format!(
                "{key}: position {} (event {}) delivered before position {} (event {})",
                w[0].1, w[0].0, w[1].1, w[1].0
            ));
        }
    }
}

/// Resources of the workers and of what they hold on the services, at one moment.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub at: Duration,
    /// Both workers together.
    pub fds: Option<usize>,
    pub rss_mib: Option<f64>,
    /// Sessions of the workers on the run's database.
    pub pg_conns: Option<i64>,
    /// The workers' AMQP connections (through the proxy) and their channels.
    pub amqp_conns: Option<usize>,
    pub channels: Option<u64>,
}

/// Takes a [`Sample`] every `every` until `stop`.
pub struct Sampler {
    pub pids: Arc<Mutex<Vec<u32>>>,
    pub db: sqlx::PgPool,
    pub db_name: String,
    pub amqp_proxy: Arc<ChaosProxy>,
}

impl Sampler {
    pub async fn sample(&self, started: Instant) -> Sample {
        let pids = self.pids.lock().unwrap().clone();
        let fds: Option<usize> = pids.iter().map(|p| chaos::open_fds(*p)).sum();
        let rss: Option<u64> = pids.iter().map(|p| chaos::rss_kib(*p)).sum();
        let pg_conns = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name <> 'weir-prober'",
        )
        .bind(&self.db_name)
        .fetch_one(&self.db)
        .await
        .ok();
        let ports = self.amqp_proxy.upstream_ports();
        let channels = async {
            let v: serde_json::Value = crate::common::http()
                .get("http://127.0.0.1:15672/api/connections?columns=peer_port,channels")
                .basic_auth("guest", Some("guest"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some(
                v.as_array()?
                    .iter()
                    .filter(|c| {
                        c["peer_port"]
                            .as_u64()
                            .is_some_and(|p| ports.contains(&(p as u16)))
                    })
                    .map(|c| c["channels"].as_u64().unwrap_or(0))
                    .sum(),
            )
        }
        .await;
        Sample {
            at: started.elapsed(),
            fds,
            rss_mib: rss.map(|k| k as f64 / 1024.0),
            pg_conns,
            amqp_conns: Some(self.amqp_proxy.upstream_ports().len()),
            channels,
        }
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("–".into(), |v| v.to_string())
}

/// The resource table: after warm-up (first sample at or past `warm`), the run's maximum, and
/// the end (after the drain).
pub fn resources_table(samples: &[Sample], warm: Duration) -> String {
    let first = samples.iter().find(|s| s.at >= warm).or(samples.first());
    let last = samples.last();
    let mut out =
        String::from("| resource | after warm-up | max | at the end |\n|---|---|---|---|\n");
    let mut row = |name: &str, f: &dyn Fn(&Sample) -> Option<f64>, digits: usize| {
        let max = samples
            .iter()
            .filter_map(f)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let show = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.digits$}"));
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} |",
            show(first.and_then(f)),
            show(max),
            show(last.and_then(f))
        );
    };
    row("open fds (both workers)", &|s| s.fds.map(|v| v as f64), 0);
    row("RSS MiB (both workers)", &|s| s.rss_mib, 1);
    row(
        "PostgreSQL connections",
        &|s| s.pg_conns.map(|v| v as f64),
        0,
    );
    row("AMQP connections", &|s| s.amqp_conns.map(|v| v as f64), 0);
    row("RabbitMQ channels", &|s| s.channels.map(|v| v as f64), 0);
    out
}

/// The counts table, one column per subscription.
pub fn counts_table(
    ledger: &[Sent],
    subs: &[Sub],
    tallies: &[Tally],
    dlq: &[Option<u32>],
) -> String {
    let per_stream = |stream: usize, f: &dyn Fn(&Answer) -> bool| {
        ledger
            .iter()
            .filter(|s| s.stream == stream && f(&s.answer))
            .count()
    };
    let mut out = String::from("| count |");
    for s in subs {
        let _ = write!(
            out,
            " {} ({}) |",
            s.name,
            if s.per_key { "perKey" } else { "none" }
        );
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(subs.len()));
    out.push('\n');
    let mut row = |name: &str, f: &dyn Fn(usize) -> String| {
        let _ = write!(out, "| {name} |");
        for i in 0..subs.len() {
            let _ = write!(out, " {} |", f(i));
        }
        out.push('\n');
    };
    row("sent to its stream", &|i| {
        per_stream(subs[i].stream, &|_| true).to_string()
    });
    row("answered 2xx", &|i| {
        per_stream(subs[i].stream, &|a| *a == Answer::Accepted).to_string()
    });
    row("refused 4xx / unroutable", &|i| {
        per_stream(subs[i].stream, &|a| {
            matches!(a, Answer::Refused(_) | Answer::Unroutable)
        })
        .to_string()
    });
    row("unanswered (5xx, timeout)", &|i| {
        per_stream(subs[i].stream, &|a| {
            matches!(a, Answer::Unanswered(_) | Answer::Pending)
        })
        .to_string()
    });
    row("delivered (distinct)", &|i| {
        tallies[i].delivered.to_string()
    });
    row("**missing**", &|i| tallies[i].missing.len().to_string());
    row("**unexpected**", &|i| {
        tallies[i].unexpected.len().to_string()
    });
    row("duplicated (events / extra deliveries)", &|i| {
        format!(
            "{} / {}",
            tallies[i].duplicated, tallies[i].extra_deliveries
        )
    });
    row("unanswered but delivered", &|i| {
        tallies[i].unanswered_delivered.to_string()
    });
    row("**order violations**", &|i| {
        if subs[i].per_key {
            tallies[i].order_violations.len().to_string()
        } else {
            "n/a".into()
        }
    });
    row("left in the DLQ", &|i| opt(dlq[i]));
    out
}

/// Disruptions applied, by kind.
pub fn disruptions_table(applied: &[Applied]) -> String {
    let mut out = String::from("| disruption | times | longest |\n|---|---|---|\n");
    for k in ALL {
        let of: Vec<&Applied> = applied.iter().filter(|a| a.kind == k).collect();
        let longest = of.iter().map(|a| a.took).max().unwrap_or_default();
        let _ = writeln!(
            out,
            "| {k:?} | {} | {:.1}s |",
            of.len(),
            longest.as_secs_f64()
        );
    }
    out
}

/// Every disruption in order: when it began, what, how long, what it hit.
pub fn timeline(applied: &[Applied]) -> String {
    applied
        .iter()
        .map(|a| {
            format!(
                "{:>7.1}s {:?} ({:.1}s, {})\n",
                a.at.as_secs_f64(),
                a.kind,
                a.took.as_secs_f64(),
                a.note
            )
        })
        .collect()
}

/// The checks above can fail: a planted missing event, an unexpected one and a key out of
/// order are each found (run before every probe, so a broken checker cannot pass a run).
pub fn self_check() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let sent = |key: u64, sent: u64, answered: u64, answer: Answer| Sent {
        stream: 0,
        key,
        sent_at: at(sent),
        answered_at: Some(at(answered)),
        answer,
    };
    // 0 and 1 (key k0) answered in turn; 2 answered, never delivered; 3 refused.
    let ledger = vec![
        sent(0, 0, 10, Answer::Accepted),
        sent(0, 20, 30, Answer::Accepted),
        sent(2, 40, 50, Answer::Accepted),
        sent(4, 60, 70, Answer::Refused(400)),
    ];
    let d = |n: u64, subject: &str, position: i64| Delivery {
        id: crate::load::event_id("r", n),
        subject: subject.into(),
        position,
    };
    let sub = Sub {
        name: "s".into(),
        stream: 0,
        per_key: true,
    };
    let got = [
        d(1, "k0", 2),
        d(0, "k0", 1),
        d(3, "k4", 4),
        d(9, "k0", 9),
        d(0, "k0", 1),
    ];
    let t = tally("r", &ledger, &sub, &got);
    assert_eq!(t.missing, vec![2], "{t:?}");
    assert_eq!(t.unexpected.len(), 2, "{t:?}"); // the refused 3, the never-sent 9
    assert_eq!(t.order_violations.len(), 2, "{t:?}"); // by answer time, by position
    assert_eq!((t.duplicated, t.extra_deliveries), (1, 1), "{t:?}");
    assert!(!t.clean());
}
