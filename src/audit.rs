//! Audit records: one line per action that changed (or tried to change) data through the admin
//! API — dead-letter redrive and purge, archive runs — and per `deleteAfter` removal of the
//! archiver. The shape is fixed (documented in `docs/security-admin.md`):
//!
//! ```json
//! {"type":"weir.audit.v1","time":"2026-12-06T22:41:04.123Z","who":"system:serviceaccount:shop:ops",
//!  "action":"deadletters.purge","target":"shop/notify","count":3,"outcome":"success","error":null}
//! ```
//!
//! A record is a `tracing` event of target [`TARGET`] whose field `record` is the JSON object;
//! [`layer`] writes it to stderr as that object alone, one per line, whatever the log format
//! and whatever `RUST_LOG` says (the regular log layer leaves the target out), so a log
//! shipper can pick audit lines by their first bytes and parse them as they are.

use std::io::Write as _;

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

/// The tracing target of audit records.
pub const TARGET: &str = "weir::audit";
/// The `type` of every record; a new shape gets a new version.
pub const RECORD_TYPE: &str = "weir.audit.v1";

/// The actor of the archiver's own `deleteAfter` removals (no caller).
pub const ARCHIVER: &str = "weir:archiver";

/// What was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    DeadLettersRedrive,
    DeadLettersPurge,
    ArchiveRun,
    ArchiveDeleteAfter,
    /// A subject's personal-data key deleted (`weir forget`).
    SubjectForget,
    /// Subject keys re-wrapped with the newest key id (`weir keys rotate`).
    KeysRotate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::DeadLettersRedrive => "deadletters.redrive",
            Action::DeadLettersPurge => "deadletters.purge",
            Action::ArchiveRun => "archive.run",
            Action::ArchiveDeleteAfter => "archive.deleteAfter",
            Action::SubjectForget => "subject.forget",
            Action::KeysRotate => "keys.rotate",
        }
    }
}

/// One audit record (the fixed JSON shape).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The authenticated caller: a Kubernetes user name (`system:serviceaccount:NS:NAME`),
    /// `admin-token` (standalone, the holder of the admin token file), `anonymous`
    /// (standalone without a token file, loopback only) or [`ARCHIVER`].
    pub who: &'a str,
    pub action: &'static str,
    /// `namespace/name` of the subscription or stream (`namespace/name/subjects/<subject>`
    /// for a forget).
    pub target: &'a str,
    /// Dead letters redriven or purged, events archived or removed, subject keys deleted or
    /// re-wrapped.
    pub count: u64,
    /// `success` or `failure`.
    pub outcome: &'static str,
    /// Why it failed; `null` on success.
    pub error: Option<&'a str>,
}

/// Writes one audit record. `result` is the count done, or the error.
pub fn record(who: &str, action: Action, target: &str, result: Result<u64, &str>) {
    let (count, outcome, error) = match result {
        Ok(n) => (n, "success", None),
        Err(e) => (0, "failure", Some(e)),
    };
    let rec = Record {
        kind: RECORD_TYPE,
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        who,
        action: action.as_str(),
        target,
        count,
        outcome,
        error,
    };
    match serde_json::to_string(&rec) {
        Ok(line) => tracing::info!(target: TARGET, record = %line),
        // Strings and numbers only: cannot fail; said anyway rather than lost silently.
        Err(e) => tracing::error!(error = %e, ?rec, "an audit record could not be encoded"),
    }
}

/// The layer that writes audit records to stderr, one JSON object per line. Its filter takes
/// the audit target only; the log layer must leave it out ([`is_audit`]).
pub fn layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'l> tracing_subscriber::registry::LookupSpan<'l>,
{
    AuditLayer.with_filter(tracing_subscriber::filter::filter_fn(is_audit))
}

/// Whether an event is an audit record.
pub fn is_audit(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == TARGET
}

struct AuditLayer;

impl<S: tracing::Subscriber> Layer<S> for AuditLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut v = RecordField(None);
        event.record(&mut v);
        if let Some(mut line) = v.0 {
            line.push('\n');
            // One write of the whole line on the locked stderr: lines never interleave.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }
}

/// Picks the `record` field out of an event.
struct RecordField(Option<String>);

impl Visit for RecordField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "record" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "record" {
            // `%line` arrives as Display through Debug formatting of a display wrapper.
            self.0 = Some(format!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_has_the_fixed_shape() {
        let rec = Record {
            kind: RECORD_TYPE,
            time: "t".into(),
            who: "u",
            action: Action::DeadLettersPurge.as_str(),
            target: "shop/notify",
            count: 3,
            outcome: "success",
            error: None,
        };
        let v: serde_json::Value = serde_json::to_value(&rec).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = [
            "type", "time", "who", "action", "target", "count", "outcome", "error",
        ];
        want.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, want);
        assert_eq!(v["error"], serde_json::Value::Null);
    }
}
