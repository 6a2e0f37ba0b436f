//! Verification of the audit chain: recomputes every hash and MAC, checks the
//! signed checkpoints in the range, and names the first entry that does not
//! match; then compares the database with the audit witness, which names a
//! tail that was cut off together with its checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::crypto::{KeyringProvider, MacPurpose};
use crate::domain::VaultError;
use crate::store::{AuditCheckpoint, AuditRow, AuditStore};

use super::checkpoint::{CheckpointSigner, signature_valid};
use super::{archive, entry_hash, witness};

use crate::store::audit::GENESIS_HASH;

/// Entries read per page while verifying.
const PAGE: i64 = 1000;

/// The result of verifying (a range of) the audit chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries checked (up to and including the first broken one).
    pub entries_checked: u64,
    /// The first entry that failed, if any.
    pub first_broken_seq: Option<i64>,
    /// What failed there, or a summary.
    pub detail: String,
    /// The range verified (both inclusive; `to_seq < from_seq` when empty).
    pub from_seq: i64,
    /// See `from_seq`.
    pub to_seq: i64,
    /// Signed checkpoints verified within the range.
    pub checkpoints_verified: u64,
    /// The Ed25519 public key that verifies this vault's checkpoints.
    pub checkpoint_public_key: Vec<u8>,
    /// Signed checkpoints within the range that a witness file holds and the
    /// database holds alike (see [`verify_with_witness`]).
    pub checkpoints_witnessed: u64,
    /// The witness files compared with the database.
    pub witness_files: Vec<PathBuf>,
}

impl VerifyReport {
    /// Whether the chain verified.
    pub fn ok(&self) -> bool {
        self.first_broken_seq.is_none()
    }
}

/// Verifies entries `from_seq..=to_seq` (clamped to the chain head). Starting
/// above 1 takes the first entry's previous hash from the entry before it as
/// stored (or from the archive's last segment), which the first entry's own
/// hash and MAC must then agree with. Every signed checkpoint in the range must match the entry it
/// names, and no checkpoint may lie beyond the chain head (a truncated log).
///
/// Entries up to the last archived segment's are the archive's to prove
/// (`verify_with_witness`); the live table is checked after them, its first
/// entry linking to the segment's last hash.
pub async fn verify_chain(
    store: &dyn AuditStore,
    keyring: &dyn KeyringProvider,
    from_seq: i64,
    to_seq: Option<i64>,
) -> Result<VerifyReport, VaultError> {
    let archived = store
        .audit_segment_last()
        .await?
        .map(|s| (s.last_seq, s.last_hash));
    verify_live(store, keyring, from_seq, to_seq, archived).await
}

