//! The HTTP side of a delivery: one POST of a CloudEvent to a sink, and what its answer means.
//!
//! - Binary mode (default): every attribute in a `ce-<name>` header (values percent-encoded as
//!   the CloudEvents HTTP binding asks), `datacontenttype` as `Content-Type`, the data as body.
//! - Structured mode: the event in the CloudEvents JSON format, `application/cloudevents+json`.
//! - `Authorization: Bearer <token>` when the sink has an auth Secret.
//!
//! 2xx is delivered; connection errors, timeouts, 404, 409, 429 and 5xx are retryable; any
//! other status is final, 3xx included (redirects are not followed). A sink address the
//! [`super::guard`] refuses is final too, with the code `refused`. A 2xx carrying a CloudEvent (binary: `ce-specversion`, or
//! structured: `application/cloudevents+json`) is a reply.

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use super::DeliveryError;
use super::guard::{Refused, SinkGuard};
use crate::data::event::{CloudEvent, Data, SPEC_VERSION, to_structured_json};
use crate::data::ingest::{IngestContext, parse_request};
use crate::data::tracecontext::Outgoing;
use crate::topology::{SinkFormat, SinkPlan};

/// `weirerrorcode` of a delivery the sink guard refused.
pub const REFUSED_CODE: &str = "refused";
/// Longest part of a sink's error answer kept as `weirerrordata`.
pub const ERROR_DATA_MAX: usize = 1024;
/// Longest answer body read from a sink: a reply is one event, and an error body is cut to
/// 1 KiB anyway; a sink streaming gigabytes cannot exhaust memory.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Characters percent-encoded in `ce-` header values: the CloudEvents HTTP binding asks for
/// space, double quote, percent and everything outside printable ASCII.
const HEADER_ENCODE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// What one attempt came to.
#[derive(Debug)]
pub enum Outcome {
    /// 2xx; `reply` is the CloudEvent the sink answered with, if any.
    Delivered {
        status: u16,
        reply: Option<CloudEvent>,
    },
    /// Anything else.
    Failed(Failure),
}

/// A failed attempt, with what the dead-letter queue records about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// The HTTP status, or `timeout` / `connect` / `error` when there was no answer.
    pub code: String,
    /// The answer's body (or the error), cut to [`ERROR_DATA_MAX`] bytes.
    pub data: String,
    /// `Retry-After` of a 429 or 503, in seconds or as an HTTP date.
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// The label of this failure in metrics: a status class, never the URL or body.
    pub fn class(&self) -> &'static str {
        match self.code.as_bytes().first() {
            Some(b'4') => "4xx",
            Some(b'5') => "5xx",
            _ if self.code == "timeout" => "timeout",
            _ => "error",
        }
    }
}

/// Sends events to one sink. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    url: String,
    format: SinkFormat,
    auth: Option<String>,
    timeout: Duration,
    /// The sink's literal address is refused by the guard: every attempt fails with this.
    refused: Option<Refused>,
}

impl Sender {
    /// A sender for `sink` (its connections come from the guard's shared client). `https`
    /// sinks are verified against the system's trusted roots (OpenSSL's: `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR` add a private CA).
    pub fn new(
        sink: &SinkPlan,
        timeout: Duration,
        guard: &SinkGuard,
    ) -> Result<Sender, DeliveryError> {
        Sender::to_url(
            &sink.url,
            sink.format,
            sink.auth_token.clone(),
            timeout,
            guard,
        )
    }

    /// A sender for a plain URL (dead-letter sinks).
    pub fn to_url(
        url: &str,
        format: SinkFormat,
        auth: Option<String>,
        timeout: Duration,
        guard: &SinkGuard,
    ) -> Result<Sender, DeliveryError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(DeliveryError::Sink(format!(
                "{url}: a sink is an http:// or https:// URL"
            )));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| DeliveryError::Sink(format!("{url}: not a URL: {e}")))?;
        let client = guard
            .client(parsed.port_or_known_default())
            .map_err(|e| DeliveryError::Sink(format!("HTTP client: {e}")))?;
        Ok(Sender {
            client,
            url: url.to_string(),
            format,
            auth,
            timeout,
            refused: guard.check_url(&parsed).err(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One attempt; never errors: every failure is an [`Outcome::Failed`]. `trace` is sent
    /// as the W3C `traceparent`/`tracestate` headers.
    pub async fn send(&self, ev: &CloudEvent, trace: &Outgoing) -> (Outcome, Duration) {
        let started = Instant::now();
        if let Some(r) = &self.refused {
            return (Outcome::Failed(refused(r)), started.elapsed());
        }
        let mut req = self.client.post(&self.url).timeout(self.timeout);
        match self.format {
            SinkFormat::Structured => {
                req = req
                    .header(header::CONTENT_TYPE, "application/cloudevents+json")
                    .body(to_structured_json(ev));
            }
            SinkFormat::Binary => {
                req = req.headers(binary_headers(ev));
                if let Some(d) = &ev.data {
                    req = req.body(d.bytes().clone());
                }
            }
        }
        if let Some(t) = &self.auth {
            req = req.bearer_auth(t);
        }
        let mut headers = HeaderMap::new();
        trace.apply(&mut headers);
        if !headers.is_empty() {
            req = req.headers(headers);
        }
        let outcome = match req.send().await {
            Err(e) => Outcome::Failed(match find_refused(&e) {
                Some(r) => refused(r),
                None => Failure {
                    retryable: true,
                    code: if e.is_timeout() { "timeout" } else { "connect" }.into(),
                    data: cut(&error_chain(&e)),
                    retry_after: None,
                },
            }),
            Ok(resp) => answer(resp).await,
        };
        (outcome, started.elapsed())
    }
}

/// A delivery the guard refused: permanent (the same address would be refused again), so it
/// dead-letters at once, saying why.
fn refused(r: &Refused) -> Failure {
    Failure {
        retryable: false,
        code: REFUSED_CODE.into(),
        data: cut(&r.to_string()),
        retry_after: None,
    }
}

/// The guard's refusal among the causes of a request error (the resolver's error, wrapped by
/// the connector and the client).
fn find_refused<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<Refused>() {
            return Some(r);
        }
        cause = c.source();
    }
    None
}

