//! Personal-data fields (`spec.pii`): encrypted per subject at ingest, decrypted for readers
//! and sinks, forgotten by deleting the subject's key. Format and guarantees:
//! `docs/security-encryption.md`; the cryptography: [`envelope`].
//!
//! - **Ingest** ([`Pii::seal`]): after validation (schemas see the plaintext), each listed
//!   field present in an event's JSON `data` is replaced by its envelope under the subject's
//!   data key (created on first use, stored wrapped in `weir_subject_keys`). Everything
//!   downstream (the store, RabbitMQ, archive segments) holds only the envelope.
//! - **Reads and deliveries** ([`Pii::reveal`]): envelopes are opened again; one whose key is
//!   gone (the subject was forgotten) reads as [`FORGOTTEN`].
//! - **Cache**: unwrapped data keys are kept per worker in one bounded cache
//!   ([`DekCache`]) for [`DEK_TTL`], which is also the longest a forget takes to reach every
//!   other worker.

pub mod envelope;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SystemRandom;
use serde_json::Value;

pub use envelope::{Dek, Envelope, FORGOTTEN, Scope};

use crate::data::event::{CloudEvent, Data};
use crate::data::problem::{FieldError, HttpProblem, ProblemKind};
use crate::data::store::{Store, StoreError, SubjectKey};
use crate::topology::{Key, PiiPlan};

/// Unwrapped data keys kept per worker, all streams together. An entry is ~200 bytes (the
/// AES key schedule, ids, the subject), so 100 000 of them bound the cache near 20 MiB while
/// covering the subjects a busy worker writes and reads within [`DEK_TTL`].
pub const DEK_CACHE_ENTRIES: u64 = 100_000;
/// How long an unwrapped key is trusted without asking the store. Forgetting a subject
/// deletes its key in the store and drops it from this worker's cache at once; every other
/// worker stops using it within this time. Short enough for an erasure request, long enough
/// that a busy subject costs one key read per 10 s per worker.
pub const DEK_TTL: Duration = Duration::from_secs(10);

/// `(stream runtime, subject)` → its data key. The runtime is a random number drawn when a
/// stream (re)starts, so a stream restarted with another key ring (a key removed from the
/// Secret) never uses keys its predecessor unwrapped.
pub type DekCache = moka::sync::Cache<(u64, String), Arc<Dek>>;

/// The worker's key cache (see [`DEK_CACHE_ENTRIES`], [`DEK_TTL`]).
pub fn dek_cache() -> DekCache {
    moka::sync::Cache::builder()
        .max_capacity(DEK_CACHE_ENTRIES)
        .time_to_live(DEK_TTL)
        .build()
}

/// Errors of personal-data encryption.
#[derive(Debug, thiserror::Error)]
pub enum PiiError {
    /// An event of the request cannot be encrypted as configured (422).
    #[error("{0}")]
    Refused(String, Vec<FieldError>),
    /// A subject's key is wrapped by a key id the Secret no longer holds.
    #[error(
        "the data key of subject {subject:?} is wrapped by key id {kek_id:?}, which \
         spec.pii.keySecretRef no longer holds: put the key back (or run `weir keys rotate` \
         while it is there)"
    )]
    KeyMissing { subject: String, kek_id: String },
    /// A stored wrapped key does not unwrap under the key its id names.
    #[error(
        "the data key of subject {subject:?} does not unwrap with key id {kek_id:?}: the \
         Secret holds a different key under that id, or the stored key was altered"
    )]
    BadWrappedKey { subject: String, kek_id: String },
    /// An envelope was altered, or moved to another field, subject or stream.
    #[error("the encrypted value at {pointer} failed authentication (altered or moved)")]
    Tampered { pointer: String },
    #[error("cryptography: {0}")]
    Crypto(&'static str),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl PiiError {
    /// The HTTP answer to a read or publish that hit this error.
    pub fn problem(&self) -> HttpProblem {
        match self {
            PiiError::Refused(detail, errors) => {
                let mut p = HttpProblem::new(ProblemKind::PiiRefused, detail.clone());
                p.errors = errors.clone();
                p
            }
            PiiError::KeyMissing { .. } => {
                HttpProblem::new(ProblemKind::PiiKeyMissing, self.to_string())
            }
            PiiError::Store(e) if e.is_transient() => {
                HttpProblem::unavailable(self.to_string(), crate::data::http::RETRY_AFTER_SECS)
            }
            _ => HttpProblem::internal(self.to_string()),
        }
    }

    /// The code a failed delivery records (`weirerrorcode` of a dead letter).
    pub fn code(&self) -> &'static str {
        match self {
            PiiError::KeyMissing { .. } => "pii-key-missing",
            PiiError::Store(_) => "pii-store",
            _ => "pii-error",
        }
    }
}

