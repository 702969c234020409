//! Correlation traces (sagas): every stored event of a namespace's streams that carries one
//! `correlationid`, in commit-time order, with its stream, position and `causationid`.
//! `GET /v1/namespaces/{ns}/correlations/{id}/events`.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::data::engine::Engine;
use crate::data::event::{EXT_CAUSATION_ID, StoredEvent, to_structured_json};
use crate::data::store::Store;

/// Most events one trace answer holds; a saga longer than this is cut (and says so).
pub const MAX_TRACE: usize = 1000;

/// One event of a trace.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TraceEntry {
    pub stream: String,
    pub position: i64,
    pub id: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The id of the event that caused this one, if it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
    /// The W3C trace id of the context the event carries (`traceparent`), if any: the
    /// distributed trace of its journey (publisher → Weir → sinks) in a tracing backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub recorded_time: String,
    /// The whole event, as the read API returns it (structured CloudEvent).
    #[schema(value_type = crate::openapi::CloudEventJson)]
    pub event: Box<RawValue>,
}

/// A saga's timeline.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Trace {
    pub correlationid: String,
    pub events: Vec<TraceEntry>,
    /// More events carry this correlation id than `events` holds.
    pub truncated: bool,
}

fn entry(stream: String, ev: &StoredEvent) -> TraceEntry {
    let ce = ev.to_cloud_event();
    let json = String::from_utf8_lossy(&to_structured_json(&ce)).into_owned();
    TraceEntry {
        stream,
        position: ev.position,
        id: ev.event.id.clone(),
        ty: ev.event.ty.clone(),
        source: ev.event.source.clone(),
        subject: ev.event.subject.clone(),
        causationid: ev.event.extension_str(EXT_CAUSATION_ID),
        trace_id: crate::data::tracecontext::trace_id(&ev.event),
        recorded_time: ev
            .recorded_time
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        // The structured encoder always writes a JSON object; null stands in should that
        // ever not parse, rather than failing the whole trace.
        event: RawValue::from_string(json).unwrap_or_else(|_| RawValue::NULL.to_owned()),
    }
}

/// The trace of `correlation_id` over the running streams of `namespace` that have a store
/// (only those named in `only`, when given: the streams the caller may read). Streams in
/// different databases are queried concurrently and merged by commit time. Personal-data
/// fields (`spec.pii`) are decrypted: the caller may read every stream asked for.
pub async fn correlation(
    engine: &Engine,
    namespace: &str,
    correlation_id: &str,
    limit: usize,
    only: Option<&std::collections::BTreeSet<String>>,
) -> Result<Trace, crate::data::pii::PiiError> {
    let limit = limit.clamp(1, MAX_TRACE);
    // Streams grouped by database, so each database is asked once.
    let mut by_db: BTreeMap<String, (Store, Vec<String>)> = BTreeMap::new();
    for rt in engine.streams() {
        if rt.plan.key.namespace != namespace
            || only.is_some_and(|only| !only.contains(&rt.plan.key.name))
        {
            continue;
        }
        let (Some(plan), Some(store)) = (rt.plan.store.as_ref(), rt.store()) else {
            continue;
        };
        let url = plan.urls.first().cloned().unwrap_or_default();
        by_db
            .entry(url)
            .or_insert_with(|| (store.clone(), Vec::new()))
            .1
            .push(rt.plan.key.name.clone());
    }
    // One more than asked tells whether the trace is cut.
    let fetch = (limit + 1) as i64;
    let reads = by_db
        .values()
        .map(|(store, names)| store.read_correlation(namespace, names, correlation_id, fetch));
    let mut all: Vec<(String, StoredEvent)> = futures::future::try_join_all(reads)
        .await?
        .into_iter()
        .flatten()
        .collect();
    all.sort_by(|a, b| {
        (a.1.recorded_time, &a.0, a.1.position).cmp(&(b.1.recorded_time, &b.0, b.1.position))
    });
    let truncated = all.len() > limit;
    all.truncate(limit);
    for rt in engine.streams() {
        if rt.plan.key.namespace != namespace {
            continue;
        }
        if let (Some(pii), Some(id)) = (&rt.pii, rt.stream_id()) {
            let name = &rt.plan.key.name;
            let events = all
                .iter_mut()
                .filter(|(s, _)| s == name)
                .map(|(_, e)| &mut e.event);
            pii.reveal(id, events).await?;
        }
    }
    Ok(Trace {
        correlationid: correlation_id.to_string(),
        events: all.into_iter().map(|(s, e)| entry(s, &e)).collect(),
        truncated,
    })
}

/// A trace arranged as a causation forest: roots are events whose `causationid` names no
/// event of the trace; children follow in time order. Returns `(depth, index)` pairs in
/// print order (depth-first).
pub fn causation_order(events: &[(String, Option<String>)]) -> Vec<(usize, usize)> {
    let index: std::collections::HashMap<&str, usize> = events
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); events.len()];
    let mut roots = Vec::new();
    for (i, (_, cause)) in events.iter().enumerate() {
        match cause.as_deref().and_then(|c| index.get(c)) {
            // A parent must come earlier: a cycle or a forward reference makes it a root.
            Some(&p) if p < i => children[p].push(i),
            _ => roots.push(i),
        }
    }
    let mut out = Vec::with_capacity(events.len());
    // Explicit stack: a deep causation chain must not overflow the call stack.
    let mut stack: Vec<(usize, usize)> = roots.into_iter().rev().map(|r| (0, r)).collect();
    while let Some((depth, i)) = stack.pop() {
        out.push((depth, i));
        for &c in children[i].iter().rev() {
            stack.push((depth + 1, c));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, cause: Option<&str>) -> (String, Option<String>) {
        (id.to_string(), cause.map(str::to_string))
    }

    #[test]
    fn causation_forest_depth_first_in_time_order() {
        // order → payment → shipment; order → email; a stray event with an unknown cause.
        let events = [
            ev("order", None),
            ev("payment", Some("order")),
            ev("email", Some("order")),
            ev("stray", Some("elsewhere")),
            ev("shipment", Some("payment")),
        ];
        let order: Vec<_> = causation_order(&events)
            .into_iter()
            .map(|(d, i)| (d, events[i].0.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                (0, "order"),
                (1, "payment"),
                (2, "shipment"),
                (1, "email"),
                (0, "stray")
            ]
        );
    }

    #[test]
    fn a_cycle_or_forward_reference_does_not_loop() {
        let events = [ev("a", Some("b")), ev("b", Some("a"))];
        assert_eq!(causation_order(&events), [(0, 0), (1, 1)]);
    }
}
