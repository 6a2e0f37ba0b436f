//! Behaviour both store implementations must share.

use std::sync::Arc;

use tokenvault::audit::{Actor, Outcome, verify_chain};
use tokenvault::domain::{ConnectionStatus, Integration, TenantId};
use tokenvault::store::{ConnectionFilter, PageRequest};
use tokenvault::vault::Vault;

use crate::both_backends;
use crate::support::{Backend, seed_connection, spawn_vault};

async fn reconnecting_replaces_the_connection_and_destroys_its_secrets(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let v = &tv.vault;
    let first = seed_connection(
        v,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.first",
        Some("1//r1"),
    )
    .await;
    let second = seed_connection(
        v,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.second",
        Some("1//r2"),
    )
    .await;
    assert_ne!(first.id, second.id);

    let old = v.store().connection_get(&first.id).await.unwrap().unwrap();
    assert_eq!(old.status, ConnectionStatus::Deleted);
    assert_eq!(old.google_email, None, "tombstones keep no email");
    assert_eq!(old.google_subject, None);
    assert!(old.granted_scopes.is_empty());
    assert!(
        v.store().secrets_get(&first.id).await.unwrap().is_none(),
        "old DEK and tokens destroyed"
    );

    let opened = v.access_token_open(&second.id).await.unwrap();
    assert_eq!(opened.access_token.expose(), "ya29.second");

    // Another integration of the same account is a separate live connection.
    seed_connection(v, "acme", "alice", Integration::Email, "ya29.mail", None).await;
    let live = v
        .store()
        .connection_list(
            &ConnectionFilter {
                tenant: Some(TenantId::parse("acme").unwrap()),
                ..Default::default()
            },
            &PageRequest {
                after: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(live.len(), 2);
}
both_backends!(
    reconnect_replaces,
    reconnecting_replaces_the_connection_and_destroys_its_secrets
);

async fn listing_pages_through_every_connection_once(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    for i in 0..7 {
        seed_connection(
            &tv.vault,
            "pager",
            &format!("user{i}"),
            Integration::Calendar,
            "ya29.x",
            None,
        )
        .await;
    }
    let filter = ConnectionFilter {
        tenant: Some(TenantId::parse("pager").unwrap()),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = tv
            .vault
            .store()
            .connection_list(
                &filter,
                &PageRequest {
                    after: after.clone(),
                    limit: 3,
                },
            )
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|c| c.id.to_string());
        seen.extend(page.into_iter().map(|c| c.id));
    }
    assert_eq!(seen.len(), 7);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "pages are ordered and disjoint");
}
both_backends!(list_paging, listing_pages_through_every_connection_once);

