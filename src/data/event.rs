//! The event model shared by ingest, store, broker and read API.
//!
//! An event is a CloudEvents 1.0 event. Its `data` is kept as the exact bytes the publisher
//! sent (JSON text, UTF-8 text or raw bytes), so that it round-trips byte for byte through the
//! store and the broker whatever content mode was used to publish or read it.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::value::RawValue;

/// The only CloudEvents version Weir accepts and emits.
pub const SPEC_VERSION: &str = "1.0";

/// Extension attributes Weir adds to stored events.
pub const EXT_POSITION: &str = "weirposition";
pub const EXT_VERSION: &str = "weirversion";
pub const EXT_RECORDED_TIME: &str = "weirrecordedtime";
/// The authenticated publisher of a stored event (streams with `ingest.auth`); set by Weir
/// at ingest, never by the publisher.
pub const EXT_PUBLISHER: &str = "weirpublisher";
/// Extension attributes Weir reads from published events.
pub const EXT_EXPECTED_VERSION: &str = "expectedversion";
pub const EXT_CORRELATION_ID: &str = "correlationid";
pub const EXT_CAUSATION_ID: &str = "causationid";

/// The context attributes the CloudEvents spec defines (everything else is an extension).
pub const CONTEXT_ATTRIBUTES: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
];

/// How an event's payload is encoded. The variant decides how the payload is written in
/// structured mode (`data` as JSON, `data` as a JSON string, or `data_base64`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    /// JSON text, exactly as received (whitespace and key order preserved).
    Json(Bytes),
    /// UTF-8 text that is not JSON (e.g. `text/plain`).
    Text(Bytes),
    /// Opaque bytes (`data_base64` in structured mode, raw body in binary mode).
    Binary(Bytes),
}

impl Data {
    pub fn bytes(&self) -> &Bytes {
        match self {
            Data::Json(b) | Data::Text(b) | Data::Binary(b) => b,
        }
    }

    /// Stable small integer for storage (`weir_events.data_kind`).
    pub fn kind_code(&self) -> i16 {
        match self {
            Data::Json(_) => 1,
            Data::Text(_) => 2,
            Data::Binary(_) => 3,
        }
    }

    pub fn from_kind_code(code: i16, bytes: Bytes) -> Option<Data> {
        match code {
            1 => Some(Data::Json(bytes)),
            2 => Some(Data::Text(bytes)),
            3 => Some(Data::Binary(bytes)),
            _ => None,
        }
    }
}

/// A CloudEvents extension value. CloudEvents has Boolean, Integer and String (URI,
/// Timestamp and Binary travel as strings in JSON).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum ExtValue {
    Bool(bool),
    Integer(i64),
    String(String),
}

impl ExtValue {
    /// The canonical string form, used in HTTP headers and for filters.
    pub fn as_string(&self) -> String {
        match self {
            ExtValue::Bool(b) => b.to_string(),
            ExtValue::Integer(i) => i.to_string(),
            ExtValue::String(s) => s.clone(),
        }
    }
}

/// One CloudEvent as published (before the store assigns position and version).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudEvent {
    pub id: String,
    pub source: String,
    pub ty: String,
    pub datacontenttype: Option<String>,
    pub dataschema: Option<String>,
    pub subject: Option<String>,
    /// The producer's `time`, RFC 3339, as given.
    pub time: Option<String>,
    /// Every other attribute, by lowercase name. Never holds the context attributes above.
    pub extensions: BTreeMap<String, ExtValue>,
    pub data: Option<Data>,
}

impl CloudEvent {
    /// An event with only the required attributes (source `/t`, type `t`), for tests.
    #[cfg(test)]
    pub(crate) fn bare(id: impl Into<String>) -> CloudEvent {
        CloudEvent {
            id: id.into(),
            source: "/t".into(),
            ty: "t".into(),
            datacontenttype: None,
            dataschema: None,
            subject: None,
            time: None,
            extensions: BTreeMap::new(),
            data: None,
        }
    }