/// The personal-data side of one running stream.
pub struct Pii {
    /// `namespace/name`: part of every ciphertext's additional data.
    stream: String,
    /// This runtime's part of [`DekCache`] keys.
    instance: u64,
    plan: PiiPlan,
    store: Store,
    deks: DekCache,
    rng: SystemRandom,
}

impl std::fmt::Debug for Pii {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pii")
            .field("stream", &self.stream)
            .field("plan", &self.plan)
            .finish()
    }
}

impl Pii {
    pub fn new(key: &Key, plan: PiiPlan, store: Store, deks: DekCache) -> Pii {
        Pii {
            stream: key.to_string(),
            instance: rand::random(),
            plan,
            store,
            deks,
            rng: SystemRandom::new(),
        }
    }

    /// The encryption of a stream starting with `plan`, if it lists fields. Validation
    /// refuses fields on a broker-only stream; should one get here, it is refused again
    /// rather than run in clear.
    pub fn for_stream(
        key: &Key,
        plan: Option<&PiiPlan>,
        store: Option<&Store>,
        deks: &DekCache,
    ) -> Result<Option<Arc<Pii>>, String> {
        match (plan, store) {
            (None, _) => Ok(None),
            (Some(p), Some(store)) => Ok(Some(Arc::new(Pii::new(
                key,
                p.clone(),
                store.clone(),
                deks.clone(),
            )))),
            (Some(_), None) => Err("spec.pii.fields needs spec.store".into()),
        }
    }

    pub fn plan(&self) -> &PiiPlan {
        &self.plan
    }

    fn scope<'a>(&'a self, subject: &'a str) -> Scope<'a> {
        Scope {
            stream: &self.stream,
            subject,
        }
    }

    fn cache_key(&self, subject: &str) -> (u64, String) {
        (self.instance, subject.to_string())
    }

