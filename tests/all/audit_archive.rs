//! The audit archive: entries past the hot retention leave the database in
//! sealed segment files, and `audit verify` checks archive and live table as
//! one chain, naming a segment file that is missing, edited, cut short,
//! reordered or swapped with another.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use tokenvault::proto::v1 as pb;
use tokenvault::store::AuditFilter;

use crate::both_backends;
use crate::support::audit_fill_to as fill_to;
use crate::support::{As, Backend, TestVault, spawn_vault_with};

/// Entries per segment in these tests.
const SEGMENT: u64 = 10;

async fn archived_vault(backend: Backend) -> Option<TestVault> {
    spawn_vault_with(backend, |c| {
        c.audit.checkpoint_every = 4;
        c.audit.archive_dir = Some(c.data_dir.join("archive"));
        c.audit.hot_retention_seconds = 1;
        c.audit.segment_max_entries = SEGMENT;
        // The background archiver stays out of the way: passes run when the
        // test says.
        c.audit.archive_interval_seconds = 86_400;
    })
    .await
}

fn archive_dir(tv: &TestVault) -> PathBuf {
    tv.config.audit.archive_dir.clone().unwrap()
}

/// The segment files in the archive directory, by name (which sorts by range).
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.retain(|p| {
        let name = p.file_name().unwrap().to_string_lossy();
        name.starts_with("audit-") && name.ends_with(".jsonl")
    });
    files.sort();
    files
}

async fn verify(tv: &TestVault) -> tokenvault::audit::VerifyReport {
    tv.vault.audit_verify(1, None).await.unwrap()
}

/// Verification fails at `seq` with a detail containing every one of `words`.
async fn broken_at(tv: &TestVault, seq: i64, words: &[&str]) {
    let report = verify(tv).await;
    assert_eq!(report.first_broken_seq, Some(seq), "{report:?}");
    for w in words {
        assert!(report.detail.contains(w), "{w:?} not in {report:?}");
    }
}

