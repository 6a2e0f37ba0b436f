-- Leases: who holds what, for pruning and for revoking them on deletion.
CREATE INDEX leases_by_expiry ON leases (expires_at);

-- Events carry free text (the caller's deletion reason, the RISC reason).
ALTER TABLE events ADD COLUMN detail TEXT NOT NULL DEFAULT '';
CREATE INDEX events_by_receipt ON events (receipt_id) WHERE receipt_id IS NOT NULL;

-- The highest cursor pruned from the event log: a consumer resuming from
-- below it would silently miss events, so Watch refuses with OUT_OF_RANGE.
CREATE TABLE event_log_state (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through  BIGINT NOT NULL
);
INSERT INTO event_log_state (id, pruned_through) VALUES (1, 0);

-- Upstream (Google) revocation of each deleted connection's grant: not_needed,
-- pending, confirmed or failed, with the outbox's attempts.
ALTER TABLE receipt_connections ADD COLUMN upstream_state TEXT NOT NULL DEFAULT 'not_needed';
ALTER TABLE receipt_connections ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE receipt_connections ADD COLUMN last_attempt_at BIGINT;
ALTER TABLE receipt_connections ADD COLUMN next_attempt_at BIGINT;
ALTER TABLE receipt_connections ADD COLUMN settled_at BIGINT;
ALTER TABLE receipt_connections ADD COLUMN last_error TEXT;
ALTER TABLE deletion_receipts ADD COLUMN requested_by TEXT NOT NULL DEFAULT '';

-- Google revocations not yet confirmed. The token (refresh token, else access
-- token) is sealed under a DEK of its own, wrapped by a KEK version; no API
-- reads or leases from this table. The row is deleted once Google confirms or
-- the give-up time passes.
CREATE TABLE revocation_outbox (
    receipt_id       TEXT NOT NULL,
    connection_id    TEXT NOT NULL,
    kek_version      BIGINT NOT NULL REFERENCES kek_versions (version),
    wrapped_dek      BYTEA NOT NULL,
    sealed_token     BYTEA NOT NULL,
    created_at       BIGINT NOT NULL,
    next_attempt_at  BIGINT NOT NULL,
    give_up_at       BIGINT NOT NULL,
    PRIMARY KEY (receipt_id, connection_id),
    FOREIGN KEY (receipt_id, connection_id) REFERENCES receipt_connections (receipt_id, connection_id)
);
CREATE INDEX revocation_outbox_due ON revocation_outbox (next_attempt_at);

-- RISC security events already processed (de-duplicated by jti).
CREATE TABLE risc_seen (
    jti          TEXT PRIMARY KEY,
    received_at  BIGINT NOT NULL
);
