-- tokenvault schema, SQLite flavour. Times are microseconds since the Unix
-- epoch (BIGINT) in both backends; byte strings are BLOB here, BYTEA on Postgres.

-- Lifecycle of key-encryption-key versions. The key material lives in the
-- keyring provider, never here.
CREATE TABLE kek_versions (
    version        BIGINT PRIMARY KEY,
    state          TEXT NOT NULL CHECK (state IN ('primary', 'active', 'retired', 'destroyed')),
    created_at     BIGINT NOT NULL,
    primary_since  BIGINT,
    primary_until  BIGINT,
    retired_at     BIGINT,
    destroyed_at   BIGINT,
    -- A zero key wrapped by this version: proves at start-up that the keyring
    -- holds the same material the database was written with.
    key_check      BLOB NOT NULL
);
-- At most one primary version.
CREATE UNIQUE INDEX kek_versions_one_primary ON kek_versions (state) WHERE state = 'primary';

-- One row per integration of an account. A deleted connection keeps only a
-- tombstone: ids, integration, status and times (no email, no subject, no scopes).
CREATE TABLE connections (
    connection_id   TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    integration     TEXT NOT NULL,
    google_subject  TEXT,
    google_email    TEXT,
    granted_scopes  TEXT NOT NULL DEFAULT '',
    status          TEXT NOT NULL,
    status_reason   TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    deleted_at      BIGINT
);
CREATE UNIQUE INDEX connections_live
    ON connections (tenant_id, account_id, integration) WHERE status <> 'deleted';
CREATE INDEX connections_by_account ON connections (tenant_id, account_id, connection_id);
CREATE INDEX connections_by_subject ON connections (google_subject) WHERE google_subject IS NOT NULL;

-- The per-connection DEK, wrapped by a KEK version. Kept apart from the sealed
-- tokens so that a key rotation rewrites only these narrow rows.
CREATE TABLE connection_deks (
    connection_id  TEXT PRIMARY KEY REFERENCES connections (connection_id),
    kek_version    BIGINT NOT NULL REFERENCES kek_versions (version),
    wrapped_dek    BLOB NOT NULL
);
CREATE INDEX connection_deks_by_kek ON connection_deks (kek_version, connection_id);

-- The tokens sealed with the connection's DEK. Deleting this row and the DEK
-- row is what destroys a connection's tokens.
CREATE TABLE connection_secrets (
    connection_id       TEXT PRIMARY KEY REFERENCES connection_deks (connection_id),
    access_token        BLOB,
    access_expires_at   BIGINT,
    refresh_token       BLOB,
    updated_at          BIGINT NOT NULL
);

-- Pending OAuth authorizations: the state is stored hashed, the PKCE verifier sealed.
CREATE TABLE authorization_states (
    state_hash      BLOB PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    integration     TEXT NOT NULL,
    caller          TEXT NOT NULL,
    kek_version     BIGINT NOT NULL REFERENCES kek_versions (version),
    wrapped_dek     BLOB NOT NULL,
    sealed_verifier BLOB NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    consumed_at     BIGINT
);
CREATE INDEX authorization_states_expiry ON authorization_states (expires_at);

-- Leases handed to workers. The token itself is never recorded, only its HMAC.
CREATE TABLE leases (
    lease_id           TEXT PRIMARY KEY,
    connection_id      TEXT NOT NULL,
    caller             TEXT NOT NULL,
    purpose            TEXT NOT NULL,
    scopes             TEXT NOT NULL,
    token_fingerprint  TEXT NOT NULL,
    granted_at         BIGINT NOT NULL,
    expires_at         BIGINT NOT NULL,
    revoked_at         BIGINT,
    revoke_reason      TEXT
);
CREATE INDEX leases_open_by_connection ON leases (connection_id) WHERE revoked_at IS NULL;

-- The event log watched by sync services, and each consumer's durable position.
CREATE TABLE events (
    cursor         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind           TEXT NOT NULL,
    occurred_at    BIGINT NOT NULL,
    tenant_id      TEXT,
    account_id     TEXT,
    connection_id  TEXT,
    integration    TEXT,
    lease_id       TEXT,
    receipt_id     TEXT,
    reason         TEXT
);

CREATE TABLE consumer_positions (
    consumer    TEXT PRIMARY KEY,
    cursor      BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- Deletion receipts: proof of what was destroyed, revoked and purged, and when.
CREATE TABLE deletion_receipts (
    receipt_id              TEXT PRIMARY KEY,
    -- 'connection:<id>' or 'account:<tenant>/<account>': repeating a deletion returns the same receipt.
    subject_key             TEXT NOT NULL UNIQUE,
    tenant_id               TEXT NOT NULL,
    account_id              TEXT NOT NULL,
    reason                  TEXT NOT NULL,
    reason_detail           TEXT NOT NULL DEFAULT '',
    requested_at            BIGINT NOT NULL,
    tokens_destroyed_at     BIGINT,
    upstream_state          TEXT NOT NULL,
    upstream_updated_at     BIGINT,
    upstream_attempts       BIGINT NOT NULL DEFAULT 0,
    completed_at            BIGINT
);
CREATE INDEX deletion_receipts_incomplete ON deletion_receipts (requested_at) WHERE completed_at IS NULL;

CREATE TABLE receipt_connections (
    receipt_id     TEXT NOT NULL REFERENCES deletion_receipts (receipt_id),
    connection_id  TEXT NOT NULL,
    integration    TEXT NOT NULL,
    PRIMARY KEY (receipt_id, connection_id)
);

CREATE TABLE receipt_acks (
    receipt_id       TEXT NOT NULL REFERENCES deletion_receipts (receipt_id),
    consumer         TEXT NOT NULL,
    acknowledged_at  BIGINT,
    PRIMARY KEY (receipt_id, consumer)
);

-- Key rotation runs: progress is persisted so a crash resumes the run.
CREATE TABLE rotation_runs (
    run_id          TEXT PRIMARY KEY,
    target_version  BIGINT NOT NULL REFERENCES kek_versions (version),
    started_at      BIGINT NOT NULL,
    finished_at     BIGINT,
    total           BIGINT NOT NULL,
    rewrapped       BIGINT NOT NULL DEFAULT 0,
    state           TEXT NOT NULL CHECK (state IN ('running', 'completed', 'failed')),
    actor           TEXT NOT NULL,
    last_error      TEXT
);
CREATE UNIQUE INDEX rotation_runs_one_running ON rotation_runs (state) WHERE state = 'running';

-- The tamper-evident audit log: each entry holds the SHA-256 of the previous
-- entry and an HMAC under the keyring's audit key.
CREATE TABLE audit_log (
    seq         BIGINT PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    role        TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    detail      TEXT NOT NULL,
    prev_hash   BLOB NOT NULL,
    entry_hash  BLOB NOT NULL,
    mac         BLOB NOT NULL
);
CREATE INDEX audit_log_by_action ON audit_log (action, seq);

-- The head of the audit chain, one row; updating it serialises appenders.
-- The genesis hash (before entry 1) is 32 zero bytes.
CREATE TABLE audit_head (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    seq         BIGINT NOT NULL,
    entry_hash  BLOB NOT NULL
);
INSERT INTO audit_head (id, seq, entry_hash) VALUES (1, 0, zeroblob(32));
