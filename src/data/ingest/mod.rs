//! HTTP ingest: reading CloudEvents out of a publish request ([`parse_request`]) and checking
//! them against the stream's validation rules ([`Validator`]).
//!
//! The HTTP layer runs the checks in this order, each with its own status and an
//! `application/problem+json` body ([`crate::data::problem`]): unknown stream 404; content type
//! 415 and body over `maxRequestBytes` 413 (before parsing); while the body is read
//! ([`body`]), 408 past the body read timeout and 503 when the worker's body memory
//! ([`budget`]) is spent; [`parse_request`] 400 (malformed JSON, broken CloudEvents rules);
//! the rate limit ([`limit`]) 429, or 413 for more events than its burst;
//! [`Validator::check`] 413 (event over `maxEventBytes`) and 422 (required extensions, JSON
//! Schema, unknown types).
//!
//! # Content modes
//!
//! | request | events |
//! |---|---|
//! | `Content-Type: application/cloudevents+json` | one event, CloudEvents JSON format |
//! | `Content-Type: application/cloudevents-batch+json` | a non-empty JSON array of events |
//! | `ce-specversion`, `ce-id`, … headers, any or no `Content-Type` | binary mode: one event, the body is its data |
//! | `Content-Type: application/json`, no `ce-` header | the plain shape below, one object or an array |
//!
//! A structured content type wins over stray `ce-` headers; any `ce-` header otherwise means
//! binary mode. JSON bodies must be UTF-8. Everything else is answered 415.
//!
//! # The plain `application/json` shape
//!
//! `{type, data, source?, id?, subject?, correlationId?}` with exactly these member names;
//! `type` and `data` are required. Defaults:
//! - `id`: a new UUIDv7 (time-ordered, so ids sort by publish time);
//! - `source`: `/weir/namespaces/{namespace}/streams/{stream}`;
//! - `datacontenttype`: `application/json`; `specversion`: `1.0`;
//! - `time`: the time the request was received (RFC 3339, microseconds, UTC);
//! - `correlationId` becomes the `correlationid` extension.
//!
//! Any other member is refused (400, naming it): a misspelt `correlationID` would otherwise be
//! dropped without a word. Other attributes need a real CloudEvent.
//!
//! # Rules beyond the letter of CloudEvents
//!
//! - `null` for an attribute means the attribute is unset, as the CloudEvents JSON format
//!   requires; a required attribute that is `null` is missing.
//! - Extension names must be lowercase `a-z0-9` (a MUST of CloudEvents). The 20-character limit
//!   is a SHOULD and is not enforced; names longer than [`MAX_EXTENSION_NAME_LEN`] are refused
//!   because they could not travel as AMQP headers. `weirposition`, `weirversion` and
//!   `weirrecordedtime` are assigned by the store and cannot be published, nor can
//!   `weirpublisher` (the authenticated publisher, set by Weir).
//! - Extension values are strings, booleans or integers within CloudEvents' 32-bit Integer
//!   range; fractional numbers, objects and arrays are refused. In binary mode every `ce-`
//!   extension is a string.
//! - A member that appears twice in an event, or a `ce-` header sent twice, is refused.
//! - `expectedversion`, when present, is decimal digits (string) or a non-negative integer, and
//!   the event must have a `subject`.
//! - An empty batch is refused: a publish carries at least one event.
//!
//! # Payloads
//!
//! `data` round-trips byte for byte whatever the mode:
//! - structured `data` is kept as the exact JSON text ([`Data::Json`]) unless it is a JSON
//!   string and `datacontenttype` is present and not JSON (`*/json`, `*/*+json`): then it is
//!   that string's text ([`Data::Text`]); non-string `data` with a non-JSON `datacontenttype` is
//!   refused; `data_base64` is [`Data::Binary`];
//! - binary mode: a JSON `Content-Type` gives [`Data::Json`] (the body must be JSON), `text/*`
//!   in UTF-8 gives [`Data::Text`] (or [`Data::Binary`] if the bytes are not UTF-8), anything
//!   else or no `Content-Type` gives [`Data::Binary`]; an empty body is an event without data.
//!   A JSON body is kept whole, whitespace around the value included (binary in, binary out is
//!   exact); structured mode has no room for that outer whitespace, so there only the value's
//!   own text is reproduced.
//!
//! [`Data::Json`]: crate::data::event::Data::Json
//! [`Data::Text`]: crate::data::event::Data::Text
//! [`Data::Binary`]: crate::data::event::Data::Binary

pub mod body;
pub mod budget;
mod content;
pub mod limit;
mod parse;
mod raw;
mod validate;

pub use parse::{MAX_EXTENSION_NAME_LEN, parse_request, parse_request_bytes};
pub use validate::{Validator, ValidatorError};

use chrono::{DateTime, Utc};

use crate::data::event::{CloudEvent, EXT_EXPECTED_VERSION, ExtValue};
use crate::data::problem::HttpProblem;

/// What the parser needs to know about the request besides its headers and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestContext {
    /// Namespace of the EventStream published to.
    pub namespace: String,
    /// Name of the EventStream published to.
    pub stream: String,
    /// When the request was received: the default `time` of plain JSON events.
    pub now: DateTime<Utc>,
}

impl IngestContext {
    pub fn new(
        namespace: impl Into<String>,
        stream: impl Into<String>,
        now: DateTime<Utc>,
    ) -> IngestContext {
        IngestContext {
            namespace: namespace.into(),
            stream: stream.into(),
            now,
        }
    }

    /// The `source` given to plain JSON events that have none.
    pub fn default_source(&self) -> String {
        format!(
            "/weir/namespaces/{}/streams/{}",
            self.namespace, self.stream
        )
    }
}

/// Checks only the content type (415 when no content mode applies), so the HTTP layer can
/// answer it before reading the body; [`parse_request`] repeats the same check.
pub fn check_content_type(headers: &http::HeaderMap) -> Result<(), HttpProblem> {
    content::detect(headers).map(|_| ())
}

/// The event's `expectedversion` as a number, if it has one. Events from [`parse_request`]
/// carry only well-formed values.
pub fn expected_version(ev: &CloudEvent) -> Option<i64> {
    ev.extensions
        .get(EXT_EXPECTED_VERSION)
        .and_then(version_number)
}

/// A version number: a non-negative integer, or a string of decimal digits that fits `i64`.
fn version_number(value: &ExtValue) -> Option<i64> {
    match value {
        ExtValue::Integer(i) if *i >= 0 => Some(*i),
        ExtValue::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        _ => None,
    }
}
