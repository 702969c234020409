//! The plan of a stream's personal-data encryption (`spec.pii`): which fields, and the key
//! ring read from `spec.pii.keySecretRef`.
//!
//! The Secret value holds one key per line, `<keyId>:<base64 of 32 bytes>`; the last line is
//! the newest key (it wraps new subject keys). Blank lines and lines starting with `#` are
//! skipped. Key bytes never appear in a plan's `Debug` output or in an error message: errors
//! name the line number only.

use std::fmt;

/// Length of a key-encryption key (AES-256).
pub const KEY_LEN: usize = 32;
/// Longest key id (it is stored with every wrapped subject key).
pub const MAX_KEY_ID: usize = 64;

/// What `spec.pii` asks for, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PiiPlan {
    /// JSON pointers into `data` whose values are encrypted.
    pub fields: Vec<String>,
    /// The stream's keys, oldest first.
    pub keys: KeyRing,
}

/// The key-encryption keys of a stream, in Secret order (the last is the newest). Never
/// empty once parsed.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRing {
    keys: Vec<(String, [u8; KEY_LEN])>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ids only: the key bytes must never reach a log or a plan dump.
        f.debug_struct("KeyRing")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a key line was refused. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyLineError {
    #[error("holds no key (expected lines of <keyId>:<base64 of 32 bytes>)")]
    Empty,
    #[error("line {line}: expected <keyId>:<base64 of 32 bytes>")]
    NoSeparator { line: usize },
    #[error("line {line}: key id must be 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadId { line: usize },
    #[error("line {line}: key id {id:?} appears twice")]
    DuplicateId { line: usize, id: String },
    #[error("line {line}: the key is not valid base64")]
    BadBase64 { line: usize },
    #[error("line {line}: the key is {len} bytes long, expected 32")]
    BadLength { line: usize, len: usize },
}

/// Whether `id` is a valid key id: `[A-Za-z0-9._-]{1,64}`.
pub fn valid_key_id(id: &str) -> bool {
    (1..=MAX_KEY_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl KeyRing {
    /// Parses the Secret value. Line numbers in errors start at 1.
    pub fn parse(text: &str) -> Result<KeyRing, KeyLineError> {
        use base64::Engine as _;
        let mut keys: Vec<(String, [u8; KEY_LEN])> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let (id, b64) = l
                .split_once(':')
                .ok_or(KeyLineError::NoSeparator { line })?;
            let id = id.trim();
            if !valid_key_id(id) {
                return Err(KeyLineError::BadId { line });
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(KeyLineError::DuplicateId {
                    line,
                    id: id.to_string(),
                });
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(b64.trim()))
                .map_err(|_| KeyLineError::BadBase64 { line })?;
            let key: [u8; KEY_LEN] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| KeyLineError::BadLength {
                        line,
                        len: bytes.len(),
                    })?;
            keys.push((id.to_string(), key));
        }
        if keys.is_empty() {
            return Err(KeyLineError::Empty);
        }
        Ok(KeyRing { keys })
    }

    /// The newest key: the one new subject keys are wrapped with.
    pub fn newest(&self) -> (&str, &[u8; KEY_LEN]) {
        // `parse` refuses an empty ring; the fallback only keeps this total.
        match self.keys.last() {
            Some((id, k)) => (id.as_str(), k),
            None => ("", &[0; KEY_LEN]),
        }
    }

    /// The key with this id, if the ring holds it.
    pub fn get(&self, id: &str) -> Option<&[u8; KEY_LEN]> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, v)| v)
    }

    /// Key ids, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn the_last_line_is_the_newest_key() {
        let text = format!("# keys\nk1:{}\n\n k2 : {} \n", b64(&[1; 32]), b64(&[2; 32]));
        let ring = KeyRing::parse(&text).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), ["k1", "k2"]);
        assert_eq!(ring.newest(), ("k2", &[2; 32]));
        assert_eq!(ring.get("k1"), Some(&[1; 32]));
        assert_eq!(ring.get("k3"), None);
    }

    #[test]
    fn bad_lines_are_named_by_number_without_key_bytes() {
        let good = format!("k1:{}", b64(&[7; 32]));
        let cases = [
            (String::new(), KeyLineError::Empty),
            ("# only a comment".to_string(), KeyLineError::Empty),
            (
                format!("{good}\nnoseparator"),
                KeyLineError::NoSeparator { line: 2 },
            ),
            (
                format!("bad id:{}", b64(&[1; 32])),
                KeyLineError::BadId { line: 1 },
            ),
            (
                format!("{}:{}", "x".repeat(65), b64(&[1; 32])),
                KeyLineError::BadId { line: 1 },
            ),
            (
                format!("{good}\n{good}"),
                KeyLineError::DuplicateId {
                    line: 2,
                    id: "k1".into(),
                },
            ),
            (
                "k1:not*base64".to_string(),
                KeyLineError::BadBase64 { line: 1 },
            ),
            (
                format!("k1:{}", b64(&[1; 16])),
                KeyLineError::BadLength { line: 1, len: 16 },
            ),
        ];
        for (text, want) in cases {
            let err = KeyRing::parse(&text).unwrap_err();
            assert_eq!(err, want, "{text:?}");
            let msg = err.to_string();
            assert!(!msg.contains(&b64(&[1; 32])) && !msg.contains(&b64(&[7; 32])));
        }
    }

    #[test]
    fn debug_shows_ids_only() {
        let ring = KeyRing::parse(&format!("k1:{}", b64(&[9; 32]))).unwrap();
        let dbg = format!("{ring:?}");
        assert!(dbg.contains("k1") && !dbg.contains("9, 9"), "{dbg}");
    }
}
