//! Verification of the audit chain: recomputes every hash and MAC, checks the
//! signed checkpoints in the range, and names the first entry that does not
//! match; then compares the database with the audit witness, which names a
//! tail that was cut off together with its checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::crypto::{KeyringProvider, MacPurpose};
use crate::domain::VaultError;
use crate::store::audit::{GENESIS_HASH, chain_of, chain_position, chain_range};
use crate::store::{AuditCheckpoint, AuditHead, AuditRow, AuditSegment, AuditStore};

use super::chains::{self, CrossRef};
use super::checkpoint::{CheckpointSigner, signature_valid};
use super::{archive, entry_hash, witness};

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

/// What verifying the chains one by one collected, for the checks across
/// them.
#[derive(Debug, Default)]
struct Collected {
    /// Every reference a verified entry makes to another chain's checkpoint.
    refs: Vec<CrossRef>,
    /// Every checkpoint verified against its entry, by sequence number: its
    /// entry's hash.
    checkpoints: BTreeMap<i64, Vec<u8>>,
    /// The ranges of entries verified (both inclusive).
    verified: Vec<(i64, i64)>,
}

impl Collected {
    fn covers(&self, seq: i64) -> bool {
        self.verified
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&seq))
    }
}

/// Verifies entries `from_seq..=to_seq` of every chain (each clamped to the
/// chain's head; see `store::audit` for how sequence numbers name chains).
/// Starting within a chain takes its first entry's previous hash from the
/// entry before it as stored (or from the chain's last archived segment),
/// which the first entry's own hash and MAC must then agree with. Every
/// signed checkpoint in the range must match the entry it names, no
/// checkpoint may lie beyond its chain's head (a truncated log), and every
/// reference one chain makes to another's checkpoint (see the `chains`
/// module) must match it.
///
/// Entries up to each chain's last archived segment's are the archive's to
/// prove (`verify_with_witness`); the live table is checked after them, its
/// first entry linking to the segment's last hash.
pub async fn verify_chain(
    store: &dyn AuditStore,
    keyring: &dyn KeyringProvider,
    from_seq: i64,
    to_seq: Option<i64>,
) -> Result<VerifyReport, VaultError> {
    let segments = store.audit_segments().await?;
    let (report, _) = verify_live(
        store,
        keyring,
        from_seq,
        to_seq,
        &segments,
        Collected::default(),
    )
    .await?;
    Ok(report)
}

