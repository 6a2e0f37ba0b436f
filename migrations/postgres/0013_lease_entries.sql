-- One compact record per lease: a granted lease's row IS its audit entry.
--
-- Until now a lease wrote two rows: a `lease.grant` entry in `audit_log`
-- (actor, role, action, target and a detail naming the lease, its purpose,
-- scopes and token fingerprint, all as text) and a lease row (its id,
-- connection, holder, expiry), with an index by connection. Now a granted
-- lease writes one row of `leases`: the entry's sequence number, time,
-- hash and MAC, the lease and connection ids as UUIDs, the expiry, the
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

DROP TABLE leases;

CREATE TABLE lease_profiles (
    id       BIGSERIAL PRIMARY KEY,
    actor    TEXT NOT NULL,
    role     TEXT NOT NULL,
    purpose  TEXT NOT NULL,
    scopes   TEXT NOT NULL,
    UNIQUE (actor, role, purpose, scopes)
);

-- Fixed-width columns first, so that none is padded.
CREATE TABLE leases (
    seq            BIGINT PRIMARY KEY,
    at             BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    profile        INTEGER NOT NULL,
    lease_id       UUID NOT NULL UNIQUE,
    connection_id  UUID NOT NULL,
    token          BYTEA NOT NULL,
    entry_hash     BYTEA NOT NULL,
    mac            BYTEA NOT NULL
);

CREATE TABLE lease_releases (
    seq          BIGINT PRIMARY KEY,
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
       'lease.grant'::text AS action,
       'conn_' || l.connection_id::text AS target,
       'ok'::text AS outcome,
       'lease=lease_' || l.lease_id::text || ' purpose=' || p.purpose || ' scopes=' || p.scopes
           || ' token=' || encode(l.token, 'hex') AS detail,
       l.entry_hash AS entry_hash,
       l.mac AS mac
FROM leases l JOIN lease_profiles p ON p.id = l.profile;