async fn archive_prune_and_verify_as_one_chain(backend: Backend) {
    let Some(tv) = archived_vault(backend).await else {
        return;
    };
    let store = tv.vault.store().clone();
    let dir = archive_dir(&tv);
    fill_to(&tv, 30).await;
    // Nothing is past the hot retention yet.
    let none = tv.vault.audit_archive_pass().await.unwrap();
    assert_eq!(none.entries, 0, "{none:?}");
    assert!(segment_files(&dir).is_empty());

    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let pass = tv.vault.audit_archive_pass().await.unwrap();
    // Entries 1..=30 in three segments; the pass's own `audit.archive`
    // entries (31..=33) are too young.
    assert_eq!(
        (pass.segments, pass.entries, pass.pruned),
        (3, 30, 30),
        "{pass:?}"
    );
    let segments = store.audit_segments().await.unwrap();
    let ranges: Vec<(i64, i64)> = segments.iter().map(|s| (s.first_seq, s.last_seq)).collect();
    assert_eq!(ranges, vec![(1, 10), (11, 20), (21, 30)]);
    assert_eq!(
        store.audit_segment_last(0).await.unwrap().as_ref(),
        segments.last()
    );
    let files = segment_files(&dir);
    assert_eq!(files.len(), 3, "{files:?}");
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", f.display());
    }
    // The live table starts after the archive, without its checkpoints.
    assert_eq!(store.audit_first_live(0).await.unwrap(), Some(31));
    assert!(store.audit_checkpoints(1, 30).await.unwrap().is_empty());
    let (head, _) = store.audit_head().await.unwrap();
    assert_eq!(head, 33);
    let archived = store
        .audit_query(
            &AuditFilter {
                action_prefix: Some("audit.archive".into()),
                ascending: true,
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(archived.len(), 3, "{archived:?}");
    assert!(
        archived[0]
            .draft
            .detail
            .contains("entries 1..=10 sealed in"),
        "{archived:?}"
    );

    // Archive and live table verify as one chain, checkpoints included, and
    // the witness's checkpoints are found in the archive.
    let report = verify(&tv).await;
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.from_seq, report.to_seq), (1, 33), "{report:?}");
    assert_eq!(report.entries_checked, 33, "{report:?}");
    // 4, 8, …, 28 and three seals in the archive; 32 live.
    assert_eq!(report.checkpoints_verified, 7 + 3 + 1, "{report:?}");
    assert_eq!(report.checkpoints_witnessed, 8, "{report:?}");
    assert!(
        report
            .detail
            .contains("entries 1..=30 verified in 3 sealed archive segments"),
        "{report:?}"
    );
    // Over gRPC, the same.
    let rpc = tv
        .admin(As::Auditor)
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(rpc.ok, "{rpc:?}");
    assert_eq!(rpc.from_seq, 1);

    // Queries read the archive where the live table has nothing.
    let page = tv
        .admin(As::Auditor)
        .query_audit(pb::QueryAuditRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert!(seqs.len() >= 33, "{seqs:?}");
    assert_eq!(seqs, expected);
    let (newest, _) = tv
        .vault
        .audit_query(&AuditFilter::default(), 5)
        .await
        .unwrap();
    let newest: Vec<i64> = newest.iter().map(|r| r.seq).collect();
    let top = newest[0];
    assert_eq!(newest, (top - 4..=top).rev().collect::<Vec<_>>());
    let (old, _) = tv
        .vault
        .audit_query(
            &AuditFilter {
                before_seq: Some(12),
                after_seq: Some(8),
                ascending: false,
                action_prefix: Some("test.".into()),
                ..Default::default()
            },
            100,
        )
        .await
        .unwrap();
    assert_eq!(
        old.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![11, 10, 9]
    );

    // A later pass continues the chain.
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let more = tv.vault.audit_archive_pass().await.unwrap();
    assert!(more.entries >= 3, "{more:?}");
    let report = verify(&tv).await;
    assert!(report.ok(), "{report:?}");
}
both_backends!(archive_and_verify, archive_prune_and_verify_as_one_chain);

