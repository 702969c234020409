//! Turns one publish request (headers and body) into CloudEvents, or into a 400/415 problem
//! that lists every fault of every event with its index and JSON pointer.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_TYPE;
use percent_encoding::percent_decode;
use serde_json::value::RawValue;

mod attrs;

pub(crate) use self::attrs::pointer;
use self::attrs::{
    Slots, add_extension, check_expected_version, event_object, finish_context, missing,
    string_attr, wrong_type,
};
use super::IngestContext;
use super::content::{self, Mode, PayloadKind};
use super::raw::{self, RawEvent, Top, Val};
use crate::data::event::{CloudEvent, Data, EXT_CORRELATION_ID, ExtValue};
use crate::data::problem::{FieldError, FieldErrors, HttpProblem};

/// Longest extension name accepted. CloudEvents asks for at most 20 characters as a SHOULD, so
/// longer names from other producers are accepted; the hard cap is what still fits an AMQP
/// header name (a short string of at most 255 bytes) with the `cloudEvents:` prefix, so every
/// accepted event can be relayed to RabbitMQ.
pub const MAX_EXTENSION_NAME_LEN: usize = 255 - "cloudEvents:".len();

/// Standard base64 as CloudEvents specifies it; padding is accepted but not required, since
/// producers differ on it and both decode to the same bytes.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Parses a publish request. Payloads are copied out of `body`; use [`parse_request_bytes`]
/// when the body is already a [`Bytes`].
///
/// Content modes, picked from the headers:
/// - `application/cloudevents+json` (a `charset` other than UTF-8 is refused): one event in the
///   CloudEvents JSON format;
/// - `application/cloudevents-batch+json`: a non-empty JSON array of such events;
/// - binary: any other content type (or none) together with `ce-` headers: attributes come from
///   the `ce-` headers (percent-decoded, as strings), `datacontenttype` from `Content-Type`, the
///   body is the data;
/// - plain `application/json` without `ce-` headers: one object or an array of
///   `{type, data, source?, id?, subject?, correlationId?}`, with the defaults described in the
///   [module docs](super).
///
/// Anything else is a 415; a body that is not JSON where JSON is expected is a 400 naming the
/// line and column; every broken CloudEvents rule is a 400 listing each fault.
pub fn parse_request(
    headers: &HeaderMap,
    body: &[u8],
    ctx: &IngestContext,
) -> Result<Vec<CloudEvent>, HttpProblem> {
    parse(headers, body, &Owner::Copy, ctx)
}

/// As [`parse_request`], but payloads are slices of `body` (no copy). The events then keep
/// the whole request body alive until the last of them is dropped, which is bounded by
/// `maxRequestBytes` and by the time a batch takes to commit.
pub fn parse_request_bytes(
    headers: &HeaderMap,
    body: &Bytes,
    ctx: &IngestContext,
) -> Result<Vec<CloudEvent>, HttpProblem> {
    parse(headers, body, &Owner::Shared(body), ctx)
}

/// Where payload bytes come from.
enum Owner<'b> {
    /// Copy each payload into its own buffer.
    Copy,
    /// Share the request body's buffer.
    Shared(&'b Bytes),
}

impl Owner<'_> {
    fn bytes(&self, part: &[u8]) -> Bytes {
        match self {
            // Every payload handed here is borrowed from the body; the range test keeps
            // `slice_ref` (which panics otherwise) safe should that ever change.
            Owner::Shared(body) if within(body, part) => body.slice_ref(part),
            _ => Bytes::copy_from_slice(part),
        }
    }
}

fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr_range(), inner.as_ptr_range());
    o.start <= i.start && i.end <= o.end
}

