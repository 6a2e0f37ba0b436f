-- The lease path's group commit as one statement. Inserting a row into this
-- view appends a sealed audit batch (entries, checkpoints, lease rows) in the
-- statement's own transaction, so a batch costs one round trip to SQLite's
-- worker thread instead of five (begin, head, entries, leases, commit).
--
-- Nothing is written unless all of it holds: the chain head is still the one
-- the batch was sealed onto, and every leased connection is still ACTIVE and
-- unchanged since the lease path read it. Otherwise the statement aborts and
-- the vault inserts the batch again inside a write transaction, where
-- it has read the head and passes only the leases that still hold.
--
-- Rows travel as JSON arrays of arrays, hashes, MACs, keys and signatures in
-- hex:
--   entries:     [seq, at, actor, role, action, target, outcome, detail,
--                 prev_hash, entry_hash, mac]
--   checkpoints: [seq, entry_hash, signed_at, public_key, signature]
--   leases:      [lease_id, connection_id, caller, purpose, scopes,
--                 token_fingerprint, granted_at, expires_at, connection_version]
CREATE VIEW audit_append_batch AS
    SELECT 0 AS from_seq, x'' AS from_hash, 0 AS to_seq, x'' AS to_hash,
           '[]' AS entries, '[]' AS checkpoints, '[]' AS leases
    WHERE 0;

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
                                      AND c.updated_at = v.value ->> 8));
    UPDATE audit_head SET seq = NEW.to_seq, entry_hash = NEW.to_hash WHERE id = 1;
    INSERT INTO audit_log
        (seq, at, actor, role, action, target, outcome, detail, prev_hash, entry_hash, mac)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
           value ->> 6, value ->> 7, unhex(value ->> 8), unhex(value ->> 9), unhex(value ->> 10)
    FROM jsonb_each(NEW.entries);
    INSERT INTO audit_checkpoints (seq, entry_hash, signed_at, public_key, signature)
    SELECT value ->> 0, unhex(value ->> 1), value ->> 2, unhex(value ->> 3), unhex(value ->> 4)
    FROM jsonb_each(NEW.checkpoints);
    INSERT INTO leases (lease_id, connection_id, caller, purpose, scopes, token_fingerprint,
                        granted_at, expires_at)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
           value ->> 6, value ->> 7
    FROM jsonb_each(NEW.leases);
END;
