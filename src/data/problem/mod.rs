//! RFC 7807 problem details (`application/problem+json`): the body of every error Weir's HTTP
//! API answers.
//!
//! The body is `{type, title, status, detail, errors: [{index, pointer, keyword, message}]}`.
//! `errors` lists what is wrong with which event of the request (`index`, 0-based position in
//! the request), at which JSON pointer inside that event (`/id`, `/data/orderId`) and, where it
//! applies, which check failed (`keyword`: a JSON Schema keyword such as `required` or `type`, or
//! Weir's own check name). It is always present, empty for problems about the request as a
//! whole.
//!
//! Problem types (the `type` member, one per [`ProblemKind`]):
//!
//! | `type` | status | when |
//! |---|---|---|
//! | `https://weir.dev/problems/bad-request` | 400 | a request parameter is wrong (read API) |
//! | `https://weir.dev/problems/unreadable-body` | 400 | the request body could not be read (truncated, bad chunk encoding, connection reset) |
//! | `https://weir.dev/problems/malformed-json` | 400 | the body is not JSON (with line and column) |
//! | `https://weir.dev/problems/invalid-event` | 400 | an event breaks a CloudEvents rule |
//! | `https://weir.dev/problems/unauthorized` | 401 | no or unknown credentials |
//! | `https://weir.dev/problems/forbidden` | 403 | the caller may not publish or read here |
//! | `https://weir.dev/problems/stream-not-found` | 404 | no such EventStream |
//! | `https://weir.dev/problems/not-found` | 404 | no such event, subject or position |
//! | `https://weir.dev/problems/version-conflict` | 409 | `expectedversion` does not match |
//! | `https://weir.dev/problems/busy` | 409 | another run holds the resource (admin: an archive run) |
//! | `https://weir.dev/problems/request-timeout` | 408 | the body did not arrive within the body read timeout |
//! | `https://weir.dev/problems/payload-too-large` | 413 | the body exceeds `maxRequestBytes`, or the request holds more events than the rate limit's `burst` |
//! | `https://weir.dev/problems/event-too-large` | 413 | an event exceeds `maxEventBytes` |
//! | `https://weir.dev/problems/unsupported-media-type` | 415 | a content type ingest does not read |
//! | `https://weir.dev/problems/missing-extension` | 422 | a `requiredExtensions` entry is absent |
//! | `https://weir.dev/problems/schema-violation` | 422 | `data` breaks the type's JSON Schema |
//! | `https://weir.dev/problems/unknown-type` | 422 | no schema for the type, unknown types refused |
//! | `https://weir.dev/problems/validation-failed` | 422 | several of the three above at once |
//! | `https://weir.dev/problems/pii-refused` | 422 | a personal-data field cannot be encrypted: non-JSON data, or no `subject` |
//! | `https://weir.dev/problems/rate-limited` | 429 | the stream's rate limit (with `Retry-After`) |
//! | `https://weir.dev/problems/internal` | 500 | a fault inside Weir |
//! | `https://weir.dev/problems/unavailable` | 503 | the stream's broker or store is down |
//! | `https://weir.dev/problems/pii-key-missing` | 503 | a subject's data key is wrapped by a key id `spec.pii.keySecretRef` no longer holds |

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

mod fields;

pub use fields::{FieldError, FieldErrors};

/// The media type of a problem body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// At most this many field errors are returned in one problem. A 4 MiB batch of broken events
/// could otherwise produce a response larger than the request; the first hundred are enough to
/// fix a publisher, and `detail` says how many there were in all.
pub const MAX_REPORTED_ERRORS: usize = 100;

/// The kinds of problem Weir reports; each has its own `type` URI, title and status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProblemKind {
    BadRequest,
    UnreadableBody,
    MalformedJson,
    InvalidEvent,
    Unauthorized,
    Forbidden,
    StreamNotFound,
    NotFound,
    VersionConflict,
    IdConflict,
    Busy,
    RequestTimeout,
    PayloadTooLarge,
    EventTooLarge,
    UnsupportedMediaType,
    MissingExtension,
    SchemaViolation,
    UnknownType,
    ValidationFailed,
    PiiRefused,
    RateLimited,
    Internal,
    Unavailable,
    PiiKeyMissing,
}

