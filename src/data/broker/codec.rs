//! CloudEvents on AMQP 0-9-1, following the CloudEvents AMQP binding (binary content mode).
//!
//! - Every attribute except `datacontenttype` travels as an application header named
//!   `cloudEvents:<attribute>`: `specversion`, `id`, `source`, `type`, `subject`, `time`,
//!   `dataschema` and every extension (among them `weirposition`, `weirversion` and
//!   `weirrecordedtime`). String values are AMQP long strings; Boolean and Integer extensions
//!   are AMQP booleans and longs (64-bit).
//! - `datacontenttype` is the message's `content-type` property. A value too long for that
//!   property (over 255 bytes) travels as the header `cloudEvents:datacontenttype` instead.
//! - The body is the data, byte for byte; no data is an empty body.
//! - The routing key is the event type (cut to AMQP's 255-byte limit at a character
//!   boundary; the full type is always in `cloudEvents:type`).
//! - The `message-id` property is the event id, `delivery-mode` is 2 (persistent) and
//!   `timestamp` is the producer's `time` in whole seconds when it parses.
//!
//! Decoding derives the kind of data from the content type, since AMQP has no place for it
//! and Weir adds no attribute of its own: JSON media types (`application/json`, `text/json`,
//! anything ending in `+json`) give [`Data::Json`]; `text/*` gives [`Data::Text`] when the
//! body is UTF-8; anything else gives [`Data::Binary`]. Without a content type, a body that
//! parses as JSON is JSON (as in the CloudEvents JSON format), else UTF-8 is text, else
//! binary. An empty body decodes as "no data". Where the event's kind of data is not the one
//! its content type gives (a `data_base64` payload declared `application/json`, a structured
//! JSON string declared `text/plain; charset=latin1`), the message carries the header
//! [`DATA_KIND_HEADER`] with the kind's code, so that decoding gives the event back exactly:
//! without it, arbitrary bytes came back as JSON data, which the structured mode could not
//! write, and a sink got the event without its data.

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::OutMessage;
use super::error::BrokerError;
use crate::data::event::{CONTEXT_ATTRIBUTES, CloudEvent, Data, ExtValue, SPEC_VERSION};

/// Prefix of the headers that carry CloudEvents attributes.
pub const HEADER_PREFIX: &str = "cloudEvents:";
/// The alternative prefix the AMQP binding allows; accepted when decoding.
pub const HEADER_PREFIX_ALT: &str = "cloudEvents_";
/// AMQP short strings (routing keys, header names, most properties) hold at most this many
/// bytes.
pub const MAX_SHORT_STRING: usize = 255;
/// Header carrying the kind of data ([`Data::kind_code`]) when it differs from the kind the
/// content type gives. Not a `cloudEvents:` header: it is no attribute of the event.
pub const DATA_KIND_HEADER: &str = "weir-datakind";

/// The AMQP message for an event, following the CloudEvents AMQP binding (binary mode):
///
/// - every attribute except `datacontenttype` is a header `cloudEvents:<attribute>`
///   (`specversion`, `id`, `source`, `type`, `subject`, `time`, `dataschema` and every
///   extension, `weirposition`, `weirversion` and `weirrecordedtime` among them); strings
///   are AMQP long strings, Boolean and Integer extensions AMQP booleans and longs;
/// - `datacontenttype` is the `content-type` property (the header
///   `cloudEvents:datacontenttype` if it is over 255 bytes);
/// - the body is the data (empty for none), the routing key the type (cut to 255 bytes),
///   `message-id` the id, `timestamp` the producer's `time` in seconds.
///
/// [`from_delivery`] reads it back; it derives the kind of data from the content type.
pub fn to_message(ev: &CloudEvent) -> OutMessage {
    let mut headers = FieldTable::default();
    let mut put = |name: &str, value: AMQPValue| {
        let key = format!("{HEADER_PREFIX}{name}");
        match ShortString::try_new(key) {
            Ok(key) => {
                headers.insert(key, value);
            }
            // Attribute names are validated at ingest (CloudEvents recommends at most 20
            // characters); a name that cannot be an AMQP header name is left out rather than
            // making the event impossible to publish.
            Err(_) => tracing::warn!(
                attribute = name,
                id = %ev.id,
                "attribute name too long for an AMQP header; left out"
            ),
        }
    };
    put("specversion", long_str(SPEC_VERSION));
    put("id", long_str(&ev.id));
    put("source", long_str(&ev.source));
    put("type", long_str(&ev.ty));
    for (name, value) in [
        ("subject", &ev.subject),
        ("time", &ev.time),
        ("dataschema", &ev.dataschema),
    ] {
        if let Some(v) = value {
            put(name, long_str(v));
        }
    }
    let content_type = match &ev.datacontenttype {
        Some(ct) if ct.len() <= MAX_SHORT_STRING => Some(ct.clone()),
        Some(ct) => {
            put("datacontenttype", long_str(ct));
            None
        }
        None => None,
    };
    for (name, value) in &ev.extensions {
        let value = match value {
            ExtValue::Bool(b) => AMQPValue::Boolean(*b),
            ExtValue::Integer(i) => AMQPValue::LongLongInt(*i),
            ExtValue::String(s) => long_str(s),
        };
        put(name, value);
    }
    if let Some(d) = &ev.data {
        let derived = data_for(ev.datacontenttype.as_deref(), d.bytes().clone());
        if derived.kind_code() != d.kind_code() {
            headers.insert(
                ShortString::from(DATA_KIND_HEADER),
                AMQPValue::ShortInt(d.kind_code()),
            );
        }
    }
    let timestamp = ev
        .time
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .and_then(|t| u64::try_from(t.timestamp()).ok());
    OutMessage {
        routing_key: truncate_short(&ev.ty).to_string(),
        headers,
        body: ev
            .data
            .as_ref()
            .map(|d| d.bytes().clone())
            .unwrap_or_default(),
        message_id: ev.id.clone(),
        content_type,
        timestamp,
    }
}

