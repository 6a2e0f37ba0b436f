-- Signed checkpoints of the audit chain: every `audit.checkpoint_every`
-- entries, an Ed25519 signature over (seq, entry_hash, signed_at) under a key
-- derived from the keyring's MAC root. Anyone holding the public key can check
-- that the chain between two checkpoints is the one the vault wrote, and a
-- checkpoint past the chain head proves the tail was cut off. Written in the
-- same transaction as the entry it signs.
CREATE TABLE audit_checkpoints (
    seq         BIGINT PRIMARY KEY,
    entry_hash  BLOB NOT NULL,
    signed_at   BIGINT NOT NULL,
    public_key  BLOB NOT NULL,
    signature   BLOB NOT NULL
);

-- Finds the receipt of a deleted connection (Connection.deletion_receipt_id).
CREATE INDEX receipt_connections_by_connection ON receipt_connections (connection_id);
