-- The authenticated publisher of each dedup key (streams with `ingest.auth`; NULL for events
-- stored without authentication). With auth on, an event whose (source, id) another publisher
-- already stored is refused (409) instead of being answered as that publisher's duplicate.
ALTER TABLE weir_event_ids ADD COLUMN publisher TEXT;
