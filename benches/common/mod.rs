//! What the benchmarks share: a fresh database per run, dropped afterwards.

use sqlx::Connection as _;

/// A fresh database URL for the backend, and what to drop afterwards
/// (PostgreSQL: the admin URL and the database name). PostgreSQL comes from
/// `TV_TEST_POSTGRES_URL` (default postgres://postgres@127.0.0.1:5432/postgres).
pub async fn database(backend: &str, dir: &std::path::Path) -> (String, Option<(String, String)>) {
    match backend {
        "sqlite" => (format!("sqlite://{}", dir.join("bench.db").display()), None),
        "postgres" => {
            let admin = std::env::var("TV_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let name = format!("tv_bench_{}", uuid::Uuid::new_v4().simple());
            let mut c = sqlx::PgConnection::connect(&admin)
                .await
                .expect("connect to PostgreSQL (TV_TEST_POSTGRES_URL)");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut c)
                .await
                .expect("create the bench database");
            let _ = c.close().await;
            let base = admin
                .rsplit_once('/')
                .map_or(admin.as_str(), |(b, _)| b)
                .to_owned();
            (format!("{base}/{name}"), Some((admin, name)))
        }
        other => panic!("unknown backend {other} (sqlite|postgres)"),
    }
}

/// Drops a database [`database`] created; failures are reported, not fatal.
pub async fn drop_database(admin: &str, name: &str) {
    match sqlx::PgConnection::connect(admin).await {
        Ok(mut c) => {
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {name} WITH (FORCE)"
            )))
            .execute(&mut c)
            .await
            {
                eprintln!("could not drop database {name}: {e}");
            }
            let _ = c.close().await;
        }
        Err(e) => eprintln!("could not drop database {name}: {e}"),
    }
}
