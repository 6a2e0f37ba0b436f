-- One compact record per lease: a granted lease's row IS its audit entry.
--
-- Until now a lease wrote two rows: a `lease.grant` entry in `audit_log`
-- (actor, role, action, target and a detail naming the lease, its purpose,
-- scopes and token fingerprint, all as text) and a lease row (its id,
-- connection, holder, expiry), with an index by connection. Now a granted
-- lease writes one row of `leases`: the entry's sequence number, time,
-- hash and MAC, the lease and connection ids as 16 bytes, the expiry, the
-- token fingerprint as 16 bytes and a `lease_profiles` id naming the
-- (actor, role, purpose, scopes) it was granted for. `lease_entries` reads
-- such a row back as the exact entry that was hashed and MACed, so the chain,
-- its verification and the archive see the same log as before.
--
-- A grant whose lease was not recorded (its connection changed first: a
-- void lease) and every other entry stay text rows of `audit_log`.
--
-- Leases are no longer revoked one row at a time: a deletion or suspension
-- ends every lease of the connection granted up to that moment
-- (`connections.leases_revoked_at`, or the connection no longer ACTIVE), so
-- no index by connection is needed. A release is a row of `lease_releases`.
--
-- Lease rows of the old layout cannot become entries (their entries are
-- text rows already); they are dropped. A lease open across this upgrade
-- still expires on time; releasing it answers NOT_FOUND.

DROP TRIGGER audit_append_batch_insert;
DROP TABLE leases;

CREATE TABLE lease_profiles (
    id       INTEGER PRIMARY KEY,
    actor    TEXT NOT NULL,
    role     TEXT NOT NULL,
    purpose  TEXT NOT NULL,
    scopes   TEXT NOT NULL,
    UNIQUE (actor, role, purpose, scopes)
);

CREATE TABLE leases (
    seq            INTEGER PRIMARY KEY,
    at             BIGINT NOT NULL,
    profile        INTEGER NOT NULL,
    lease_id       BLOB NOT NULL UNIQUE,
    connection_id  BLOB NOT NULL,
    expires_at     BIGINT NOT NULL,
    token          BLOB NOT NULL,
    entry_hash     BLOB NOT NULL,
    mac            BLOB NOT NULL
);

CREATE TABLE lease_releases (
    seq          INTEGER PRIMARY KEY,
    released_at  BIGINT NOT NULL
);

ALTER TABLE connections ADD COLUMN leases_revoked_at BIGINT;
ALTER TABLE connections ADD COLUMN leases_revoke_reason TEXT;
-- Counting open leases looks up the few connections revoked since a grant.
CREATE INDEX connections_leases_revoked ON connections (leases_revoked_at)
    WHERE leases_revoked_at IS NOT NULL;

-- A lease row as the audit entry it is (the columns of `audit_log`).
CREATE VIEW lease_entries AS
SELECT l.seq AS seq,
       l.at AS at,
       p.actor AS actor,
       p.role AS role,
       'lease.grant' AS action,
       'conn_' || lower(substr(hex(l.connection_id), 1, 8) || '-' || substr(hex(l.connection_id), 9, 4)
           || '-' || substr(hex(l.connection_id), 13, 4) || '-' || substr(hex(l.connection_id), 17, 4)
           || '-' || substr(hex(l.connection_id), 21, 12)) AS target,
       'ok' AS outcome,
       'lease=lease_' || lower(substr(hex(l.lease_id), 1, 8) || '-' || substr(hex(l.lease_id), 9, 4)
           || '-' || substr(hex(l.lease_id), 13, 4) || '-' || substr(hex(l.lease_id), 17, 4)
           || '-' || substr(hex(l.lease_id), 21, 12))
           || ' purpose=' || p.purpose || ' scopes=' || p.scopes
           || ' token=' || lower(hex(l.token)) AS detail,
       l.entry_hash AS entry_hash,
       l.mac AS mac
FROM leases l JOIN lease_profiles p ON p.id = l.profile;

-- The batch statement of migration 0011: entries that are not recorded
-- leases travel as before; recorded leases as
-- [connection_id, connection_version, seq, at, profile, lease_key (hex),
--  connection_key (hex), expires_at, token (hex), entry_hash (hex), mac (hex)].
CREATE TRIGGER audit_append_batch_insert INSTEAD OF INSERT ON audit_append_batch
BEGIN
    SELECT RAISE(ABORT, 'tokenvault: the audit chain head moved')
    WHERE NOT EXISTS (SELECT 1 FROM audit_head
                      WHERE id = 1 AND seq = NEW.from_seq AND entry_hash = NEW.from_hash);
    SELECT RAISE(ABORT, 'tokenvault: a leased connection changed')
    WHERE EXISTS (SELECT 1 FROM jsonb_each(NEW.leases) AS v
                  WHERE NOT EXISTS (SELECT 1 FROM connections c
                                    WHERE c.connection_id = v.value ->> 0
                                      AND c.status = 'active'
                                      AND c.updated_at = v.value ->> 1));
    UPDATE audit_head SET seq = NEW.to_seq, entry_hash = NEW.to_hash WHERE id = 1;
    INSERT INTO audit_log
        (seq, at, actor, role, action, target, outcome, detail, entry_hash, mac)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
           value ->> 6, value ->> 7, unhex(value ->> 8), unhex(value ->> 9)
    FROM jsonb_each(NEW.entries);
    INSERT INTO audit_checkpoints (seq, entry_hash, signed_at, public_key, signature)
    SELECT value ->> 0, unhex(value ->> 1), value ->> 2, unhex(value ->> 3), unhex(value ->> 4)
    FROM jsonb_each(NEW.checkpoints);
    INSERT INTO leases
        (seq, at, profile, lease_id, connection_id, expires_at, token, entry_hash, mac)
    SELECT value ->> 2, value ->> 3, value ->> 4, unhex(value ->> 5), unhex(value ->> 6),
           value ->> 7, unhex(value ->> 8), unhex(value ->> 9), unhex(value ->> 10)
    FROM jsonb_each(NEW.leases);
END;
