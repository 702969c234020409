//! The HTTP binding's binary mode, written by the tests that check what ingest makes of it.

use http::{HeaderMap, HeaderName, HeaderValue};
use weir::data::event::CloudEvent;

/// The binary-mode encoding of an event: `ce-` headers (values percent-encoded, as the HTTP
/// binding asks), the body is the data.
pub fn to_binary(ev: &CloudEvent) -> (HeaderMap, Vec<u8>) {
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::CONTROLS.add(b' ').add(b'"').add(b'%');
    let mut h = HeaderMap::new();
    let mut put = |name: &str, value: &str| {
        let v = percent_encoding::utf8_percent_encode(value, SET).to_string();
        h.insert(
            HeaderName::from_bytes(format!("ce-{name}").as_bytes()).unwrap(),
            HeaderValue::from_str(&v).unwrap(),
        );
    };
    put("specversion", "1.0");
    put("id", &ev.id);
    put("source", &ev.source);
    put("type", &ev.ty);
    for (name, v) in [
        ("dataschema", &ev.dataschema),
        ("subject", &ev.subject),
        ("time", &ev.time),
    ] {
        if let Some(v) = v {
            put(name, v);
        }
    }
    for (name, v) in &ev.extensions {
        put(name, &v.as_string());
    }
    if let Some(ct) = &ev.datacontenttype {
        h.insert("content-type", HeaderValue::from_str(ct).unwrap());
    }
    let body = ev.data.as_ref().map_or(Vec::new(), |d| d.bytes().to_vec());
    (h, body)
}
