//! The audit log of a fleet on one PostgreSQL: each vault's audit writer
//! appends to a chain of its own, the chains name each other's signed
//! checkpoints, and `audit verify`, the archive, queries and follows treat
//! them as one log. A chain cut short or removed below a point another chain
//! recorded is named even with no witness at hand.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokenvault::audit::{Actor, Outcome, verify_chain};
use tokenvault::store::AuditFilter;
use tokenvault::store::audit::{chain_of, chain_range};
use tokenvault::vault::{FollowFrom, Vault};

use crate::support::raw::RawDb;
use crate::support::{Backend, TestVault, spawn_vault_with};

/// A checkpoint every this many entries of a chain.
const EVERY: u64 = 5;

/// The first entry of chain 1.
fn chain_1() -> i64 {
    *chain_range(1).start()
}

async fn record(v: &Vault, who: &str, n: usize) -> Vec<i64> {
    let actor = Actor {
        identity: who.to_owned(),
        role: "system".to_owned(),
    };
    let mut seqs = Vec::with_capacity(n);
    for i in 0..n {
        seqs.push(
            v.audit()
                .record(&actor, "test.append", who, Outcome::Ok, i.to_string())
                .await
                .unwrap(),
        );
    }
    seqs
}

/// A vault whose writer holds chain 0, and a second vault on its database,
/// whose writer holds chain 1 (with a witness file of its own, as a replica
/// on another host has).
async fn two_writers(
    adjust: impl FnOnce(&mut tokenvault::config::Config),
) -> Option<(TestVault, Arc<Vault>)> {
    let tv = spawn_vault_with(Backend::Postgres, |c| {
        c.audit.checkpoint_every = EVERY;
        adjust(c);
    })
    .await?;
    assert_eq!(chain_of(record(&tv.vault, "a", 1).await[0]), 0);
    let mut config = tv.config.clone();
    config.audit.witness_file = Some(tv.dir.path().join("other-witness.jsonl"));
    let other = Vault::open(&config).await.expect("second vault");
    assert_eq!(chain_of(record(&other, "b", 1).await[0]), 1);
    Some((tv, other))
}

/// The references chain `chain`'s cross-reference entries make, newest last.
async fn cross_references(v: &Vault, chain: i64) -> Vec<String> {
    let range = chain_range(chain);
    v.store()
        .audit_query(
            &AuditFilter {
                action_prefix: Some(tokenvault::audit::chains::CROSS_REFERENCE.to_owned()),
                after_seq: Some(range.start() - 1),
                before_seq: Some(range.end() + 1),
                ascending: true,
                ..AuditFilter::default()
            },
            1_000,
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.draft.detail)
        .collect()
}