fn parse(
    headers: &HeaderMap,
    body: &[u8],
    owner: &Owner<'_>,
    ctx: &IngestContext,
) -> Result<Vec<CloudEvent>, HttpProblem> {
    let mode = content::detect(headers)?;
    let mut errs = FieldErrors::new();
    let events = if mode == Mode::Binary {
        binary_event(headers, body, owner, &mut errs)
            .into_iter()
            .collect()
    } else {
        let top = raw::parse_top(body).map_err(|(e, at)| HttpProblem::malformed_json(at, &e))?;
        let raws = match shape(mode, top) {
            Ok(raws) => raws,
            Err(e) => return Err(HttpProblem::invalid_events(single(e))),
        };
        let mut events = Vec::with_capacity(raws.len());
        if mode == Mode::Plain {
            let defaults = PlainDefaults {
                source: ctx.default_source(),
                time: ctx.now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            };
            for (i, raw) in raws.into_iter().enumerate() {
                events.extend(plain_event(i, raw, owner, &defaults, &mut errs));
            }
        } else {
            for (i, raw) in raws.into_iter().enumerate() {
                events.extend(structured_event(i, raw, owner, &mut errs));
            }
        }
        events
    };
    if errs.is_empty() {
        Ok(events)
    } else {
        Err(HttpProblem::invalid_events(errs))
    }
}

fn single(e: FieldError) -> FieldErrors {
    let mut errs = FieldErrors::new();
    errs.push(e);
    errs
}

