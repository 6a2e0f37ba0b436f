-- Refresh health of each connection: its last successful refresh, its last
-- refresh error, and when the proactive refresh sweeper checks it next (a
-- replica claims a due connection by moving this forward). Tombstones keep
-- the columns NULL.
ALTER TABLE connections ADD COLUMN last_refresh_at BIGINT;
ALTER TABLE connections ADD COLUMN last_refresh_error TEXT;
ALTER TABLE connections ADD COLUMN last_refresh_error_at BIGINT;
ALTER TABLE connections ADD COLUMN next_check_at BIGINT;

-- Connections made before this migration: refreshed when their tokens were
-- last stored, next checked seven days later (the default refresh_after_hours).
UPDATE connections SET
    last_refresh_at = (SELECT s.updated_at FROM connection_secrets s
                       WHERE s.connection_id = connections.connection_id),
    next_check_at = COALESCE((SELECT s.updated_at FROM connection_secrets s
                              WHERE s.connection_id = connections.connection_id),
                             created_at) + 604800000000
WHERE status NOT IN ('deleted', 'revoked_upstream');

-- An ACTIVE connection that holds no refresh token fails at its first
-- refresh (earlier versions made them when a reconnect got no consent
-- screen): it waits for the user to connect again instead.
UPDATE connections SET status = 'consent_required', status_reason = 'no_refresh_token'
WHERE status = 'active' AND connection_id IN (
    SELECT connection_id FROM connection_secrets WHERE refresh_token IS NULL);

CREATE INDEX connections_next_check ON connections (next_check_at) WHERE status = 'active';