/// [`verify_chain`] after an archive whose last segment ends at the entry
/// and hash `archived` (as read once by the caller, so that archive and live
/// table are checked against the same snapshot: entries an archiver prunes
/// meanwhile show up as missing, never as unchecked).
async fn verify_live(
    store: &dyn AuditStore,
    keyring: &dyn KeyringProvider,
    from_seq: i64,
    to_seq: Option<i64>,
    archived: Option<(i64, Vec<u8>)>,
) -> Result<VerifyReport, VaultError> {
    let (head_seq, head_hash) = store.audit_head().await?;
    let public_key = CheckpointSigner::new(keyring, 1).public_key();
    let archived_to = archived.as_ref().map_or(0, |(seq, _)| *seq);
    let from = from_seq.max(1).max(archived_to + 1);
    let to = to_seq.unwrap_or(head_seq).min(head_seq);
    let mut report = VerifyReport {
        entries_checked: 0,
        first_broken_seq: None,
        detail: String::new(),
        from_seq: from,
        to_seq: to,
        checkpoints_verified: 0,
        checkpoint_public_key: public_key.clone(),
        checkpoints_witnessed: 0,
        witness_files: Vec::new(),
    };
    let broken = |mut report: VerifyReport, seq: i64, detail: String| {
        report.first_broken_seq = Some(seq);
        report.detail = detail;
        Ok(report)
    };

    // A checkpoint beyond the head vouches for entries that are gone.
    if let Some(last) = store.audit_checkpoint_last().await?
        && last.seq > head_seq
    {
        let why = if signature_valid(&last, &public_key) {
            format!(
                "entries after {head_seq} are missing: a signed checkpoint vouches for entry {}",
                last.seq
            )
        } else {
            format!(
                "a checkpoint past the chain head (entry {}) does not carry this vault's signature",
                last.seq
            )
        };
        return broken(report, head_seq + 1, why);
    }

    let mut checkpoints: BTreeMap<i64, _> = store
        .audit_checkpoints(from, to)
        .await?
        .into_iter()
        .map(|c| (c.seq, c))
        .collect();
    let mut expected_seq = from;
    let mut prev: Option<Vec<u8>> = match archived {
        Some((seq, hash)) if from == seq + 1 => Some(hash),
        _ => None,
    };
    while expected_seq <= to {
        let rows = store.audit_range(expected_seq, to, PAGE).await?;
        if rows.is_empty() {
            return broken(report, expected_seq, "entry missing".to_owned());
        }
        for row in rows {
            if row.seq != expected_seq {
                return broken(report, expected_seq, "entry missing".to_owned());
            }
            report.entries_checked += 1;
            if let Some(p) = &prev {
                if &row.prev_hash != p {
                    return broken(
                        report,
                        row.seq,
                        "previous-hash link does not match the entry before it".to_owned(),
                    );
                }
            } else if row.seq == 1 && row.prev_hash != GENESIS_HASH {
                return broken(
                    report,
                    row.seq,
                    "first entry links to a predecessor".to_owned(),
                );
            }
            let hash = match check_entry(keyring, &row) {
                Ok(hash) => hash,
                Err(why) => return broken(report, row.seq, why.to_owned()),
            };
            if let Some(c) = checkpoints.remove(&row.seq) {
                if let Err(why) = check_checkpoint(&c, &public_key, &hash) {
                    return broken(report, row.seq, why.to_owned());
                }
                report.checkpoints_verified += 1;
            }
            expected_seq += 1;
            prev = Some(hash);
        }
    }
    if to == head_seq
        && head_seq > 0
        && head_seq >= from
        && prev.as_deref() != Some(head_hash.as_slice())
    {
        return broken(
            report,
            head_seq,
            "chain head does not match the last entry".to_owned(),
        );
    }
    report.detail = format!(
        "{} entries verified ({}..={}), {} signed checkpoints",
        report.entries_checked, from, to, report.checkpoints_verified
    );
    Ok(report)
}

/// Checks a stored entry's hash against its contents and its MAC under the
/// audit key: the entry's hash, or what is wrong with it. (Its link to the
/// entry before is the caller's to check.)
pub(super) fn check_entry(
    keyring: &dyn KeyringProvider,
    row: &AuditRow,
) -> Result<Vec<u8>, &'static str> {
    let hash = entry_hash(row.seq, &row.prev_hash, &row.draft);
    if hash != row.entry_hash {
        return Err("entry contents do not match its hash");
    }
    if !keyring.mac_verify(MacPurpose::AuditChain, &hash, &row.mac) {
        return Err("entry MAC does not verify under the audit key");
    }
    Ok(hash)
}

/// Checks a signed checkpoint against this vault's public key and the hash
/// of the entry it names.
pub(super) fn check_checkpoint(
    c: &AuditCheckpoint,
    public_key: &[u8],
    hash: &[u8],
) -> Result<(), &'static str> {
    if !signature_valid(c, public_key) {
        return Err("the signed checkpoint of this entry does not verify");
    }
    if c.entry_hash != hash {
        return Err("entry does not match its signed checkpoint");
    }
    Ok(())
}

