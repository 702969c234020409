//! Ingest parsing and validation, black-box: every content mode with byte-for-byte data round
//! trips, every refusal with its status, index and pointer, and the stream validation rules.

#[path = "common/binary.rs"]
mod binary;

use binary::to_binary;
use bytes::Bytes;
use chrono::{TimeZone, Utc};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::json;
use weir::data::event::{CloudEvent, Data, ExtValue, to_batch_json, to_structured_json};
use weir::data::ingest::{
    IngestContext, MAX_EXTENSION_NAME_LEN, Validator, ValidatorError, check_content_type,
    expected_version, parse_request, parse_request_bytes,
};
use weir::data::problem::{HttpProblem, ProblemKind};
use weir::topology::{SchemaPlan, ValidationPlan};

const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

fn ctx() -> IngestContext {
    IngestContext::new(
        "shop",
        "orders",
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap(),
    )
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn post(content_type: &str, body: &[u8]) -> Result<Vec<CloudEvent>, HttpProblem> {
    parse_request(&headers(&[("content-type", content_type)]), body, &ctx())
}

fn one(content_type: &str, body: &str) -> CloudEvent {
    let mut events = post(content_type, body.as_bytes()).unwrap();
    assert_eq!(events.len(), 1);
    events.remove(0)
}

/// Serialises in structured mode and parses again: must give the same event.
fn assert_structured_round_trip(ev: &CloudEvent) {
    let text = to_structured_json(ev);
    let again = post(STRUCTURED, &text).unwrap();
    assert_eq!(
        again,
        vec![ev.clone()],
        "{}",
        String::from_utf8_lossy(&text)
    );
}

fn problem(result: Result<Vec<CloudEvent>, HttpProblem>) -> HttpProblem {
    match result {
        Ok(evs) => panic!("expected a problem, got {evs:?}"),
        Err(p) => p,
    }
}

/// Asserts that `p` has status `status` and an error at `index`/`pointer`.
fn assert_error(p: &HttpProblem, status: u16, index: Option<usize>, pointer: Option<&str>) {
    assert_eq!(p.status, status, "{p:?}");
    assert!(
        p.errors
            .iter()
            .any(|e| e.index == index && e.pointer.as_deref() == pointer),
        "no error at index {index:?} pointer {pointer:?}: {p:#?}"
    );
}

fn event_json(extra: serde_json::Value) -> serde_json::Value {
    let mut ev =
        json!({"specversion": "1.0", "id": "e1", "source": "/checkout", "type": "order.created"});
    for (k, v) in extra.as_object().unwrap() {
        ev[k] = v.clone();
    }
    ev
}

// ---------------------------------------------------------------------------------------------
// Structured and batched mode

#[test]
fn structured_json_data_keeps_its_exact_text() {
    let data = r#"{"z": 1,   "a" : [1.50, "x\u00e9", 1e3],
        "b":{} }"#;
    let body = format!(
        r#"{{"specversion":"1.0","id":"e1","source":"/checkout","type":"order.created",
            "subject":"o-1","time":"2024-05-01T14:00:00.5+02:00","region":"eu","n":-7,
            "flag":true,"data" :  {data}  }}"#
    );
    let ev = one(STRUCTURED, &body);
    assert_eq!(ev.data, Some(Data::Json(Bytes::from(data))));
    assert_eq!(ev.subject.as_deref(), Some("o-1"));
    assert_eq!(ev.time.as_deref(), Some("2024-05-01T14:00:00.5+02:00"));
    // Absent in the request: JSON data implies application/json, and the event says so from
    // here on (a sink in binary mode, the broker and the store see JSON, not opaque bytes).
    assert_eq!(ev.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(ev.extensions["region"], ExtValue::String("eu".into()));
    assert_eq!(ev.extensions["n"], ExtValue::Integer(-7));
    assert_eq!(ev.extensions["flag"], ExtValue::Bool(true));
    assert_structured_round_trip(&ev);
}