/// [`verify_chain`] after an archive whose segments are `segments` (as read
/// once by the caller, so that archive and live table are checked against
/// the same snapshot: entries an archiver prunes meanwhile show up as
/// missing, never as unchecked), with what verifying the archive collected.
async fn verify_live(
    store: &dyn AuditStore,
    keyring: &dyn KeyringProvider,
    from_seq: i64,
    to_seq: Option<i64>,
    segments: &[AuditSegment],
    mut collected: Collected,
) -> Result<(VerifyReport, Collected), VaultError> {
    // Each chain's newest checkpoint is read before the heads: one committed
    // by then is at or below its chain's head read next, unless entries
    // were taken away (read after, a busy chain's newest checkpoint could be
    // past the head read while another chain was walked).
    let mut newest_checkpoints = BTreeMap::new();
    for head in store.audit_heads().await? {
        if let Some(c) = store.audit_checkpoint_last(head.chain).await? {
            newest_checkpoints.insert(head.chain, c);
        }
    }
    // One statement, so one snapshot of every head: an entry of one chain
    // read below names only checkpoints of another at or below its head.
    let heads = store.audit_heads().await?;
    let public_key = CheckpointSigner::new(keyring, 1).public_key();
    let mut report = VerifyReport {
        entries_checked: 0,
        first_broken_seq: None,
        detail: String::new(),
        from_seq: from_seq.max(1),
        to_seq: 0,
        checkpoints_verified: 0,
        checkpoint_public_key: public_key.clone(),
        checkpoints_witnessed: 0,
        witness_files: Vec::new(),
    };
    if let Some(s) = segments
        .iter()
        .find(|s| !heads.iter().any(|h| h.chain == chain_of(s.first_seq)))
    {
        let why = format!(
            "audit chain {} is gone from the database: the archive holds its entries up to {}, \
             and the database has no head for it",
            chain_of(s.first_seq),
            s.last_seq
        );
        return Ok((broken_at(report, s.first_seq, why), collected));
    }
    let mut ranges = Vec::new();
    for head in &heads {
        let archived = segments
            .iter()
            .rev()
            .find(|s| chain_of(s.first_seq) == head.chain)
            .map(|s| (s.last_seq, s.last_hash.clone()));
        let walked = verify_one(
            store,
            keyring,
            &public_key,
            head,
            (from_seq, to_seq),
            archived,
            newest_checkpoints.remove(&head.chain),
            &mut collected,
        )
        .await?;
        report.entries_checked += walked.entries;
        report.checkpoints_verified += walked.checkpoints;
        if let Some((seq, why)) = walked.broken {
            report.from_seq = walked.from;
            report.to_seq = walked.to;
            return Ok((broken_at(report, seq, why), collected));
        }
        ranges.push((head.chain, walked.from, walked.to));
    }
    let references = match check_references(&heads, &collected) {
        Ok(n) => n,
        Err((seq, why)) => return Ok((broken_at(report, seq, why), collected)),
    };
    if let (Some(first), Some(last)) = (ranges.first(), ranges.last()) {
        report.from_seq = first.1;
        report.to_seq = last.2;
    }
    report.detail = if let [(_, from, to)] = ranges[..] {
        format!(
            "{} entries verified ({from}..={to}), {} signed checkpoints",
            report.entries_checked, report.checkpoints_verified
        )
    } else {
        let each: Vec<String> = ranges
            .iter()
            .map(|(chain, from, to)| format!("chain {chain}: {from}..={to}"))
            .collect();
        format!(
            "{} entries verified in {} chains ({}), {} signed checkpoints, {references} \
             cross-references between chains",
            report.entries_checked,
            ranges.len(),
            each.join(", "),
            report.checkpoints_verified
        )
    };
    Ok((report, collected))
}

/// What walking one chain found.
struct Walked {
    entries: u64,
    checkpoints: u64,
    from: i64,
    to: i64,
    broken: Option<(i64, String)>,
}

