//! What each fuzz target does with one input, shared by the `cargo fuzz` targets (nightly,
//! `fuzz/fuzz_targets/`) and by `tests/properties.rs` (stable, which runs the committed seed
//! corpus and seeded damage of it in every `cargo test`). A panic is a finding.

#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use weir::data::archive::format::{BlockEntry, decode_block, decompress_block, parse_body};
use weir::data::broker::{AMQPValue, FieldTable, from_delivery, to_message};
use weir::data::event::to_structured_json;
use weir::data::ingest::{IngestContext, parse_request, parse_request_bytes};

/// One target: what it does with one input.
pub type Target = fn(&[u8]);

/// The targets by name (the corpus folder and the `cargo fuzz run` name).
pub const TARGETS: &[(&str, Target)] = &[
    ("ingest_body", ingest_body),
    ("archive_block", archive_block),
    ("amqp_headers", amqp_headers),
];

const CONTENT_TYPES: &[&str] = &[
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
    "application/json",
    "text/plain",
    "application/octet-stream",
    "application/json; charset=latin1",
    "application/vnd.x+json",
];

const CE_HEADERS: &[(&str, &str)] = &[
    ("ce-specversion", "1.0"),
    ("ce-id", "e-1"),
    ("ce-source", "/fuzz"),
    ("ce-type", "t"),
    ("ce-subject", "s%C3%A9"),
    ("ce-time", "2024-05-01T00:00:00Z"),
    ("ce-expectedversion", "3"),
    ("ce-x", "%FF"),
];

fn ctx() -> IngestContext {
    IngestContext::new(
        "fuzz",
        "target",
        chrono::DateTime::from_timestamp(1_714_564_800, 0).unwrap_or_default(),
    )
}

