//! Every file the vault creates is readable by its owner only, whatever the
//! directory: the SQLite database with its -wal and -shm files, and the
//! local keyring. The umask is process-wide, so these tests cannot set a
//! permissive one; they assert that group and others get nothing.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use tokenvault::domain::Integration;
use tokenvault::proto::v1 as pb;

use crate::support::{As, Backend, TestVault, logs, seed_connection, spawn_vault, start_vault};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The database file and its -wal and -shm siblings.
fn database_files(dir: &Path) -> [PathBuf; 3] {
    ["tokenvault.db", "tokenvault.db-wal", "tokenvault.db-shm"].map(|name| dir.join(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_sqlite_vault_creates_only_owner_only_files() {
    let Some(tv) = spawn_vault(Backend::Sqlite).await else {
        return;
    };
    // A write, so that SQLite has created the WAL and the shared-memory file.
    seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.file-modes-access-token",
        Some("1//file-modes-refresh-token"),
    )
    .await;

    let [db, wal, shm] = database_files(tv.dir.path());
    for path in [&db, &wal, &shm] {
        assert!(path.exists(), "{} was not created", path.display());
        let m = mode(path);
        assert_eq!(m & 0o077, 0, "{} has mode {m:04o}", path.display());
    }
    // SQLite gives the -wal and -shm files the database file's mode.
    assert_eq!(mode(&wal), mode(&db));
    assert_eq!(mode(&shm), mode(&db));

    let keyring = tv.keyring_path();
    let m = mode(&keyring);
    assert_eq!(m & 0o077, 0, "{} has mode {m:04o}", keyring.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_readable_database_is_narrowed_to_its_owner_at_start() {
    let Some(mut tv) = spawn_vault(Backend::Sqlite).await else {
        return;
    };
    let seeded = seed_connection(
        &tv.vault,
        "acme",
        "bob",
        Integration::Calendar,
        "ya29.file-modes-narrowed",
        None,
    )
    .await;
    tv.stop().await;
    let TestVault {
        dir, database_url, ..
    } = tv;

    // As an older release (or a copy with `cp`) left it.
    let [db, wal, shm] = database_files(dir.path());
    for path in [&db, &wal, &shm] {
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    assert_eq!(mode(&db), 0o644);

    let tv = start_vault(Backend::Sqlite, dir, database_url, |_| {}).await;
    assert_eq!(mode(&db), 0o600, "the database file was not narrowed");
    for path in [&wal, &shm] {
        if path.exists() {
            let m = mode(path);
            assert_eq!(m & 0o077, 0, "{} has mode {m:04o}", path.display());
        }
    }
    let logged = String::from_utf8_lossy(&logs::captured()).into_owned();
    let db_name = db.display().to_string();
    assert!(
        logged.lines().any(|l| l.contains("WARN")
            && l.contains("readable by group or others")
            && l.contains(&db_name)),
        "no warning naming {db_name}"
    );

    // Narrowing kept the data.
    let got = tv
        .connections(As::App)
        .get_connection(pb::GetConnectionRequest {
            connection_id: seeded.id.to_string(),
        })
        .await
        .expect("the connection stored before the restart")
        .into_inner()
        .connection
        .unwrap();
    assert_eq!(got.connection_id, seeded.id.to_string());
}
