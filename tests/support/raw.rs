//! Direct access to a test vault's database, bypassing the vault: for
//! tampering with stored ciphertexts and for scanning everything at rest.

use sqlx::Row as _;

use super::{Backend, TestVault};

/// The stored secret columns of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRow {
    pub kek_version: i64,
    pub wrapped_dek: Vec<u8>,
    pub access_token: Option<Vec<u8>>,
    pub refresh_token: Option<Vec<u8>>,
}

/// A second, independent connection pool on the vault's database.
pub enum RawDb {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

const SELECT: &str = "SELECT d.kek_version, d.wrapped_dek, s.access_token, s.refresh_token \
                      FROM connection_secrets s JOIN connection_deks d \
                      ON d.connection_id = s.connection_id WHERE s.connection_id = $1";
const UPDATE_DEK: &str =
    "UPDATE connection_deks SET kek_version = $1, wrapped_dek = $2 WHERE connection_id = $3";
const UPDATE_TOKENS: &str =
    "UPDATE connection_secrets SET access_token = $1, refresh_token = $2 WHERE connection_id = $3";

impl RawDb {
    pub async fn open(tv: &TestVault) -> Self {
        Self::open_url(tv.backend, &tv.database_url).await
    }

    pub async fn open_url(backend: Backend, url: &str) -> Self {
        match backend {
            Backend::Sqlite => RawDb::Sqlite(sqlx::SqlitePool::connect(url).await.unwrap()),
            Backend::Postgres => RawDb::Postgres(sqlx::PgPool::connect(url).await.unwrap()),
        }
    }

    pub async fn secret_row(&self, connection_id: &str) -> Option<SecretRow> {
        macro_rules! get {
            ($pool:expr) => {{
                let row = sqlx::query(SELECT)
                    .bind(connection_id)
                    .fetch_optional($pool)
                    .await
                    .unwrap();
                row.map(|r| SecretRow {
                    kek_version: r.get(0),
                    wrapped_dek: r.get(1),
                    access_token: r.get(2),
                    refresh_token: r.get(3),
                })
            }};
        }
        match self {
            RawDb::Sqlite(p) => get!(p),
            RawDb::Postgres(p) => get!(p),
        }
    }

    pub async fn set_secret_row(&self, connection_id: &str, row: &SecretRow) {
        macro_rules! set {
            ($pool:expr) => {{
                let n = sqlx::query(UPDATE_DEK)
                    .bind(row.kek_version)
                    .bind(&row.wrapped_dek)
                    .bind(connection_id)
                    .execute($pool)
                    .await
                    .unwrap()
                    .rows_affected();
                assert_eq!(n, 1, "no DEK row for {connection_id}");
                let n = sqlx::query(UPDATE_TOKENS)
                    .bind(&row.access_token)
                    .bind(&row.refresh_token)
                    .bind(connection_id)
                    .execute($pool)
                    .await
                    .unwrap()
                    .rows_affected();
                assert_eq!(n, 1, "no secrets row for {connection_id}");
            }};
        }
        match self {
            RawDb::Sqlite(p) => set!(p),
            RawDb::Postgres(p) => set!(p),
        }
    }

    /// Runs one statement.
    /// The one integer a query returns (a count).
    pub async fn scalar(&self, sql: &str) -> i64 {
        match self {
            RawDb::Sqlite(p) => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_one(p)
                .await
                .unwrap(),
            RawDb::Postgres(p) => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_one(p)
                .await
                .unwrap(),
        }
    }

    pub async fn execute(&self, sql: &str) {
        match self {
            RawDb::Sqlite(p) => {
                sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(p)
                    .await
                    .unwrap();
            }
            RawDb::Postgres(p) => {
                sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(p)
                    .await
                    .unwrap();
            }
        }
    }

