//! The cryptography of personal-data fields: AES-256-GCM (ring) with random 96-bit nonces.
//!
//! A field value is replaced by the string
//!
//! ```text
//! weir:pii:v1:<dek id>:<nonce, base64url>:<ciphertext and tag, base64url>
//! ```
//!
//! (base64url without padding). The plaintext is the value's JSON text, so any JSON value
//! (string, number, object, …) comes back as the same value. The additional authenticated
//! data binds the ciphertext to the stream, the subject, the field's JSON pointer and the
//! data key: a value copied into another field, event subject or stream fails to decrypt.
//!
//! A subject's data key (DEK, 32 random bytes) is stored wrapped: `nonce || ciphertext+tag`
//! under the stream's key-encryption key, with the stream, subject, key id and DEK id as
//! additional data, so a wrapped key moved to another subject or relabelled with another
//! key id does not unwrap.

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::PiiError;
use crate::topology::pii::KEY_LEN;

/// The prefix of every envelope (the version is part of it).
pub const PREFIX: &str = "weir:pii:v1:";
/// What a field of a forgotten subject reads as.
pub const FORGOTTEN: &str = "weir:pii:forgotten";
/// Random bytes of a DEK id (12 characters of base64url).
const DEK_ID_BYTES: usize = 9;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// One subject's data key, unwrapped.
pub struct Dek {
    /// Random id stored with the key and in every envelope it made: an envelope whose DEK id
    /// is not the subject's current one was made by a key that has been deleted.
    pub id: String,
    key: LessSafeKey,
}

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dek").field("id", &self.id).finish()
    }
}

/// Where a ciphertext belongs: binds it to one stream and subject.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    /// `namespace/name` of the stream.
    pub stream: &'a str,
    pub subject: &'a str,
}

/// Length-prefixed concatenation, so that no two different part lists give the same bytes.
fn aad(label: &str, parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for p in std::iter::once(&label).chain(parts) {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p.as_bytes());
    }
    out
}

fn key(bytes: &[u8; KEY_LEN]) -> Result<LessSafeKey, PiiError> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| PiiError::Crypto("AES-256 key"))
}

fn random<const N: usize>(rng: &SystemRandom) -> Result<[u8; N], PiiError> {
    let mut b = [0u8; N];
    rng.fill(&mut b)
        .map_err(|_| PiiError::Crypto("the system random generator failed"))?;
    Ok(b)
}

fn seal(
    key: &LessSafeKey,
    aad: &[u8],
    plain: &[u8],
    rng: &SystemRandom,
) -> Result<(Vec<u8>, [u8; NONCE_LEN]), PiiError> {
    let nonce = random::<NONCE_LEN>(rng)?;
    let mut buf = plain.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .map_err(|_| PiiError::Crypto("encryption failed"))?;
    Ok((buf, nonce))
}

impl Dek {
    /// A new random data key.
    pub fn generate(rng: &SystemRandom) -> Result<(Dek, [u8; KEY_LEN]), PiiError> {
        let bytes = random::<KEY_LEN>(rng)?;
        let id = B64.encode(random::<DEK_ID_BYTES>(rng)?);
        Ok((Dek::new(id, &bytes)?, bytes))
    }

    pub fn new(id: String, bytes: &[u8; KEY_LEN]) -> Result<Dek, PiiError> {
        Ok(Dek {
            id,
            key: key(bytes)?,
        })
    }

    /// The envelope of `value` at `pointer`.
    pub fn seal_value(
        &self,
        scope: Scope<'_>,
        pointer: &str,
        value: &serde_json::Value,
        rng: &SystemRandom,
    ) -> Result<String, PiiError> {
        let plain = serde_json::to_vec(value).map_err(|_| PiiError::Crypto("serialising"))?;
        let aad = aad("field", &[scope.stream, scope.subject, pointer, &self.id]);
        let (ct, nonce) = seal(&self.key, &aad, &plain, rng)?;
        Ok(format!(
            "{PREFIX}{}:{}:{}",
            self.id,
            B64.encode(nonce),
            B64.encode(ct)
        ))
    }

    /// The value an envelope made by this key holds. Fails if it was altered or belongs to
    /// another stream, subject or field.
    pub fn open_value(
        &self,
        scope: Scope<'_>,
        pointer: &str,
        env: &Envelope<'_>,
    ) -> Result<serde_json::Value, PiiError> {
        let tampered = || PiiError::Tampered {
            pointer: pointer.to_string(),
        };
        let nonce: [u8; NONCE_LEN] = B64
            .decode(env.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(tampered)?;
        let mut buf = B64.decode(env.ciphertext).map_err(|_| tampered())?;
        let aad = aad("field", &[scope.stream, scope.subject, pointer, &self.id]);
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut buf,
            )
            .map_err(|_| tampered())?;
        serde_json::from_slice(plain).map_err(|_| tampered())
    }
}

/// The parts of an envelope string.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub dek_id: &'a str,
    nonce: &'a str,
    ciphertext: &'a str,
}