/// Reads a CloudEvent back from a message's headers, `content-type` property and body.
/// A missing required attribute is a [`BrokerError::Decode`] naming the header.
pub fn from_delivery(
    headers: Option<&FieldTable>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<CloudEvent, BrokerError> {
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty);
    let mut attrs = std::collections::BTreeMap::new();
    let mut kind = None;
    for (key, value) in headers {
        let key = key.as_str();
        if key == DATA_KIND_HEADER {
            kind = match value {
                AMQPValue::ShortInt(k) => Some(*k),
                AMQPValue::LongInt(k) => i16::try_from(*k).ok(),
                AMQPValue::LongLongInt(k) => i16::try_from(*k).ok(),
                _ => None,
            };
            continue;
        }
        let Some(name) = key
            .strip_prefix(HEADER_PREFIX)
            .or_else(|| key.strip_prefix(HEADER_PREFIX_ALT))
        else {
            continue;
        };
        // CloudEvents attribute names are lowercase ASCII letters and digits; a header that
        // is not such a name cannot be an attribute and is ignored.
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            continue;
        }
        attrs.insert(name.to_string(), (key, value));
    }

    let mut take_str = |name: &str| -> Result<Option<String>, BrokerError> {
        match attrs.remove(name) {
            None => Ok(None),
            Some((key, value)) => match ext_value(key, value)? {
                ExtValue::String(s) => Ok(Some(s)),
                other => Err(BrokerError::Decode {
                    header: key.to_string(),
                    message: format!("expected a string, found {other:?}"),
                }),
            },
        }
    };
    let required = |name: &str, v: Option<String>| -> Result<String, BrokerError> {
        match v {
            Some(v) if !v.is_empty() => Ok(v),
            Some(_) => Err(BrokerError::Decode {
                header: format!("{HEADER_PREFIX}{name}"),
                message: "must not be empty".into(),
            }),
            None => Err(BrokerError::Decode {
                header: format!("{HEADER_PREFIX}{name}"),
                message: "required header is missing".into(),
            }),
        }
    };

    let specversion = required("specversion", take_str("specversion")?)?;
    if specversion != SPEC_VERSION {
        return Err(BrokerError::Decode {
            header: format!("{HEADER_PREFIX}specversion"),
            message: format!("unsupported version {specversion:?} (expected {SPEC_VERSION})"),
        });
    }
    let id = required("id", take_str("id")?)?;
    let source = required("source", take_str("source")?)?;
    let ty = required("type", take_str("type")?)?;
    let subject = take_str("subject")?;
    let time = take_str("time")?;
    let dataschema = take_str("dataschema")?;
    let header_content_type = take_str("datacontenttype")?;
    let datacontenttype = content_type.map(str::to_string).or(header_content_type);

    let mut extensions = std::collections::BTreeMap::new();
    for (name, (key, value)) in attrs {
        if CONTEXT_ATTRIBUTES.contains(&name.as_str()) {
            continue;
        }
        extensions.insert(name, ext_value(key, value)?);
    }

    let data = if body.is_empty() {
        None
    } else {
        let bytes = Bytes::copy_from_slice(body);
        // An unknown code (a newer writer) falls back to what the content type says.
        Some(match kind {
            Some(k) => match Data::from_kind_code(k, bytes.clone()) {
                Some(d) => d,
                None => data_for(datacontenttype.as_deref(), bytes),
            },
            None => data_for(datacontenttype.as_deref(), bytes),
        })
    };

    Ok(CloudEvent {
        id,
        source,
        ty,
        datacontenttype,
        dataschema,
        subject,
        time,
        extensions,
        data,
    })
}