    /// Size used for `maxEventBytes` and `maxBytes` accounting: payload plus attribute text.
    pub fn encoded_size(&self) -> usize {
        let attrs = self.id.len()
            + self.source.len()
            + self.ty.len()
            + self.datacontenttype.as_ref().map_or(0, String::len)
            + self.dataschema.as_ref().map_or(0, String::len)
            + self.subject.as_ref().map_or(0, String::len)
            + self.time.as_ref().map_or(0, String::len)
            + self
                .extensions
                .iter()
                .map(|(k, v)| k.len() + v.as_string().len())
                .sum::<usize>();
        attrs + self.data.as_ref().map_or(0, |d| d.bytes().len())
    }

    /// The optional context attributes by their JSON names, in the order the structured
    /// format writes them.
    pub fn optional_attributes(&self) -> [(&'static str, Option<&str>); 4] {
        [
            ("datacontenttype", self.datacontenttype.as_deref()),
            ("dataschema", self.dataschema.as_deref()),
            ("subject", self.subject.as_deref()),
            ("time", self.time.as_deref()),
        ]
    }

    pub fn extension_str(&self, name: &str) -> Option<String> {
        self.extensions.get(name).map(ExtValue::as_string)
    }

    pub fn correlation_id(&self) -> Option<String> {
        self.extension_str(EXT_CORRELATION_ID)
    }

    /// Any attribute (context or extension) as a string, for filters and partition keys.
    pub fn attribute(&self, name: &str) -> Option<String> {
        match name {
            "specversion" => Some(SPEC_VERSION.to_string()),
            "id" => Some(self.id.clone()),
            "source" => Some(self.source.clone()),
            "type" => Some(self.ty.clone()),
            "datacontenttype" => self.datacontenttype.clone(),
            "dataschema" => self.dataschema.clone(),
            "subject" => self.subject.clone(),
            "time" => self.time.clone(),
            other => self.extension_str(other),
        }
    }
}

/// An event as stored: the published event plus what the store assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    pub position: i64,
    /// Version within `subject`; `None` for events without a subject.
    pub version: Option<i64>,
    /// Commit time (`weirrecordedtime`).
    pub recorded_time: chrono::DateTime<chrono::Utc>,
    pub event: CloudEvent,
}

