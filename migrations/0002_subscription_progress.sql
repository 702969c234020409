-- Progress of each subscription that reads a stream with a store: where its catch-up from
-- the store stands, the high-water mark that hands over to the live queue, and the last
-- delivered position (status.position).
CREATE TABLE weir_subscription_progress (
    namespace      TEXT NOT NULL,
    name           TEXT NOT NULL,
    stream_id      BIGINT NOT NULL REFERENCES weir_streams (stream_id) ON DELETE CASCADE,
    -- Next stored position the catch-up delivers.
    next_position  BIGINT NOT NULL,
    -- NULL while catching up; then the last position the catch-up delivered: live messages
    -- at or below it on their first attempt are duplicates.
    caught_up_to   BIGINT,
    -- Highest position delivered or dead-lettered (sampled).
    position       BIGINT NOT NULL DEFAULT 0,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);