/// Verifies the chain as [`verify_chain`] does and, if it verifies, compares
/// the database with the audit witness files `witness_files` (see the
/// `witness` module): every checkpoint a witness holds must carry this
/// vault's signature; one past the chain head means the log's tail was cut
/// off, its checkpoints deleted and the head moved back; one within the range
/// must be in the database, unchanged. The first disagreement, by sequence
/// number, fails the report, naming the checkpoint, when it was signed and
/// where it was witnessed. A witness file that does not exist checks
/// nothing, and the summary says so.
///
/// Entries moved to the archive (see the `archive` module) are checked there
/// when `archive_dir` is given, from entry 1, before the live table, as one
/// chain; without it the summary says which entries went unchecked. The
/// whole archive is checked whatever the range (a break in it fails the
/// report). An archiver that moves entries out of the live table while this
/// runs (on another replica; this replica's waits) makes entries look
/// missing: a failed verification during which the archive grew is run
/// again, up to three times in all.
pub async fn verify_with_witness(
    store: &dyn AuditStore,
    keyring: &dyn KeyringProvider,
    from_seq: i64,
    to_seq: Option<i64>,
    witness_files: &[PathBuf],
    archive_dir: Option<&Path>,
) -> Result<VerifyReport, VaultError> {
    let archived_to =
        || async { Ok::<_, VaultError>(store.audit_segment_last().await?.map(|s| s.last_seq)) };
    let mut attempt = 1;
    loop {
        let before = archived_to().await?;
        let report =
            verify_once(store, keyring, from_seq, to_seq, witness_files, archive_dir).await?;
        if report.ok() || attempt == 3 || archived_to().await? == before {
            return Ok(report);
        }
        attempt += 1;
    }
}

