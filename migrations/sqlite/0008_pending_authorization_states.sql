-- BeginAuthorization keeps at most `google.max_pending_states` pending states
-- per (tenant, account, caller): each begin counts that key's states and
-- deletes the oldest beyond the cap, in the transaction that inserts the new
-- one. This index serves both, oldest first (and DeleteAccount's delete by
-- tenant and account). Used states are deleted from now on, so
-- `consumed_at` is set only on rows written before this migration.
CREATE INDEX authorization_states_pending
    ON authorization_states (tenant_id, account_id, caller, created_at);