#[test]
fn shared_body_is_not_copied_and_gives_the_same_events() {
    let body = Bytes::from(
        event_json(json!({"data": {"orderId": "o-1"}}))
            .to_string()
            .into_bytes(),
    );
    let h = headers(&[("content-type", STRUCTURED)]);
    let shared = parse_request_bytes(&h, &body, &ctx()).unwrap();
    assert_eq!(shared, parse_request(&h, &body, &ctx()).unwrap());
    let data = shared[0].data.as_ref().unwrap().bytes();
    let range = body.as_ptr_range();
    assert!(
        range.contains(&data.as_ptr()),
        "data should point into the body"
    );
}

#[test]
fn structured_text_data_is_the_strings_text() {
    let body = event_json(json!({
        "datacontenttype": "text/plain; charset=utf-8",
        "data": "line 1\nline 2 \"quoted\" café \u{1F600}"
    }))
    .to_string();
    let ev = one(STRUCTURED, &body);
    assert_eq!(
        ev.data,
        Some(Data::Text(Bytes::from(
            "line 1\nline 2 \"quoted\" café \u{1F600}"
        )))
    );
    assert_structured_round_trip(&ev);

    // A JSON string with a JSON (or no) content type stays JSON text, quotes included.
    for extra in [
        json!({"data": "just a string"}),
        json!({"datacontenttype": "application/vnd.shop+json", "data": "just a string"}),
    ] {
        let ev = one(STRUCTURED, &event_json(extra).to_string());
        assert_eq!(
            ev.data,
            Some(Data::Json(Bytes::from_static(b"\"just a string\"")))
        );
        assert_structured_round_trip(&ev);
    }
}

#[test]
fn structured_binary_data_round_trips_every_byte_value() {
    use base64::Engine as _;
    let bytes: Vec<u8> = (0..=255u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let body =
        event_json(json!({"datacontenttype": "application/octet-stream", "data_base64": b64}))
            .to_string();
    let ev = one(STRUCTURED, &body);
    assert_eq!(ev.data, Some(Data::Binary(Bytes::from(bytes.clone()))));
    assert_structured_round_trip(&ev);

    // Unpadded base64 decodes to the same bytes.
    let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&bytes[..10]);
    let ev = one(
        STRUCTURED,
        &event_json(json!({"data_base64": unpadded})).to_string(),
    );
    assert_eq!(
        ev.data,
        Some(Data::Binary(Bytes::from(bytes[..10].to_vec())))
    );
}

#[test]
fn explicit_null_data_is_json_null_and_absent_data_is_none() {
    let ev = one(STRUCTURED, &event_json(json!({"data": null})).to_string());
    assert_eq!(ev.data, Some(Data::Json(Bytes::from_static(b"null"))));
    assert_structured_round_trip(&ev);
    let ev = one(STRUCTURED, &event_json(json!({})).to_string());
    assert_eq!(ev.data, None);
    assert_structured_round_trip(&ev);
}

#[test]
fn batch_round_trips_every_kind_of_data() {
    let body = json!([
        event_json(json!({"id": "a", "data": {"k": [1, 2]}})),
        event_json(json!({"id": "b", "datacontenttype": "text/csv", "data": "a,b\n1,2"})),
        event_json(json!({"id": "c", "datacontenttype": "image/png", "data_base64": "AAEC/w=="})),
    ])
    .to_string();
    let events = post(BATCH, body.as_bytes()).unwrap();
    assert_eq!(events.len(), 3);
    assert!(matches!(events[0].data, Some(Data::Json(_))));
    assert_eq!(
        events[1].data,
        Some(Data::Text(Bytes::from_static(b"a,b\n1,2")))
    );
    assert_eq!(
        events[2].data,
        Some(Data::Binary(Bytes::from_static(&[0, 1, 2, 255])))
    );
    let again = post(BATCH, &to_batch_json(&events)).unwrap();
    assert_eq!(again, events);
}