async fn concurrent_appenders_on_two_vaults_keep_one_verifiable_chain(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let other: Arc<Vault> = Vault::open(&tv.config)
        .await
        .expect("second vault on the same database");
    let mut tasks = Vec::new();
    for (n, vault) in [tv.vault.clone(), other.clone()].into_iter().enumerate() {
        for t in 0..4 {
            let vault = vault.clone();
            tasks.push(tokio::spawn(async move {
                let actor = Actor {
                    identity: format!("replica-{n}"),
                    role: "system".into(),
                };
                for i in 0..50 {
                    vault
                        .audit()
                        .record(
                            &actor,
                            "test.append",
                            &format!("task-{t}"),
                            Outcome::Ok,
                            format!("{i}"),
                        )
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = verify_chain(
        tv.vault.store().as_ref(),
        tv.vault.keyring().as_ref(),
        1,
        None,
    )
    .await
    .unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(report.entries_checked >= 400, "{report:?}");
    other.shutdown().await;
}
both_backends!(
    audit_chain_concurrency,
    concurrent_appenders_on_two_vaults_keep_one_verifiable_chain
);

async fn audit_fields_round_trip_exactly_through_batched_appends(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let before = tv.vault.store().audit_head().await.unwrap().0;
    // Every kind of text an audit field can hold: quotes and backslashes (JSON
    // and SQL escapes), non-ASCII, characters outside the BMP, a long value.
    let details = [
        r#"reason="user said \"stop\"" path=C:\temp\x 'single'"#.to_owned(),
        "ünïcødé — ĳ 日本語 🚀 \u{1F600}".to_owned(),
        "x".repeat(5000),
        String::new(),
    ];
    let actor = Actor {
        identity: "spiffe://test.local/odd \"name\"".into(),
        role: "system".into(),
    };
    // Appended concurrently, so they share group-commit batches.
    let tasks: Vec<_> = details
        .iter()
        .map(|d| {
            let (vault, actor, d) = (tv.vault.clone(), actor.clone(), d.clone());
            tokio::spawn(async move {
                vault
                    .audit()
                    .record(&actor, "test.round_trip", "target ✓", Outcome::Ok, d)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    let rows = tv
        .vault
        .store()
        .audit_range(before + 1, before + 100, 100)
        .await
        .unwrap();
    for (seq, detail) in seqs.iter().zip(&details) {
        let row = rows.iter().find(|r| r.seq == *seq).expect("appended row");
        assert_eq!(&row.draft.detail, detail);
        assert_eq!(row.draft.actor, actor.identity);
        assert_eq!(row.draft.target, "target ✓");
    }
    let report = verify_chain(
        tv.vault.store().as_ref(),
        tv.vault.keyring().as_ref(),
        1,
        None,
    )
    .await
    .unwrap();
    assert!(report.ok(), "{report:?}");
}
both_backends!(
    audit_round_trip,
    audit_fields_round_trip_exactly_through_batched_appends
);

/// A lease for `conn` as the lease path writes it (one minute long), against
/// the connection as `conn` shows it.
fn calendar_lease(conn: &tokenvault::store::ConnectionRecord) -> tokenvault::store::LeaseGrant {
    use tokenvault::domain::{LeaseId, Timestamp};
    let lease = tokenvault::store::LeaseRecord {
        lease_id: LeaseId::generate(),
        connection_id: conn.id.clone(),
        caller: "spiffe://test.local/worker".into(),
        expires_at: Timestamp::now().plus(std::time::Duration::from_secs(60)),
        revoked_at: None,
        revoke_reason: None,
    };
    tokenvault::store::LeaseGrant {
        lease,
        connection_version: conn.updated_at,
        purpose: "calendar.sync".into(),
        scopes: "https://www.googleapis.com/auth/calendar.readonly".into(),
        token: "00112233445566778899aabbccddeeff".into(),
        entry: 0,
    }
}

/// The grant entry the lease path writes for `g`.
fn grant_draft(g: &tokenvault::store::LeaseGrant) -> tokenvault::store::AuditDraft {
    tokenvault::store::AuditDraft {
        at: tokenvault::domain::Timestamp::now(),
        actor: g.lease.caller.clone(),
        role: "worker".into(),
        action: "lease.grant".into(),
        target: g.lease.connection_id.to_string(),
        outcome: "ok".into(),
        detail: tokenvault::store::lease_grant_detail(
            &g.lease.lease_id,
            &g.purpose,
            &g.scopes,
            &g.token,
        ),
    }
}

/// Appends the grants of `leases` straight through the store, as the audit
/// writer would (with a stand-in sealer): the entries' sequence numbers and
/// the ids of the leases recorded.
async fn append_grants(
    v: &Vault,
    leases: &[tokenvault::store::LeaseGrant],
) -> (Vec<i64>, Vec<String>) {
    use tokenvault::store::{AuditDraft, SealedEntry};
    let leases: Vec<_> = leases
        .iter()
        .enumerate()
        .map(|(entry, g)| tokenvault::store::LeaseGrant { entry, ..g.clone() })
        .collect();
    let drafts: Vec<AuditDraft> = leases.iter().map(grant_draft).collect();
    let sealer = |_: i64, prev: &[u8], _: &AuditDraft| SealedEntry {
        entry_hash: prev.iter().map(|b| b.wrapping_add(1)).collect(),
        mac: vec![0; 32],
        checkpoint: None,
    };
    v.store()
        .audit_append(&drafts, &leases, &sealer)
        .await
        .unwrap()
}

async fn a_lease_batched_with_a_deleted_connection_is_not_recorded(backend: Backend) {
    use tokenvault::domain::DeletionReason;
    use tokenvault::store::DeletionTarget;
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let v = &tv.vault;
    let live = seed_connection(v, "acme", "alice", Integration::Calendar, "ya29.a", None).await;
    let gone = seed_connection(v, "acme", "bob", Integration::Calendar, "ya29.b", None).await;
    // Deleted after the lease path read it, before the grant is written.
    v.delete(
        &Actor::system(),
        DeletionTarget::Connection(gone.id.clone()),
        DeletionReason::UserDisconnected,
        "test",
    )
    .await
    .unwrap();
    let leases = [calendar_lease(&live), calendar_lease(&gone)];
    let (seqs, recorded) = append_grants(v, &leases).await;
    assert_eq!(seqs.len(), 2, "both entries are in the log");
    assert_eq!(recorded, vec![leases[0].lease.lease_id.to_string()]);
    assert!(
        v.store()
            .lease_get(&leases[1].lease.lease_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        v.store()
            .lease_get(&leases[0].lease.lease_id)
            .await
            .unwrap()
            .is_some()
    );
}
both_backends!(
    lease_write_checks_active,
    a_lease_batched_with_a_deleted_connection_is_not_recorded
);

async fn a_lease_read_before_its_connection_changed_is_not_recorded(backend: Backend) {
    use tokenvault::domain::Timestamp;
    use tokenvault::store::{AuditDraft, SealedEntry};
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let v = &tv.vault;
    let before = seed_connection(v, "acme", "dave", Integration::Calendar, "ya29.d", None).await;
    // Suspended and resumed after the lease path read it: ACTIVE again, but
    // not the record the lease was decided on.
    for suspend in [true, false] {
        v.store()
            .connections_suspend("sub-acme-dave", suspend, "test", Timestamp::now())
            .await
            .unwrap();
    }
    let after = v.store().connection_get(&before.id).await.unwrap().unwrap();
    assert_eq!(after.status, before.status);
    assert!(after.updated_at > before.updated_at);
    let sealer = |_: i64, prev: &[u8], _: &AuditDraft| SealedEntry {
        entry_hash: prev.iter().map(|b| b.wrapping_add(1)).collect(),
        mac: vec![0; 32],
        checkpoint: None,
    };
    let append = async |grant: &tokenvault::store::LeaseGrant| {
        v.store()
            .audit_append(
                std::slice::from_ref(&grant_draft(grant)),
                std::slice::from_ref(grant),
                &sealer,
            )
            .await
            .unwrap()
    };
    // Twice: the second round appends onto the chain head the first left
    // cached, after a refused lease (on SQLite, after the one-statement
    // append aborted and the batch was written step by step).
    for _ in 0..2 {
        let stale = calendar_lease(&before);
        let (seqs, recorded) = append(&stale).await;
        assert_eq!(seqs.len(), 1, "the grant entry is in the log");
        assert!(
            recorded.is_empty(),
            "a lease on an outdated read is not recorded"
        );
        assert!(
            v.store()
                .lease_get(&stale.lease.lease_id)
                .await
                .unwrap()
                .is_none()
        );
        let current = calendar_lease(&after);
        let (_, recorded) = append(&current).await;
        assert_eq!(recorded, vec![current.lease.lease_id.to_string()]);
    }
}
both_backends!(
    lease_write_checks_version,
    a_lease_read_before_its_connection_changed_is_not_recorded
);

/// Leases are revoked by their connection's cut-off, not one by one: a
/// suspension ends every lease granted before it (read back as revoked,
/// "suspended", and no longer open), and one granted after the connection
/// resumed is open; a release ends a lease once; a deletion ends the rest.
async fn a_suspension_revokes_leases_granted_before_it_and_no_later_one(backend: Backend) {
    use tokenvault::domain::{DeletionReason, Timestamp};
    use tokenvault::store::DeletionTarget;
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let v = &tv.vault;
    let store = v.store();
    let conn = seed_connection(v, "acme", "erin", Integration::Calendar, "ya29.e", None).await;
    let before = calendar_lease(&conn);
    let (_, recorded) = append_grants(v, std::slice::from_ref(&before)).await;
    assert_eq!(recorded.len(), 1);
    let epoch = Timestamp::from_micros(0);
    let open = || async {
        store
            .lease_open_count(Timestamp::now(), epoch, Some(&conn.id))
            .await
            .unwrap()
    };
    assert_eq!(open().await, 1);
    let suspended_at = Timestamp::now();
    store
        .connections_suspend("sub-acme-erin", true, "test", suspended_at)
        .await
        .unwrap();
    store
        .connections_suspend("sub-acme-erin", false, "test", Timestamp::now())
        .await
        .unwrap();
    let got = store
        .lease_get(&before.lease.lease_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.revoked_at, Some(suspended_at));
    assert_eq!(got.revoke_reason.as_deref(), Some("suspended"));
    assert_eq!(open().await, 0);
    assert_eq!(
        store
            .lease_release(&before.lease.lease_id, Timestamp::now())
            .await
            .unwrap(),
        Some(suspended_at),
        "a revoked lease ended when it was revoked"
    );

    let resumed = store.connection_get(&conn.id).await.unwrap().unwrap();
    let after = calendar_lease(&resumed);
    let (_, recorded) = append_grants(v, std::slice::from_ref(&after)).await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(
        store
            .lease_get(&after.lease.lease_id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        None
    );
    assert_eq!(open().await, 1);
    let released_at = Timestamp::now();
    assert_eq!(
        store
            .lease_release(&after.lease.lease_id, released_at)
            .await
            .unwrap(),
        Some(released_at)
    );
    assert_eq!(
        store
            .lease_release(&after.lease.lease_id, Timestamp::now())
            .await
            .unwrap(),
        Some(released_at),
        "released once"
    );
    assert_eq!(open().await, 0);

    let last = calendar_lease(&resumed);
    append_grants(v, std::slice::from_ref(&last)).await;
    assert_eq!(open().await, 1);
    v.delete(
        &Actor::system(),
        DeletionTarget::Connection(conn.id.clone()),
        DeletionReason::UserDisconnected,
        "test",
    )
    .await
    .unwrap();
    assert_eq!(open().await, 0);
    let ended = store
        .lease_get(&last.lease.lease_id)
        .await
        .unwrap()
        .unwrap();
    assert!(ended.revoked_at.is_some());
    assert_eq!(ended.revoke_reason.as_deref(), Some("user_disconnected"));
}
both_backends!(
    lease_revocation_cut_off,
    a_suspension_revokes_leases_granted_before_it_and_no_later_one
);

async fn an_append_concurrent_with_a_failing_one_lands_and_the_chain_verifies(backend: Backend) {
    use tokenvault::crypto::MacPurpose;
    use tokenvault::domain::Timestamp;
    use tokenvault::store::{AuditDraft, SealedEntry};
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let v = &tv.vault;
    let conn = seed_connection(v, "acme", "carol", Integration::Calendar, "ya29.c", None).await;
    let lease = calendar_lease(&conn);
    let draft = |what: &str| AuditDraft {
        at: Timestamp::now(),
        actor: "tokenvault".into(),
        role: "system".into(),
        action: "test.pipeline".into(),
        target: what.into(),
        outcome: "ok".into(),
        detail: String::new(),
    };
    // The real sealer, so the chain can be verified afterwards.
    let keyring = v.keyring().clone();
    let sealer = move |seq: i64, prev: &[u8], d: &AuditDraft| {
        let hash = tokenvault::audit::entry_hash(seq, prev, d);
        SealedEntry {
            mac: keyring.mac(MacPurpose::AuditChain, &hash).to_vec(),
            checkpoint: None,
            entry_hash: hash,
        }
    };
    let store = v.store();
    // Warm the cached head.
    store
        .audit_append(&[draft("warm")], &[], &sealer)
        .await
        .unwrap();
    store
        .audit_append(
            &[grant_draft(&lease)],
            std::slice::from_ref(&lease),
            &sealer,
        )
        .await
        .unwrap();
    // Batch A repeats a lease id, so the database refuses it after it took
    // the cached head; batch B is appended while A is in flight.
    let a_drafts = [grant_draft(&lease)];
    let b_drafts = [draft("after the failure")];
    let (a, b) = tokio::join!(
        store.audit_append(&a_drafts, std::slice::from_ref(&lease), &sealer),
        store.audit_append(&b_drafts, &[], &sealer),
    );
    assert!(a.is_err(), "the duplicate lease id is refused");
    let (b_seqs, _) = b.expect("the concurrent batch lands");
    let head = store.audit_head().await.unwrap().0;
    assert_eq!(b_seqs, vec![head]);
    let report = verify_chain(store.as_ref(), v.keyring().as_ref(), 1, None)
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    // And the next append still lands on the real head.
    let (next, _) = store
        .audit_append(&[draft("next")], &[], &sealer)
        .await
        .unwrap();
    assert_eq!(next, vec![head + 1]);
}
both_backends!(
    audit_concurrent_failure,
    an_append_concurrent_with_a_failing_one_lands_and_the_chain_verifies
);

/// The checkpoint sequence number in a SQLite WAL file's header; SQLite
/// increments it each time the WAL starts over from its beginning.
fn wal_checkpoint_sequence(path: &std::path::Path) -> u32 {
    let bytes = std::fs::read(path).expect("read the WAL");
    u32::from_be_bytes(bytes[12..16].try_into().expect("a WAL header"))
}

/// Under commits that never pause, the SQLite WAL still starts over (SQLite's
/// own checkpoints are off; the store's background task does them). A
/// `PASSIVE` checkpoint alone never caught up with the release build's
/// back-to-back audit batches (what was committed while it copied was left
/// for the next), and the WAL grew for as long as the load lasted: ~50 MB/s
/// under the lease benchmark, which prints the WAL's size. In this debug
/// build the writers leave gaps in which a passive checkpoint sometimes
/// catches up on its own, so this guards the outcome, not which pass got
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_starts_over_under_continuous_writes() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let Some(tv) = spawn_vault(Backend::Sqlite).await else {
        return;
    };
    let wal = tv.dir.path().join("tokenvault.db-wal");
    // 64 writers keep the audit log's group commit busy back to back, as a
    // lease load does, with 4 KiB entries so the WAL fills quickly.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..64)
        .map(|_| {
            let (vault, stop, written) = (tv.vault.clone(), stop.clone(), written.clone());
            tokio::spawn(async move {
                let detail = "x".repeat(4 * 1024);
                while !stop.load(Ordering::Relaxed) {
                    vault
                        .audit()
                        .record(
                            &Actor::system(),
                            "test.load",
                            "wal",
                            Outcome::Ok,
                            detail.clone(),
                        )
                        .await
                        .unwrap();
                    written.fetch_add(detail.len(), Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Once the load is under way (any start-over of the idle WAL is behind
    // us), the WAL must start over again while it lasts: past the 16 MiB at
    // which the background checkpoint finishes under the write lock, and
    // long before an unbounded WAL would stop growing.
    while written.load(Ordering::Relaxed) < 4 * 1024 * 1024 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before = wal_checkpoint_sequence(&wal);
    let from = written.load(Ordering::Relaxed);
    let limit = 160 * 1024 * 1024;
    let mut largest = 0;
    let restarted = loop {
        if wal_checkpoint_sequence(&wal) != before {
            break true;
        }
        largest = largest.max(std::fs::metadata(&wal).unwrap().len());
        if written.load(Ordering::Relaxed) - from > limit {
            break false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        restarted,
        "the WAL never started over while {limit} bytes were committed back to back \
         (the file reached {largest} bytes)"
    );
}

/// A lease's record is its grant's audit entry, so it is pruned with the
/// archived entries, oldest first and a bounded number per call, but never
/// before the lease expired past the given bound: a chain's pruning stops at
/// the first lease still kept, and everything after it stays too.
async fn expired_leases_are_pruned_oldest_first_in_steps(backend: Backend) {
    use tokenvault::domain::Timestamp;
    use tokenvault::store::AuditSegment;
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let v = &tv.vault;
    let conn = seed_connection(v, "acme", "alice", Integration::Calendar, "ya29.a", None).await;
    let past = Timestamp::from_micros(Timestamp::now().as_micros() - 10_000_000);
    let mut leases = Vec::new();
    for i in 0..7 {
        let mut g = calendar_lease(&conn);
        // Lease 5 has not expired; the others have.
        if i != 5 {
            g.lease.expires_at = past;
        }
        leases.push(g);
    }
    let (seqs, recorded) = append_grants(v, &leases).await;
    assert_eq!(recorded.len(), 7);
    let store = v.store();
    let last = *seqs.last().unwrap();
    let last_hash = store.audit_range(last, last, 1).await.unwrap()[0]
        .entry_hash
        .clone();
    // The whole chain so far is archived.
    assert!(
        store
            .audit_segment_record(&AuditSegment {
                first_seq: 1,
                last_seq: last,
                prev_hash: vec![0; 32],
                last_hash,
                file_name: "segment-test.jsonl".into(),
                file_sha256: vec![0; 32],
                sealed_at: Timestamp::now(),
                sealed_by: "test".into(),
            })
            .await
            .unwrap()
    );
    let present = |i: usize| {
        let id = leases[i].lease.lease_id.clone();
        async move { store.lease_get(&id).await.unwrap().is_some() }
    };
    let now = Timestamp::now();
    assert_eq!(store.audit_prune_archived(2, now).await.unwrap(), 2);
    assert_eq!(store.audit_first_live(0).await.unwrap(), Some(3));
    let pruned = store.audit_prune_archived(1000, now).await.unwrap();
    assert_eq!(store.audit_first_live(0).await.unwrap(), Some(seqs[5]));
    assert_eq!(pruned, u64::try_from(seqs[5] - 3).unwrap());
    for i in 0..5 {
        assert!(!present(i).await, "lease {i} expired before the bound");
    }
    assert!(present(5).await, "not expired");
    assert!(present(6).await, "after a lease that is kept");
    assert_eq!(store.audit_prune_archived(1000, now).await.unwrap(), 0);
    // Once lease 5 expired past the bound, the rest goes.
    let later = leases[5]
        .lease
        .expires_at
        .plus(std::time::Duration::from_secs(1));
    assert_eq!(store.audit_prune_archived(1000, later).await.unwrap(), 2);
    assert_eq!(store.audit_first_live(0).await.unwrap(), None);
    // The freed space is reusable: SQLite's free list needs nothing; on a
    // PostgreSQL server without autovacuum the store vacuums the table.
    let reclaimed = store.reclaim(&["leases"]).await.unwrap();
    if backend == Backend::Sqlite {
        assert!(!reclaimed);
    }
}
both_backends!(
    lease_prune_steps,
    expired_leases_are_pruned_oldest_first_in_steps
);

/// The bulk import path writes every field as the one-row path does (nulls
/// included), and a batch with one collision writes nothing.
async fn bulk_import_round_trips_every_field_and_is_all_or_nothing(backend: Backend) {
    use std::time::Duration;

    use tokenvault::crypto::SecretString;
    use tokenvault::domain::{AccountId, ScopeSet, Timestamp};
    use tokenvault::vault::NewConnection;

    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let v = &tv.vault;
    let scopes = ScopeSet::parse_spaced(
        "https://www.googleapis.com/auth/calendar.events https://www.googleapis.com/auth/calendar.readonly",
    )
    .unwrap();
    let new = |i: usize, status: ConnectionStatus, refresh: bool| NewConnection {
        tenant: TenantId::parse("bulk").unwrap(),
        account: AccountId::parse(&format!("user{i}")).unwrap(),
        integration: Integration::Calendar,
        google_subject: format!("sub{i}"),
        google_email: format!("user{i}@example.test"),
        granted_scopes: scopes.clone(),
        status,
        access_token: SecretString::new(format!("ya29.bulk-{i}")),
        access_expires_at: Timestamp::now().plus(Duration::from_secs(3600)),
        refresh_token: refresh.then(|| SecretString::new(format!("1//bulk-{i}"))),
    };
    let batch = vec![
        new(0, ConnectionStatus::Active, true),
        new(1, ConnectionStatus::ConsentRequired, false),
        new(2, ConnectionStatus::Active, false),
    ];
    let imported = v.connection_import(batch).await.unwrap();
    assert_eq!(imported.len(), 3);
    for (i, record) in imported.iter().enumerate() {
        let stored = v.store().connection_get(&record.id).await.unwrap().unwrap();
        assert_eq!(&stored, record, "connection {i} as imported");
        let secrets = v.store().secrets_get(&record.id).await.unwrap().unwrap();
        assert!(!secrets.wrapped_dek.is_empty());
        assert_eq!(
            secrets.refresh_token.is_some(),
            i == 0,
            "refresh token of {i}"
        );
        let opened = v.access_token_open(&record.id).await.unwrap();
        assert_eq!(opened.access_token.expose(), format!("ya29.bulk-{i}"));
    }
    assert_eq!(
        imported[1].status_reason.as_deref(),
        Some("no_refresh_token"),
        "a status reason travels through the bulk path"
    );

    // user3 is new, user0 collides with a live connection: nothing of the
    // batch is written.
    let before = v
        .store()
        .connection_list(
            &ConnectionFilter::default(),
            &PageRequest {
                after: None,
                limit: 100,
            },
        )
        .await
        .unwrap()
        .len();
    let clash = vec![
        new(3, ConnectionStatus::Active, true),
        new(0, ConnectionStatus::Active, true),
    ];
    v.connection_import(clash)
        .await
        .expect_err("a batch colliding with a live connection is refused");
    let after = v
        .store()
        .connection_list(
            &ConnectionFilter::default(),
            &PageRequest {
                after: None,
                limit: 100,
            },
        )
        .await
        .unwrap()
        .len();
    assert_eq!(before, after, "a refused batch writes no row");
}
both_backends!(
    bulk_import_round_trips,
    bulk_import_round_trips_every_field_and_is_all_or_nothing
);

/// Lease rows written before migrations 0010-0013 are dropped by 0013 (a
/// lease's record is now its grant's entry): such a lease is not found and
/// not counted open. Migration 0011 stops storing each audit entry's previous hash:
/// a chain written before it still verifies after it, and an entry edited
/// afterwards is still named.
async fn lease_rows_before_0013_are_dropped_and_old_chains_verify(backend: Backend) {
    use std::time::Duration;
    use tokenvault::crypto::{KeyringProvider, LocalKeyring, MacPurpose};
    use tokenvault::domain::{ConnectionId, LeaseId, Timestamp};
    use tokenvault::store::AuditDraft;
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = crate::support::fresh_database(backend, dir.path()).await else {
        return;
    };
    let _guard = crate::support::DropDatabase::new(&url);
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        });
    let mut before = sqlx::migrate::Migrator::new(source.as_path())
        .await
        .unwrap();
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < 10)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    let conn = ConnectionId::generate();
    let open = LeaseId::generate();
    let released = LeaseId::generate();
    let now = Timestamp::now();
    let expires = now.plus(Duration::from_secs(600));
    let rows = [
        (open.to_string(), None, None),
        (
            released.to_string(),
            Some(now.as_micros()),
            Some("released"),
        ),
        ("lease_legacy".to_owned(), None, None),
    ];
    // A chain of three entries as the vault wrote it before 0011.
    let keyring = LocalKeyring::init(dir.path().join("keyring.json")).unwrap();
    let mut chain = Vec::new();
    let mut prev = vec![0u8; 32];
    for seq in 1..=3i64 {
        let draft = AuditDraft {
            at: now,
            actor: "tokenvault".into(),
            role: "system".into(),
            action: "test.before".into(),
            target: format!("t{seq}"),
            outcome: "ok".into(),
            detail: String::new(),
        };
        let hash = tokenvault::audit::entry_hash(seq, &prev, &draft);
        let mac = keyring.mac(MacPurpose::AuditChain, &hash).to_vec();
        chain.push((seq, draft, prev.clone(), hash.clone(), mac));
        prev = hash;
    }
    const ENTRY: &str = "INSERT INTO audit_log (seq, at, actor, role, action, target, outcome, \
         detail, prev_hash, entry_hash, mac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
    const INSERT: &str = "INSERT INTO leases (lease_id, connection_id, caller, purpose, scopes, \
         token_fingerprint, granted_at, expires_at, revoked_at, revoke_reason) \
         VALUES ($1, $2, 'spiffe://test.local/worker', 'calendar_sync', 'calendar.events', \
         'ffff', $3, $4, $5, $6)";
    macro_rules! seed {
        ($pool:expr) => {{
            let pool = $pool;
            before.run(&pool).await.expect("migrations 0001-0009");
            for (id, revoked_at, reason) in &rows {
                sqlx::query(INSERT)
                    .bind(id.as_str())
                    .bind(conn.as_str())
                    .bind(now.as_micros())
                    .bind(expires.as_micros())
                    .bind(*revoked_at)
                    .bind(*reason)
                    .execute(&pool)
                    .await
                    .expect("an old-format lease row");
            }
            for (seq, d, prev, hash, mac) in &chain {
                sqlx::query(ENTRY)
                    .bind(*seq)
                    .bind(d.at.as_micros())
                    .bind(&d.actor)
                    .bind(&d.role)
                    .bind(&d.action)
                    .bind(&d.target)
                    .bind(&d.outcome)
                    .bind(&d.detail)
                    .bind(prev.as_slice())
                    .bind(hash.as_slice())
                    .bind(mac.as_slice())
                    .execute(&pool)
                    .await
                    .expect("an entry with its previous hash");
            }
            sqlx::query("UPDATE audit_head SET seq = 3, entry_hash = $1 WHERE id = 1")
                .bind(prev.as_slice())
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }};
    }
    match backend {
        Backend::Sqlite => {
            use std::str::FromStr as _;
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
                .unwrap()
                .create_if_missing(true);
            seed!(sqlx::SqlitePool::connect_with(options).await.unwrap());
        }
        Backend::Postgres => seed!(sqlx::PgPool::connect(&url).await.unwrap()),
    }

    let store = tokenvault::store::open(&url)
        .await
        .expect("migrate to 0010");
    // Migration 0013 makes a lease's record its grant's audit entry; rows
    // of the old layout cannot become entries and are dropped: such a lease
    // is not found (it expires on time) and no longer counts as open.
    for id in [&open, &released] {
        assert!(store.lease_get(id).await.unwrap().is_none());
    }
    let epoch = Timestamp::from_micros(0);
    assert_eq!(
        store
            .lease_open_count(Timestamp::now(), epoch, Some(&conn))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store.lease_release(&open, Timestamp::now()).await.unwrap(),
        None
    );

    // The chain reads back with each previous hash, and verifies.
    let rows = store.audit_range(1, 3, 10).await.unwrap();
    let stored: Vec<_> = rows.iter().map(|r| (r.seq, r.prev_hash.clone())).collect();
    let written: Vec<_> = chain.iter().map(|c| (c.0, c.2.clone())).collect();
    assert_eq!(stored, written);
    let report = tokenvault::audit::verify_chain(store.as_ref(), &keyring, 1, None)
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.entries_checked, 3);
    // An entry edited after the upgrade is named.
    const EDIT: &str = "UPDATE audit_log SET target = 'x' WHERE seq = 2";
    match backend {
        Backend::Sqlite => {
            use std::str::FromStr as _;
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url).unwrap();
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            sqlx::query(EDIT).execute(&pool).await.unwrap();
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            sqlx::query(EDIT).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }
    let report = tokenvault::audit::verify_chain(store.as_ref(), &keyring, 1, None)
        .await
        .unwrap();
    assert_eq!(report.first_broken_seq, Some(2), "{report:?}");
    store.close().await;
}
both_backends!(
    compact_migration,
    lease_rows_before_0013_are_dropped_and_old_chains_verify
);
