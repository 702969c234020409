//! The segment format, the same bytes whether a segment lives in PostgreSQL or in a file:
//!
//! ```text
//! "WEIRSEG2"                          8-byte magic
//! block 0 .. block n-1                each a zstd frame (content checksum on), optionally
//!                                     compressed with the stream's dictionary
//! index                               JSON array of BlockEntry
//! trailer: index offset  u64 LE
//!          index length  u32 LE
//!          CRC-32 of every byte before the trailer  u32 LE
//!          "WEIRSEGE"                 8-byte end magic
//! ```
//!
//! A block holds ~64 KiB of events, each a length-prefixed binary record (layout below,
//! in `record`). A record carries no position (the block index gives the first, and they
//! are consecutive) and its
//! recorded time as nanoseconds since the previous record of the block (since the epoch for
//! the first): absolute timestamps differ in many digits from one event to the next, a delta
//! in a few. Small blocks
//! are what make reading one archived event cheap (one block is decompressed, not the
//! segment) and what make a trained dictionary pay: zstd learns little from the start of a
//! frame, and a 64 KiB frame is mostly start.

mod record;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ArchiveError;
use crate::data::event::{ExtValue, StoredEvent};
pub use record::{BlockEncoder, decode_block};

pub const MAGIC: &[u8; 8] = b"WEIRSEG2";
pub const END_MAGIC: &[u8; 8] = b"WEIRSEGE";
pub const TRAILER_LEN: usize = 8 + 4 + 4 + 8;
/// Raw bytes of events per block. ~64 KiB: big enough for zstd to find the repetition
/// between events, small enough that one read decompresses little.
pub const BLOCK_TARGET_BYTES: usize = 64 * 1024;
/// Upper bound on one decompressed block: a block holds at least one event, and an event's
/// payload is capped at 64 MiB by the store, so anything claiming more is corrupt.
pub const MAX_BLOCK_BYTES: usize = 80 * 1024 * 1024;
/// Size of a trained dictionary. zstd's guidance is ~100 KiB. 128 KiB is deliberate: zstd
/// sizes a prepared dictionary's match tables from the dictionary's size, and from 128 KiB
/// on they reach back over all of it from anywhere in a 64 KiB block; a 96 KiB dictionary
/// gets the smaller tables and loses its oldest part. On the shop corpus: 8.0× with 64 or
/// 96 KiB, 8.5× with 128 KiB (`weir bench archive`).
pub const DICTIONARY_BYTES: usize = 128 * 1024;

/// One block of a segment, as listed in the index.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    /// Byte offset of the block's zstd frame within the segment.
    pub offset: u64,
    /// Compressed length.
    pub len: u32,
    /// Decompressed length.
    pub raw_len: u32,
    pub first_position: i64,
    pub count: u32,
    /// CRC-32 of the compressed bytes, so a damaged block is named before zstd sees it.
    pub crc32: u32,
}

impl BlockEntry {
    /// Saturating: an index read back from a damaged segment may hold any numbers, and
    /// checking it must not overflow.
    pub fn last_position(&self) -> i64 {
        self.first_position
            .saturating_add(i64::from(self.count))
            .saturating_sub(1)
    }

    /// The block's frame within `body`, or `None` when the entry points past its end
    /// (a damaged index: its numbers are not to be trusted with plain arithmetic).
    pub fn frame<'b>(&self, body: &'b [u8]) -> Option<&'b [u8]> {
        let start = usize::try_from(self.offset).ok()?;
        body.get(start..start.checked_add(self.len as usize)?)
    }
    pub fn holds(&self, position: i64) -> bool {
        position >= self.first_position && position <= self.last_position()
    }
}

/// A segment ready to be stored.
#[derive(Debug)]
pub struct BuiltSegment {
    pub body: Vec<u8>,
    pub index: Vec<BlockEntry>,
    pub first_position: i64,
    pub last_position: i64,
    pub first_recorded: DateTime<Utc>,
    pub last_recorded: DateTime<Utc>,
    pub event_count: i64,
    /// The events' size as CloudEvents JSON (structured mode): the "raw JSON" compression
    /// ratios are measured against. The records themselves are smaller (`BlockEntry::raw_len`).
    pub raw_bytes: u64,
    pub checksum: u32,
    /// (subject, block) and (correlation id, block) pairs, deduplicated.
    pub subjects: Vec<(String, i32)>,
    pub correlations: Vec<(String, i32)>,
}