impl<'a> Envelope<'a> {
    /// `None` if `s` is not an envelope (a value stored before the field was encrypted, or
    /// the redaction marker).
    pub fn parse(s: &'a str) -> Option<Envelope<'a>> {
        let rest = s.strip_prefix(PREFIX)?;
        let mut parts = rest.split(':');
        let (dek_id, nonce, ciphertext) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || dek_id.is_empty() {
            return None;
        }
        Some(Envelope {
            dek_id,
            nonce,
            ciphertext,
        })
    }
}

/// `dek` wrapped under the key-encryption key `kek` (id `kek_id`): `nonce || ct+tag`.
pub fn wrap(
    kek: &[u8; KEY_LEN],
    kek_id: &str,
    scope: Scope<'_>,
    dek_id: &str,
    dek: &[u8; KEY_LEN],
    rng: &SystemRandom,
) -> Result<Vec<u8>, PiiError> {
    let aad = aad("dek", &[scope.stream, scope.subject, kek_id, dek_id]);
    let (ct, nonce) = seal(&key(kek)?, &aad, dek, rng)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    Ok(out)
}

/// The data key `wrapped` holds, if `kek` made it for this scope, key id and DEK id.
pub fn unwrap(
    kek: &[u8; KEY_LEN],
    kek_id: &str,
    scope: Scope<'_>,
    dek_id: &str,
    wrapped: &[u8],
) -> Result<[u8; KEY_LEN], PiiError> {
    let bad = || PiiError::BadWrappedKey {
        subject: scope.subject.to_string(),
        kek_id: kek_id.to_string(),
    };
    if wrapped.len() != NONCE_LEN + KEY_LEN + AES_256_GCM.tag_len() {
        return Err(bad());
    }
    let (nonce, ct) = wrapped.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| bad())?;
    let mut buf = ct.to_vec();
    let aad = aad("dek", &[scope.stream, scope.subject, kek_id, dek_id]);
    let plain = key(kek)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut buf,
        )
        .map_err(|_| bad())?;
    <[u8; KEY_LEN]>::try_from(&*plain).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const S: Scope<'static> = Scope {
        stream: "shop/orders",
        subject: "customer-1",
    };

    #[test]
    fn every_json_value_round_trips() {
        let rng = SystemRandom::new();
        let (dek, _) = Dek::generate(&rng).unwrap();
        for v in [
            json!("a@b.example"),
            json!(42),
            json!(-1.5),
            json!(null),
            json!(true),
            json!({"street": "Main St", "no": [1, 2]}),
            json!(["x", {"y": null}]),
        ] {
            let env = dek.seal_value(S, "/customer/email", &v, &rng).unwrap();
            assert!(env.starts_with(PREFIX), "{env}");
            assert!(!env.contains("a@b.example"));
            let parsed = Envelope::parse(&env).unwrap();
            assert_eq!(parsed.dek_id, dek.id);
            assert_eq!(dek.open_value(S, "/customer/email", &parsed).unwrap(), v);
        }
    }

    #[test]
    fn nonces_differ_between_two_seals_of_one_value() {
        let rng = SystemRandom::new();
        let (dek, _) = Dek::generate(&rng).unwrap();
        let a = dek.seal_value(S, "/e", &json!("x"), &rng).unwrap();
        let b = dek.seal_value(S, "/e", &json!("x"), &rng).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn tampering_or_moving_a_value_is_detected() {
        let rng = SystemRandom::new();
        let (dek, _) = Dek::generate(&rng).unwrap();
        let env = dek.seal_value(S, "/email", &json!("a@b"), &rng).unwrap();
        let e = Envelope::parse(&env).unwrap();
        // Another field, subject or stream.
        assert!(matches!(
            dek.open_value(S, "/phone", &e),
            Err(PiiError::Tampered { .. })
        ));
        let other = Scope {
            subject: "customer-2",
            ..S
        };
        assert!(dek.open_value(other, "/email", &e).is_err());
        let other = Scope {
            stream: "shop/other",
            ..S
        };
        assert!(dek.open_value(other, "/email", &e).is_err());
        // A flipped ciphertext character.
        let mut bytes = env.clone().into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(bytes).unwrap();
        let e = Envelope::parse(&flipped).unwrap();
        assert!(dek.open_value(S, "/email", &e).is_err());
        // Another key.
        let (other_dek, _) = Dek::generate(&rng).unwrap();
        let e = Envelope::parse(&env).unwrap();
        let moved = Dek::new(dek.id.clone(), &[3; 32]).unwrap();
        assert!(moved.open_value(S, "/email", &e).is_err());
        assert!(other_dek.open_value(S, "/email", &e).is_err());
    }

    #[test]
    fn what_is_not_an_envelope_is_left_alone() {
        for s in [
            "plain@example.com",
            FORGOTTEN,
            "weir:pii:v1:",
            "weir:pii:v1:id:n",
            "weir:pii:v1:id:n:c:extra",
            "weir:pii:v2:id:n:c",
        ] {
            assert_eq!(Envelope::parse(s), None, "{s}");
        }
    }

    #[test]
    fn a_wrapped_key_unwraps_only_in_its_own_scope() {
        let rng = SystemRandom::new();
        let kek = [5u8; 32];
        let (dek, bytes) = Dek::generate(&rng).unwrap();
        let w = wrap(&kek, "k1", S, &dek.id, &bytes, &rng).unwrap();
        assert!(!w.windows(32).any(|x| x == bytes));
        assert_eq!(unwrap(&kek, "k1", S, &dek.id, &w).unwrap(), bytes);
        assert!(unwrap(&kek, "k2", S, &dek.id, &w).is_err());
        assert!(unwrap(&[6; 32], "k1", S, &dek.id, &w).is_err());
        assert!(unwrap(&kek, "k1", S, "other", &w).is_err());
        let other = Scope {
            subject: "customer-2",
            ..S
        };
        assert!(unwrap(&kek, "k1", other, &dek.id, &w).is_err());
        assert!(unwrap(&kek, "k1", S, &dek.id, &w[1..]).is_err());
    }
}
