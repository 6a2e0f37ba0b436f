-- Audit entries no longer store `prev_hash`: it is, by the chain's
-- definition, the `entry_hash` of the entry before (or the last archived
-- segment's `last_hash`, or 32 zero bytes before entry 1), and reads compute
-- it from there. Each entry's own hash still covers the previous hash, and
-- its MAC covers its hash, so an edited, removed or reordered entry is found
-- exactly as before. Dropping the column is instant; rows written from now
-- on are 33 bytes shorter, and older rows shrink as they are rewritten.
ALTER TABLE audit_log DROP COLUMN prev_hash;
