-- Refresh single-flight across replicas: one row per connection being
-- refreshed. The fence increases with every acquisition; a holder whose lease
-- expired cannot store its (stale) result because its fence no longer matches.
CREATE TABLE refresh_locks (
    connection_id  TEXT PRIMARY KEY,
    holder         TEXT NOT NULL,
    fence          BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL
);
