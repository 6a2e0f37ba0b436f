-- Compact lease rows. A lease row now holds only what a release and a
-- deletion read back: which connection, who holds it, when it ends and
-- whether it ended early. Its purpose, scopes and token fingerprint are in
-- the grant's audit entry (`lease.grant`, whose detail names the lease id),
-- which is written in the same statement; they are no longer repeated here.
--
-- Ids are stored as the 16 bytes of their UUID (`lease_` and `conn_` are
-- implied). Lease ids are UUIDv7, so the primary key is append-ordered and
-- doubles as the time index: pruning and counting open leases read a range
-- of it, and the expiry index goes.

CREATE TABLE leases_compact (
    lease_id       BYTEA PRIMARY KEY,
    connection_id  BYTEA NOT NULL,
    caller         TEXT NOT NULL,
    expires_at     BIGINT NOT NULL,
    revoked_at     BIGINT,
    revoke_reason  TEXT
);

INSERT INTO leases_compact (lease_id, connection_id, caller, expires_at, revoked_at, revoke_reason)
SELECT decode(replace(substr(lease_id, 7), '-', ''), 'hex'),
       decode(replace(substr(connection_id, 6), '-', ''), 'hex'),
       caller, expires_at, revoked_at, revoke_reason
FROM leases
WHERE lease_id ~ '^lease_[0-9a-f-]{36}$' AND connection_id ~ '^conn_[0-9a-f-]{36}$';

DROP TABLE leases;
ALTER TABLE leases_compact RENAME TO leases;
ALTER INDEX leases_compact_pkey RENAME TO leases_pkey;
CREATE INDEX leases_open_by_connection ON leases (connection_id) WHERE revoked_at IS NULL;
-- As migration 0009 set for the table this one replaces.
ALTER TABLE leases SET (autovacuum_vacuum_scale_factor = 0.02);

-- The audit log's index by action leaves out lease grants, the bulk of the
-- log: a query for them reads the log in sequence order, where they are
-- dense; a query for any other action says `action <> 'lease.grant'` so that
-- it can use this index.
DROP INDEX audit_log_by_action;
CREATE INDEX audit_log_by_action ON audit_log (action, seq) WHERE action <> 'lease.grant';
