-- The audit log becomes one chain per audit writer (see `store::audit`): a
-- sequence number carries its chain in the bits above the 40th, and each
-- chain has its own head row here, `id` = chain + 1. Row 1, chain 0, is the
-- log as it was; each vault process's writer claims a chain with a
-- session-level advisory lock and makes its row when the chain is new, so
-- replicas no longer move one shared head.
ALTER TABLE audit_head DROP CONSTRAINT audit_head_id_check;
ALTER TABLE audit_head ADD CONSTRAINT audit_head_id_check CHECK (id >= 1 AND id <= 4096);
