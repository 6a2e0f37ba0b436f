#!/usr/bin/env bash
# The do-it-yourself alternative to tokenvault's leases, measured with pgbench
# against the same PostgreSQL, so that BENCHMARKS.md can print its figure next
# to `lease_load --backend postgres`.
#
# What a team would build by hand: OAuth tokens in a PostgreSQL column (as
# opaque bytes, the size of a sealed Google access token), and per read one
# SELECT of the token plus one INSERT of an audit row naming who read it, for
# which purpose and connection, committed (synchronous_commit on, as
# tokenvault's PostgreSQL writes are), prepared statements (as sqlx uses). No
# encryption, no policy, no hash chain.
#
#   bash benches/diy_pgbench.sh [--clients 64] [--seconds 10] [--rows 10000]
#
# PostgreSQL: TV_TEST_POSTGRES_URL (default
# postgres://postgres@127.0.0.1:5432/postgres). A fresh database is created and
# dropped afterwards. Prints pgbench's summary and one markdown table row.
set -euo pipefail

clients=64
seconds=10
rows=10000
while [ $# -gt 0 ]; do
    case "$1" in
        --clients) clients="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --rows) rows="$2"; shift 2 ;;
        *) echo "usage: $0 [--clients N] [--seconds N] [--rows N]" >&2; exit 2 ;;
    esac
done

admin="${TV_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
command -v pgbench >/dev/null || { echo "pgbench not found (Debian: postgresql-client)" >&2; exit 1; }
db="tv_diy_$$_$(date +%s)"
base="${admin%/*}"
url="$base/$db"
work="$(mktemp -d)"
cleanup() {
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

psql -q "$admin" -c "CREATE DATABASE $db" >/dev/null
psql -q "$url" >/dev/null <<SQL
CREATE TABLE tokens (
    connection_id BIGINT PRIMARY KEY,
    access_token  BYTEA NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL
);
-- 192 bytes per token, about a Google access token's size.
INSERT INTO tokens
    SELECT i, decode(repeat(md5(i::text), 12), 'hex'), now() + interval '1 hour'
    FROM generate_series(1, $rows) AS i;
CREATE TABLE audit (
    id            BIGSERIAL PRIMARY KEY,
    at            TIMESTAMPTZ NOT NULL,
    actor         TEXT NOT NULL,
    purpose       TEXT NOT NULL,
    connection_id BIGINT NOT NULL,
    detail        TEXT NOT NULL
);
ANALYZE;
SQL

cat > "$work/read.sql" <<SQL
\set id random(1, $rows)
BEGIN;
SELECT access_token, expires_at FROM tokens WHERE connection_id = :id;
INSERT INTO audit (at, actor, purpose, connection_id, detail)
    VALUES (now(), 'spiffe://bench.local/calendar-sync', 'calendar_sync', :id,
            'scopes=https://www.googleapis.com/auth/calendar.events');
COMMIT;
SQL

echo "diy: tokens in a column, SELECT + audit INSERT per read, committed; $rows rows, $clients clients, $seconds s"
out="$(pgbench -n -M prepared -c "$clients" -j 2 -T "$seconds" -f "$work/read.sql" "$url" 2>&1)"
echo "$out"
tps="$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)"
lat="$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' | head -1)"
echo
echo "| approach | clients | transactions/s | latency average |"
echo "| --- | --- | --- | --- |"
echo "| DIY: token column + audit row per read (pgbench) | $clients | ${tps%.*} | $lat ms |"