/// Checks the top-level shape against the content mode.
fn shape(mode: Mode, top: Top<'_>) -> Result<Vec<RawEvent<'_>>, FieldError> {
    let wrong = |message: String| Err(FieldError::new(message).keyword("type"));
    match (mode, top) {
        (Mode::Structured, Top::One(ev)) => Ok(vec![ev]),
        (Mode::Structured, Top::Many(_)) => wrong(
            "application/cloudevents+json carries one event object; send an array of events \
             as application/cloudevents-batch+json"
                .into(),
        ),
        (Mode::Batch, Top::One(_)) => wrong(
            "application/cloudevents-batch+json carries a JSON array of events; send a single \
             event as application/cloudevents+json"
                .into(),
        ),
        (Mode::Batch | Mode::Plain, Top::Many(evs)) if evs.is_empty() => Err(FieldError::new(
            "the array of events is empty: a publish carries at least one event",
        )
        .keyword("minItems")),
        (Mode::Batch | Mode::Plain, Top::Many(evs)) => Ok(evs),
        (Mode::Plain, Top::One(ev)) => Ok(vec![ev]),
        (Mode::Structured, Top::Other(what)) => {
            wrong(format!("an event must be a JSON object, got {what}"))
        }
        (Mode::Batch, Top::Other(what)) => wrong(format!(
            "application/cloudevents-batch+json must be a JSON array of events, got {what}"
        )),
        (Mode::Plain, Top::Other(what)) => wrong(format!(
            "application/json takes an event object or an array of them, got {what}"
        )),
        // Binary mode never parses the body as the envelope.
        (Mode::Binary, _) => wrong("binary mode has no JSON envelope".into()),
    }
}

fn structured_event(
    index: usize,
    raw: RawEvent<'_>,
    owner: &Owner<'_>,
    errs: &mut FieldErrors,
) -> Option<CloudEvent> {
    let before = event_object(index, &raw, errs)?;
    let mut slots = Slots::default();
    let mut data_base64 = None;
    let mut exts = BTreeMap::new();
    for (name, val) in raw.members {
        if let Some(slot) = slots.slot(&name) {
            *slot = Some(val);
        } else if name == "data_base64" {
            data_base64 = Some(val);
        } else {
            add_extension(index, &name, val, &mut exts, errs);
        }
    }
    let context = finish_context(index, slots, errs);
    let content_type = context.as_ref().and_then(|c| c.datacontenttype.as_deref());
    let data = structured_data(index, raw.data, data_base64, content_type, owner, errs);
    check_expected_version(
        index,
        &exts,
        context.as_ref().and_then(|c| c.subject.as_deref()),
        context.is_some(),
        errs,
    );
    if errs.total() > before {
        return None;
    }
    Some(context?.into_event(exts, data))
}

/// `data` or `data_base64` of a structured event. JSON data keeps its exact text; a JSON
/// string whose `datacontenttype` is not JSON is that string's text.
fn structured_data(
    index: usize,
    data: Option<&RawValue>,
    data_base64: Option<Val<'_>>,
    content_type: Option<&str>,
    owner: &Owner<'_>,
    errs: &mut FieldErrors,
) -> Option<Data> {
    let data_error = |pointer: &str, keyword: &str, message: String| {
        FieldError::new(message)
            .at(index)
            .pointer(pointer)
            .keyword(keyword)
    };
    let data_base64 = data_base64.filter(|v| *v != Val::Null);
    match (data, data_base64) {
        (Some(_), Some(_)) => {
            errs.push(data_error(
                "/data_base64",
                "oneOf",
                "data and data_base64 are mutually exclusive".into(),
            ));
            None
        }
        (None, None) => None,
        (None, Some(Val::Str(b64))) => match BASE64.decode(b64.as_bytes()) {
            Ok(bytes) => Some(Data::Binary(Bytes::from(bytes))),
            Err(e) => {
                errs.push(data_error(
                    "/data_base64",
                    "contentEncoding",
                    format!("data_base64 is not valid base64: {e}"),
                ));
                None
            }
        },
        (None, Some(other)) => {
            errs.push(wrong_type(index, "data_base64", &other, "a base64 string"));
            None
        }
        (Some(raw), None) => {
            let text = raw.get();
            // No datacontenttype means application/json (CloudEvents JSON format).
            let json = content_type.is_none_or(|ct| content::payload_kind(ct) == PayloadKind::Json);
            if json {
                return Some(Data::Json(owner.bytes(text.as_bytes())));
            }
            if text == "null" {
                // An explicit null payload of a non-JSON type: no data.
                return None;
            }
            if !text.starts_with('"') {
                errs.push(data_error(
                    "/data",
                    "type",
                    format!(
                        "datacontenttype {:?} is not JSON, so data must be a string (or the \
                         payload sent as data_base64)",
                        content_type.unwrap_or_default()
                    ),
                ));
                return None;
            }
            match raw::json_string(text) {
                Ok(Cow::Borrowed(s)) => Some(Data::Text(owner.bytes(s.as_bytes()))),
                Ok(Cow::Owned(s)) => Some(Data::Text(Bytes::from(s))),
                Err(e) => {
                    errs.push(data_error(
                        "/data",
                        "type",
                        format!("data is not a valid string: {e}"),
                    ));
                    None
                }
            }
        }
    }
}

/// Defaults of the plain `application/json` shape, computed once per request.
struct PlainDefaults {
    source: String,
    time: String,
}

const PLAIN_MEMBERS: &str = "type, data, source, id, subject and correlationId";

fn plain_event(
    index: usize,
    raw: RawEvent<'_>,
    owner: &Owner<'_>,
    defaults: &PlainDefaults,
    errs: &mut FieldErrors,
) -> Option<CloudEvent> {
    let before = event_object(index, &raw, errs)?;
    let (mut ty, mut source, mut id, mut subject, mut correlation) = (None, None, None, None, None);
    for (name, val) in raw.members {
        let slot = match name.as_ref() {
            "type" => &mut ty,
            "source" => &mut source,
            "id" => &mut id,
            "subject" => &mut subject,
            "correlationId" => &mut correlation,
            other => {
                errs.push(
                    FieldError::new(format!(
                        "unknown member {other:?}: the application/json shape has \
                         {PLAIN_MEMBERS}; send other attributes as a CloudEvent \
                         (application/cloudevents+json)"
                    ))
                    .at(index)
                    .pointer(pointer(other))
                    .keyword("additionalProperties"),
                );
                continue;
            }
        };
        *slot = Some(val);
    }
    let ty = string_attr(index, "type", ty, true, errs);
    let source = string_attr(index, "source", source, false, errs);
    let id = string_attr(index, "id", id, false, errs);
    let subject = string_attr(index, "subject", subject, false, errs);
    let correlation = string_attr(index, "correlationId", correlation, false, errs);
    if raw.data.is_none() {
        errs.push(missing(index, "data"));
    }
    if errs.total() > before {
        return None;
    }
    let mut extensions = BTreeMap::new();
    if let Some(c) = correlation {
        extensions.insert(EXT_CORRELATION_ID.to_string(), ExtValue::String(c));
    }
    Some(CloudEvent {
        id: id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        source: source.unwrap_or_else(|| defaults.source.clone()),
        ty: ty?,
        datacontenttype: Some("application/json".to_string()),
        dataschema: None,
        subject,
        time: Some(defaults.time.clone()),
        extensions,
        data: raw
            .data
            .map(|d| Data::Json(owner.bytes(d.get().as_bytes()))),
    })
}

/// Binary content mode: one event from the `ce-` headers and the body.
fn binary_event(
    headers: &HeaderMap,
    body: &[u8],
    owner: &Owner<'_>,
    errs: &mut FieldErrors,
) -> Option<CloudEvent> {
    const INDEX: usize = 0;
    let mut slots = Slots::default();
    let mut exts = BTreeMap::new();
    // `keys()` yields each header name once; repeated headers are found with `get_all`.
    for name in headers.keys() {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else {
            continue;
        };
        if values.next().is_some() {
            errs.push(
                FieldError::new(format!("the header ce-{attr} appears more than once"))
                    .at(INDEX)
                    .pointer(pointer(attr))
                    .keyword("uniqueMembers"),
            );
            continue;
        }
        // The HTTP binding percent-encodes non-ASCII, space, `"` and `%` in header values.
        let value = match percent_decode(value.as_bytes()).decode_utf8() {
            Ok(v) => v,
            Err(_) => {
                errs.push(
                    FieldError::new(format!(
                        "the header ce-{attr} is not UTF-8 once percent-decoded"
                    ))
                    .at(INDEX)
                    .pointer(pointer(attr))
                    .keyword("format"),
                );
                continue;
            }
        };
        if attr == "datacontenttype" {
            errs.push(
                FieldError::new(
                    "in binary mode the data's media type is the Content-Type header, not \
                     ce-datacontenttype",
                )
                .at(INDEX)
                .pointer("/datacontenttype")
                .keyword("additionalProperties"),
            );
        } else if let Some(slot) = slots.slot(attr) {
            *slot = Some(Val::Str(value));
        } else {
            add_extension(INDEX, attr, Val::Str(value), &mut exts, errs);
        }
    }
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    slots.datacontenttype = content_type.map(|ct| Val::Str(Cow::Borrowed(ct)));
    let context = finish_context(INDEX, slots, errs);
    check_expected_version(
        INDEX,
        &exts,
        context.as_ref().and_then(|c| c.subject.as_deref()),
        context.is_some(),
        errs,
    );
    // HTTP cannot tell an empty payload from none: an empty body is an event without data.
    let data = if body.is_empty() {
        None
    } else {
        match content_type.map(content::payload_kind) {
            Some(PayloadKind::Json) => match raw::check_json(body) {
                Ok(()) => Some(Data::Json(owner.bytes(body))),
                Err(e) => {
                    errs.push(
                        FieldError::new(format!(
                            "Content-Type {:?} declares JSON but the body is not JSON: {e}",
                            content_type.unwrap_or_default()
                        ))
                        .at(INDEX)
                        .pointer("/data")
                        .keyword("contentMediaType"),
                    );
                    None
                }
            },
            Some(PayloadKind::Text) if std::str::from_utf8(body).is_ok() => {
                Some(Data::Text(owner.bytes(body)))
            }
            _ => Some(Data::Binary(owner.bytes(body))),
        }
    };
    if !errs.is_empty() {
        return None;
    }
    Some(context?.into_event(exts, data))
}