/// Packs `events` (consecutive positions, at least one) into a segment.
pub fn build_segment(
    events: &[StoredEvent],
    level: i32,
    dictionary: Option<&[u8]>,
) -> Result<BuiltSegment, ArchiveError> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Err(ArchiveError::Encode(
            "a segment needs at least one event".into(),
        ));
    };
    // Digested once: a raw dictionary would be loaded again for every block, which halves
    // the compression rate.
    let prepared = dictionary.map(|d| zstd::dict::EncoderDictionary::copy(d, level));
    let mut compressor = match &prepared {
        Some(d) => zstd::bulk::Compressor::with_prepared_dictionary(d),
        None => zstd::bulk::Compressor::new(level),
    }
    .map_err(|e| ArchiveError::Encode(format!("zstd: {e}")))?;
    compressor
        .include_checksum(true)
        .map_err(|e| ArchiveError::Encode(format!("zstd: {e}")))?;
    if prepared.is_some() {
        // zstd copies a prepared dictionary's match tables into the context for every
        // frame over 32 KiB; with 128 KiB of dictionary that copy costs a fifth of the
        // rate. Attached, the tables are searched where they are (same output size).
        compressor
            .set_parameter(zstd::stream::raw::CParameter::ForceAttachDict(
                zstd::zstd_safe::DictAttachPref::ForceAttach,
            ))
            .map_err(|e| ArchiveError::Encode(format!("zstd: {e}")))?;
    }

    let mut body = Vec::with_capacity(1 << 20);
    body.extend_from_slice(MAGIC);
    let mut index = Vec::new();
    let mut raw = Vec::with_capacity(BLOCK_TARGET_BYTES * 2);
    let mut raw_bytes = 0u64;
    // Sorted and deduplicated at the end (cheaper than a set per event).
    let mut subjects = Vec::with_capacity(events.len());
    let mut correlations = Vec::new();
    let mut encoder = BlockEncoder::default();
    let mut block_first = first.position;
    let mut count = 0u32;
    for (i, ev) in events.iter().enumerate() {
        if Some(ev.position) != first.position.checked_add(i as i64) {
            return Err(ArchiveError::Encode(format!(
                "positions are not consecutive: {} follows {}",
                ev.position,
                // i > 0: the first event always matches.
                events[i - 1].position
            )));
        }
        let block = index.len() as i32;
        if let Some(s) = &ev.event.subject {
            subjects.push((s.as_str(), block));
        }
        match ev
            .event
            .extensions
            .get(crate::data::event::EXT_CORRELATION_ID)
        {
            Some(ExtValue::String(c)) => {
                correlations.push((std::borrow::Cow::Borrowed(c.as_str()), block));
            }
            Some(other) => {
                correlations.push((std::borrow::Cow::Owned(other.as_string()), block));
            }
            None => {}
        }
        encoder.encode(ev, &mut raw)?;
        raw_bytes += crate::data::event::structured_json_len(&ev.event) as u64;
        count += 1;
        if raw.len() >= BLOCK_TARGET_BYTES || i + 1 == events.len() {
            let frame = compressor
                .compress(&raw)
                .map_err(|e| ArchiveError::Encode(format!("zstd: {e}")))?;
            index.push(BlockEntry {
                offset: body.len() as u64,
                len: u32::try_from(frame.len())
                    .map_err(|_| ArchiveError::Encode("block over 4 GiB".into()))?,
                raw_len: u32::try_from(raw.len())
                    .map_err(|_| ArchiveError::Encode("block over 4 GiB".into()))?,
                first_position: block_first,
                count,
                crc32: crc32fast::hash(&frame),
            });
            body.extend_from_slice(&frame);
            raw.clear();
            encoder = BlockEncoder::default();
            // Saturating: after the last position there is no next block to number.
            block_first = ev.position.saturating_add(1);
            count = 0;
        }
    }
    subjects.sort_unstable();
    subjects.dedup();
    correlations.sort_unstable();
    correlations.dedup();
    let index_offset = body.len() as u64;
    serde_json::to_writer(&mut body, &index).map_err(|e| ArchiveError::Encode(e.to_string()))?;
    let index_len = (body.len() as u64 - index_offset) as u32;
    body.extend_from_slice(&index_offset.to_le_bytes());
    body.extend_from_slice(&index_len.to_le_bytes());
    let checksum = crc32fast::hash(&body);
    body.extend_from_slice(&checksum.to_le_bytes());
    body.extend_from_slice(END_MAGIC);
    let segment = BuiltSegment {
        body,
        index,
        first_position: first.position,
        last_position: last.position,
        first_recorded: first.recorded_time,
        last_recorded: last.recorded_time,
        event_count: events.len() as i64,
        raw_bytes,
        checksum,
        subjects: subjects
            .into_iter()
            .map(|(s, b)| (s.to_string(), b))
            .collect(),
        correlations: correlations
            .into_iter()
            .map(|(c, b)| (c.into_owned(), b))
            .collect(),
    };
    Ok(segment)
}