impl StoredEvent {
    /// The event with Weir's extensions (`weirposition`, `weirversion`, `weirrecordedtime`)
    /// added, as readers and subscribers see it.
    pub fn to_cloud_event(&self) -> CloudEvent {
        let mut ev = self.event.clone();
        ev.extensions.remove(EXT_EXPECTED_VERSION);
        ev.extensions.insert(
            EXT_POSITION.into(),
            ExtValue::String(self.position.to_string()),
        );
        if let Some(v) = self.version {
            ev.extensions
                .insert(EXT_VERSION.into(), ExtValue::String(v.to_string()));
        }
        ev.extensions.insert(
            EXT_RECORDED_TIME.into(),
            ExtValue::String(
                self.recorded_time
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
        );
        ev
    }

    /// An estimate, erring high, of the memory this event holds: the struct itself, every
    /// string's and the payload's heap buffer, and the extensions' B-tree nodes. Caches of
    /// decoded events weigh them with it: the text alone is a fraction of it (an event of
    /// the soak's, under 200 bytes of text, holds about 1 KiB, most of it the struct and the
    /// B-tree node of its `traceparent`).
    pub fn footprint(&self) -> usize {
        let ev = &self.event;
        let strings = [&ev.id, &ev.source, &ev.ty]
            .into_iter()
            .chain(ev.datacontenttype.as_ref())
            .chain(ev.dataschema.as_ref())
            .chain(ev.subject.as_ref())
            .chain(ev.time.as_ref())
            .map(|s| heap_block(s.capacity()))
            .sum::<usize>();
        let extensions = ev
            .extensions
            .iter()
            .map(|(k, v)| {
                heap_block(k.capacity())
                    + match v {
                        ExtValue::String(s) => heap_block(s.capacity()),
                        ExtValue::Bool(_) | ExtValue::Integer(_) => 0,
                    }
            })
            .sum::<usize>()
            + btree_nodes(ev.extensions.len())
                * (BTREE_NODE_HEADER
                    + BTREE_CAPACITY
                        * (std::mem::size_of::<String>() + std::mem::size_of::<ExtValue>()));
        // A payload shared by a clone (the read path clones events) gains a small header.
        let data = ev
            .data
            .as_ref()
            .map_or(0, |d| heap_block(d.bytes().len()) + 32);
        std::mem::size_of::<StoredEvent>() + strings + extensions + data
    }
}

/// Keys a node of the standard library's B-tree holds (`2 * B - 1`, B = 6).
const BTREE_CAPACITY: usize = 11;
/// A node's parent pointer, index and length, plus the child pointers of an inner node.
const BTREE_NODE_HEADER: usize = 16 + 12 * 8;

/// Nodes a B-tree of `len` entries takes: one up to a node's capacity, then at worst one per
/// five entries (nodes other than the root are at least half full).
fn btree_nodes(len: usize) -> usize {
    match len {
        0 => 0,
        1..=BTREE_CAPACITY => 1,
        n => n.div_ceil(BTREE_CAPACITY / 2),
    }
}

/// What a heap buffer of `len` bytes takes from the allocator: allocators hand out size
/// classes (mimalloc's are 8 or 16 bytes apart up to 128 bytes, then at most 1/8 apart).
fn heap_block(len: usize) -> usize {
    match len {
        0 => 0,
        1..=128 => len.next_multiple_of(16),
        n => n + n / 8,
    }
}

/// Serialises an event in the CloudEvents JSON format (structured mode), writing `data`
/// without re-encoding JSON payloads.
pub fn to_structured_json(ev: &CloudEvent) -> Vec<u8> {
    use serde_json::{Map, Value};
    // Attributes are serialised through a map (cheap, small); `data` is spliced in as raw
    // text afterwards so that a JSON payload keeps its exact bytes.
    let mut map = Map::new();
    map.insert("specversion".into(), Value::from(SPEC_VERSION));
    map.insert("id".into(), Value::from(ev.id.as_str()));
    map.insert("source".into(), Value::from(ev.source.as_str()));
    map.insert("type".into(), Value::from(ev.ty.as_str()));
    for (k, v) in ev.optional_attributes() {
        if let Some(v) = v {
            map.insert(k.into(), Value::from(v));
        }
    }
    for (k, v) in &ev.extensions {
        let v = match v {
            ExtValue::Bool(b) => Value::from(*b),
            ExtValue::Integer(i) => Value::from(*i),
            ExtValue::String(s) => Value::from(s.as_str()),
        };
        map.insert(k.clone(), v);
    }
    let data_field: Option<(&str, Box<RawValue>)> = match &ev.data {
        None => None,
        Some(Data::Json(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| RawValue::from_string(s.to_string()).ok())
            .map(|raw| ("data", raw)),
        Some(Data::Text(b)) => {
            let s = String::from_utf8_lossy(b);
            serde_json::value::to_raw_value(&s)
                .ok()
                .map(|raw| ("data", raw))
        }
        Some(Data::Binary(b)) => {
            use base64::Engine as _;
            let enc = base64::engine::general_purpose::STANDARD.encode(b);
            serde_json::value::to_raw_value(&enc)
                .ok()
                .map(|raw| ("data_base64", raw))
        }
    };
    #[derive(serde::Serialize)]
    struct Out<'a> {
        #[serde(flatten)]
        attrs: &'a Map<String, Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_base64: Option<&'a RawValue>,
    }
    let (data, data_base64) = match &data_field {
        Some(("data", raw)) => (Some(raw.as_ref()), None),
        Some((_, raw)) => (None, Some(raw.as_ref())),
        None => (None, None),
    };
    serde_json::to_vec(&Out {
        attrs: &map,
        data,
        data_base64,
    })
    .unwrap_or_default()
}

/// The length of `to_structured_json(ev)`, counted without building it (for a JSON payload
/// that is valid JSON and text that is UTF-8, as stored events' are): the size the archive's
/// compression ratios are measured against.
pub fn structured_json_len(ev: &CloudEvent) -> usize {
    // A JSON string as serde_json writes it: quoted, with the short escapes it uses and
    // `\u00XX` for other control characters.
    fn string(s: &[u8]) -> usize {
        2 + s
            .iter()
            .map(|&b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
                0..=0x1f => 6,
                _ => 1,
            })
            .sum::<usize>()
    }
    let mut len = 0;
    let mut members = 0;
    let mut member = |key: &str, value: usize| {
        len += string(key.as_bytes()) + 1 + value;
        members += 1;
    };
    member("specversion", string(SPEC_VERSION.as_bytes()));
    member("id", string(ev.id.as_bytes()));
    member("source", string(ev.source.as_bytes()));
    member("type", string(ev.ty.as_bytes()));
    for (k, v) in ev.optional_attributes() {
        if let Some(v) = v {
            member(k, string(v.as_bytes()));
        }
    }
    for (k, v) in &ev.extensions {
        let value = match v {
            ExtValue::Bool(true) => 4,
            ExtValue::Bool(false) => 5,
            ExtValue::Integer(i) => i.to_string().len(),
            ExtValue::String(s) => string(s.as_bytes()),
        };
        member(k, value);
    }
    match &ev.data {
        None => {}
        Some(Data::Json(b)) => member("data", b.len()),
        Some(Data::Text(b)) => member("data", string(b)),
        Some(Data::Binary(b)) => member("data_base64", 2 + b.len().div_ceil(3) * 4),
    }
    // Braces, and a comma between members.
    len + 2 + members - 1
}