/// Rewrites the lines of a segment file.
fn edit_lines(path: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    edit(&mut lines);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// The index of the line holding entry `seq`.
fn entry_line(lines: &[String], seq: i64) -> usize {
    let needle = format!("{{\"entry\":{{\"seq\":{seq},");
    lines
        .iter()
        .position(|l| l.starts_with(&needle))
        .unwrap_or_else(|| panic!("no entry {seq} in {lines:?}"))
}

async fn a_damaged_archive_is_named(backend: Backend) {
    let Some(tv) = archived_vault(backend).await else {
        return;
    };
    let dir = archive_dir(&tv);
    fill_to(&tv, 30).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let pass = tv.vault.audit_archive_pass().await.unwrap();
    assert_eq!(pass.segments, 3, "{pass:?}");
    let files = segment_files(&dir);
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let restore = || {
        for (f, bytes) in files.iter().zip(&originals) {
            std::fs::write(f, bytes).unwrap();
        }
    };
    assert!(verify(&tv).await.ok());

    // Tampered: an archived entry's detail edited.
    edit_lines(&files[1], |lines| {
        let i = entry_line(lines, 15);
        lines[i] = lines[i].replace("\"detail\":\"14\"", "\"detail\":\"forged\"");
    });
    broken_at(&tv, 15, &["do not match its hash", "audit-000000000011-"]).await;
    restore();

    // Reordered within a segment: two entries swapped.
    edit_lines(&files[1], |lines| {
        let (a, b) = (entry_line(lines, 13), entry_line(lines, 14));
        lines.swap(a, b);
    });
    broken_at(&tv, 13, &["holds entry 14 where entry 13 was expected"]).await;
    restore();

    // Reordered segments: two files' contents swapped (each file whole).
    std::fs::write(&files[0], &originals[1]).unwrap();
    std::fs::write(&files[1], &originals[0]).unwrap();
    broken_at(&tv, 1, &["begins at entry 11", "swapped or renamed"]).await;
    restore();

    // Cut short: the seal and the last entries gone.
    edit_lines(&files[2], |lines| {
        lines.truncate(lines.len() - 3);
    });
    broken_at(&tv, 29, &["without its seal"]).await;
    restore();

    // Missing: a whole segment deleted.
    std::fs::remove_file(&files[2]).unwrap();
    broken_at(&tv, 21, &["is missing", "entries 21..=30"]).await;
    restore();

    // Rewritten: the same entries re-encoded (valid JSON, other bytes).
    edit_lines(&files[0], |lines| {
        let i = entry_line(lines, 2);
        let value: serde_json::Value = serde_json::from_str(&lines[i]).unwrap();
        lines[i] = serde_json::to_string_pretty(&value)
            .unwrap()
            .replace('\n', "");
    });
    broken_at(&tv, 1, &["not the one archived"]).await;
    restore();

    let report = verify(&tv).await;
    assert!(report.ok(), "{report:?}");

    // Without the archive (this replica has no archive_dir), the live table
    // still verifies, linked to the last segment's recorded hash.
    let live = tokenvault::audit::verify_chain(
        tv.vault.store().as_ref(),
        tv.vault.keyring().as_ref(),
        1,
        None,
    )
    .await
    .unwrap();
    assert!(live.ok(), "{live:?}");
    assert_eq!(live.from_seq, 31, "{live:?}");
}
both_backends!(damaged_archive, a_damaged_archive_is_named);

async fn archiving_fails_closed_and_loses_races_safely(backend: Backend) {
    let Some(tv) = archived_vault(backend).await else {
        return;
    };
    let store = tv.vault.store().clone();
    let dir = archive_dir(&tv);
    fill_to(&tv, 25).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;

    // No `audit.archive` entry, no archive: the segment file is removed
    // and nothing leaves the live table.
    tv.vault.audit().inject_failure(true);
    let failed = tv.vault.audit_archive_pass().await;
    tv.vault.audit().inject_failure(false);
    assert!(failed.is_err(), "{failed:?}");
    assert!(segment_files(&dir).is_empty(), "{:?}", segment_files(&dir));
    assert!(store.audit_segments().await.unwrap().is_empty());
    assert_eq!(store.audit_first_live(0).await.unwrap(), Some(1));

    // Two passes at once on one replica take turns.
    let (a, b) = tokio::join!(tv.vault.audit_archive_pass(), tv.vault.audit_archive_pass());
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    let segments = store.audit_segments().await.unwrap();
    assert!(!segments.is_empty());

    // Another replica's archiver that lost the race: its segment no longer
    // continues the archive, or names a last entry the live table does not
    // hold as it says, and is not recorded.
    let last = segments.last().unwrap().clone();
    let mut again = last.clone();
    again.file_name = "audit-lost-race.jsonl".into();
    assert!(!store.audit_segment_record(&again).await.unwrap());
    let mut next = last.clone();
    next.first_seq = last.last_seq + 1;
    next.prev_hash = last.last_hash.clone();
    next.last_seq = last.last_seq + 1;
    next.last_hash = vec![7; 32];
    assert!(!store.audit_segment_record(&next).await.unwrap());
    let mut gap = next.clone();
    gap.first_seq = last.last_seq + 2;
    assert!(!store.audit_segment_record(&gap).await.unwrap());
    assert_eq!(store.audit_segments().await.unwrap(), segments);
    let files = segment_files(&dir);
    assert_eq!(files.len(), segments.len(), "{files:?} {segments:?}");
    assert_eq!(segments.first().map(|s| s.first_seq), Some(1));
    assert!(segments.last().unwrap().last_seq >= 25, "{segments:?}");
    let report = verify(&tv).await;
    assert!(report.ok(), "{report:?}");
    assert!(
        !report.detail.contains("no recorded segment names"),
        "{report:?}"
    );
}
both_backends!(
    archive_fail_closed,
    archiving_fails_closed_and_loses_races_safely
);