impl ProblemKind {
    /// Every kind (for the docs' table and tests).
    pub const ALL: [ProblemKind; 24] = [
        ProblemKind::BadRequest,
        ProblemKind::UnreadableBody,
        ProblemKind::MalformedJson,
        ProblemKind::InvalidEvent,
        ProblemKind::Unauthorized,
        ProblemKind::Forbidden,
        ProblemKind::StreamNotFound,
        ProblemKind::NotFound,
        ProblemKind::VersionConflict,
        ProblemKind::IdConflict,
        ProblemKind::Busy,
        ProblemKind::RequestTimeout,
        ProblemKind::PayloadTooLarge,
        ProblemKind::EventTooLarge,
        ProblemKind::UnsupportedMediaType,
        ProblemKind::MissingExtension,
        ProblemKind::SchemaViolation,
        ProblemKind::UnknownType,
        ProblemKind::ValidationFailed,
        ProblemKind::RateLimited,
        ProblemKind::Internal,
        ProblemKind::Unavailable,
        ProblemKind::PiiRefused,
        ProblemKind::PiiKeyMissing,
    ];

    /// The `type` URI of this kind.
    pub fn uri(self) -> &'static str {
        match self {
            ProblemKind::BadRequest => "https://weir.dev/problems/bad-request",
            ProblemKind::UnreadableBody => "https://weir.dev/problems/unreadable-body",
            ProblemKind::MalformedJson => "https://weir.dev/problems/malformed-json",
            ProblemKind::InvalidEvent => "https://weir.dev/problems/invalid-event",
            ProblemKind::Unauthorized => "https://weir.dev/problems/unauthorized",
            ProblemKind::Forbidden => "https://weir.dev/problems/forbidden",
            ProblemKind::StreamNotFound => "https://weir.dev/problems/stream-not-found",
            ProblemKind::NotFound => "https://weir.dev/problems/not-found",
            ProblemKind::VersionConflict => "https://weir.dev/problems/version-conflict",
            ProblemKind::IdConflict => "https://weir.dev/problems/id-conflict",
            ProblemKind::Busy => "https://weir.dev/problems/busy",
            ProblemKind::RequestTimeout => "https://weir.dev/problems/request-timeout",
            ProblemKind::PayloadTooLarge => "https://weir.dev/problems/payload-too-large",
            ProblemKind::EventTooLarge => "https://weir.dev/problems/event-too-large",
            ProblemKind::UnsupportedMediaType => "https://weir.dev/problems/unsupported-media-type",
            ProblemKind::MissingExtension => "https://weir.dev/problems/missing-extension",
            ProblemKind::SchemaViolation => "https://weir.dev/problems/schema-violation",
            ProblemKind::UnknownType => "https://weir.dev/problems/unknown-type",
            ProblemKind::ValidationFailed => "https://weir.dev/problems/validation-failed",
            ProblemKind::RateLimited => "https://weir.dev/problems/rate-limited",
            ProblemKind::Internal => "https://weir.dev/problems/internal",
            ProblemKind::Unavailable => "https://weir.dev/problems/unavailable",
            ProblemKind::PiiRefused => "https://weir.dev/problems/pii-refused",
            ProblemKind::PiiKeyMissing => "https://weir.dev/problems/pii-key-missing",
        }
    }

    /// The short, fixed summary of this kind (`title`).
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::BadRequest => "Bad request",
            ProblemKind::UnreadableBody => "Unreadable request body",
            ProblemKind::MalformedJson => "Malformed JSON",
            ProblemKind::InvalidEvent => "Invalid CloudEvent",
            ProblemKind::Unauthorized => "Unauthorized",
            ProblemKind::Forbidden => "Forbidden",
            ProblemKind::StreamNotFound => "Stream not found",
            ProblemKind::NotFound => "Not found",
            ProblemKind::VersionConflict => "Version conflict",
            ProblemKind::IdConflict => "Id taken by another publisher",
            ProblemKind::Busy => "Busy",
            ProblemKind::RequestTimeout => "Request timeout",
            ProblemKind::PayloadTooLarge => "Payload too large",
            ProblemKind::EventTooLarge => "Event too large",
            ProblemKind::UnsupportedMediaType => "Unsupported media type",
            ProblemKind::MissingExtension => "Missing required extension",
            ProblemKind::SchemaViolation => "Schema violation",
            ProblemKind::UnknownType => "Unknown event type",
            ProblemKind::ValidationFailed => "Validation failed",
            ProblemKind::RateLimited => "Rate limited",
            ProblemKind::Internal => "Internal error",
            ProblemKind::Unavailable => "Service unavailable",
            ProblemKind::PiiRefused => "Personal data cannot be encrypted",
            ProblemKind::PiiKeyMissing => "Personal-data key missing",
        }
    }

    /// The HTTP status code of this kind.
    pub fn status(self) -> u16 {
        match self {
            ProblemKind::BadRequest
            | ProblemKind::UnreadableBody
            | ProblemKind::MalformedJson
            | ProblemKind::InvalidEvent => 400,
            ProblemKind::Unauthorized => 401,
            ProblemKind::Forbidden => 403,
            ProblemKind::StreamNotFound | ProblemKind::NotFound => 404,
            ProblemKind::RequestTimeout => 408,
            ProblemKind::VersionConflict | ProblemKind::IdConflict | ProblemKind::Busy => 409,
            ProblemKind::PayloadTooLarge | ProblemKind::EventTooLarge => 413,
            ProblemKind::UnsupportedMediaType => 415,
            ProblemKind::MissingExtension
            | ProblemKind::SchemaViolation
            | ProblemKind::UnknownType
            | ProblemKind::ValidationFailed
            | ProblemKind::PiiRefused => 422,
            ProblemKind::RateLimited => 429,
            ProblemKind::Internal => 500,
            ProblemKind::Unavailable | ProblemKind::PiiKeyMissing => 503,
        }
    }
}