/// A JSON array of structured events (`application/cloudevents-batch+json`).
pub fn to_batch_json<'a>(events: impl IntoIterator<Item = &'a CloudEvent>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(b'[');
    for (i, ev) in events.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&to_structured_json(ev));
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(data: Option<Data>) -> CloudEvent {
        CloudEvent {
            id: "1".into(),
            source: "/s".into(),
            ty: "t".into(),
            datacontenttype: None,
            dataschema: None,
            subject: Some("a".into()),
            time: None,
            extensions: BTreeMap::from([("region".into(), ExtValue::String("eu".into()))]),
            data,
        }
    }

    #[test]
    fn json_data_is_spliced_verbatim() {
        let raw = br#"{ "b" : 1,   "a":2.50 }"#;
        let out = to_structured_json(&ev(Some(Data::Json(Bytes::from_static(raw)))));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""data":{ "b" : 1,   "a":2.50 }"#), "{text}");
        assert!(text.contains(r#""region":"eu""#));
    }

    #[test]
    fn binary_data_uses_data_base64() {
        let out = to_structured_json(&ev(Some(Data::Binary(Bytes::from_static(&[0, 255])))));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data_base64"], "AP8=");
        assert!(v.get("data").is_none());
    }

    #[test]
    fn text_data_is_a_json_string() {
        let out = to_structured_json(&ev(Some(Data::Text(Bytes::from_static(b"hi \"x\"")))));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"], "hi \"x\"");
    }

    #[test]
    fn structured_json_len_counts_what_to_structured_json_writes() {
        let mut full = ev(None);
        full.datacontenttype = Some("application/json".into());
        full.dataschema = Some("https://schemas.example/o.json".into());
        full.time = Some("2026-01-01T00:00:00Z".into());
        full.source = "/ctrl\u{1}\ttab\"quote\\back/é".into();
        full.extensions.insert("flag".into(), ExtValue::Bool(false));
        full.extensions.insert("on".into(), ExtValue::Bool(true));
        full.extensions.insert("n".into(), ExtValue::Integer(-1234));
        let cases = [
            ev(None),
            full.clone(),
            CloudEvent {
                data: Some(Data::Json(Bytes::from_static(
                    br#"{ "a" : [1, "\u00e9"] }"#,
                ))),
                ..full.clone()
            },
            CloudEvent {
                data: Some(Data::Text(Bytes::from_static(
                    b"line\nbreak \x0c \x7f \"q\"",
                ))),
                ..full.clone()
            },
            CloudEvent {
                data: Some(Data::Binary(Bytes::from_static(&[1, 2, 3, 4, 5]))),
                ..full
            },
        ];
        for e in &cases {
            assert_eq!(structured_json_len(e), to_structured_json(e).len(), "{e:?}");
        }
    }
}