    /// Encrypts the listed fields of `events` in place (publish path, after validation).
    /// Refuses, naming the event, a non-JSON payload and an event carrying a listed field
    /// without a subject (its data could never be forgotten).
    pub async fn seal(&self, stream_id: i64, events: &mut [CloudEvent]) -> Result<(), PiiError> {
        let mut errors = Vec::new();
        // Parsed payloads of the events that carry at least one listed field.
        let mut parsed: Vec<(usize, Value)> = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            let bytes = match &ev.data {
                None => continue,
                Some(Data::Json(b)) => b,
                Some(_) => {
                    errors.push(
                        FieldError::new(
                            "the stream encrypts spec.pii.fields inside JSON data, and this \
                             event's data is not JSON",
                        )
                        .at(i)
                        .pointer("/data")
                        .keyword("pii"),
                    );
                    continue;
                }
            };
            let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
                errors.push(
                    FieldError::new("data is not valid JSON")
                        .at(i)
                        .pointer("/data")
                        .keyword("pii"),
                );
                continue;
            };
            let present: Vec<&String> = self
                .plan
                .fields
                .iter()
                .filter(|p| v.pointer(p).is_some())
                .collect();
            if present.is_empty() {
                continue;
            }
            if ev.subject.as_deref().is_none_or(str::is_empty) {
                for p in present {
                    errors.push(
                        FieldError::new(
                            "a personal-data field needs the event's subject (its data key \
                             is the subject's; without one it could never be forgotten)",
                        )
                        .at(i)
                        .pointer(format!("/data{p}"))
                        .keyword("pii"),
                    );
                }
                continue;
            }
            parsed.push((i, v));
        }
        if !errors.is_empty() {
            let n = errors.len();
            return Err(PiiError::Refused(
                format!("{n} personal-data field(s) cannot be encrypted"),
                errors,
            ));
        }
        if parsed.is_empty() {
            return Ok(());
        }
        let subjects: BTreeSet<&str> = parsed
            .iter()
            .filter_map(|(i, _)| events[*i].subject.as_deref())
            .collect();
        let keys = self.keys_for_write(stream_id, &subjects).await?;
        for (i, mut v) in parsed {
            let ev = &mut events[i];
            let subject = ev.subject.as_deref().unwrap_or_default();
            let Some(dek) = keys.get(subject) else {
                return Err(PiiError::Crypto("a subject key was not created"));
            };
            for p in &self.plan.fields {
                if let Some(slot) = v.pointer_mut(p) {
                    let env = dek.seal_value(self.scope(subject), p, slot, &self.rng)?;
                    *slot = Value::String(env);
                }
            }
            let bytes = serde_json::to_vec(&v).map_err(|_| PiiError::Crypto("serialising"))?;
            ev.data = Some(Data::Json(bytes.into()));
        }
        Ok(())
    }

    /// Decrypts the listed fields of `events` in place (reads, deliveries, replays). A field
    /// whose subject key is gone reads as [`FORGOTTEN`]; a value that is not an envelope
    /// (stored before the field was listed) is left as it is.
    pub async fn reveal<'a>(
        &self,
        stream_id: i64,
        events: impl IntoIterator<Item = &'a mut CloudEvent>,
    ) -> Result<(), PiiError> {
        let mut parsed: Vec<(&'a mut CloudEvent, Value)> = Vec::new();
        for ev in events {
            let Some(Data::Json(b)) = &ev.data else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(b) else {
                continue;
            };
            let sealed = self.plan.fields.iter().any(|p| {
                v.pointer(p)
                    .and_then(Value::as_str)
                    .is_some_and(|s| Envelope::parse(s).is_some())
            });
            if sealed && ev.subject.is_some() {
                parsed.push((ev, v));
            }
        }
        if parsed.is_empty() {
            return Ok(());
        }
        let subjects: BTreeSet<&str> = parsed
            .iter()
            .filter_map(|(ev, _)| ev.subject.as_deref())
            .collect();
        let keys = self.keys_for_read(stream_id, &subjects).await?;
        for (ev, mut v) in parsed {
            let subject = ev.subject.clone().unwrap_or_default();
            let dek = keys.get(subject.as_str());
            for p in &self.plan.fields {
                let Some(slot) = v.pointer_mut(p) else {
                    continue;
                };
                let Some(env) = slot.as_str().and_then(Envelope::parse) else {
                    continue;
                };
                *slot = match dek {
                    Some(dek) if dek.id == env.dek_id => {
                        dek.open_value(self.scope(&subject), p, &env)?
                    }
                    // The key that made this envelope no longer exists: forgotten.
                    _ => Value::String(FORGOTTEN.to_string()),
                };
            }
            let bytes = serde_json::to_vec(&v).map_err(|_| PiiError::Crypto("serialising"))?;
            ev.data = Some(Data::Json(bytes.into()));
        }
        Ok(())
    }

    /// Unwraps a stored key; fails naming a key id the Secret no longer holds.
    fn unwrap_key(&self, k: &SubjectKey) -> Result<Arc<Dek>, PiiError> {
        let bytes = self.unwrap_bytes(k)?;
        Ok(Arc::new(Dek::new(k.dek_id.clone(), &bytes)?))
    }

    /// The raw bytes of a stored key, unwrapped with the key id it names.
    fn unwrap_bytes(
        &self,
        k: &SubjectKey,
    ) -> Result<[u8; crate::topology::pii::KEY_LEN], PiiError> {
        let kek = self
            .plan
            .keys
            .get(&k.kek_id)
            .ok_or_else(|| PiiError::KeyMissing {
                subject: k.subject.clone(),
                kek_id: k.kek_id.clone(),
            })?;
        envelope::unwrap(
            kek,
            &k.kek_id,
            self.scope(&k.subject),
            &k.dek_id,
            &k.wrapped,
        )
    }

    /// The keys of `subjects` that exist (a forgotten subject has none).
    async fn keys_for_read(
        &self,
        stream_id: i64,
        subjects: &BTreeSet<&str>,
    ) -> Result<HashMap<String, Arc<Dek>>, PiiError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        for s in subjects {
            match self.deks.get(&self.cache_key(s)) {
                Some(k) => {
                    out.insert(s.to_string(), k);
                }
                None => missing.push(s.to_string()),
            }
        }
        if !missing.is_empty() {
            for k in self.store.subject_keys(stream_id, &missing).await? {
                let dek = self.unwrap_key(&k)?;
                self.deks.insert(self.cache_key(&k.subject), dek.clone());
                out.insert(k.subject, dek);
            }
        }
        Ok(out)
    }

    /// The keys of `subjects`, creating those that do not exist yet. Two workers creating a
    /// subject's key at once both insert with `ON CONFLICT DO NOTHING` and read back the
    /// one that won, so a subject only ever has one key.
    async fn keys_for_write(
        &self,
        stream_id: i64,
        subjects: &BTreeSet<&str>,
    ) -> Result<HashMap<String, Arc<Dek>>, PiiError> {
        let mut out = self.keys_for_read(stream_id, subjects).await?;
        let new: Vec<&str> = subjects
            .iter()
            .copied()
            .filter(|s| !out.contains_key(*s))
            .collect();
        if new.is_empty() {
            return Ok(out);
        }
        let (kek_id, kek) = self.plan.keys.newest();
        let mut rows = Vec::with_capacity(new.len());
        for s in &new {
            let (dek, bytes) = Dek::generate(&self.rng)?;
            let wrapped = envelope::wrap(kek, kek_id, self.scope(s), &dek.id, &bytes, &self.rng)?;
            rows.push(SubjectKey {
                subject: s.to_string(),
                dek_id: dek.id,
                kek_id: kek_id.to_string(),
                wrapped,
            });
        }
        self.store.insert_subject_keys(stream_id, &rows).await?;
        let names: Vec<String> = new.iter().map(|s| s.to_string()).collect();
        for k in self.store.subject_keys(stream_id, &names).await? {
            let dek = self.unwrap_key(&k)?;
            self.deks.insert(self.cache_key(&k.subject), dek.clone());
            out.insert(k.subject, dek);
        }
        Ok(out)
    }

    /// Deletes the subject's data key: its fields read as [`FORGOTTEN`] from now on (on
    /// other workers within [`DEK_TTL`]). Whether a key existed.
    pub async fn forget(&self, stream_id: i64, subject: &str) -> Result<bool, PiiError> {
        let deleted = self.store.delete_subject_key(stream_id, subject).await?;
        self.deks.invalidate(&self.cache_key(subject));
        Ok(deleted)
    }

    /// Re-wraps up to `limit` subject keys not wrapped by the newest key id with it. Returns
    /// how many were re-wrapped and how many remain. A key wrapped by an id the Secret no
    /// longer holds fails the rotation, naming it.
    pub async fn rotate_chunk(&self, stream_id: i64, limit: i64) -> Result<Rotated, PiiError> {
        let (new_id, new_kek) = self.plan.keys.newest();
        let old = self
            .store
            .subject_keys_not_wrapped_by(stream_id, new_id, limit)
            .await?;
        let mut rewrapped = 0u64;
        for k in &old {
            let bytes = self.unwrap_bytes(k)?;
            let wrapped = envelope::wrap(
                new_kek,
                new_id,
                self.scope(&k.subject),
                &k.dek_id,
                &bytes,
                &self.rng,
            )?;
            if self
                .store
                .rewrap_subject_key(stream_id, k, new_id, &wrapped)
                .await?
            {
                rewrapped += 1;
            }
        }
        let remaining = self
            .store
            .count_subject_keys_not_wrapped_by(stream_id, new_id)
            .await?;
        let total = self.store.count_subject_keys(stream_id).await?;
        Ok(Rotated {
            key_id: new_id.to_string(),
            rewrapped,
            remaining,
            total,
        })
    }
}

/// One step of a rotation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Rotated {
    /// The newest key id, the one keys are re-wrapped with.
    #[serde(rename = "keyId")]
    pub key_id: String,
    pub rewrapped: u64,
    /// Subject keys still wrapped by an older id.
    pub remaining: u64,
    /// Subject keys of the stream.
    pub total: u64,
}
