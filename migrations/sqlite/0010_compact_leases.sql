-- Compact lease rows. A lease row now holds only what a release and a
-- deletion read back: which connection, who holds it, when it ends and
-- whether it ended early. Its purpose, scopes and token fingerprint are in
-- the grant's audit entry (`lease.grant`, whose detail names the lease id),
-- which is written in the same statement; they are no longer repeated here.
--
-- Ids are stored as the 16 bytes of their UUID (`lease_` and `conn_` are
-- implied). Lease ids are UUIDv7, so the primary key is append-ordered and
-- doubles as the time index: pruning and counting open leases read a range
-- of it, and the expiry index goes. WITHOUT ROWID: the key is the row's
-- address, not a second copy in an index.

DROP TRIGGER audit_append_batch_insert;

CREATE TABLE leases_compact (
    lease_id       BLOB PRIMARY KEY,
    connection_id  BLOB NOT NULL,
    caller         TEXT NOT NULL,
    expires_at     BIGINT NOT NULL,
    revoked_at     BIGINT,
    revoke_reason  TEXT
) WITHOUT ROWID;

INSERT INTO leases_compact (lease_id, connection_id, caller, expires_at, revoked_at, revoke_reason)
SELECT unhex(replace(substr(lease_id, 7), '-', '')),
       unhex(replace(substr(connection_id, 6), '-', '')),
       caller, expires_at, revoked_at, revoke_reason
FROM leases
WHERE length(unhex(replace(substr(lease_id, 7), '-', ''))) = 16
  AND length(unhex(replace(substr(connection_id, 6), '-', ''))) = 16;

DROP TABLE leases;
ALTER TABLE leases_compact RENAME TO leases;
CREATE INDEX leases_open_by_connection ON leases (connection_id) WHERE revoked_at IS NULL;

-- The audit log's index by action leaves out lease grants, the bulk of the
-- log: a query for them reads the log in sequence order, where they are
-- dense; a query for any other action says `action <> 'lease.grant'` so that
-- it can use this index.
DROP INDEX audit_log_by_action;
CREATE INDEX audit_log_by_action ON audit_log (action, seq) WHERE action <> 'lease.grant';

-- The batch statement of migration 0005, writing compact lease rows. Lease
-- rows travel as [lease_id, connection_id, lease key (hex), connection key
-- (hex), caller, expires_at, connection_version].
CREATE TRIGGER audit_append_batch_insert INSTEAD OF INSERT ON audit_append_batch
BEGIN
    SELECT RAISE(ABORT, 'tokenvault: the audit chain head moved')
    WHERE NOT EXISTS (SELECT 1 FROM audit_head
                      WHERE id = 1 AND seq = NEW.from_seq AND entry_hash = NEW.from_hash);
    SELECT RAISE(ABORT, 'tokenvault: a leased connection changed')
    WHERE EXISTS (SELECT 1 FROM jsonb_each(NEW.leases) AS v
                  WHERE NOT EXISTS (SELECT 1 FROM connections c
                                    WHERE c.connection_id = v.value ->> 1
                                      AND c.status = 'active'
                                      AND c.updated_at = v.value ->> 6));
    UPDATE audit_head SET seq = NEW.to_seq, entry_hash = NEW.to_hash WHERE id = 1;
    INSERT INTO audit_log
        (seq, at, actor, role, action, target, outcome, detail, prev_hash, entry_hash, mac)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
           value ->> 6, value ->> 7, unhex(value ->> 8), unhex(value ->> 9), unhex(value ->> 10)
    FROM jsonb_each(NEW.entries);
    INSERT INTO audit_checkpoints (seq, entry_hash, signed_at, public_key, signature)
    SELECT value ->> 0, unhex(value ->> 1), value ->> 2, unhex(value ->> 3), unhex(value ->> 4)
    FROM jsonb_each(NEW.checkpoints);
    INSERT INTO leases (lease_id, connection_id, caller, expires_at)
    SELECT unhex(value ->> 2), unhex(value ->> 3), value ->> 4, value ->> 5
    FROM jsonb_each(NEW.leases);
END;