async fn verify_once(
    store: &dyn AuditStore,
    keyring: &dyn KeyringProvider,
    from_seq: i64,
    to_seq: Option<i64>,
    witness_files: &[PathBuf],
    archive_dir: Option<&Path>,
) -> Result<VerifyReport, VaultError> {
    let segments = store.audit_segments().await?;
    let archived_to = segments.last().map_or(0, |s| s.last_seq);
    let mut archived_checkpoints: Option<BTreeMap<i64, AuditCheckpoint>> = None;
    let mut archive_notes = Vec::new();
    let mut archive_counts = (0, 0);
    if archived_to >= from_seq.max(1) {
        let public_key = CheckpointSigner::new(keyring, 1).public_key();
        match archive_dir {
            Some(dir) => {
                let a = archive::verify_archive(&segments, dir, keyring, &public_key).await;
                let checkpoints = a.checkpoints.len() as u64 + a.seals;
                if let Some((seq, why)) = a.broken {
                    let (head_seq, _) = store.audit_head().await?;
                    return Ok(VerifyReport {
                        entries_checked: a.entries,
                        first_broken_seq: Some(seq),
                        detail: why,
                        from_seq: 1,
                        to_seq: to_seq.unwrap_or(head_seq).min(head_seq),
                        checkpoints_verified: checkpoints,
                        checkpoint_public_key: public_key,
                        checkpoints_witnessed: 0,
                        witness_files: witness_files.to_vec(),
                    });
                }
                archive_notes.push(format!(
                    "entries 1..={archived_to} verified in {} sealed archive segments under {}",
                    a.segments,
                    dir.display()
                ));
                if let Some(first) = a.unrecorded.first() {
                    archive_notes.push(format!(
                        "{} files in the archive directory that no recorded segment names \
                         (the first: {first}), ignored",
                        a.unrecorded.len()
                    ));
                }
                archive_counts = (a.entries, checkpoints);
                archived_checkpoints = Some(a.checkpoints);
            }
            None => archive_notes.push(format!(
                "entries 1..={archived_to} are archived in {} segments and were not checked \
                 here: this replica has no audit.archive_dir",
                segments.len()
            )),
        }
    }
    let archived = segments.last().map(|s| (s.last_seq, s.last_hash.clone()));
    let mut report = verify_live(store, keyring, from_seq, to_seq, archived).await?;
    report.witness_files = witness_files.to_vec();
    if !report.ok() {
        return Ok(report);
    }
    if archived_checkpoints.is_some() {
        report.from_seq = 1;
        report.entries_checked += archive_counts.0;
        report.checkpoints_verified += archive_counts.1;
    }
    if !archive_notes.is_empty() {
        report.detail = format!("{}; {}", report.detail, archive_notes.join("; "));
    }
    if witness_files.is_empty() {
        return Ok(report);
    }
    // The witnesses are read before the head: a checkpoint is witnessed only
    // once it has committed, so every one witnessed by now is at or below the
    // head read next, unless entries were taken away.
    let mut witnessed = Vec::new();
    let mut notes = Vec::new();
    for path in witness_files {
        match witness::read(path).await {
            Ok(Some(contents)) => {
                if let Some(first) = contents.unreadable.first() {
                    notes.push(format!(
                        "{}: {} lines that are not checkpoint records ignored (the first: line {first})",
                        path.display(),
                        contents.unreadable.len()
                    ));
                }
                witnessed.extend(contents.checkpoints);
            }
            Ok(None) => notes.push(format!("no witness file at {}", path.display())),
            Err(e) => {
                return Err(VaultError::precondition(format!(
                    "the audit witness {} cannot be read: {e}",
                    path.display()
                )));
            }
        }
    }
    witnessed.sort_by_key(|w| w.checkpoint.seq);
    let (head_seq, _) = store.audit_head().await?;
    let (from, to) = (report.from_seq, report.to_seq);
    let in_range: Vec<i64> = witnessed
        .iter()
        .map(|w| w.checkpoint.seq)
        .filter(|seq| (from..=to).contains(seq))
        .collect();
    let mut stored: BTreeMap<i64, _> = match (in_range.first(), in_range.last()) {
        (Some(&lo), Some(&hi)) => store
            .audit_checkpoints(lo, hi)
            .await?
            .into_iter()
            .map(|c| (c.seq, c))
            .collect(),
        _ => BTreeMap::new(),
    };
    // Pruned entries' checkpoints are in the archive (the prune may lag, so
    // the live table can hold a few of them too, alike). When the archive
    // was not checked, the range starts after it.
    stored.extend(archived_checkpoints.unwrap_or_default());
    let mut matched = BTreeSet::new();
    for w in &witnessed {
        let c = &w.checkpoint;
        let named = format!(
            "checkpoint at seq {} (signed at {}, witnessed in {} line {})",
            c.seq,
            c.signed_at,
            w.file.display(),
            w.line
        );
        if !signature_valid(c, &report.checkpoint_public_key) {
            return Ok(broken_at(
                report,
                c.seq,
                format!(
                    "the audit witness holds a {named} that this vault did not sign \
                     (a witness of another vault, or a forged line)"
                ),
            ));
        }
        if c.seq > head_seq {
            return Ok(broken_at(
                report,
                head_seq + 1,
                format!(
                    "the audit log's tail was cut: {named} is missing from the database, \
                     whose last entry is {head_seq}"
                ),
            ));
        }
        if !(from..=to).contains(&c.seq) {
            continue;
        }
        match stored.get(&c.seq) {
            None => {
                return Ok(broken_at(
                    report,
                    c.seq,
                    format!("{named} is missing from the database"),
                ));
            }
            Some(s) if s != c => {
                return Ok(broken_at(
                    report,
                    c.seq,
                    format!(
                        "{named} differs from the database's: the log was cut before seq {} \
                         and written again",
                        c.seq
                    ),
                ));
            }
            Some(_) => {
                matched.insert(c.seq);
            }
        }
    }
    report.checkpoints_witnessed = matched.len() as u64;
    report.detail.push_str(&format!(
        "; {} of them held alike by the audit witness",
        report.checkpoints_witnessed
    ));
    for note in notes {
        report.detail.push_str("; ");
        report.detail.push_str(&note);
    }
    Ok(report)
}

/// `report`, failed at `seq` for `detail`.
fn broken_at(mut report: VerifyReport, seq: i64, detail: String) -> VerifyReport {
    report.first_broken_seq = Some(seq);
    report.detail = detail;
    report
}