/// An RFC 7807 problem. Build it with the constructors; it becomes an HTTP response through
/// [`IntoResponse`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {title}: {detail}")]
pub struct HttpProblem {
    pub kind: ProblemKind,
    pub status: u16,
    pub title: String,
    pub detail: String,
    pub errors: Vec<FieldError>,
    /// Seconds for the `Retry-After` header (429 and 503); not part of the body.
    pub retry_after: Option<u64>,
}

impl HttpProblem {
    /// A problem of `kind` with its standard title and status.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> HttpProblem {
        HttpProblem {
            kind,
            status: kind.status(),
            title: kind.title().to_string(),
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    /// Adds one field error.
    pub fn with_error(mut self, error: FieldError) -> HttpProblem {
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(error);
        }
        self
    }

    /// Sets `Retry-After` (seconds).
    pub fn with_retry_after(mut self, seconds: u64) -> HttpProblem {
        self.retry_after = Some(seconds);
        self
    }

    /// 400: a request parameter (path or query) is wrong.
    pub fn bad_request(detail: impl Into<String>) -> HttpProblem {
        HttpProblem::new(ProblemKind::BadRequest, detail)
    }

    /// 400: the body is not JSON. `error`'s text carries the line and column.
    pub fn malformed_json(index: Option<usize>, error: &serde_json::Error) -> HttpProblem {
        let where_ = match index {
            Some(i) => format!(" (in event {i})"),
            None => String::new(),
        };
        HttpProblem::new(
            ProblemKind::MalformedJson,
            // serde_json's message ends with "at line L column C".
            format!("the body is not valid JSON{where_}: {error}"),
        )
        .with_error(FieldError::new(error.to_string()).at_opt(index))
    }

    /// 400: events break CloudEvents rules; `errors` say which and where.
    pub fn invalid_events(errors: FieldErrors) -> HttpProblem {
        let n = errors.total();
        errors.into_problem(
            ProblemKind::InvalidEvent,
            format!("{n} problem(s) with the events of this request; nothing was published"),
        )
    }

    /// 401.
    pub fn unauthorized(detail: impl Into<String>) -> HttpProblem {
        HttpProblem::new(ProblemKind::Unauthorized, detail)
    }

    /// 403.
    pub fn forbidden(detail: impl Into<String>) -> HttpProblem {
        HttpProblem::new(ProblemKind::Forbidden, detail)
    }

    /// 404: no EventStream `namespace/stream`.
    pub fn stream_not_found(namespace: &str, stream: &str) -> HttpProblem {
        HttpProblem::new(
            ProblemKind::StreamNotFound,
            format!("there is no EventStream {namespace}/{stream}"),
        )
    }

    /// 404: an event, subject or position that does not exist.
    pub fn not_found(detail: impl Into<String>) -> HttpProblem {
        HttpProblem::new(ProblemKind::NotFound, detail)
    }

    /// 409: the event at `index` expected `subject` at `expected`, it is at `actual`.
    pub fn version_conflict(
        index: usize,
        subject: &str,
        expected: i64,
        actual: i64,
    ) -> HttpProblem {
        let message = format!(
            "subject {subject:?} is at version {actual}, the event expected version {expected}"
        );
        HttpProblem::new(ProblemKind::VersionConflict, message.clone()).with_error(
            FieldError::new(message)
                .at(index)
                .pointer("/expectedversion")
                .keyword("expectedversion"),
        )
    }