/// Ingest: byte 0 picks the content type (or none), byte 1 the `ce-` headers (a bit each),
/// the rest is the body. A refusal must be a 4xx; an accepted event must read back the same
/// from its structured encoding.
pub fn ingest_body(data: &[u8]) {
    let (Some(&pick), Some(&ce)) = (data.first(), data.get(1)) else {
        return;
    };
    let body = &data[2..];
    let mut headers = HeaderMap::new();
    if let Some(ct) = CONTENT_TYPES.get(pick as usize % (CONTENT_TYPES.len() + 1)) {
        headers.insert("content-type", HeaderValue::from_static(ct));
    }
    for (bit, (name, value)) in CE_HEADERS.iter().enumerate() {
        if ce & (1 << bit) != 0 {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
    }
    let copied = parse_request(&headers, body, &ctx());
    let shared = parse_request_bytes(&headers, &Bytes::copy_from_slice(body), &ctx());
    match (&copied, &shared) {
        (Ok(a), Ok(b)) => {
            // Plain events get a fresh UUID each parse; everything else must agree.
            assert_eq!(a.len(), b.len());
            for ev in a {
                let text = to_structured_json(ev);
                let mut h = HeaderMap::new();
                h.insert(
                    "content-type",
                    HeaderValue::from_static("application/cloudevents+json"),
                );
                let again = parse_request(&h, &text, &ctx()).unwrap_or_else(|p| {
                    panic!(
                        "accepted {ev:?} but its structured form is refused: {p:?}\n{}",
                        String::from_utf8_lossy(&text)
                    )
                });
                let mut want = ev.clone();
                if let Some(weir::data::event::Data::Json(b)) = &want.data {
                    let s = String::from_utf8_lossy(b);
                    want.data = Some(weir::data::event::Data::Json(Bytes::from(
                        s.trim_matches([' ', '\t', '\n', '\r']).to_string(),
                    )));
                }
                assert_eq!(again, vec![want]);
            }
        }
        (Err(a), Err(b)) => {
            assert!((400..500).contains(&a.status), "refused with {a:?}");
            assert_eq!(a.status, b.status);
        }
        _ => panic!("copied and shared bodies disagree: {copied:?} / {shared:?}"),
    }
}

/// Archive: the input as a segment body, as a decompressed block, and as a compressed frame
/// its index entry vouches for (CRC fixed up, so zstd and the record decoder see it).
pub fn archive_block(data: &[u8]) {
    if let Ok((index, _)) = parse_body(data) {
        for b in &index {
            if let Some(frame) = b.frame(data) {
                let _ = decompress_block(frame, b, None);
            }
        }
    }
    let first = data
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(1, i64::from_le_bytes);
    let _ = decode_block(data, first);
    let entry = BlockEntry {
        offset: 0,
        len: data.len() as u32,
        // A claim bounded by the input, so a run costs little; the cap is a property test's.
        raw_len: (data.len() as u32).saturating_mul(8).min(1 << 20),
        first_position: first,
        count: data.len() as u32 / 8,
        crc32: crc32fast::hash(data),
    };
    let _ = decompress_block(data, &entry, None);
}

/// AMQP: the input as a header table (entries of a tag byte, a key and a value) plus a
/// content type and a body. A message that decodes must encode and decode to the same event.
pub fn amqp_headers(data: &[u8]) {
    let mut r = Reader { data, at: 0 };
    let mut table = FieldTable::default();
    const KEYS: &[&str] = &[
        "cloudEvents:specversion",
        "cloudEvents:id",
        "cloudEvents:source",
        "cloudEvents:type",
        "cloudEvents:subject",
        "cloudEvents:time",
        "cloudEvents:datacontenttype",
        "cloudEvents_x",
        "weir-datakind",
    ];
    let count = r.byte() % 16;
    for _ in 0..count {
        let k = r.byte();
        let key = match KEYS.get(k as usize % (KEYS.len() + 1)) {
            Some(k) => (*k).to_string(),
            None => format!("cloudEvents:{}", String::from_utf8_lossy(r.take(12))),
        };
        let value = match r.byte() % 8 {
            0 => AMQPValue::LongString(r.take(24).to_vec().into()),
            1 => AMQPValue::LongString("1.0".into()),
            2 => AMQPValue::Boolean(r.byte() & 1 == 1),
            3 => AMQPValue::ShortInt(i16::from_le_bytes([r.byte(), r.byte()])),
            4 => AMQPValue::LongLongInt(i64::from_le_bytes(r.array())),
            5 => AMQPValue::Timestamp(u64::from_le_bytes(r.array())),
            6 => AMQPValue::ShortString(String::from_utf8_lossy(r.take(12)).as_ref().into()),
            _ => AMQPValue::Void,
        };
        if key.len() <= 255 {
            table.insert(key.into(), value);
        }
    }
    let ct = match r.byte() % 4 {
        0 => None,
        1 => Some("application/json".to_string()),
        2 => Some("text/plain".to_string()),
        _ => Some(String::from_utf8_lossy(r.take(20)).into_owned()),
    };
    let body = &data[r.at.min(data.len())..];
    if let Ok(ev) = from_delivery(Some(&table), ct.as_deref(), body) {
        let m = to_message(&ev);
        let again = from_delivery(Some(&m.headers), m.content_type.as_deref(), &m.body)
            .unwrap_or_else(|e| panic!("decoded {ev:?} but its own message is refused: {e}"));
        assert_eq!(again, ev);
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn take(&mut self, max: usize) -> &'a [u8] {
        let n = self.byte() as usize % (max + 1);
        let start = self.at.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.at = end;
        &self.data[start..end]
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.byte();
        }
        out
    }
}

/// Applies edits to `buf`, each `(where, byte, op)`: 0 flips bits, 1 cuts the input there,
/// 2 inserts the byte, 3 repeats up to 16 bytes found there. Used to damage valid inputs.
pub fn damage(buf: &mut Vec<u8>, edits: impl Iterator<Item = (usize, u8, u8)>) {
    for (at, b, op) in edits {
        if buf.is_empty() {
            buf.push(b);
            continue;
        }
        let i = at % buf.len();
        match op % 4 {
            0 => buf[i] ^= b.max(1),
            1 => buf.truncate(i),
            2 => buf.insert(i, b),
            _ => {
                let end = (i + 1 + b as usize % 16).min(buf.len());
                let chunk = buf[i..end].to_vec();
                buf.splice(i..i, chunk);
            }
        }
    }
}