/// Walks chain `head.chain`'s live entries in `from_seq..=to_seq`, after
/// its archive ending at `archived`; `newest_checkpoint` is the chain's
/// newest checkpoint as read before `head`.
#[allow(clippy::too_many_arguments)]
async fn verify_one(
    store: &dyn AuditStore,
    keyring: &dyn KeyringProvider,
    public_key: &[u8],
    head: &AuditHead,
    (from_seq, to_seq): (i64, Option<i64>),
    archived: Option<(i64, Vec<u8>)>,
    newest_checkpoint: Option<AuditCheckpoint>,
    collected: &mut Collected,
) -> Result<Walked, VaultError> {
    let range = chain_range(head.chain);
    let archived_to = archived.as_ref().map_or(range.start() - 1, |(seq, _)| *seq);
    let from = from_seq.max(*range.start()).max(archived_to + 1);
    let to = to_seq.unwrap_or(head.seq).min(head.seq);
    let mut walked = Walked {
        entries: 0,
        checkpoints: 0,
        from,
        to,
        broken: None,
    };
    let broken = |mut walked: Walked, seq: i64, why: String| {
        walked.broken = Some((seq, why));
        Ok(walked)
    };

    // A checkpoint beyond the head vouches for entries that are gone.
    if let Some(last) = newest_checkpoint
        && last.seq > head.seq
    {
        let why = if signature_valid(&last, public_key) {
            format!(
                "entries after {} are missing: a signed checkpoint vouches for entry {}",
                head.seq, last.seq
            )
        } else {
            format!(
                "a checkpoint past the chain head (entry {}) does not carry this vault's signature",
                last.seq
            )
        };
        return broken(walked, head.seq + 1, why);
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
            return broken(walked, expected_seq, "entry missing".to_owned());
        }
        for row in rows {
            if row.seq != expected_seq {
                return broken(walked, expected_seq, "entry missing".to_owned());
            }
            walked.entries += 1;
            if let Some(p) = &prev {
                if &row.prev_hash != p {
                    return broken(
                        walked,
                        row.seq,
                        "previous-hash link does not match the entry before it".to_owned(),
                    );
                }
            } else if chain_position(row.seq) == 1 && row.prev_hash != GENESIS_HASH {
                return broken(
                    walked,
                    row.seq,
                    "first entry links to a predecessor".to_owned(),
                );
            }
            let hash = match check_entry(keyring, &row) {
                Ok(hash) => hash,
                Err(why) => return broken(walked, row.seq, why.to_owned()),
            };
            match chains::references(&row) {
                Ok(refs) => collected.refs.extend(refs),
                Err(why) => return broken(walked, row.seq, why),
            }
            if let Some(c) = checkpoints.remove(&row.seq) {
                if let Err(why) = check_checkpoint(&c, public_key, &hash) {
                    return broken(walked, row.seq, why.to_owned());
                }
                walked.checkpoints += 1;
                collected.checkpoints.insert(row.seq, hash.clone());
            }
            expected_seq += 1;
            prev = Some(hash);
        }
    }
    if to == head.seq
        && chain_position(head.seq) > 0
        && head.seq >= from
        && prev.as_deref() != Some(head.entry_hash.as_slice())
    {
        return broken(
            walked,
            head.seq,
            "chain head does not match the last entry".to_owned(),
        );
    }
    if from <= to {
        collected.verified.push((from, to));
    }
    Ok(walked)
}

/// Checks every reference a verified entry made to another chain's
/// checkpoint: the chain must still reach it, and hold it with the hash
/// named. A reference to a checkpoint outside what was verified (a range
/// asked for, an archive not checked here) is not counted. Returns how many
/// references matched, or the first break and what it is.
fn check_references(heads: &[AuditHead], collected: &Collected) -> Result<u64, (i64, String)> {
    let mut matched = 0;
    for r in &collected.refs {
        let chain = chain_of(r.seq);
        let Some(head) = heads.iter().find(|h| h.chain == chain) else {
            return Err((
                r.seq,
                format!(
                    "audit chain {chain} is gone from the database: entry {} names its signed \
                     checkpoint at entry {}",
                    r.by_seq, r.seq
                ),
            ));
        };
        if r.seq > head.seq {
            return Err((
                head.seq + 1,
                format!(
                    "audit chain {chain} was cut short: its last entry is {}, but entry {} \
                     names its signed checkpoint at entry {}",
                    head.seq, r.by_seq, r.seq
                ),
            ));
        }
        match collected.checkpoints.get(&r.seq) {
            Some(hash) if *hash == r.entry_hash => matched += 1,
            Some(_) => {
                return Err((
                    r.seq,
                    format!(
                        "entry {} names chain {chain}'s signed checkpoint at entry {} with \
                         another hash: that chain was rewritten",
                        r.by_seq, r.seq
                    ),
                ));
            }
            None if collected.covers(r.seq) => {
                return Err((
                    r.seq,
                    format!(
                        "the signed checkpoint at entry {} that entry {} names is missing",
                        r.seq, r.by_seq
                    ),
                ));
            }
            None => {}
        }
    }
    Ok(matched)
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
    // Segments are only ever added, so their number says whether the
    // archive grew.
    let archived = || async { Ok::<_, VaultError>(store.audit_segments().await?.len()) };
    let mut attempt = 1;
    loop {
        let before = archived().await?;
        let report =
            verify_once(store, keyring, from_seq, to_seq, witness_files, archive_dir).await?;
        if report.ok() || attempt == 3 || archived().await? == before {
            return Ok(report);
        }
        attempt += 1;
    }
}