    /// 409: with publisher authentication, the event's `(source, id)` was stored by another
    /// publisher. It is not a duplicate of this publisher's (it would otherwise be answered
    /// as stored and dropped), and one id must not name two events.
    pub fn foreign_id(index: usize, source: &str, id: &str) -> HttpProblem {
        let message = format!(
            "an event with id {id:?} and source {source:?} was already stored by another \
             publisher; use an id of your own"
        );
        HttpProblem::new(ProblemKind::IdConflict, message.clone()).with_error(
            FieldError::new(message)
                .at(index)
                .pointer("/id")
                .keyword("id"),
        )
    }

    /// 413: the request body is larger than `maxRequestBytes`. `size` is `None` when the body
    /// was cut off while reading (its full length is unknown).
    pub fn payload_too_large(size: Option<usize>, limit: usize) -> HttpProblem {
        let detail = match size {
            Some(size) => {
                format!("the request body is {size} bytes; this stream accepts at most {limit}")
            }
            None => format!("the request body exceeds this stream's limit of {limit} bytes"),
        };
        HttpProblem::new(ProblemKind::PayloadTooLarge, detail)
    }

    /// 400: the request body could not be read to its end (`cause`: the transport's reason,
    /// e.g. a truncated body, an invalid chunk size line, a connection reset). Not a 413: its
    /// size was within the limit as far as it came.
    pub fn unreadable_body(cause: &str) -> HttpProblem {
        HttpProblem::new(
            ProblemKind::UnreadableBody,
            format!("the request body could not be read: {cause}"),
        )
    }

    /// 415: `content_type` (if any) is not one ingest reads.
    pub fn unsupported_media_type(content_type: Option<&str>) -> HttpProblem {
        let got = match content_type {
            Some(ct) => format!("Content-Type {ct:?} is not accepted"),
            None => "the request has no Content-Type".to_string(),
        };
        HttpProblem::new(
            ProblemKind::UnsupportedMediaType,
            format!(
                "{got}; send application/cloudevents+json (one event), \
                 application/cloudevents-batch+json (an array of events), application/json \
                 (one object or an array of {{type, data, source?, id?, subject?, \
                 correlationId?}}), or any content type with ce-specversion and the other ce- \
                 headers (binary mode); JSON bodies must be UTF-8"
            ),
        )
    }

    /// 408: the request body did not arrive whole within `timeout`. The connection is closed
    /// after the answer (the rest of the body is not read).
    pub fn request_timeout(timeout: std::time::Duration, received: usize) -> HttpProblem {
        HttpProblem::new(
            ProblemKind::RequestTimeout,
            format!(
                "the request body did not arrive within {}s (the server's body read timeout); \
                 {received} bytes had arrived; nothing was stored",
                timeout.as_secs_f64()
            ),
        )
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(retry_after_seconds: u64) -> HttpProblem {
        HttpProblem::new(
            ProblemKind::RateLimited,
            "this stream's rate limit is exhausted; retry after the given delay",
        )
        .with_retry_after(retry_after_seconds)
    }

    /// 500. `detail` must not leak secrets (URLs with passwords and the like).
    pub fn internal(detail: impl Into<String>) -> HttpProblem {
        HttpProblem::new(ProblemKind::Internal, detail)
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(detail: impl Into<String>, retry_after_seconds: u64) -> HttpProblem {
        HttpProblem::new(ProblemKind::Unavailable, detail).with_retry_after(retry_after_seconds)
    }
}

impl serde::Serialize for HttpProblem {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut s = serializer.serialize_struct("HttpProblem", 5)?;
        s.serialize_field("type", self.kind.uri())?;
        s.serialize_field("title", &self.title)?;
        s.serialize_field("status", &self.status)?;
        s.serialize_field("detail", &self.detail)?;
        s.serialize_field("errors", &self.errors)?;
        s.end()
    }
}

impl IntoResponse for HttpProblem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // Serialising strings and integers into a Vec cannot fail; the fallback keeps the
        // answer a valid problem body all the same.
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| {
            format!(
                r#"{{"type":"{}","status":{}}}"#,
                self.kind.uri(),
                self.status
            )
            .into_bytes()
        });
        let mut response = (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
            body,
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // RFC 6750: a 401 names the scheme the client must use.
        if self.kind == ProblemKind::Unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"weir\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests;
