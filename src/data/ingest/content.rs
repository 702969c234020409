//! Which content mode a request uses, and what a media type says about a payload.

use http::HeaderMap;
use http::header::CONTENT_TYPE;

use crate::data::problem::HttpProblem;

/// The four ways a publisher can send events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `application/cloudevents+json`: one event in the JSON format.
    Structured,
    /// `application/cloudevents-batch+json`: an array of events in the JSON format.
    Batch,
    /// `ce-*` headers carry the attributes; the body is the data.
    Binary,
    /// Plain `application/json` without `ce-` headers: the seed's `{type, data, …}` shape.
    Plain,
}

const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

/// Picks the content mode from the headers, as the CloudEvents HTTP binding does: a
/// `application/cloudevents…` content type means a structured (or batched) event whatever
/// other headers say; otherwise any `ce-` header means binary mode; otherwise only plain
/// `application/json` is read.
pub(crate) fn detect(headers: &HeaderMap) -> Result<Mode, HttpProblem> {
    let content_type = match headers.get(CONTENT_TYPE) {
        None => None,
        Some(v) => match v.to_str() {
            Ok(s) => Some(s),
            // A Content-Type with bytes outside visible ASCII cannot name any type we read.
            Err(_) => {
                return Err(HttpProblem::unsupported_media_type(Some(
                    &String::from_utf8_lossy(v.as_bytes()),
                )));
            }
        },
    };
    let mime = content_type.and_then(|ct| ct.parse::<mime::Mime>().ok());
    if let Some(m) = &mime
        && m.type_() == mime::APPLICATION
        && m.subtype().as_str().starts_with("cloudevents")
    {
        let essence = m.essence_str();
        let mode = if essence == STRUCTURED {
            Mode::Structured
        } else if essence == BATCH {
            Mode::Batch
        } else {
            // Another event format (Avro, Protobuf…): Weir reads the JSON format only.
            return Err(HttpProblem::unsupported_media_type(content_type));
        };
        return if charset_is_utf8(m) {
            Ok(mode)
        } else {
            Err(HttpProblem::unsupported_media_type(content_type))
        };
    }
    if has_ce_headers(headers) {
        return Ok(Mode::Binary);
    }
    match &mime {
        Some(m) if m.essence_str() == "application/json" && charset_is_utf8(m) => Ok(Mode::Plain),
        _ => Err(HttpProblem::unsupported_media_type(content_type)),
    }
}

fn has_ce_headers(headers: &HeaderMap) -> bool {
    // Header names are stored lowercase by `http`, so one prefix test covers `Ce-Id` too.
    headers.keys().any(|k| k.as_str().starts_with("ce-"))
}

/// JSON is UTF-8 (RFC 8259); a body declared in another charset is refused rather than
/// misread.
fn charset_is_utf8(m: &mime::Mime) -> bool {
    match m.get_param(mime::CHARSET) {
        None => true,
        Some(cs) => cs == mime::UTF_8 || cs.as_str().eq_ignore_ascii_case("utf8"),
    }
}

/// What a `datacontenttype` says about the payload's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PayloadKind {
    /// `*/json` or `*/*+json` (the CloudEvents JSON format's definition).
    Json,
    /// `text/*` in UTF-8 (no charset, `utf-8` or its subset `us-ascii`).
    Text,
    /// Anything else, including text in other charsets and unparsable media types.
    Other,
}

pub(crate) fn payload_kind(media_type: &str) -> PayloadKind {
    let Ok(m) = media_type.parse::<mime::Mime>() else {
        return PayloadKind::Other;
    };
    if m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON) {
        return PayloadKind::Json;
    }
    if m.type_() == mime::TEXT {
        let utf8 = match m.get_param(mime::CHARSET) {
            None => true,
            Some(cs) => {
                cs == mime::UTF_8
                    || cs.as_str().eq_ignore_ascii_case("utf8")
                    || cs.as_str().eq_ignore_ascii_case("us-ascii")
            }
        };
        if utf8 {
            return PayloadKind::Text;
        }
    }
    PayloadKind::Other
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn modes() {
        let ct = |v| headers(&[("content-type", v)]);
        assert_eq!(
            detect(&ct("application/cloudevents+json")),
            Ok(Mode::Structured)
        );
        assert_eq!(
            detect(&ct("Application/CloudEvents+JSON; charset=UTF-8")),
            Ok(Mode::Structured)
        );
        assert_eq!(
            detect(&ct("application/cloudevents-batch+json")),
            Ok(Mode::Batch)
        );
        assert_eq!(detect(&ct("application/json")), Ok(Mode::Plain));
        assert_eq!(
            detect(&ct("application/json; charset=utf-8")),
            Ok(Mode::Plain)
        );
        assert_eq!(
            detect(&headers(&[
                ("content-type", "application/json"),
                ("ce-specversion", "1.0")
            ])),
            Ok(Mode::Binary)
        );
        assert_eq!(detect(&headers(&[("ce-id", "1")])), Ok(Mode::Binary));
        // The structured content type wins over stray ce- headers.
        assert_eq!(
            detect(&headers(&[
                ("content-type", "application/cloudevents+json"),
                ("ce-id", "1")
            ])),
            Ok(Mode::Structured)
        );
    }

    #[test]
    fn refused_content_types_are_415() {
        for ct in [
            "text/plain",
            "application/xml",
            "application/cloudevents+avro",
            "application/json; charset=iso-8859-1",
            "application/cloudevents+json; charset=latin1",
            "not a media type",
        ] {
            let p = detect(&headers(&[("content-type", ct)])).unwrap_err();
            assert_eq!(p.status, 415, "{ct}");
            assert!(p.detail.contains(ct), "{ct}: {}", p.detail);
        }
        let p = detect(&HeaderMap::new()).unwrap_err();
        assert_eq!(p.status, 415);
        assert!(p.detail.contains("no Content-Type"));
        // Even with ce- headers, another event format is refused.
        let p = detect(&headers(&[
            ("content-type", "application/cloudevents+protobuf"),
            ("ce-id", "1"),
        ]))
        .unwrap_err();
        assert_eq!(p.status, 415);
    }

    #[test]
    fn payload_kinds() {
        assert_eq!(payload_kind("application/json"), PayloadKind::Json);
        assert_eq!(payload_kind("text/json"), PayloadKind::Json);
        assert_eq!(
            payload_kind("application/vnd.shop.order+json; v=2"),
            PayloadKind::Json
        );
        assert_eq!(payload_kind("text/plain"), PayloadKind::Text);
        assert_eq!(payload_kind("text/csv; charset=utf-8"), PayloadKind::Text);
        assert_eq!(
            payload_kind("text/plain; charset=iso-8859-1"),
            PayloadKind::Other
        );
        assert_eq!(payload_kind("application/octet-stream"), PayloadKind::Other);
        assert_eq!(payload_kind("garbage"), PayloadKind::Other);
    }
}