/// An error with its causes: reqwest's own message names only the URL, the reason (refused,
/// certificate not trusted, ...) is further down.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

async fn answer(resp: reqwest::Response) -> Outcome {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = read_capped(resp).await;
    if (200..300).contains(&status) {
        let reply = body.and_then(|b| reply_event(&headers, &b));
        return Outcome::Delivered { status, reply };
    }
    let retryable = matches!(status, 404 | 409 | 429) || status >= 500;
    // Redirects are not followed (the guard's checks would not see where they lead): a 3xx
    // is a final failure that says where the sink pointed.
    if (300..400).contains(&status) {
        let to = headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(no Location)");
        return Outcome::Failed(Failure {
            retryable,
            code: status.to_string(),
            data: cut(&format!("redirect to {to} not followed")),
            retry_after: None,
        });
    }
    let retry_after = if matches!(status, 429 | 503) {
        headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
    } else {
        None
    };
    Outcome::Failed(Failure {
        retryable,
        code: status.to_string(),
        data: body
            .map(|b| cut(&String::from_utf8_lossy(&b)))
            .unwrap_or_default(),
        retry_after,
    })
}

async fn read_capped(mut resp: reqwest::Response) -> Option<bytes::Bytes> {
    let mut buf = bytes::BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if buf.len() + c.len() > MAX_RESPONSE_BYTES {
                    return Some(buf.freeze());
                }
                buf.extend_from_slice(&c);
            }
            Ok(None) => return Some(buf.freeze()),
            Err(_) => return (!buf.is_empty()).then(|| buf.freeze()),
        }
    }
}

/// The CloudEvent in a 2xx answer, if it carries one (a body that is not an event is no
/// reply, and neither is a broken one: the delivery itself succeeded).
fn reply_event(headers: &HeaderMap, body: &bytes::Bytes) -> Option<CloudEvent> {
    let structured = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/cloudevents+json"));
    let binary = headers.contains_key("ce-specversion");
    if !structured && !binary {
        return None;
    }
    // A sink that echoes the delivered event back sends the position, version and commit
    // time it received; the target stream assigns its own.
    let mut headers = headers.clone();
    for k in ["ce-weirposition", "ce-weirversion", "ce-weirrecordedtime"] {
        headers.remove(k);
    }
    let ctx = IngestContext::new("", "", chrono::Utc::now());
    match parse_request(&headers, body, &ctx) {
        Ok(mut evs) if evs.len() == 1 => evs.pop(),
        Ok(_) => None,
        Err(p) => {
            tracing::warn!(problem = %p.detail, "sink answered with an invalid CloudEvent; no reply");
            None
        }
    }
}

/// `Retry-After` as seconds or as an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let t = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = (t.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds();
    Some(Duration::from_millis(ms.max(0) as u64))
}

/// The `ce-` headers of an event in binary mode.
pub fn binary_headers(ev: &CloudEvent) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &str, value: &str| {
        let enc = utf8_percent_encode(value, HEADER_ENCODE).to_string();
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(format!("ce-{name}")),
            HeaderValue::try_from(enc),
        ) {
            h.insert(n, v);
        }
    };
    put("specversion", SPEC_VERSION);
    put("id", &ev.id);
    put("source", &ev.source);
    put("type", &ev.ty);
    for (n, v) in [
        ("subject", &ev.subject),
        ("time", &ev.time),
        ("dataschema", &ev.dataschema),
    ] {
        if let Some(v) = v {
            put(n, v);
        }
    }
    for (n, v) in &ev.extensions {
        put(n, &v.as_string());
    }
    // JSON data without a type is JSON (events stored before ingest wrote the implied type
    // down still carry it that way).
    let implied = match (&ev.datacontenttype, &ev.data) {
        (None, Some(Data::Json(_))) => Some("application/json"),
        (ct, _) => ct.as_deref(),
    };
    if let Some(ct) = implied.and_then(|ct| HeaderValue::try_from(ct).ok()) {
        h.insert(header::CONTENT_TYPE, ct);
    }
    h
}

/// `s` cut to at most [`ERROR_DATA_MAX`] bytes at a character boundary.
pub fn cut(s: &str) -> String {
    if s.len() <= ERROR_DATA_MAX {
        return s.to_string();
    }
    let mut end = ERROR_DATA_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests;
