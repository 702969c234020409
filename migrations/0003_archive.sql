-- Archive segments (ArchivePolicy). Old events move out of weir_events into segments: a
-- sequence of zstd blocks of ~64 KiB of events each plus a block index. The metadata of every
-- segment lives here whatever the destination, so readers on any replica find archived events
-- with the same queries; only the segment bytes live elsewhere for `volume`.

-- zstd dictionaries, trained per stream and versioned: a segment names the one it uses.
CREATE TABLE weir_archive_dictionaries (
    stream_id   BIGINT NOT NULL REFERENCES weir_streams (stream_id) ON DELETE CASCADE,
    dict_id     INT NOT NULL,
    dict        BYTEA NOT NULL,
    -- Events the dictionary was trained on.
    samples     INT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, dict_id)
);

CREATE TABLE weir_archive_segments (
    stream_id       BIGINT NOT NULL REFERENCES weir_streams (stream_id) ON DELETE CASCADE,
    first_position  BIGINT NOT NULL,
    last_position   BIGINT NOT NULL,
    event_count     BIGINT NOT NULL,
    -- Uncompressed size of the events (their JSON lines) and size of the segment as stored.
    raw_bytes       BIGINT NOT NULL,
    stored_bytes    BIGINT NOT NULL,
    block_count     INT NOT NULL,
    dict_id         INT,
    first_recorded  TIMESTAMPTZ NOT NULL,
    last_recorded   TIMESTAMPTZ NOT NULL,
    -- The block index (JSON, see src/data/archive/format.rs) and the CRC-32 of the whole
    -- segment body, also recorded inside the body's trailer.
    block_index     JSONB NOT NULL,
    checksum        BIGINT NOT NULL,
    -- NULL: the body is in `body` (destination store); else the segment file's path.
    file_path       TEXT,
    body            BYTEA,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, first_position),
    CHECK (last_position >= first_position),
    CHECK ((file_path IS NULL) != (body IS NULL))
);
-- The body is zstd already: keep PostgreSQL from compressing it again, and let
-- substring() fetch one block's bytes without reading the whole value.
ALTER TABLE weir_archive_segments ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE INDEX weir_archive_segments_by_last ON weir_archive_segments (stream_id, last_position);

-- Which blocks hold a subject's events, and which hold a correlation id's, so subject and
-- trace reads decompress only those blocks.
CREATE TABLE weir_archive_subjects (
    stream_id       BIGINT NOT NULL,
    subject         TEXT NOT NULL,
    first_position  BIGINT NOT NULL,
    block           INT NOT NULL,
    PRIMARY KEY (stream_id, subject, first_position, block),
    FOREIGN KEY (stream_id, first_position)
        REFERENCES weir_archive_segments (stream_id, first_position) ON DELETE CASCADE
);
CREATE TABLE weir_archive_correlations (
    correlation_id  TEXT NOT NULL,
    stream_id       BIGINT NOT NULL,
    first_position  BIGINT NOT NULL,
    block           INT NOT NULL,
    PRIMARY KEY (correlation_id, stream_id, first_position, block),
    FOREIGN KEY (stream_id, first_position)
        REFERENCES weir_archive_segments (stream_id, first_position) ON DELETE CASCADE
);
CREATE INDEX weir_archive_correlations_by_segment
    ON weir_archive_correlations (stream_id, first_position);

-- Per stream: when the archiver last finished, and the positions removed by deleteAfter.
CREATE TABLE weir_archive_state (
    stream_id      BIGINT PRIMARY KEY REFERENCES weir_streams (stream_id) ON DELETE CASCADE,
    last_run       TIMESTAMPTZ,
    -- Every position up to this one was archived and then deleted by deleteAfter.
    deleted_to     BIGINT NOT NULL DEFAULT 0
);

-- Audit log of segments removed by deleteAfter.
CREATE TABLE weir_archive_audit (
    stream_id       BIGINT NOT NULL REFERENCES weir_streams (stream_id) ON DELETE CASCADE,
    action          TEXT NOT NULL,
    first_position  BIGINT NOT NULL,
    last_position   BIGINT NOT NULL,
    event_count     BIGINT NOT NULL,
    file_path       TEXT,
    at              TIMESTAMPTZ NOT NULL DEFAULT now()
);
