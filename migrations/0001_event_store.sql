-- Weir event store. One database may hold many streams (several EventStreams can name the
-- same Secret); every table is keyed by stream_id.

-- One row per stream. `head` is the last assigned position: appends take this row FOR UPDATE,
-- which serialises appends to one stream across every process, so positions are gap-free and
-- commit in position order (a sequence would leave gaps and commit out of order).
CREATE TABLE weir_streams (
    stream_id   BIGSERIAL PRIMARY KEY,
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    head        BIGINT NOT NULL DEFAULT 0,
    -- Recorded time of the head event (NULL before the first): recorded times never go
    -- backwards within a stream.
    head_time   TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (namespace, name)
);

CREATE TABLE weir_events (
    stream_id        BIGINT NOT NULL REFERENCES weir_streams (stream_id) ON DELETE CASCADE,
    position         BIGINT NOT NULL,
    id               TEXT NOT NULL,
    source           TEXT NOT NULL,
    type             TEXT NOT NULL,
    subject          TEXT,
    version          BIGINT,
    time             TEXT,
    datacontenttype  TEXT,
    dataschema       TEXT,
    -- Extension attributes as a JSON object (types preserved: string, integer, boolean).
    extensions       TEXT,
    correlation_id   TEXT,
    -- 0 no data, 1 JSON text, 2 UTF-8 text, 3 binary.
    data_kind        SMALLINT NOT NULL DEFAULT 0,
    -- 0 stored as is, 1 zstd frame.
    data_encoding    SMALLINT NOT NULL DEFAULT 0,
    data             BYTEA,
    recorded_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (stream_id, position)
);

CREATE INDEX weir_events_by_subject ON weir_events (stream_id, subject, version)
    WHERE subject IS NOT NULL;
CREATE INDEX weir_events_by_correlation ON weir_events (correlation_id)
    WHERE correlation_id IS NOT NULL;
CREATE INDEX weir_events_by_recorded ON weir_events (stream_id, recorded_at);

-- Dedup keys live apart from the events so they outlive archiving.
CREATE TABLE weir_event_ids (
    stream_id  BIGINT NOT NULL REFERENCES weir_streams (stream_id) ON DELETE CASCADE,
    source     TEXT NOT NULL,
    id         TEXT NOT NULL,
    position   BIGINT NOT NULL,
    version    BIGINT,
    PRIMARY KEY (stream_id, source, id)
);

-- Each subject's current version (for `expectedversion`), also kept across archiving.
CREATE TABLE weir_subjects (
    stream_id  BIGINT NOT NULL REFERENCES weir_streams (stream_id) ON DELETE CASCADE,
    subject    TEXT NOT NULL,
    version    BIGINT NOT NULL,
    PRIMARY KEY (stream_id, subject)
);

-- The relay's progress. `epoch` fences writers: the process that takes the relay lock bumps
-- it, and checkpoint writes carry the epoch they were granted.
CREATE TABLE weir_relay_checkpoints (
    stream_id   BIGINT PRIMARY KEY REFERENCES weir_streams (stream_id) ON DELETE CASCADE,
    position    BIGINT NOT NULL DEFAULT 0,
    epoch       BIGINT NOT NULL DEFAULT 0,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