async fn verify(v: &Vault) -> tokenvault::audit::VerifyReport {
    verify_chain(v.store().as_ref(), v.keyring().as_ref(), 1, None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_writer_appends_to_a_chain_of_its_own_and_the_chains_verify_as_one_log() {
    let Some((tv, other)) = two_writers(|_| {}).await else {
        return;
    };
    let mut tasks = Vec::new();
    for (name, vault) in [("a", tv.vault.clone()), ("b", other.clone())] {
        for _ in 0..3 {
            let vault = vault.clone();
            tasks.push(tokio::spawn(async move {
                (name, record(&vault, name, 20).await)
            }));
        }
    }
    for t in tasks {
        let (name, seqs) = t.await.unwrap();
        let want = if name == "a" { 0 } else { 1 };
        assert!(
            seqs.iter().all(|s| chain_of(*s) == want),
            "{name}: {seqs:?}"
        );
    }
    let heads = tv.vault.store().audit_heads().await.unwrap();
    assert_eq!(
        heads.iter().map(|h| h.chain).collect::<Vec<_>>(),
        vec![0, 1],
        "{heads:?}"
    );
    // Each chain named the other's checkpoints as it passed its own.
    assert!(!cross_references(&tv.vault, 0).await.is_empty());
    assert!(!cross_references(&tv.vault, 1).await.is_empty());

    let report = verify(&tv.vault).await;
    assert!(report.ok(), "{report:?}");
    assert!(report.entries_checked >= 122, "{report:?}");
    // The first vault's witness holds a checkpoint of the second's chain
    // too, and the verification with it agrees.
    let witnessed = tokenvault::audit::read_witness(&tv.config.audit_witness_path())
        .await
        .unwrap()
        .unwrap();
    assert!(
        witnessed
            .checkpoints
            .iter()
            .any(|w| chain_of(w.checkpoint.seq) == 1),
        "{:?}",
        witnessed.checkpoints
    );
    let with_witness = tv.vault.audit_verify(1, None).await.unwrap();
    assert!(with_witness.ok(), "{with_witness:?}");
    assert!(with_witness.checkpoints_witnessed > 0, "{with_witness:?}");
    assert!(report.detail.contains("in 2 chains"), "{report:?}");
    assert!(
        !report.detail.contains(" 0 cross-references"),
        "no reference was checked: {report:?}"
    );
    other.shutdown().await;
}

/// Chain 1's last signed checkpoint that chain 0 names, after each has
/// written 20 entries, chain 1 first.
async fn chain_0_names_chain_1(tv: &TestVault, other: &Vault) -> i64 {
    record(other, "b", 20).await;
    record(&tv.vault, "a", 20).await;
    let named = cross_references(&tv.vault, 0).await;
    let last = named.last().expect("chain 0 names chain 1");
    let seq: i64 = last.split(' ').nth(3).unwrap().parse().unwrap();
    assert_eq!(chain_of(seq), 1, "{last}");
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_cut_short_below_a_checkpoint_another_chain_names_is_found() {
    let Some((tv, other)) = two_writers(|_| {}).await else {
        return;
    };
    let named = chain_0_names_chain_1(&tv, &other).await;
    other.shutdown().await;
    assert!(verify(&tv.vault).await.ok());

    // Someone with database access cuts chain 1 back below the checkpoint
    // chain 0 named, with its checkpoints, and moves its head back: on its
    // own the chain is consistent.
    let keep = named - 3;
    let raw = RawDb::open(&tv).await;
    let end = *chain_range(1).end();
    raw.execute(&format!(
        "DELETE FROM audit_checkpoints WHERE seq > {keep} AND seq <= {end}"
    ))
    .await;
    raw.execute(&format!(
        "DELETE FROM audit_log WHERE seq > {keep} AND seq <= {end}"
    ))
    .await;
    raw.execute(&format!(
        "UPDATE audit_head SET seq = {keep}, \
         entry_hash = (SELECT entry_hash FROM audit_log WHERE seq = {keep}) WHERE id = 2"
    ))
    .await;
    let report = verify(&tv.vault).await;
    assert_eq!(report.first_broken_seq, Some(keep + 1), "{report:?}");
    assert!(
        report.detail.contains("audit chain 1 was cut short"),
        "{report:?}"
    );
    assert!(report.detail.contains(&named.to_string()), "{report:?}");

    // Removed whole, head and all: named too.
    raw.execute(&format!(
        "DELETE FROM audit_checkpoints WHERE seq >= {} AND seq <= {end}",
        chain_1()
    ))
    .await;
    raw.execute(&format!(
        "DELETE FROM audit_log WHERE seq >= {} AND seq <= {end}",
        chain_1()
    ))
    .await;
    raw.execute("DELETE FROM audit_head WHERE id = 2").await;
    let report = verify(&tv.vault).await;
    assert_eq!(report.first_broken_seq, Some(named), "{report:?}");
    assert!(
        report.detail.contains("audit chain 1 is gone"),
        "{report:?}"
    );
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_break_inside_the_second_chain_is_named_at_its_entry() {
    let Some((tv, other)) = two_writers(|_| {}).await else {
        return;
    };
    chain_0_names_chain_1(&tv, &other).await;
    other.shutdown().await;
    let edited = chain_1() + 7;
    let raw = RawDb::open(&tv).await;
    raw.execute(&format!(
        "UPDATE audit_log SET detail = 'rewritten' WHERE seq = {edited}"
    ))
    .await;
    let report = verify(&tv.vault).await;
    assert_eq!(report.first_broken_seq, Some(edited), "{report:?}");
    assert!(report.detail.contains("do not match"), "{report:?}");
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_chain_is_archived_in_segments_of_its_own_and_verified_read_as_one_log() {
    let Some((tv, other)) = two_writers(|c| {
        c.audit.archive_dir = Some(c.data_dir.join("archive"));
        c.audit.hot_retention_seconds = 1;
        c.audit.segment_max_entries = 10;
        c.audit.archive_interval_seconds = 86_400;
    })
    .await
    else {
        return;
    };
    let b = record(&other, "b", 24).await;
    let a = record(&tv.vault, "a", 24).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let pass = tv.vault.audit_archive_pass().await.unwrap();
    assert!(pass.segments >= 4, "{pass:?}");
    let store = tv.vault.store();
    let segments = store.audit_segments().await.unwrap();
    for chain in [0, 1] {
        let of_chain: Vec<_> = segments
            .iter()
            .filter(|s| chain_of(s.first_seq) == chain)
            .collect();
        assert!(of_chain.len() >= 2, "chain {chain}: {segments:?}");
        assert_eq!(of_chain[0].first_seq, *chain_range(chain).start());
        assert!(of_chain.iter().all(|s| chain_of(s.last_seq) == chain));
        let first_live = store.audit_first_live(chain).await.unwrap().unwrap();
        assert_eq!(first_live, of_chain.last().unwrap().last_seq + 1);
    }

    let report = tv.vault.audit_verify(1, None).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(report.detail.contains("chain 1:"), "{report:?}");

    // One read of everything: archive and live table, both chains, each
    // entry once, merged by time, each chain's in sequence order.
    let (rows, newest) = tv
        .vault
        .audit_query(
            &AuditFilter {
                ascending: true,
                ..AuditFilter::default()
            },
            1_000,
        )
        .await
        .unwrap();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    // Chain 1's entries were all written before chain 0's.
    let at = |seq: i64| seqs.iter().position(|s| *s == seq).unwrap();
    assert!(at(*b.last().unwrap()) < at(a[0]), "{seqs:?}");
    assert!(seqs.iter().all(|s| *s <= newest));
    for chain in [0, 1] {
        let of_chain: Vec<i64> = seqs
            .iter()
            .copied()
            .filter(|s| chain_of(*s) == chain)
            .collect();
        let first = *chain_range(chain).start();
        let want: Vec<i64> = (first..first + of_chain.len() as i64).collect();
        assert_eq!(
            of_chain, want,
            "chain {chain}: every entry, archived or live, once"
        );
        assert!(of_chain.len() >= 25, "chain {chain}: {of_chain:?}");
    }

    // A segment of chain 1 goes missing: named at its first entry.
    let first_of_1 = segments
        .iter()
        .find(|s| chain_of(s.first_seq) == 1)
        .unwrap();
    std::fs::remove_file(
        tv.config
            .audit
            .archive_dir
            .as_ref()
            .unwrap()
            .join(&first_of_1.file_name),
    )
    .unwrap();
    let report = tv.vault.audit_verify(1, None).await.unwrap();
    assert_eq!(report.first_broken_seq, Some(chain_1()), "{report:?}");
    assert!(report.detail.contains("is missing"), "{report:?}");
    other.shutdown().await;
}

/// Entries a follow receives within a few seconds, until `want` are in.
async fn follow_until(
    rx: &mut tokio::sync::mpsc::Receiver<
        Result<tokenvault::vault::AuditBatch, tokenvault::domain::VaultError>,
    >,
    want: &BTreeSet<i64>,
) -> Vec<i64> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !want.iter().all(|s| seen.contains(s)) {
        let batch = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("saw {seen:?}, waiting for {want:?}"))
            .expect("follow ended")
            .unwrap();
        seen.extend(batch.rows.iter().map(|r| r.seq));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_sees_every_chain_and_resumes_each_where_it_left_off() {
    let Some((tv, other)) = two_writers(|_| {}).await else {
        return;
    };
    let mut rx = tv.vault.audit_follow(FollowFrom::Newest(0)).await.unwrap();
    // Chain 1's entry is numbered far above chain 0's, and chain 0's commits
    // after it: a follow by one position would skip it.
    let b = record(&other, "b", 1).await[0];
    tokio::time::sleep(Duration::from_millis(700)).await;
    let a = record(&tv.vault, "a", 1).await[0];
    let seen = follow_until(&mut rx, &BTreeSet::from([a, b])).await;
    drop(rx);
    let unique: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "each once: {seen:?}");

    // Resuming after the last entry of each chain sends what came after,
    // once.
    let later = [
        record(&tv.vault, "a", 1).await[0],
        record(&other, "b", 1).await[0],
    ];
    let mut rx = tv
        .vault
        .audit_follow(FollowFrom::After(vec![a, b]))
        .await
        .unwrap();
    let seen = follow_until(&mut rx, &later.into_iter().collect()).await;
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, seen, "in order, each once: {seen:?}");
    assert!(seen.iter().all(|s| s > &a), "{seen:?}");
    assert!(!seen.contains(&b), "{seen:?}");

    // Resuming past a chain's newest entry is refused.
    let past = tv
        .vault
        .audit_follow(FollowFrom::After(vec![later[1] + 100]))
        .await
        .unwrap_err();
    assert!(past.to_string().contains("past the newest entry"), "{past}");
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_merge_the_chains_by_time_and_page_through_each_once() {
    use tokenvault::proto::v1 as pb;
    let Some((tv, other)) = two_writers(|_| {}).await else {
        return;
    };
    // Alternate the writers, so the newest entries are in both chains.
    for _ in 0..6 {
        record(&tv.vault, "a", 1).await;
        record(&other, "b", 1).await;
    }
    let bearer = crate::support::Bearer(Some(
        format!("Bearer {}", crate::support::As::Auditor.key())
            .parse()
            .unwrap(),
    ));
    let mut admin =
        pb::admin_service_client::AdminServiceClient::with_interceptor(tv.channel.clone(), bearer);
    let page = |token: String| pb::QueryAuditRequest {
        action: Some("test.append".to_owned()),
        newest_first: true,
        page_size: 3,
        page_token: token,
        ..Default::default()
    };
    let first = admin
        .query_audit(page(String::new()))
        .await
        .unwrap()
        .into_inner();
    let chains: BTreeSet<i64> = first
        .entries
        .iter()
        .map(|e| chain_of(e.seq as i64))
        .collect();
    assert_eq!(
        chains,
        BTreeSet::from([0, 1]),
        "the newest of both chains: {first:?}"
    );

    // Every page on: each entry once, each chain's in its order, newest first.
    let mut seen: Vec<pb::AuditEntry> = first.entries;
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let next = admin.query_audit(page(token)).await.unwrap().into_inner();
        seen.extend(next.entries);
        token = next.next_page_token;
    }
    for chain in [0, 1] {
        let of_chain: Vec<u64> = seen
            .iter()
            .map(|e| e.seq)
            .filter(|s| chain_of(*s as i64) == chain)
            .collect();
        assert_eq!(of_chain.len(), 7, "chain {chain}: {of_chain:?}");
        assert!(
            of_chain.windows(2).all(|w| w[0] > w[1]),
            "chain {chain}: {of_chain:?}"
        );
    }
    let times: Vec<i64> = seen
        .iter()
        .map(|e| {
            let at = e.at.as_ref().unwrap();
            at.seconds * 1_000_000 + i64::from(at.nanos / 1_000)
        })
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    other.shutdown().await;
}
