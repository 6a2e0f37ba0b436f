//! The audit witness against someone with write access to the database:
//! cutting the log's tail, deleting its checkpoint rows and moving the chain
//! head back leaves a database that verifies on its own, but not against the
//! witness, whose checkpoints name what is gone.

use std::os::unix::fs::PermissionsExt as _;

use tokenvault::audit::WitnessRecord;
use tokenvault::proto::v1 as pb;

use crate::both_backends;
use crate::support::audit_fill_to as fill_to;
use crate::support::raw::RawDb;
use crate::support::{As, Backend, TestVault, spawn_vault_with};

/// A signed checkpoint every this many entries.
const EVERY: u64 = 4;

/// The records in the vault's witness file, in file order.
fn witness_records(tv: &TestVault) -> Vec<WitnessRecord> {
    let text = std::fs::read_to_string(tv.config.audit_witness_path()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

async fn a_cut_tail_is_named_by_the_witness(backend: Backend) {
    let Some(tv) = spawn_vault_with(backend, |c| c.audit.checkpoint_every = EVERY).await else {
        return;
    };
    fill_to(&tv, 20).await;
    let witness = tv.config.audit_witness_path();
    assert_eq!(witness, tv.dir.path().join("audit-witness.jsonl"));
    let mode = std::fs::metadata(&witness).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode & 0o077, 0, "the witness has mode {mode:04o}");

    // Each checkpoint is witnessed by the time the append of its entry
    // returns, exactly as the database holds it.
    let records = witness_records(&tv);
    let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![4, 8, 12, 16, 20], "{records:?}");
    let witnessed: Vec<_> = records.iter().map(|r| r.checkpoint().unwrap()).collect();
    let stored = tv.vault.store().audit_checkpoints(1, 20).await.unwrap();
    assert_eq!(witnessed, stored);
    assert!(
        records.iter().all(|r| r.replica.starts_with("vault-")),
        "{records:?}"
    );

    let clean = tv.vault.audit_verify(1, None).await.unwrap();
    assert!(clean.ok(), "{clean:?}");
    assert_eq!(clean.checkpoints_witnessed, 5, "{clean:?}");
    assert_eq!(clean.witness_files, vec![witness.clone()]);
    let public_key = hex::encode(&clean.checkpoint_public_key);
    assert!(records.iter().all(|r| r.public_key == public_key));

    // The attacker deletes every entry after 10 and their checkpoints, and
    // moves the chain head back to entry 10.
    let raw = RawDb::open(&tv).await;
    raw.execute("DELETE FROM audit_log WHERE seq > 10").await;
    raw.execute("DELETE FROM audit_checkpoints WHERE seq > 10")
        .await;
    raw.execute(
        "UPDATE audit_head SET seq = 10, \
         entry_hash = (SELECT entry_hash FROM audit_log WHERE seq = 10) WHERE id = 1",
    )
    .await;

    // The database on its own verifies...
    let alone = tokenvault::audit::verify_chain(
        tv.vault.store().as_ref(),
        tv.vault.keyring().as_ref(),
        1,
        None,
    )
    .await
    .unwrap();
    assert!(alone.ok(), "{alone:?}");

    // ...against the witness it does not, which names the first checkpoint
    // missing and where it was witnessed.
    let cut = tv.vault.audit_verify(1, None).await.unwrap();
    assert!(!cut.ok(), "{cut:?}");
    assert_eq!(cut.first_broken_seq, Some(11), "{cut:?}");
    assert!(cut.detail.contains("tail was cut"), "{cut:?}");
    assert!(cut.detail.contains("checkpoint at seq 12 "), "{cut:?}");
    assert!(
        cut.detail.contains(&witness.display().to_string()),
        "{cut:?}"
    );

    // So does the admin API (which audits the call first, as entry 11); the
    // CLI prints this answer and exits 1, as for any broken chain.
    let rpc = tv
        .admin(As::Auditor)
        .verify_audit(pb::VerifyAuditRequest {
            from_seq: None,
            to_seq: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!rpc.ok, "{rpc:?}");
    assert!(rpc.first_broken_seq.is_some_and(|s| s <= 12), "{rpc:?}");
    assert!(rpc.detail.contains("tail was cut"), "{rpc:?}");
    assert!(rpc.detail.contains("checkpoint at seq 12 "), "{rpc:?}");
    assert_eq!(rpc.witness_files, vec![witness.display().to_string()]);

    // Writing the log on over the cut does not hide it: the new checkpoint
    // at 12 is not the one witnessed there.
    fill_to(&tv, 12).await;
    let regrown = tv.vault.audit_verify(1, None).await.unwrap();
    assert!(!regrown.ok(), "{regrown:?}");
    assert_eq!(regrown.first_broken_seq, Some(12), "{regrown:?}");
    assert!(
        regrown.detail.contains("checkpoint at seq 12 ")
            && regrown.detail.contains("differs from the database's"),
        "{regrown:?}"
    );
    raw.close().await;

    // It is the witness that catches the cut: without it, the same database
    // verifies.
    std::fs::remove_file(&witness).unwrap();
    let unwitnessed = tv.vault.audit_verify(1, None).await.unwrap();
    assert!(unwitnessed.ok(), "{unwitnessed:?}");
    assert!(
        unwitnessed.detail.contains("no witness file"),
        "{unwitnessed:?}"
    );
}
both_backends!(audit_witness, a_cut_tail_is_named_by_the_witness);