    /// Every column of every row of every PostgreSQL table, as text (bytea as hex).
    pub async fn postgres_dump(&self) -> String {
        let RawDb::Postgres(pool) = self else {
            panic!("postgres_dump on SQLite")
        };
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        assert!(
            tables.len() >= 10,
            "expected the vault's tables, got {tables:?}"
        );
        let mut out = String::new();
        for t in tables {
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT row_to_json(t)::text FROM \"{t}\" t"
            )))
            .fetch_all(pool)
            .await
            .unwrap();
            for r in rows {
                out.push_str(&t);
                out.push(' ');
                out.push_str(&r);
                out.push('\n');
            }
        }
        out
    }

    /// Every row of every table of the vault's schema except those in `skip`,
    /// as text (blobs and bytea in hex), sorted, per table: for proving that a
    /// series of calls changed nothing at rest.
    pub async fn snapshot(&self, skip: &[&str]) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut out = std::collections::BTreeMap::new();
        match self {
            RawDb::Sqlite(pool) => {
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM sqlite_master WHERE type = 'table' \
                     AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_sqlx_%'",
                )
                .fetch_all(pool)
                .await
                .unwrap();
                for t in tables.into_iter().filter(|t| !skip.contains(&t.as_str())) {
                    let columns: Vec<String> =
                        sqlx::query_scalar("SELECT name FROM pragma_table_info($1)")
                            .bind(&t)
                            .fetch_all(pool)
                            .await
                            .unwrap();
                    let row = columns
                        .iter()
                        .map(|c| format!("quote(\"{c}\")"))
                        .collect::<Vec<_>>()
                        .join(" || '|' || ");
                    let mut rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT {row} FROM \"{t}\""
                    )))
                    .fetch_all(pool)
                    .await
                    .unwrap();
                    rows.sort();
                    out.insert(t, rows);
                }
            }
            RawDb::Postgres(pool) => {
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT table_name::text FROM information_schema.tables \
                     WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx\\_%'",
                )
                .fetch_all(pool)
                .await
                .unwrap();
                for t in tables.into_iter().filter(|t| !skip.contains(&t.as_str())) {
                    let mut rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT row_to_json(t)::text FROM \"{t}\" t"
                    )))
                    .fetch_all(pool)
                    .await
                    .unwrap();
                    rows.sort();
                    out.insert(t, rows);
                }
            }
        }
        out
    }

    /// Makes the database refuse every `op` (`INSERT`, `UPDATE` or `DELETE`)
    /// on `table` with an error raised by a trigger, the way a full disk, a
    /// revoked privilege or a violated constraint would: the failure comes from
    /// the database inside the vault's own statement, not from the vault.
    pub async fn refuse(&self, table: &str, op: &str) {
        self.refuse_when(table, op, "").await;
    }

    /// As [`RawDb::refuse`], only for rows matching `when` (an SQL condition
    /// on `NEW`/`OLD`, e.g. `NEW.action = 'deletion.done'`); empty for all.
    pub async fn refuse_when(&self, table: &str, op: &str, when: &str) {
        let name = format!("tv_refuse_{table}_{}", op.to_lowercase());
        let when = if when.is_empty() {
            String::new()
        } else {
            format!(" WHEN ({when})")
        };
        match self {
            RawDb::Sqlite(_) => {
                self.execute(&format!(
                    "CREATE TRIGGER {name} BEFORE {op} ON {table} FOR EACH ROW{when} \
                     BEGIN SELECT RAISE(ABORT, 'test: {op} on {table} refused'); END"
                ))
                .await;
            }
            RawDb::Postgres(_) => {
                self.execute(
                    "CREATE OR REPLACE FUNCTION tv_refuse() RETURNS trigger LANGUAGE plpgsql AS \
                     $$ BEGIN RAISE EXCEPTION 'test: % on % refused', TG_OP, TG_TABLE_NAME; END $$",
                )
                .await;
                self.execute(&format!(
                    "CREATE TRIGGER {name} BEFORE {op} ON {table} \
                     FOR EACH ROW{when} EXECUTE FUNCTION tv_refuse()"
                ))
                .await;
            }
        }
    }

    /// Undoes [`RawDb::refuse`].
    pub async fn allow(&self, table: &str, op: &str) {
        let name = format!("tv_refuse_{table}_{}", op.to_lowercase());
        match self {
            RawDb::Sqlite(_) => self.execute(&format!("DROP TRIGGER {name}")).await,
            RawDb::Postgres(_) => {
                self.execute(&format!("DROP TRIGGER {name} ON {table}"))
                    .await
            }
        }
    }

    pub async fn close(self) {
        match self {
            RawDb::Sqlite(p) => p.close().await,
            RawDb::Postgres(p) => p.close().await,
        }
    }
}

/// Makes the vault's stored access token of a connection look expired, so
/// the next lease refreshes it.
pub async fn expire_stored_token(tv: &TestVault, connection_id: &str) {
    let raw = RawDb::open(tv).await;
    raw.execute(&format!(
        "UPDATE connection_secrets SET access_expires_at = 0 WHERE connection_id = '{connection_id}'"
    ))
    .await;
    raw.close().await;
}