/// What a whole segment body says about itself: its index, after checking both magics and
/// the body checksum. Errors name the byte offset where the damage was found.
pub fn parse_body(body: &[u8]) -> Result<(Vec<BlockEntry>, u32), (u64, String)> {
    if body.len() < MAGIC.len() + TRAILER_LEN || &body[..8] != MAGIC {
        return Err((0, "not a segment (bad magic)".into()));
    }
    let t = body.len() - TRAILER_LEN;
    if &body[t + 16..] != END_MAGIC {
        return Err((t as u64 + 16, "truncated segment (bad end magic)".into()));
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let u32_at = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&body[i..i + 4]);
        u32::from_le_bytes(b)
    };
    let index_offset = u64_at(t);
    let index_len = u64::from(u32_at(t + 8));
    let checksum = u32_at(t + 12);
    let actual = crc32fast::hash(&body[..t + 12]);
    if actual != checksum {
        // Find the first damaged block to name a useful offset.
        return Err((
            first_bad_block(body, index_offset, index_len).unwrap_or(0),
            format!("checksum mismatch (recorded {checksum:08x}, computed {actual:08x})"),
        ));
    }
    let index_end = index_offset.saturating_add(index_len);
    if index_end as usize != t {
        return Err((index_offset, "index does not end at the trailer".into()));
    }
    let index: Vec<BlockEntry> = serde_json::from_slice(&body[index_offset as usize..t])
        .map_err(|e| (index_offset, format!("index: {e}")))?;
    Ok((index, checksum))
}

/// The offset of the first block whose CRC does not match, when the index can still be read.
fn first_bad_block(body: &[u8], index_offset: u64, index_len: u64) -> Option<u64> {
    let end = usize::try_from(index_offset.checked_add(index_len)?).ok()?;
    let index: Vec<BlockEntry> =
        serde_json::from_slice(body.get(usize::try_from(index_offset).ok()?..end)?).ok()?;
    index.iter().find_map(|b| {
        let frame = b.frame(body)?;
        (crc32fast::hash(frame) != b.crc32).then_some(b.offset)
    })
}

/// A prepared decompression dictionary (parsed once, shared by every block decoded with it).
pub type Dictionary = zstd::dict::DecoderDictionary<'static>;

/// Checks and decompresses one block's frame.
pub fn decompress_block(
    frame: &[u8],
    entry: &BlockEntry,
    dictionary: Option<&Dictionary>,
) -> Result<Vec<StoredEvent>, String> {
    if crc32fast::hash(frame) != entry.crc32 {
        return Err("block checksum mismatch".into());
    }
    if entry.raw_len as usize > MAX_BLOCK_BYTES {
        return Err(format!("block claims {} bytes", entry.raw_len));
    }
    let mut d = match dictionary {
        Some(dict) => zstd::bulk::Decompressor::with_prepared_dictionary(dict),
        None => zstd::bulk::Decompressor::new(),
    }
    .map_err(|e| format!("zstd: {e}"))?;
    let raw = d
        .decompress(frame, entry.raw_len as usize)
        .map_err(|e| format!("zstd: {e}"))?;
    if raw.len() != entry.raw_len as usize {
        return Err(format!(
            "block decompressed to {} bytes, index says {}",
            raw.len(),
            entry.raw_len
        ));
    }
    let events = decode_block(&raw, entry.first_position)?;
    if events.len() != entry.count as usize
        || events.first().map(|e| e.position) != Some(entry.first_position)
        || events
            .iter()
            .enumerate()
            .any(|(i, e)| Some(e.position) != entry.first_position.checked_add(i as i64))
    {
        return Err(format!(
            "block holds {} events not numbered {}..={}",
            events.len(),
            entry.first_position,
            entry.last_position()
        ));
    }
    Ok(events)
}