#[test]
fn null_attributes_are_unset() {
    let ev = one(
        STRUCTURED,
        &event_json(json!({"subject": null, "time": null, "unsetext": null, "data": 1}))
            .to_string(),
    );
    assert_eq!(ev.subject, None);
    assert_eq!(ev.time, None);
    assert!(ev.extensions.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Binary mode

#[test]
fn binary_mode_reads_headers_and_keeps_the_body() {
    let json_body = br#"{ "orderId" :"o-1",  "total": 10.50 }"#;
    let h = headers(&[
        ("content-type", "application/json"),
        ("ce-specversion", "1.0"),
        ("ce-id", "e1"),
        ("ce-source", "/checkout"),
        ("ce-type", "order.created"),
        ("ce-subject", "caf%C3%A9%20%25%22"),
        ("ce-time", "2024-05-01T12:00:00Z"),
        ("ce-Region", "eu"),
        ("ce-count", "7"),
    ]);
    let evs = parse_request(&h, json_body, &ctx()).unwrap();
    let ev = &evs[0];
    assert_eq!(ev.subject.as_deref(), Some("café %\""));
    assert_eq!(ev.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(ev.data, Some(Data::Json(Bytes::from_static(json_body))));
    // Header names are case-insensitive; binary-mode extensions are strings.
    assert_eq!(ev.extensions["region"], ExtValue::String("eu".into()));
    assert_eq!(ev.extensions["count"], ExtValue::String("7".into()));
    assert_structured_round_trip(ev);
    let (h2, body2) = to_binary(ev);
    assert_eq!(parse_request(&h2, &body2, &ctx()).unwrap(), evs);
}

#[test]
fn binary_mode_data_kinds_round_trip() {
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    // (Content-Type, body, the expected kind of data)
    type Case = (Option<&'static str>, Vec<u8>, fn(Bytes) -> Data);
    let cases: Vec<Case> = vec![
        (
            Some("text/plain"),
            "héllo\r\n\"x\"".as_bytes().to_vec(),
            Data::Text,
        ),
        (
            Some("application/octet-stream"),
            all_bytes.clone(),
            Data::Binary,
        ),
        (None, all_bytes.clone(), Data::Binary),
        // Text that is not UTF-8 is kept as bytes.
        (Some("text/plain"), vec![0x66, 0xff, 0x6f], Data::Binary),
        (
            Some("text/plain; charset=iso-8859-1"),
            b"caf\xe9".to_vec(),
            Data::Binary,
        ),
        (
            Some("application/xml"),
            b"<a x=\"1\"/>".to_vec(),
            Data::Binary,
        ),
        (
            Some("application/vnd.shop.order+json"),
            b"[1,  {\"b\":2 , \"a\":1}]".to_vec(),
            Data::Json,
        ),
    ];
    for (ct, body, kind) in cases {
        let mut pairs = vec![
            ("ce-specversion", "1.0"),
            ("ce-id", "e1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ];
        if let Some(ct) = ct {
            pairs.push(("content-type", ct));
        }
        let evs = parse_request(&headers(&pairs), &body, &ctx()).unwrap();
        let ev = &evs[0];
        assert_eq!(ev.data, Some(kind(Bytes::from(body.clone()))), "{ct:?}");
        assert_eq!(ev.datacontenttype.as_deref(), ct);
        assert_structured_round_trip(ev);
        let (h2, body2) = to_binary(ev);
        assert_eq!(parse_request(&h2, &body2, &ctx()).unwrap(), evs, "{ct:?}");
    }
}

#[test]
fn binary_json_body_keeps_whitespace_around_the_value() {
    let body = b"\n  {\"a\": 1}\n";
    let h = headers(&[
        ("ce-specversion", "1.0"),
        ("ce-id", "e1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("content-type", "application/json"),
    ]);
    let evs = parse_request(&h, body, &ctx()).unwrap();
    assert_eq!(evs[0].data, Some(Data::Json(Bytes::from_static(body))));
    // Binary to binary is exact.
    let (h2, body2) = to_binary(&evs[0]);
    assert_eq!(body2, body);
    assert_eq!(parse_request(&h2, &body2, &ctx()).unwrap(), evs);
    // Structured mode has no room for whitespace around `data`: the value itself is exact.
    let again = post(STRUCTURED, &to_structured_json(&evs[0])).unwrap();
    assert_eq!(
        again[0].data,
        Some(Data::Json(Bytes::from_static(b"{\"a\": 1}")))
    );
}

#[test]
fn binary_mode_empty_body_means_no_data() {
    let h = headers(&[
        ("ce-specversion", "1.0"),
        ("ce-id", "e1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("content-type", "application/json"),
    ]);
    let evs = parse_request(&h, b"", &ctx()).unwrap();
    assert_eq!(evs[0].data, None);
}

#[test]
fn binary_mode_refusals() {
    let base = [("ce-id", "e1"), ("ce-source", "/s"), ("ce-type", "t")];
    let with = |extra: &[(&str, &str)]| {
        let mut pairs: Vec<(&str, &str)> = base.to_vec();
        pairs.extend_from_slice(extra);
        headers(&pairs)
    };
    // specversion missing although other ce- headers are there.
    let p = problem(parse_request(&with(&[]), b"", &ctx()));
    assert_error(&p, 400, Some(0), Some("/specversion"));

    // Each header set and body, with the pointer of the one fault it has.
    let sv = ("ce-specversion", "1.0");
    for (extra, body, pointer) in [
        (
            ("content-type", "application/json"),
            &b"{not json"[..],
            "/data",
        ),
        (
            ("ce-datacontenttype", "text/plain"),
            b"x",
            "/datacontenttype",
        ),
        (("ce-foo_bar", "x"), b"", "/foo_bar"),
        (("ce-subject", "%FF%FE"), b"", "/subject"),
        (("ce-id", "second"), b"", "/id"),
    ] {
        let p = problem(parse_request(&with(&[sv, extra]), body, &ctx()));
        assert_error(&p, 400, Some(0), Some(pointer));
    }
}

// ---------------------------------------------------------------------------------------------
// Plain application/json (the seed's shape)

#[test]
fn plain_json_gets_the_documented_defaults() {
    let data = r#"{"orderId":  "o-1" }"#;
    let body = format!(r#"{{"type":"order.created","data":{data},"correlationId":"saga-9"}}"#);
    let ev = one("application/json", &body);
    let id = uuid::Uuid::parse_str(&ev.id).unwrap();
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(ev.source, "/weir/namespaces/shop/streams/orders");
    assert_eq!(ev.ty, "order.created");
    assert_eq!(ev.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(ev.time.as_deref(), Some("2024-05-01T12:00:00.000000Z"));
    assert_eq!(ev.correlation_id().as_deref(), Some("saga-9"));
    assert_eq!(ev.data, Some(Data::Json(Bytes::from(data))));
    assert_structured_round_trip(&ev);
}

#[test]
fn plain_json_array_and_given_attributes() {
    let body = json!([
        {"type": "a", "data": 1, "id": "x1", "source": "/mine", "subject": "s-1"},
        {"type": "b", "data": [true]},
    ])
    .to_string();
    let evs = post("application/json; charset=utf-8", body.as_bytes()).unwrap();
    assert_eq!(evs.len(), 2);
    assert_eq!(
        (evs[0].id.as_str(), evs[0].source.as_str()),
        ("x1", "/mine")
    );
    assert_eq!(evs[0].subject.as_deref(), Some("s-1"));
    assert_ne!(evs[1].id, evs[0].id);
    assert!(evs[1].extensions.is_empty());
}

#[test]
fn plain_json_refusals_name_the_member() {
    let p = problem(post(
        "application/json",
        br#"[{"type":"a","data":1},{"type":"b","data":1,"correlationID":"x"}]"#,
    ));
    assert_error(&p, 400, Some(1), Some("/correlationID"));
    assert!(p.errors[0].message.contains("correlationID"));

    let p = problem(post("application/json", br#"{"data":1}"#));
    assert_error(&p, 400, Some(0), Some("/type"));
    let p = problem(post("application/json", br#"{"type":"a"}"#));
    assert_error(&p, 400, Some(0), Some("/data"));
    let p = problem(post(
        "application/json",
        br#"{"type":"a","data":1,"id":""}"#,
    ));
    assert_error(&p, 400, Some(0), Some("/id"));
    let p = problem(post("application/json", b"[]"));
    assert_eq!(p.status, 400);
    let p = problem(post("application/json", b"\"hello\""));
    assert_eq!(p.status, 400);
}

// ---------------------------------------------------------------------------------------------
// Content types and JSON syntax

#[test]
fn unsupported_content_types_are_415() {
    for ct in ["text/xml", "application/cloudevents+avro", "text/plain"] {
        let p = problem(post(ct, b"{}"));
        assert_eq!(p.status, 415, "{ct}");
        assert_eq!(p.kind, ProblemKind::UnsupportedMediaType);
        assert!(p.detail.contains(ct));
        assert_eq!(
            check_content_type(&headers(&[("content-type", ct)])).unwrap_err(),
            p
        );
    }
    let p = problem(parse_request(&HeaderMap::new(), b"{}", &ctx()));
    assert_eq!(p.status, 415);
    assert!(check_content_type(&headers(&[("content-type", STRUCTURED)])).is_ok());
}

#[test]
fn malformed_json_is_400_with_line_and_column() {
    let p = problem(post(STRUCTURED, b"{\"id\": \"e1\",\n  \"type\": }"));
    assert_eq!(p.status, 400);
    assert_eq!(p.kind, ProblemKind::MalformedJson);
    assert!(p.detail.contains("line 2 column"), "{}", p.detail);
    assert!(p.errors[0].message.contains("line 2 column"));

    let body = format!("[{},\n{{\"id\": ]", event_json(json!({"data": 1})));
    let p = problem(post(BATCH, body.as_bytes()));
    assert_eq!(p.errors[0].index, Some(1));

    let p = problem(post(STRUCTURED, b""));
    assert_eq!(p.kind, ProblemKind::MalformedJson);
    let p = problem(post(STRUCTURED, b"{\"data\": \"\xff\"}"));
    assert_eq!(p.kind, ProblemKind::MalformedJson);
}

#[test]
fn envelope_shape_must_match_the_mode() {
    let ev = event_json(json!({}));
    let p = problem(post(STRUCTURED, json!([ev.clone()]).to_string().as_bytes()));
    assert_eq!(p.status, 400);
    let p = problem(post(BATCH, ev.to_string().as_bytes()));
    assert_eq!(p.status, 400);
    let p = problem(post(BATCH, b"[]"));
    assert_eq!(p.status, 400);
    assert_eq!(p.errors[0].keyword.as_deref(), Some("minItems"));
    let p = problem(post(BATCH, json!([ev, "nope", 3]).to_string().as_bytes()));
    assert_error(&p, 400, Some(1), None);
    assert_error(&p, 400, Some(2), None);
}

// ---------------------------------------------------------------------------------------------
// CloudEvents rules

#[test]
fn every_missing_required_attribute_is_named() {
    for name in ["specversion", "id", "source", "type"] {
        let mut ev = event_json(json!({}));
        ev.as_object_mut().unwrap().remove(name);
        let p = problem(post(STRUCTURED, ev.to_string().as_bytes()));
        let pointer = format!("/{name}");
        assert_error(&p, 400, Some(0), Some(&pointer));
        assert_eq!(p.errors[0].keyword.as_deref(), Some("required"));
        assert_eq!(p.kind, ProblemKind::InvalidEvent);
    }
    let cases = [
        (json!({"specversion": "0.3"}), "/specversion", "const"),
        (json!({"id": ""}), "/id", "minLength"),
        (json!({"id": 5}), "/id", "type"),
        (json!({"source": null}), "/source", "required"),
        (json!({"subject": ""}), "/subject", "minLength"),
        (json!({"time": "yesterday"}), "/time", "format"),
        (json!({"time": "2024-05-01 12:00"}), "/time", "format"),
    ];
    for (extra, pointer, keyword) in cases {
        let p = problem(post(
            STRUCTURED,
            event_json(extra.clone()).to_string().as_bytes(),
        ));
        assert_error(&p, 400, Some(0), Some(pointer));
        assert_eq!(p.errors[0].keyword.as_deref(), Some(keyword), "{extra}");
    }
}

#[test]
fn all_faults_of_all_events_are_reported() {
    let body = json!([
        event_json(json!({"id": "ok"})),
        {"specversion": "1.0", "source": "/s"},
        event_json(json!({"Bad": 1, "time": "x"})),
    ])
    .to_string();
    let p = problem(post(BATCH, body.as_bytes()));
    assert_error(&p, 400, Some(1), Some("/id"));
    assert_error(&p, 400, Some(1), Some("/type"));
    assert_error(&p, 400, Some(2), Some("/Bad"));
    assert_error(&p, 400, Some(2), Some("/time"));
    assert_eq!(p.errors.len(), 4);
}

#[test]
fn extension_names_and_values() {
    let bad_name = [
        json!({"Region": "eu"}),
        json!({"foo-bar": "x"}),
        json!({"weirposition": "1"}),
        json!({"a".repeat(MAX_EXTENSION_NAME_LEN + 1): "x"}),
    ];
    for extra in bad_name {
        let name = extra.as_object().unwrap().keys().next().unwrap().clone();
        let p = problem(post(STRUCTURED, event_json(extra).to_string().as_bytes()));
        assert_error(&p, 400, Some(0), Some(&format!("/{name}")));
        assert_eq!(p.errors[0].keyword.as_deref(), Some("propertyNames"));
    }
    // Longer than the recommended 20 characters is still accepted.
    let long = "a".repeat(30);
    let ev = one(
        STRUCTURED,
        &event_json(json!({long.clone(): "x"})).to_string(),
    );
    assert!(ev.extensions.contains_key(&long));

    let bad_value = [
        json!({"ext": {"a": 1}}),
        json!({"ext": [1]}),
        json!({"ext": 1.5}),
        json!({"ext": 3_000_000_000i64}),
    ];
    for extra in bad_value {
        let p = problem(post(
            STRUCTURED,
            event_json(extra.clone()).to_string().as_bytes(),
        ));
        assert_error(&p, 400, Some(0), Some("/ext"));
    }
    let ev = one(
        STRUCTURED,
        &event_json(json!({"ext": 2_147_483_647, "neg": -2_147_483_648i64})).to_string(),
    );
    assert_eq!(ev.extensions["ext"], ExtValue::Integer(2_147_483_647));
    assert_eq!(ev.extensions["neg"], ExtValue::Integer(-2_147_483_648));
}

#[test]
fn duplicate_members_are_refused() {
    let p = problem(post(
        STRUCTURED,
        br#"{"specversion":"1.0","id":"a","id":"b","source":"/s","type":"t","data":1,"data":2}"#,
    ));
    assert_error(&p, 400, Some(0), Some("/id"));
    assert_error(&p, 400, Some(0), Some("/data"));
}

#[test]
fn data_rules() {
    let p = problem(post(
        STRUCTURED,
        event_json(json!({"data": 1, "data_base64": "AA=="}))
            .to_string()
            .as_bytes(),
    ));
    assert_error(&p, 400, Some(0), Some("/data_base64"));
    let p = problem(post(
        STRUCTURED,
        event_json(json!({"data_base64": "not base64!"}))
            .to_string()
            .as_bytes(),
    ));
    assert_error(&p, 400, Some(0), Some("/data_base64"));
    assert_eq!(p.errors[0].keyword.as_deref(), Some("contentEncoding"));
    let p = problem(post(
        STRUCTURED,
        event_json(json!({"data_base64": 12}))
            .to_string()
            .as_bytes(),
    ));
    assert_error(&p, 400, Some(0), Some("/data_base64"));
    let p = problem(post(
        STRUCTURED,
        event_json(json!({"datacontenttype": "text/plain", "data": {"a": 1}}))
            .to_string()
            .as_bytes(),
    ));
    assert_error(&p, 400, Some(0), Some("/data"));
}

#[test]
fn expected_version_rules() {
    let parse = |extra| post(STRUCTURED, event_json(extra).to_string().as_bytes());
    let ev = &parse(json!({"subject": "o-1", "expectedversion": "3"})).unwrap()[0];
    assert_eq!(expected_version(ev), Some(3));
    let ev = &parse(json!({"subject": "o-1", "expectedversion": 0})).unwrap()[0];
    assert_eq!(expected_version(ev), Some(0));
    let ev = &parse(json!({"subject": "o-1"})).unwrap()[0];
    assert_eq!(expected_version(ev), None);
    for bad in [json!("abc"), json!("-1"), json!(-1), json!(""), json!(true)] {
        let p = problem(parse(json!({"subject": "o-1", "expectedversion": bad})));
        assert_error(&p, 400, Some(0), Some("/expectedversion"));
    }
    let p = problem(parse(json!({"expectedversion": "1"})));
    assert_error(&p, 400, Some(0), Some("/expectedversion"));
    assert_eq!(p.errors[0].keyword.as_deref(), Some("dependentRequired"));

    let h = headers(&[
        ("ce-specversion", "1.0"),
        ("ce-id", "e1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("ce-subject", "o-1"),
        ("ce-expectedversion", "12"),
    ]);
    let evs = parse_request(&h, b"", &ctx()).unwrap();
    assert_eq!(expected_version(&evs[0]), Some(12));
}

// ---------------------------------------------------------------------------------------------
// Validation

fn order_schema() -> serde_json::Value {
    json!({"type": "object", "required": ["orderId"], "properties": {"orderId": {"type": "string"}}})
}

fn plan(schemas: Vec<SchemaPlan>) -> ValidationPlan {
    ValidationPlan {
        schemas,
        ..ValidationPlan::default()
    }
}

fn schema(ty: &str, dataschema: Option<&str>, schema: serde_json::Value) -> SchemaPlan {
    SchemaPlan {
        event_type: ty.into(),
        dataschema: dataschema.map(str::to_string),
        schema,
    }
}

fn events(list: serde_json::Value) -> Vec<CloudEvent> {
    post(BATCH, list.to_string().as_bytes()).unwrap()
}

#[test]
fn schema_violations_carry_pointer_and_keyword_for_every_event() {
    let v = Validator::new(&plan(vec![schema("order.created", None, order_schema())])).unwrap();
    let evs = events(json!([
        event_json(json!({"data": {"orderId": "o-1"}})),
        event_json(json!({"data": {"total": 3}})),
        event_json(json!({"data": {"orderId": 42}})),
        event_json(json!({"type": "other", "data": "anything"})),
    ]));
    let p = v.check(&evs).unwrap_err();
    assert_eq!(p.status, 422);
    assert_eq!(p.kind, ProblemKind::SchemaViolation);
    assert_eq!(p.errors.len(), 2, "{p:#?}");
    assert_eq!(p.errors[0].index, Some(1));
    assert_eq!(p.errors[0].pointer.as_deref(), Some("/data/orderId"));
    assert_eq!(p.errors[0].keyword.as_deref(), Some("required"));
    assert_eq!(p.errors[1].index, Some(2));
    assert_eq!(p.errors[1].pointer.as_deref(), Some("/data/orderId"));
    assert_eq!(p.errors[1].keyword.as_deref(), Some("type"));
    assert!(v.check(&evs[..1]).is_ok());
    assert!(
        v.check(&evs[3..]).is_ok(),
        "unknown types are allowed by default"
    );
}

#[test]
fn dataschema_selects_the_versioned_schema() {
    let v2 = "https://schemas.shop/order.created/v2";
    let v = Validator::new(&plan(vec![
        schema("order.created", None, order_schema()),
        schema(
            "order.created",
            Some(v2),
            json!({"type": "object", "required": ["orderNumber"]}),
        ),
    ]))
    .unwrap();
    let evs = events(json!([
        event_json(json!({"dataschema": v2, "data": {"orderNumber": 7}})),
        event_json(json!({"dataschema": v2, "data": {"orderId": "o-1"}})),
        event_json(json!({"dataschema": "https://schemas.shop/v9", "data": {"orderId": "o-1"}})),
        event_json(json!({"data": {"orderNumber": 7}})),
    ]));
    let p = v.check(&evs).unwrap_err();
    let at: Vec<_> = p
        .errors
        .iter()
        .map(|e| (e.index, e.pointer.as_deref()))
        .collect();
    assert_eq!(
        at,
        vec![
            (Some(1), Some("/data/orderNumber")),
            (Some(3), Some("/data/orderId"))
        ]
    );
}

#[test]
fn unknown_types_and_versions_when_refused() {
    let v2 = "https://schemas.shop/v2";
    let mut rules = plan(vec![
        schema("order.created", None, order_schema()),
        schema("order.paid", Some(v2), json!({})),
    ]);
    rules.allow_unknown_types = false;
    let v = Validator::new(&rules).unwrap();
    let evs = events(json!([
        event_json(json!({"type": "order.shipped", "data": {}})),
        event_json(json!({"type": "order.paid", "dataschema": "https://schemas.shop/v1"})),
        event_json(json!({"type": "order.paid", "dataschema": v2})),
    ]));
    let p = v.check(&evs).unwrap_err();
    assert_eq!(p.status, 422);
    assert_eq!(p.kind, ProblemKind::UnknownType);
    assert_error(&p, 422, Some(0), Some("/type"));
    assert_eq!(p.errors[0].keyword.as_deref(), Some("type"));
    assert_error(&p, 422, Some(1), Some("/dataschema"));
    assert_eq!(p.errors.len(), 2);

    rules.allow_unknown_types = true;
    assert!(Validator::new(&rules).unwrap().check(&evs).is_ok());
}

#[test]
fn required_extensions() {
    let mut rules = plan(vec![]);
    rules.required_extensions = vec!["correlationid".into(), "subject".into()];
    let v = Validator::new(&rules).unwrap();
    let evs = events(json!([
        event_json(json!({"correlationid": "c", "subject": "s"})),
        event_json(json!({"subject": "s"})),
    ]));
    let p = v.check(&evs).unwrap_err();
    assert_eq!(p.kind, ProblemKind::MissingExtension);
    assert_error(&p, 422, Some(1), Some("/correlationid"));
    assert_eq!(p.errors[0].keyword.as_deref(), Some("required"));
    assert_eq!(p.errors.len(), 1);
}

#[test]
fn oversized_events_are_413_and_other_faults_are_still_listed() {
    let mut rules = plan(vec![schema("order.created", None, order_schema())]);
    rules.max_event_bytes = 200;
    let v = Validator::new(&rules).unwrap();
    let big = "x".repeat(300);
    let evs = events(json!([
        event_json(json!({"data": {"orderId": "o-1"}})),
        event_json(json!({"data": {"orderId": big}})),
        event_json(json!({"data": {}})),
    ]));
    let p = v.check(&evs).unwrap_err();
    assert_eq!(p.status, 413);
    assert_eq!(p.kind, ProblemKind::EventTooLarge);
    let e = &p.errors[0];
    assert_eq!(e.index, Some(1));
    let size = evs[1].encoded_size().to_string();
    assert!(
        e.message.contains(&size) && e.message.contains("200"),
        "{}",
        e.message
    );
    assert_error(&p, 413, Some(2), Some("/data/orderId"));
}

#[test]
fn a_schema_needs_json_data() {
    let v = Validator::new(&plan(vec![schema("order.created", None, order_schema())])).unwrap();
    let evs = events(json!([
        event_json(json!({"datacontenttype": "text/plain", "data": "hello"})),
        event_json(json!({"data_base64": "AA=="})),
        event_json(json!({})),
    ]));
    let p = v.check(&evs).unwrap_err();
    assert_eq!(p.status, 422);
    assert_error(&p, 422, Some(0), Some("/data"));
    assert_error(&p, 422, Some(1), Some("/data"));
    // No data is checked as null, which this schema refuses by type.
    assert_error(&p, 422, Some(2), Some("/data"));
    assert_eq!(p.errors[2].keyword.as_deref(), Some("type"));
}

#[test]
fn several_kinds_of_failure_are_validation_failed() {
    let mut rules = plan(vec![schema("order.created", None, order_schema())]);
    rules.required_extensions = vec!["correlationid".into()];
    let v = Validator::new(&rules).unwrap();
    let evs = events(json!([event_json(json!({"data": {}}))]));
    let p = v.check(&evs).unwrap_err();
    assert_eq!(p.kind, ProblemKind::ValidationFailed);
    assert_eq!(p.status, 422);
    assert_eq!(p.errors.len(), 2);
}

#[test]
fn bad_schemas_are_refused_at_compile_time() {
    let err = Validator::new(&plan(vec![schema("t", None, json!({"type": 12}))])).unwrap_err();
    assert!(matches!(err, ValidatorError::InvalidSchema { .. }), "{err}");
    let err = Validator::new(&plan(vec![schema(
        "t",
        None,
        json!({"$ref": "https://example.invalid/schema.json"}),
    )]))
    .unwrap_err();
    assert!(matches!(err, ValidatorError::InvalidSchema { .. }), "{err}");
    let err = Validator::new(&plan(vec![
        schema("t", Some("v1"), json!({})),
        schema("t", Some("v1"), json!({})),
    ]))
    .unwrap_err();
    assert!(
        matches!(err, ValidatorError::DuplicateSchema { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("v1"));
}