/// The archived ranges, chain by chain, as a summary names them: `1..=N`
/// for a log of one chain.
fn archived_ranges(segments: &[AuditSegment]) -> String {
    let mut ranges: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for s in segments {
        let r = ranges
            .entry(chain_of(s.first_seq))
            .or_insert((s.first_seq, s.last_seq));
        r.1 = r.1.max(s.last_seq);
    }
    match ranges.iter().collect::<Vec<_>>()[..] {
        [(0, (first, last))] => format!("{first}..={last}"),
        ref all => {
            let each: Vec<String> = all
                .iter()
                .map(|(chain, (first, last))| format!("chain {chain}: {first}..={last}"))
                .collect();
            format!("({})", each.join(", "))
        }
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
    let reaches_archive = segments.iter().any(|s| s.last_seq >= from_seq.max(1));
    let mut archived_checkpoints: Option<BTreeMap<i64, AuditCheckpoint>> = None;
    let mut archive_notes = Vec::new();
    let mut archive_counts = (0, 0);
    let mut collected = Collected::default();
    if reaches_archive {
        let public_key = CheckpointSigner::new(keyring, 1).public_key();
        let ranges = archived_ranges(&segments);
        match archive_dir {
            Some(dir) => {
                let a = archive::verify_archive(&segments, dir, keyring, &public_key).await;
                let checkpoints = a.checkpoints.len() as u64 + a.seals;
                if let Some((seq, why)) = a.broken {
                    let heads = store.audit_heads().await?;
                    let head_seq = heads.last().map_or(0, |h| h.seq);
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
                    "entries {ranges} verified in {} sealed archive segments under {}",
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
                collected.refs = a.refs;
                collected.verified = a.verified;
                collected.checkpoints = a
                    .checkpoints
                    .values()
                    .map(|c| (c.seq, c.entry_hash.clone()))
                    .collect();
                archived_checkpoints = Some(a.checkpoints);
            }
            None => archive_notes.push(format!(
                "entries {ranges} are archived in {} segments and were not checked \
                 here: this replica has no audit.archive_dir",
                segments.len()
            )),
        }
    }
    let (mut report, collected) =
        verify_live(store, keyring, from_seq, to_seq, &segments, collected).await?;
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
    // The witnesses are read before the heads: a checkpoint is witnessed
    // only once it has committed, so every one witnessed by now is at or
    // below its chain's head read next, unless entries were taken away.
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
    let heads = store.audit_heads().await?;
    // Each chain's checkpoints that a witness holds within what the walk
    // verified, read from the database chain by chain.
    let mut stored: BTreeMap<i64, AuditCheckpoint> = BTreeMap::new();
    let mut in_range: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for seq in witnessed
        .iter()
        .map(|w| w.checkpoint.seq)
        .filter(|seq| collected.covers(*seq))
    {
        let r = in_range.entry(chain_of(seq)).or_insert((seq, seq));
        r.1 = r.1.max(seq);
    }
    for (lo, hi) in in_range.values() {
        stored.extend(
            store
                .audit_checkpoints(*lo, *hi)
                .await?
                .into_iter()
                .map(|c| (c.seq, c)),
        );
    }
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
        let chain = chain_of(c.seq);
        let Some(head) = heads.iter().find(|h| h.chain == chain) else {
            return Ok(broken_at(
                report,
                c.seq,
                format!(
                    "audit chain {chain} is gone from the database: the audit witness holds its \
                     {named}"
                ),
            ));
        };
        if c.seq > head.seq {
            return Ok(broken_at(
                report,
                head.seq + 1,
                format!(
                    "the audit log's tail was cut: {named} is missing from the database, \
                     whose last entry is {}",
                    head.seq
                ),
            ));
        }
        if !collected.covers(c.seq) && !stored.contains_key(&c.seq) {
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