/// Trains a dictionary on the records of `events` (at most `max_sample_bytes` of them,
/// evenly spread). `None` when there is too little to learn from.
pub fn train_dictionary(events: &[StoredEvent], max_sample_bytes: usize) -> Option<Vec<u8>> {
    let mut records = Vec::new();
    let mut sizes = Vec::new();
    let mut total = 0usize;
    for ev in events {
        total += ev.event.data.as_ref().map_or(0, |d| d.bytes().len()) + 200;
    }
    let step = (total / max_sample_bytes.max(1)).max(1);
    for ev in events.iter().step_by(step) {
        let start = records.len();
        // Samples stand alone, as the first record of a block does.
        if BlockEncoder::default().encode(ev, &mut records).is_err() {
            continue;
        }
        sizes.push(records.len() - start);
        if records.len() >= max_sample_bytes {
            break;
        }
    }
    // zstd needs a few samples per dictionary kilobyte to find anything worth keeping.
    if sizes.len() < 64 || records.len() < 4 * DICTIONARY_BYTES {
        return None;
    }
    zstd::dict::from_continuous(&records, &sizes, DICTIONARY_BYTES).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::*;
    use crate::data::event::{CloudEvent, Data};

    fn event(position: i64, data: Option<Data>) -> StoredEvent {
        let mut extensions = BTreeMap::new();
        extensions.insert("correlationid".into(), ExtValue::String("c-1".into()));
        extensions.insert("n".into(), ExtValue::Integer(position));
        extensions.insert("neg".into(), ExtValue::Integer(-position));
        extensions.insert("odd".into(), ExtValue::Bool(position % 2 == 1));
        StoredEvent {
            position,
            version: Some(position),
            recorded_time: DateTime::from_timestamp(1_700_000_000 + position, 123_456_789).unwrap(),
            event: CloudEvent {
                id: format!("id-{position}"),
                source: "/orders".into(),
                ty: "order.created".into(),
                datacontenttype: Some("application/json".into()),
                dataschema: None,
                subject: Some(format!("order-{}", position % 7)),
                time: Some("2024-05-01T00:00:00Z".into()),
                extensions,
                data,
            },
        }
    }

    #[test]
    fn every_kind_of_data_comes_back_byte_for_byte() {
        let events = vec![
            event(1, None),
            event(
                2,
                Some(Data::Json(Bytes::from_static(br#"{"a": [1, 2.50]}"#))),
            ),
            event(3, Some(Data::Json(Bytes::from_static(b" {\"a\":1}\n")))),
            event(4, Some(Data::Text(Bytes::from_static(b"plain\ntext")))),
            event(
                5,
                Some(Data::Binary(Bytes::from_static(&[0, 159, 146, 150]))),
            ),
        ];
        let seg = build_segment(&events, 6, None).unwrap();
        let (index, checksum) = parse_body(&seg.body).unwrap();
        assert_eq!((index.clone(), checksum), (seg.index.clone(), seg.checksum));
        let b = &index[0];
        let frame = &seg.body[b.offset as usize..b.offset as usize + b.len as usize];
        assert_eq!(decompress_block(frame, b, None).unwrap(), events);
        assert!(seg.correlations.contains(&("c-1".into(), 0)));
        assert_eq!(seg.subjects.len(), 5);
    }

    #[test]
    fn blocks_split_near_64k_and_a_dictionary_pays() {
        let events: Vec<_> = (1..=5000)
            .map(|p| {
                let data = format!(
                    r#"{{"orderId":"ord-{p:06}","customer":"cust-{}","total":{}.{:02},"currency":"EUR","items":[{{"sku":"sku-{}","qty":{}}}]}}"#,
                    p % 311,
                    p % 997,
                    p % 100,
                    p % 53,
                    p % 5 + 1
                );
                event(p, Some(Data::Json(Bytes::from(data))))
            })
            .collect();
        let plain = build_segment(&events, 6, None).unwrap();
        assert!(plain.index.len() > 10, "{} blocks", plain.index.len());
        for b in &plain.index {
            assert!(b.raw_len as usize <= BLOCK_TARGET_BYTES + 1024);
        }
        let dict = train_dictionary(&events, 4 << 20).expect("enough samples");
        let with = build_segment(&events, 6, Some(&dict)).unwrap();
        assert!(
            with.body.len() < plain.body.len(),
            "dictionary {} vs plain {}",
            with.body.len(),
            plain.body.len()
        );
        let prepared = Dictionary::copy(&dict);
        let b = &with.index[3];
        let frame = &with.body[b.offset as usize..b.offset as usize + b.len as usize];
        let got = decompress_block(frame, b, Some(&prepared)).unwrap();
        assert_eq!(got[0], events[(b.first_position - 1) as usize]);
        // Without the dictionary the block does not decode.
        assert!(decompress_block(frame, b, None).is_err());
    }

    #[test]
    fn damage_is_found_with_its_offset() {
        let events: Vec<_> = (1..=3000)
            .map(|p| event(p, Some(Data::Text(Bytes::from(format!("payload {p}"))))))
            .collect();
        let mut seg = build_segment(&events, 3, None).unwrap();
        let victim = seg.index[2].clone();
        seg.body[victim.offset as usize + 5] ^= 0xff;
        let (offset, msg) = parse_body(&seg.body).unwrap_err();
        assert_eq!(offset, victim.offset, "{msg}");
        let frame = &seg.body[victim.offset as usize..victim.offset as usize + victim.len as usize];
        assert!(decompress_block(frame, &victim, None).is_err());
        // Other blocks still decode.
        let b = &seg.index[1];
        let frame = &seg.body[b.offset as usize..b.offset as usize + b.len as usize];
        assert!(decompress_block(frame, b, None).is_ok());
        let (offset, _) = parse_body(&seg.body[..seg.body.len() - 3]).unwrap_err();
        assert!(offset > 0);
    }
}
