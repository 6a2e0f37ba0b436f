-- The audit log's archive: entries older than audit.hot_retention_seconds
-- are written, before they leave this table, into sealed segment files under
-- audit.archive_dir. One row per segment, in chain order; rows are never
-- updated or deleted. The live table's first entry links (prev_hash) to the
-- last segment's last_hash, so archive and live table verify as one chain.
--
-- Recording a segment marks entries first_seq..=last_seq archived; the prune
-- that follows deletes them from audit_log in small steps, and may lag.
CREATE TABLE audit_segments (
    first_seq    BIGINT PRIMARY KEY,
    last_seq     BIGINT NOT NULL,
    -- The hash of the entry before first_seq (32 zero bytes before entry 1).
    prev_hash    BLOB NOT NULL,
    -- The hash of entry last_seq.
    last_hash    BLOB NOT NULL,
    -- The file's name within the archive directory, and its SHA-256.
    file_name    TEXT NOT NULL,
    file_sha256  BLOB NOT NULL,
    sealed_at    BIGINT NOT NULL,
    -- The replica that wrote it.
    sealed_by    TEXT NOT NULL
);