/// [`from_delivery`] for a message as lapin hands it over.
pub fn from_properties(props: &BasicProperties, body: &[u8]) -> Result<CloudEvent, BrokerError> {
    from_delivery(
        props.headers().as_ref(),
        props.content_type().as_ref().map(ShortString::as_str),
        body,
    )
}

/// The kind of data a payload with this content type is (see the module documentation).
pub fn data_for(content_type: Option<&str>, bytes: Bytes) -> Data {
    let utf8 = std::str::from_utf8(&bytes).is_ok();
    let Some(ct) = content_type else {
        return if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
            Data::Json(bytes)
        } else if utf8 {
            Data::Text(bytes)
        } else {
            Data::Binary(bytes)
        };
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence == "text/json" || essence.ends_with("+json") {
        Data::Json(bytes)
    } else if essence.starts_with("text/") && utf8 {
        Data::Text(bytes)
    } else {
        Data::Binary(bytes)
    }
}

fn ext_value(key: &str, value: &AMQPValue) -> Result<ExtValue, BrokerError> {
    let bad = |message: String| BrokerError::Decode {
        header: key.to_string(),
        message,
    };
    Ok(match value {
        AMQPValue::LongString(s) => ExtValue::String(
            String::from_utf8(s.as_bytes().to_vec()).map_err(|_| bad("not UTF-8".into()))?,
        ),
        AMQPValue::ShortString(s) => ExtValue::String(s.as_str().to_string()),
        AMQPValue::Boolean(b) => ExtValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => ExtValue::Integer((*i).into()),
        AMQPValue::ShortShortUInt(i) => ExtValue::Integer((*i).into()),
        AMQPValue::ShortInt(i) => ExtValue::Integer((*i).into()),
        AMQPValue::ShortUInt(i) => ExtValue::Integer((*i).into()),
        AMQPValue::LongInt(i) => ExtValue::Integer((*i).into()),
        AMQPValue::LongUInt(i) => ExtValue::Integer((*i).into()),
        AMQPValue::LongLongInt(i) => ExtValue::Integer(*i),
        AMQPValue::Timestamp(t) => {
            let t = i64::try_from(*t)
                .ok()
                .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                .ok_or_else(|| bad(format!("timestamp {t} out of range")))?;
            ExtValue::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        }
        other => return Err(bad(format!("unsupported AMQP type {:?}", other.get_type()))),
    })
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// `s` cut to at most [`MAX_SHORT_STRING`] bytes, at a character boundary.
pub(crate) fn truncate_short(s: &str) -> &str {
    if s.len() <= MAX_SHORT_STRING {
        return s;
    }
    let mut end = MAX_SHORT_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn event(data: Option<Data>, ct: Option<&str>) -> CloudEvent {
        CloudEvent {
            id: "e-1".into(),
            source: "/orders".into(),
            ty: "order.created".into(),
            datacontenttype: ct.map(str::to_string),
            dataschema: Some("https://schemas.example/order/v1".into()),
            subject: Some("order-7".into()),
            time: Some("2024-05-01T10:00:00Z".into()),
            extensions: BTreeMap::from([
                ("weirposition".into(), ExtValue::String("42".into())),
                ("flag".into(), ExtValue::Bool(true)),
                ("count".into(), ExtValue::Integer(-7)),
            ]),
            data,
        }
    }

    fn round_trip(ev: &CloudEvent) -> CloudEvent {
        let msg = to_message(ev);
        from_delivery(Some(&msg.headers), msg.content_type.as_deref(), &msg.body).unwrap()
    }

    #[test]
    fn headers_follow_the_binding() {
        let ev = event(
            Some(Data::Json(Bytes::from_static(b"{\"a\": 1}"))),
            Some("application/json"),
        );
        let msg = to_message(&ev);
        let h = msg.headers.inner();
        assert_eq!(h.get("cloudEvents:specversion"), Some(&long_str("1.0")));
        assert_eq!(h.get("cloudEvents:id"), Some(&long_str("e-1")));
        assert_eq!(h.get("cloudEvents:type"), Some(&long_str("order.created")));
        assert_eq!(h.get("cloudEvents:weirposition"), Some(&long_str("42")));
        assert_eq!(h.get("cloudEvents:flag"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(
            h.get("cloudEvents:count"),
            Some(&AMQPValue::LongLongInt(-7))
        );
        assert!(h.get("cloudEvents:datacontenttype").is_none());
        assert_eq!(msg.content_type.as_deref(), Some("application/json"));
        assert_eq!(msg.routing_key, "order.created");
        assert_eq!(msg.message_id, "e-1");
        assert_eq!(msg.timestamp, Some(1_714_557_600));
        assert_eq!(&msg.body[..], b"{\"a\": 1}");
    }

    #[test]
    fn every_data_kind_round_trips() {
        for ev in [
            event(
                Some(Data::Json(Bytes::from_static(b"{ \"b\":1, \"a\":[2] }"))),
                Some("application/json; charset=utf-8"),
            ),
            event(
                Some(Data::Json(Bytes::from_static(b"[1,2]"))),
                Some("application/cloudevents+json"),
            ),
            event(Some(Data::Json(Bytes::from_static(b"{\"x\":1}"))), None),
            event(
                Some(Data::Text(Bytes::from_static("héllo".as_bytes()))),
                Some("text/plain"),
            ),
            event(Some(Data::Text(Bytes::from_static(b"plain words"))), None),
            event(
                Some(Data::Binary(Bytes::from_static(&[0, 159, 146, 150, 255]))),
                Some("application/octet-stream"),
            ),
            event(Some(Data::Binary(Bytes::from_static(&[0xff, 0xfe]))), None),
            event(None, None),
        ] {
            assert_eq!(round_trip(&ev), ev);
        }
    }

    #[test]
    fn long_type_and_content_type_still_round_trip() {
        let mut ev = event(
            Some(Data::Text(Bytes::from_static(b"x"))),
            Some(&format!("text/plain; p={}", "v".repeat(300))),
        );
        ev.ty = "é".repeat(200); // 400 bytes
        let msg = to_message(&ev);
        assert!(msg.routing_key.len() <= MAX_SHORT_STRING);
        assert!(ev.ty.starts_with(&msg.routing_key));
        assert_eq!(msg.content_type, None);
        assert_eq!(round_trip(&ev), ev);
    }

    #[test]
    fn missing_required_header_is_named() {
        let ev = event(None, None);
        for missing in ["specversion", "id", "source", "type"] {
            let mut msg = to_message(&ev);
            let mut h = msg.headers.inner().clone();
            h.remove(format!("cloudEvents:{missing}").as_str());
            msg.headers = h.into();
            let err = from_delivery(Some(&msg.headers), None, &msg.body).unwrap_err();
            match err {
                BrokerError::Decode { header, .. } => {
                    assert_eq!(header, format!("cloudEvents:{missing}"))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let err = from_delivery(None, None, b"").unwrap_err();
        assert!(err.to_string().contains("cloudEvents:specversion"), "{err}");
    }

    #[test]
    fn wrong_types_and_versions_are_decode_errors() {
        let mut h = to_message(&event(None, None)).headers;
        h.insert("cloudEvents:id".into(), AMQPValue::LongLongInt(5));
        let err = from_delivery(Some(&h), None, b"").unwrap_err();
        assert!(
            matches!(err, BrokerError::Decode { ref header, .. } if header == "cloudEvents:id")
        );

        let mut h = to_message(&event(None, None)).headers;
        h.insert("cloudEvents:specversion".into(), long_str("0.3"));
        let err = from_delivery(Some(&h), None, b"").unwrap_err();
        assert!(err.to_string().contains("0.3"), "{err}");
    }

    #[test]
    fn foreign_headers_are_ignored_and_underscore_prefix_accepted() {
        let mut h = FieldTable::default();
        h.insert("cloudEvents_specversion".into(), long_str("1.0"));
        h.insert("cloudEvents_id".into(), long_str("1"));
        h.insert("cloudEvents_source".into(), long_str("/s"));
        h.insert("cloudEvents_type".into(), long_str("t"));
        h.insert("x-death".into(), AMQPValue::Boolean(true));
        h.insert("cloudEvents:Bad-Name".into(), long_str("?"));
        h.insert("cloudEvents:n".into(), AMQPValue::LongInt(3));
        let ev = from_delivery(Some(&h), Some("text/plain"), b"hi").unwrap();
        assert_eq!(ev.id, "1");
        assert_eq!(
            ev.extensions,
            BTreeMap::from([("n".to_string(), ExtValue::Integer(3))])
        );
        assert_eq!(ev.data, Some(Data::Text(Bytes::from_static(b"hi"))));
    }
}
