-- Key custody for a fleet: the database's key registry is the truth for every
-- replica.

-- Who did each step of a key version's life, and which provider holds it.
ALTER TABLE kek_versions ADD COLUMN provider TEXT NOT NULL DEFAULT '';
ALTER TABLE kek_versions ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
ALTER TABLE kek_versions ADD COLUMN promoted_by TEXT;
ALTER TABLE kek_versions ADD COLUMN retired_by TEXT;
ALTER TABLE kek_versions ADD COLUMN destroyed_by TEXT;

-- Key-check values of the keyring's root keys other than the KEKs (which keep
-- theirs in kek_versions.key_check): 'mac_root' (an HMAC of a fixed string
-- under the MAC root's key-check subkey) and 'checkpoint_signing' (the Ed25519
-- public key of the audit checkpoints). A keyring that does not reproduce them
-- refuses to start.
CREATE TABLE root_key_checks (
    name         TEXT PRIMARY KEY,
    check_value  BLOB NOT NULL,
    recorded_at  BIGINT NOT NULL
);

-- The replicas sharing this database and the key versions each holds,
-- written at start, whenever what a replica holds changes, and every
-- keyring.heartbeat_seconds, stamped with the database's clock. A row not
-- refreshed for three heartbeats is a replica that stopped; a clean shutdown
-- deletes its row.
CREATE TABLE key_replicas (
    replica_id     TEXT PRIMARY KEY,
    host           TEXT NOT NULL,
    pid            BIGINT NOT NULL,
    -- The kernel boot and PID namespace the process runs in: two rows with the
    -- same instance can tell whether the other's pid still runs.
    instance       TEXT NOT NULL,
    provider       TEXT NOT NULL,
    -- Held KEK versions, ascending, comma-separated ("1,2").
    versions       TEXT NOT NULL,
    heartbeat_ms   BIGINT NOT NULL,
    started_at     BIGINT NOT NULL,
    seen_at        BIGINT NOT NULL
);

-- Creating keys in a keyring the fleet shares is claimed here first, so two
-- replicas never create the same key at once: 'init' (the first start on an
-- empty keyring) and 'kek:vN' (a rotation's new version). A claim older than a
-- minute is stale (its replica died) and may be taken over.
CREATE TABLE keyring_claims (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    claimed_at  BIGINT NOT NULL
);

-- The replica whose worker runs a rotation; another replica takes the run
-- over when that one is no longer live.
ALTER TABLE rotation_runs ADD COLUMN owner TEXT NOT NULL DEFAULT '';

-- A rotation counts and rewraps every wrapped key by version.
CREATE INDEX authorization_states_by_kek ON authorization_states (kek_version);
CREATE INDEX revocation_outbox_by_kek ON revocation_outbox (kek_version);
