-- Audit entries no longer store `prev_hash`: it is, by the chain's
-- definition, the `entry_hash` of the entry before (or the last archived
-- segment's `last_hash`, or 32 zero bytes before entry 1), and reads compute
-- it from there. Each entry's own hash still covers the previous hash, and
-- its MAC covers its hash, so an edited, removed or reordered entry is found
-- exactly as before.
--
-- `seq` becomes the table's rowid (INTEGER PRIMARY KEY): a BIGINT primary key
-- was a second B-tree holding every sequence number again.
--
-- The table is rebuilt; on a large log this migration takes a while once.

DROP TRIGGER audit_append_batch_insert;

CREATE TABLE audit_log_compact (
    seq         INTEGER PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    role        TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    detail      TEXT NOT NULL,
    entry_hash  BLOB NOT NULL,
    mac         BLOB NOT NULL
);
INSERT INTO audit_log_compact
    (seq, at, actor, role, action, target, outcome, detail, entry_hash, mac)
SELECT seq, at, actor, role, action, target, outcome, detail, entry_hash, mac
FROM audit_log ORDER BY seq;
DROP TABLE audit_log;
ALTER TABLE audit_log_compact RENAME TO audit_log;
CREATE INDEX audit_log_by_action ON audit_log (action, seq) WHERE action <> 'lease.grant';

-- The batch statement of migrations 0005 and 0010, without `prev_hash`.
-- Entries travel as [seq, at, actor, role, action, target, outcome, detail,
-- entry_hash (hex), mac (hex)].
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
        (seq, at, actor, role, action, target, outcome, detail, entry_hash, mac)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
           value ->> 6, value ->> 7, unhex(value ->> 8), unhex(value ->> 9)
    FROM jsonb_each(NEW.entries);
    INSERT INTO audit_checkpoints (seq, entry_hash, signed_at, public_key, signature)
    SELECT value ->> 0, unhex(value ->> 1), value ->> 2, unhex(value ->> 3), unhex(value ->> 4)
    FROM jsonb_each(NEW.checkpoints);
    INSERT INTO leases (lease_id, connection_id, caller, expires_at)
    SELECT unhex(value ->> 2), unhex(value ->> 3), value ->> 4, value ->> 5
    FROM jsonb_each(NEW.leases);
END;
