//! Deciding a batch in memory: each request's dedup keys, `expectedversion`s and publisher
//! checked against what the store held (and the batches decided before it), positions and
//! subjects' versions handed out. No I/O: the caller looked everything up beforehand.

use std::collections::HashMap;

use super::{AppendInput, Appended, Conflict, RequestOutcome};
use crate::data::event::{CloudEvent, EXT_EXPECTED_VERSION, EXT_PUBLISHER, ExtValue};

/// What the store held for a batch when it was looked at: the stream's head, and for the
/// batch's events their dedup keys and subjects' versions.
pub(super) struct Known {
    pub(super) head: i64,
    /// By `(source, id)`: where it is, and who published it (`None`: not authenticated).
    pub(super) ids: HashMap<(String, String), (Appended, Option<String>)>,
    pub(super) versions: HashMap<String, i64>,
}

/// One batch decided in memory against [`Known`].
pub(super) struct Decided {
    /// One outcome per request.
    pub(super) out: Vec<RequestOutcome>,
    /// `(request, event, position, version)` of every event to write, in position order.
    pub(super) accepted: Vec<(usize, usize, i64, Option<i64>)>,
    /// Dedup keys this batch writes (as later batches will see them: duplicates), with
    /// their publisher.
    pub(super) ids: HashMap<(String, String), (Appended, Option<String>)>,
    /// Each subject's version after this batch.
    pub(super) versions: HashMap<String, i64>,
    /// The head position after this batch.
    pub(super) next: i64,
}

/// `expectedversion` as a number. Ingest has already rejected malformed values.
fn expected_version(ev: &CloudEvent) -> Option<i64> {
    match ev.extensions.get(EXT_EXPECTED_VERSION)? {
        ExtValue::Integer(i) => Some(*i),
        ExtValue::String(s) => s.parse().ok(),
        ExtValue::Bool(_) => None,
    }
}

/// Decides every request of a batch in memory; a failing request leaves no trace.
pub(super) fn decide(known: &Known, requests: &[AppendInput<'_>]) -> Decided {
    let mut d = Decided {
        out: Vec::with_capacity(requests.len()),
        accepted: Vec::new(),
        ids: HashMap::new(),
        versions: HashMap::new(),
        next: known.head,
    };
    for (ri, r) in requests.iter().enumerate() {
        // This request's own effects, applied to the batch's only if it succeeds.
        let mut req_ids: HashMap<(&str, &str), (Appended, Option<String>)> = HashMap::new();
        let mut req_versions: HashMap<&str, i64> = HashMap::new();
        let mut results = Vec::with_capacity(r.events.len());
        let mut accepted = Vec::new();
        let mut conflict = None;
        let mut pos = d.next;
        for (index, ev) in r.events.iter().enumerate() {
            let key = (ev.source.as_str(), ev.id.as_str());
            let publisher = ev.extension_str(EXT_PUBLISHER);
            let prior = req_ids.get(&key).cloned().or_else(|| {
                let owned = (ev.source.clone(), ev.id.clone());
                d.ids.get(&owned).or_else(|| known.ids.get(&owned)).cloned()
            });
            if let Some((orig, by)) = prior {
                // Two authenticated publishers: the id is taken, not repeated. Unauthenticated
                // events on either side cannot be told apart and count as duplicates.
                if let (Some(by), Some(this)) = (&by, &publisher)
                    && by != this
                {
                    conflict = Some(Conflict::ForeignId {
                        index,
                        source: ev.source.clone(),
                        id: ev.id.clone(),
                    });
                    break;
                }
                results.push(Appended {
                    duplicate: true,
                    ..orig
                });
                continue;
            }
            let version = match &ev.subject {
                Some(subject) => {
                    let current = req_versions
                        .get(subject.as_str())
                        .or_else(|| d.versions.get(subject))
                        .or_else(|| known.versions.get(subject))
                        .copied()
                        .unwrap_or(0);
                    if let Some(expected) = expected_version(ev)
                        && expected != current
                    {
                        conflict = Some(Conflict::Version {
                            index,
                            subject: subject.clone(),
                            expected,
                            actual: current,
                        });
                        break;
                    }
                    req_versions.insert(subject.as_str(), current + 1);
                    Some(current + 1)
                }
                None => None,
            };
            pos += 1;
            let appended = Appended {
                position: pos,
                version,
                duplicate: false,
            };
            req_ids.insert(key, (appended, publisher));
            results.push(appended);
            accepted.push((ri, index, pos, version));
        }
        match conflict {
            Some(c) => d.out.push(Err(c)),
            None => {
                d.next = pos;
                for ((source, id), (a, by)) in req_ids {
                    d.ids.insert(
                        (source.to_string(), id.to_string()),
                        (
                            Appended {
                                duplicate: true,
                                ..a
                            },
                            by,
                        ),
                    );
                }
                for (subject, v) in req_versions {
                    d.versions.insert(subject.to_string(), v);
                }
                d.accepted.extend(accepted);
                d.out.push(Ok(results));
            }
        }
    }
    d
}
