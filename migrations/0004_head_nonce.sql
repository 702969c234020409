-- Appends chain on each other: a process sends a batch decided on top of its previous,
-- still-uncommitted batch, guarded by "the head is still what that batch leaves". A position
-- alone cannot say that (another process may have appended the same number of events), so
-- every append also writes a random nonce, and the guard checks both.
ALTER TABLE weir_streams ADD COLUMN head_nonce BIGINT NOT NULL DEFAULT 0;
