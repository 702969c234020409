-- Personal-data encryption (spec.pii): one data key per subject of a stream, stored wrapped
-- (AES-256-GCM) by the stream's key `kek_id` from spec.pii.keySecretRef. `dek_id` is random
-- and appears in every envelope the key made, so an envelope whose key was deleted (the
-- subject was forgotten) is told apart from a later key of the same subject. Forgetting a
-- subject deletes its row: nothing else can decrypt its fields.
CREATE TABLE weir_subject_keys (
    stream_id   BIGINT NOT NULL REFERENCES weir_streams (stream_id) ON DELETE CASCADE,
    subject     TEXT NOT NULL,
    dek_id      TEXT NOT NULL,
    kek_id      TEXT NOT NULL,
    wrapped     BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, subject)
);

-- Rotation looks for the keys not yet wrapped by the newest key id.
CREATE INDEX weir_subject_keys_kek ON weir_subject_keys (stream_id, kek_id);
