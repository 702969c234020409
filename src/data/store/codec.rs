//! Row ⇄ event conversion, including the store-time zstd compression of large payloads.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::StoreError;
use crate::data::event::{CloudEvent, Data, EXT_EXPECTED_VERSION, ExtValue, StoredEvent};

pub const ENCODING_RAW: i16 = 0;
pub const ENCODING_ZSTD: i16 = 1;

/// Upper bound on a decompressed payload. A frame that claims more is treated as corrupt,
/// so a damaged or hostile row cannot make a reader allocate without limit.
pub const MAX_DECOMPRESSED_BYTES: u64 = 64 * 1024 * 1024;

/// The columns every read selects (by name, see [`decode_row`]). A macro so that queries
/// stay `&'static str` (sqlx only takes audited static SQL).
macro_rules! event_columns {
    () => {
        "position, id, source, type, subject, version, time, datacontenttype, dataschema, \
         extensions, data_kind, data_encoding, data, recorded_at"
    };
}
pub(crate) use event_columns;

/// Extensions as stored: everything but the write precondition `expectedversion`.
pub fn encode_extensions(ev: &CloudEvent) -> Option<String> {
    let mut ext = ev.extensions.clone();
    ext.remove(EXT_EXPECTED_VERSION);
    if ext.is_empty() {
        None
    } else {
        serde_json::to_string(&ext).ok()
    }
}

/// Payload bytes as stored and their encoding: zstd when at least `min_bytes` and smaller.
pub fn encode_data(data: &[u8], min_bytes: usize, level: i32) -> (i16, Vec<u8>) {
    if data.len() >= min_bytes
        && min_bytes > 0
        && let Ok(compressed) = zstd::bulk::compress(data, level)
        && compressed.len() < data.len()
    {
        return (ENCODING_ZSTD, compressed);
    }
    (ENCODING_RAW, data.to_vec())
}

pub fn decode_data(position: i64, encoding: i16, bytes: Vec<u8>) -> Result<Bytes, StoreError> {
    match encoding {
        ENCODING_RAW => Ok(Bytes::from(bytes)),
        ENCODING_ZSTD => {
            let corrupt = |message: String| StoreError::Corrupt { position, message };
            let size = zstd::zstd_safe::get_frame_content_size(&bytes)
                .map_err(|_| corrupt("not a zstd frame".into()))?
                .ok_or_else(|| corrupt("zstd frame without a content size".into()))?;
            if size > MAX_DECOMPRESSED_BYTES {
                return Err(corrupt(format!(
                    "zstd frame claims {size} bytes, over the {MAX_DECOMPRESSED_BYTES}-byte cap"
                )));
            }
            zstd::bulk::decompress(&bytes, size as usize)
                .map(Bytes::from)
                .map_err(|e| corrupt(format!("zstd: {e}")))
        }
        other => Err(StoreError::Corrupt {
            position,
            message: format!("unknown data encoding {other}"),
        }),
    }
}

pub fn decode_row(row: &PgRow) -> Result<StoredEvent, StoreError> {
    let position: i64 = row.try_get("position")?;
    let corrupt = |message: String| StoreError::Corrupt { position, message };
    let extensions: Option<String> = row.try_get("extensions")?;
    let extensions: BTreeMap<String, ExtValue> = match extensions {
        Some(text) => {
            serde_json::from_str(&text).map_err(|e| corrupt(format!("extensions: {e}")))?
        }
        None => BTreeMap::new(),
    };
    let kind: i16 = row.try_get("data_kind")?;
    let encoding: i16 = row.try_get("data_encoding")?;
    let raw: Option<Vec<u8>> = row.try_get("data")?;
    let data = match (kind, raw) {
        (0, _) | (_, None) => None,
        (kind, Some(raw)) => {
            let bytes = decode_data(position, encoding, raw)?;
            Some(
                Data::from_kind_code(kind, bytes)
                    .ok_or_else(|| corrupt(format!("unknown data kind {kind}")))?,
            )
        }
    };
    let recorded_time: DateTime<Utc> = row.try_get("recorded_at")?;
    Ok(StoredEvent {
        position,
        version: row.try_get("version")?,
        recorded_time,
        event: CloudEvent {
            id: row.try_get("id")?,
            source: row.try_get("source")?,
            ty: row.try_get("type")?,
            datacontenttype: row.try_get("datacontenttype")?,
            dataschema: row.try_get("dataschema")?,
            subject: row.try_get("subject")?,
            time: row.try_get("time")?,
            extensions,
            data,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_payloads_are_compressed_and_come_back() {
        let data = br#"{"k":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#
            .repeat(100);
        let (enc, stored) = encode_data(&data, 1024, 3);
        assert_eq!(enc, ENCODING_ZSTD);
        assert!(stored.len() < data.len() / 10);
        assert_eq!(decode_data(1, enc, stored).unwrap(), Bytes::from(data));
    }

    #[test]
    fn small_payloads_stay_raw() {
        let (enc, stored) = encode_data(b"{}", 1024, 3);
        assert_eq!((enc, stored.as_slice()), (ENCODING_RAW, &b"{}"[..]));
    }

    #[test]
    fn a_frame_claiming_too_much_is_corrupt_not_an_allocation() {
        let big = vec![0u8; (MAX_DECOMPRESSED_BYTES + 1) as usize];
        let frame = zstd::bulk::compress(&big, 1).unwrap();
        let err = decode_data(7, ENCODING_ZSTD, frame).unwrap_err();
        assert!(err.to_string().contains("position 7"), "{err}");
        let err = decode_data(8, ENCODING_ZSTD, b"garbage".to_vec()).unwrap_err();
        assert!(err.to_string().contains("not a zstd frame"), "{err}");
    }
}
