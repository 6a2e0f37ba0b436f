//! The audit log's archive: bounded hot storage, a verifiable history.
//!
//! Entries older than `audit.hot_retention_seconds` leave the live table in
//! sealed segment files under `audit.archive_dir`, oldest first, and only
//! after their segment is durable:
//!
//! 1. the archiver reads the oldest unarchived entries (never the chain
//!    head), checks that each links to the one before and carries a valid
//!    MAC, and writes them with their signed checkpoints to a new file;
//! 2. the file ends with a *seal*: a checkpoint signed for its last entry,
//!    which with the hash links vouches for every entry in it; the file is
//!    fsync'd, renamed to its final name and the directory fsync'd;
//! 3. an `audit.archive` entry records the segment in the live chain (the
//!    log fails closed: no entry, no archive);
//! 4. one transaction records the segment in `audit_segments`, only if it
//!    continues the archive and its last entry is still the one it sealed;
//! 5. the archived entries are then deleted from the live table in short
//!    transactions (the prune may lag; verification starts the live table
//!    after the last segment).
//!
//! A segment file is JSON Lines, one object per line, each tagged by its
//! kind: `segment` (a header: format, first entry, the hash before it),
//! `entry`, `checkpoint` (right after the entry it signs) and `seal` (the
//! last line). Its name holds its range and a prefix of its SHA-256, so two
//! archivers racing on one directory never overwrite each other's file; the
//! loser removes its own.
//!
//! Each chain of the log (see `store::audit`) has its own series of
//! segments, archived and verified on its own; a segment never spans two
//! chains. Verification walks each chain's segments the database records,
//! in order from the chain's first entry, then its live entries, as one
//! chain: the first break anywhere is named — a segment file missing, cut
//! short, edited, renamed or swapped with another — with the entry where it
//! happens.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use ring::digest;
use serde::{Deserialize, Serialize};

use crate::crypto::KeyringProvider;
use crate::domain::{Timestamp, VaultError};
use crate::store::audit::{GENESIS_HASH, chain_of, chain_range};
use crate::store::{AuditCheckpoint, AuditDraft, AuditFilter, AuditRow, AuditSegment, AuditStore};

use super::Sealer;
use super::chains::{self, CrossRef};
use super::verify::{check_checkpoint, check_entry};
use super::witness::WitnessRecord;

/// The format named in every segment's header.
pub const SEGMENT_FORMAT: &str = "tokenvault-audit-segment-v1";

/// Entries read from the live table per query while archiving.
const PAGE: i64 = 1000;

/// One line of a segment file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SegmentLine {
    /// The first line.
    Segment(SegmentHeader),
    /// An audit entry, as the live table held it.
    Entry(EntryLine),
    /// A signed checkpoint of the entry on the line before.
    Checkpoint(WitnessRecord),
    /// The last line: a checkpoint signed for the segment's last entry.
    Seal(WitnessRecord),
}

/// A segment's first line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentHeader {
    /// [`SEGMENT_FORMAT`].
    pub format: String,
    /// The segment's first entry.
    pub first_seq: i64,
    /// The hash of the entry before it, hex.
    pub prev_hash: String,
}

/// An archived entry: every column of the live table, hashes and MAC in hex,
/// the time in microseconds since the Unix epoch (what the hash covers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryLine {
    /// Position in the chain.
    pub seq: i64,
    /// When it happened, microseconds since the Unix epoch.
    pub at_us: i64,
    /// Who did it.
    pub actor: String,
    /// The actor's role.
    pub role: String,
    /// What was done.
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// `ok`, `denied`, `failed`.
    pub outcome: String,
    /// Further detail (never a secret).
    pub detail: String,
    /// The previous entry's hash, hex.
    pub prev_hash: String,
    /// This entry's hash, hex.
    pub entry_hash: String,
    /// The entry hash's MAC under the audit key, hex.
    pub mac: String,
}

impl EntryLine {
    fn new(row: &AuditRow) -> Self {
        let d = &row.draft;
        Self {
            seq: row.seq,
            at_us: d.at.as_micros(),
            actor: d.actor.clone(),
            role: d.role.clone(),
            action: d.action.clone(),
            target: d.target.clone(),
            outcome: d.outcome.clone(),
            detail: d.detail.clone(),
            prev_hash: hex::encode(&row.prev_hash),
            entry_hash: hex::encode(&row.entry_hash),
            mac: hex::encode(&row.mac),
        }
    }

    /// The entry this line holds; an error names the field that does not decode.
    pub fn row(&self) -> Result<AuditRow, String> {
        let bytes =
            |field: &str, v: &str| hex::decode(v).map_err(|e| format!("{field} is not hex: {e}"));
        Ok(AuditRow {
            seq: self.seq,
            draft: AuditDraft {
                at: Timestamp::from_micros(self.at_us),
                actor: self.actor.clone(),
                role: self.role.clone(),
                action: self.action.clone(),
                target: self.target.clone(),
                outcome: self.outcome.clone(),
                detail: self.detail.clone(),
            },
            prev_hash: bytes("prev_hash", &self.prev_hash)?,
            entry_hash: bytes("entry_hash", &self.entry_hash)?,
            mac: bytes("mac", &self.mac)?,
        })
    }
}

/// How the archiver runs (`[audit]` settings).
#[derive(Clone, Debug)]
pub struct ArchiveSettings {
    /// Where segment files go.
    pub dir: PathBuf,
    /// Entries older than this are archived and pruned.
    pub hot_retention: std::time::Duration,
    /// The most entries in one segment.
    pub segment_max_entries: u64,
}

/// A segment written and sealed, not yet recorded in the database.
pub struct WrittenSegment {
    /// What the database will record.
    pub segment: AuditSegment,
    /// Where the file is.
    pub path: PathBuf,
}

/// Writes chain `chain`'s next segment: its oldest unarchived entries older
/// than the hot retention (at most `segment_max_entries`, never the chain's
/// head, whose head row names it). `None` when there is nothing to archive
/// yet. An entry that does not link to the one before, or whose MAC does
/// not verify, stops the archive with an error naming it: the archive never
/// seals a broken chain.
pub async fn write_next_segment(
    store: &dyn AuditStore,
    sealer: &Sealer,
    settings: &ArchiveSettings,
    replica: &str,
    chain: i64,
    now: Timestamp,
) -> Result<Option<WrittenSegment>, VaultError> {
    let (mut next, mut prev) = match store.audit_segment_last(chain).await? {
        Some(s) => (s.last_seq + 1, s.last_hash),
        None => (*chain_range(chain).start(), GENESIS_HASH.to_vec()),
    };
    let Some(head) = store
        .audit_heads()
        .await?
        .into_iter()
        .find(|h| h.chain == chain)
        .map(|h| h.seq)
    else {
        return Ok(None);
    };
    let cutoff = now.minus(settings.hot_retention).as_micros();
    let first = next;
    let prev_of_first = prev.clone();
    let max = i64::try_from(settings.segment_max_entries.max(1)).unwrap_or(i64::MAX);
    let last_allowed = (head - 1).min(first.saturating_add(max - 1));
    if first > last_allowed {
        return Ok(None);
    }

    let failed = |what: &str, e: std::io::Error| {
        VaultError::Internal(format!("audit archive: {what}: {e}").into())
    };
    if !settings.dir.is_dir() {
        // A directory made here must survive a crash like the files in it.
        std::fs::create_dir_all(&settings.dir)
            .and_then(|()| match settings.dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => {
                    std::fs::File::open(parent)?.sync_all()
                }
                _ => Ok(()),
            })
            .map_err(|e| failed(&format!("creating {}", settings.dir.display()), e))?;
    }
    let tmp = settings
        .dir
        .join(format!(".segment-{}.tmp", uuid::Uuid::new_v4()));
    let file = crate::files::private_options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| failed(&format!("creating {}", tmp.display()), e))?;
    let mut out = HashingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        digest: digest::Context::new(&digest::SHA256),
    };
    let result = async {
        write_line(
            &mut out,
            &SegmentLine::Segment(SegmentHeader {
                format: SEGMENT_FORMAT.to_owned(),
                first_seq: first,
                prev_hash: hex::encode(&prev),
            }),
        )?;
        'pages: while next <= last_allowed {
            let rows = store.audit_range(next, last_allowed, PAGE).await?;
            if rows.is_empty() {
                break;
            }
            let page_last = rows.last().map_or(next, |r| r.seq);
            let mut checkpoints: BTreeMap<i64, AuditCheckpoint> = store
                .audit_checkpoints(next, page_last)
                .await?
                .into_iter()
                .map(|c| (c.seq, c))
                .collect();
            for row in rows {
                if row.draft.at.as_micros() >= cutoff {
                    break 'pages;
                }
                if row.seq != next {
                    return Err(VaultError::precondition(format!(
                        "audit archive stopped: entry {next} is missing from the live audit log \
                         (run `tokenvault admin audit verify`)"
                    )));
                }
                if row.prev_hash != prev || !sealer.entry_intact(&row) {
                    return Err(VaultError::precondition(format!(
                        "audit archive stopped: entry {next} does not verify \
                         (run `tokenvault admin audit verify`)"
                    )));
                }
                write_line(&mut out, &SegmentLine::Entry(EntryLine::new(&row)))?;
                if let Some(c) = checkpoints.remove(&row.seq) {
                    write_line(
                        &mut out,
                        &SegmentLine::Checkpoint(WitnessRecord::new(&c, replica)),
                    )?;
                }
                prev = row.entry_hash;
                next += 1;
            }
        }
        Ok::<_, VaultError>(())
    }
    .await;
    let discard = |e: VaultError| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    result.map_err(discard)?;
    let last = next - 1;
    if last < first {
        let _ = std::fs::remove_file(&tmp);
        return Ok(None);
    }
    let seal = sealer.sign_seal(last, &prev);
    write_line(
        &mut out,
        &SegmentLine::Seal(WitnessRecord::new(&seal, replica)),
    )
    .map_err(discard)?;
    let HashingWriter { inner, digest } = out;
    let sha256 = digest.finish().as_ref().to_vec();
    let file_name = format!(
        "audit-{first:012}-{last:012}-{}.jsonl",
        &hex::encode(&sha256)[..12]
    );
    let path = settings.dir.join(&file_name);
    let dir = settings.dir.clone();
    let (from, to) = (tmp.clone(), path.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let file = inner
            .into_inner()
            .map_err(std::io::IntoInnerError::into_error)?;
        file.sync_all()?;
        std::fs::rename(&from, &to)?;
        std::fs::File::open(&dir)?.sync_all()
    })
    .await
    .map_err(|e| VaultError::Internal(format!("audit archive: {e}").into()))?
    .map_err(|e| {
        // Neither the temporary file nor a renamed one whose directory
        // entry may not be durable is left for a later pass to trip on.
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&path);
        failed(&format!("writing {}", path.display()), e)
    })?;
    Ok(Some(WrittenSegment {
        segment: AuditSegment {
            first_seq: first,
            last_seq: last,
            prev_hash: prev_of_first,
            last_hash: prev,
            file_name,
            file_sha256: sha256,
            sealed_at: seal.signed_at,
            sealed_by: replica.to_owned(),
        },
        path,
    }))
}

/// A writer that hashes what passes through it.
struct HashingWriter {
    inner: std::io::BufWriter<std::fs::File>,
    digest: digest::Context,
}

fn write_line(out: &mut HashingWriter, line: &SegmentLine) -> Result<(), VaultError> {
    let mut bytes = serde_json::to_vec(line)
        .map_err(|e| VaultError::Internal(format!("audit archive: encoding: {e}").into()))?;
    bytes.push(b'\n');
    out.digest.update(&bytes);
    out.inner
        .write_all(&bytes)
        .map_err(|e| VaultError::Internal(format!("audit archive: writing: {e}").into()))
}

/// What verifying the archive found.
#[derive(Clone, Debug, Default)]
pub struct ArchiveReport {
    /// Segments checked.
    pub segments: u64,
    /// Entries checked in them.
    pub entries: u64,
    /// Signed checkpoints (not seals) verified in them, by sequence number.
    pub checkpoints: BTreeMap<i64, AuditCheckpoint>,
    /// Seals verified.
    pub seals: u64,
    /// The references the archived entries make to other chains'
    /// checkpoints (see the `chains` module).
    pub refs: Vec<CrossRef>,
    /// The ranges of entries verified, one per chain (both inclusive).
    pub verified: Vec<(i64, i64)>,
    /// The first break: the entry and what is wrong there.
    pub broken: Option<(i64, String)>,
    /// Files in the directory that no recorded segment names.
    pub unrecorded: Vec<String>,
}

/// Verifies the archive's segments as the database records them (in
/// sequence order: chain by chain), each chain's from its first entry,
/// against the files in `dir`: every file present, whole, unchanged (its
/// SHA-256), each entry linking to the one before with a valid hash and MAC,
/// every checkpoint and seal signed by `public_key`. Stops at the first
/// break.
pub async fn verify_archive(
    segments: &[AuditSegment],
    dir: &Path,
    keyring: &dyn KeyringProvider,
    public_key: &[u8],
) -> ArchiveReport {
    let mut report = ArchiveReport::default();
    let mut chain = None;
    let mut expected = 1;
    let mut prev = GENESIS_HASH.to_vec();
    for s in segments {
        if chain != Some(chain_of(s.first_seq)) {
            chain = Some(chain_of(s.first_seq));
            expected = *chain_range(chain_of(s.first_seq)).start();
            prev = GENESIS_HASH.to_vec();
            report.verified.push((expected, expected - 1));
        }
        if s.first_seq != expected
            || s.prev_hash != prev
            || chain_of(s.last_seq) != chain_of(expected)
        {
            report.broken = Some((
                expected,
                format!(
                    "the archive's record of segment {} (entries {}..={}) does not follow \
                     the segment before it",
                    s.file_name, s.first_seq, s.last_seq
                ),
            ));
            return report;
        }
        let path = dir.join(&s.file_name);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                let why = if e.kind() == std::io::ErrorKind::NotFound {
                    "is missing".to_owned()
                } else {
                    format!("cannot be read ({e})")
                };
                report.broken = Some((
                    s.first_seq,
                    format!(
                        "archived segment {} (entries {}..={}, sealed at {}) {why} in {}",
                        s.file_name,
                        s.first_seq,
                        s.last_seq,
                        s.sealed_at,
                        dir.display()
                    ),
                ));
                return report;
            }
        };
        match check_segment(&bytes, s, keyring, public_key, &mut report) {
            Ok(()) => {}
            Err((seq, why)) => {
                report.broken = Some((seq, format!("archived segment {}: {why}", s.file_name)));
                return report;
            }
        }
        if digest::digest(&digest::SHA256, &bytes).as_ref() != s.file_sha256.as_slice() {
            report.broken = Some((
                s.first_seq,
                format!(
                    "archived segment {}: the file is not the one archived (its SHA-256 differs \
                     from the one recorded when it was sealed)",
                    s.file_name
                ),
            ));
            return report;
        }
        report.segments += 1;
        expected = s.last_seq + 1;
        prev = s.last_hash.clone();
        if let Some(range) = report.verified.last_mut() {
            range.1 = s.last_seq;
        }
    }
    if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
        let recorded: std::collections::HashSet<&str> =
            segments.iter().map(|s| s.file_name.as_str()).collect();
        while let Ok(Some(e)) = entries.next_entry().await {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("audit-") && name.ends_with(".jsonl") && !recorded.contains(&*name)
            {
                report.unrecorded.push(name);
            }
        }
        report.unrecorded.sort();
    }
    report
}

/// Checks one segment file's contents against its record.
fn check_segment(
    bytes: &[u8],
    s: &AuditSegment,
    keyring: &dyn KeyringProvider,
    public_key: &[u8],
    report: &mut ArchiveReport,
) -> Result<(), (i64, String)> {
    let text = std::str::from_utf8(bytes).map_err(|_| (s.first_seq, "not UTF-8".to_owned()))?;
    let mut lines = text.lines().enumerate();
    let mut expected = s.first_seq;
    let mut prev = s.prev_hash.clone();
    let parse = |n: usize, line: &str, at: i64| {
        serde_json::from_str::<SegmentLine>(line)
            .map_err(|e| (at, format!("line {} is not a segment line: {e}", n + 1)))
    };
    match lines.next() {
        Some((n, line)) => match parse(n, line, expected)? {
            SegmentLine::Segment(h) if h.format == SEGMENT_FORMAT => {
                if h.first_seq != s.first_seq {
                    return Err((
                        s.first_seq,
                        format!(
                            "the file begins at entry {}, where entry {} was expected: segment \
                             files were swapped or renamed",
                            h.first_seq, s.first_seq
                        ),
                    ));
                }
                if h.prev_hash != hex::encode(&prev) {
                    return Err((
                        s.first_seq,
                        "its header does not link to the entry before it".to_owned(),
                    ));
                }
            }
            _ => {
                return Err((
                    s.first_seq,
                    "the first line is not a segment header".to_owned(),
                ));
            }
        },
        None => return Err((s.first_seq, "the file is empty".to_owned())),
    }
    let mut sealed = false;
    for (n, line) in lines {
        if sealed {
            return Err((expected, format!("line {} follows the seal", n + 1)));
        }
        match parse(n, line, expected)? {
            SegmentLine::Segment(_) => {
                return Err((expected, format!("line {} is a second header", n + 1)));
            }
            SegmentLine::Entry(e) => {
                let row = e.row().map_err(|why| (expected, why))?;
                if row.seq != expected {
                    return Err((
                        expected,
                        format!(
                            "line {} holds entry {} where entry {expected} was expected: \
                             entries missing or reordered",
                            n + 1,
                            row.seq
                        ),
                    ));
                }
                if row.seq > s.last_seq {
                    return Err((row.seq, "entry past the segment's recorded end".to_owned()));
                }
                if row.prev_hash != prev {
                    return Err((
                        row.seq,
                        "previous-hash link does not match the entry before it".to_owned(),
                    ));
                }
                let hash = check_entry(keyring, &row).map_err(|why| (row.seq, why.to_owned()))?;
                report
                    .refs
                    .extend(chains::references(&row).map_err(|why| (row.seq, why))?);
                report.entries += 1;
                prev = hash;
                expected += 1;
            }
            line @ (SegmentLine::Checkpoint(_) | SegmentLine::Seal(_)) => {
                let (w, seal) = match line {
                    SegmentLine::Seal(w) => (w, true),
                    SegmentLine::Checkpoint(w) => (w, false),
                    _ => unreachable!("matched above"),
                };
                if w.seq != expected - 1 {
                    return Err((w.seq, format!("line {}: a checkpoint out of place", n + 1)));
                }
                let c = w.checkpoint().map_err(|why| (w.seq, why))?;
                check_checkpoint(&c, public_key, &prev).map_err(|why| (c.seq, why.to_owned()))?;
                if seal {
                    sealed = true;
                    report.seals += 1;
                } else {
                    report.checkpoints.insert(c.seq, c);
                }
            }
        }
    }
    if !sealed {
        return Err((
            expected,
            "the file ends without its seal: it was cut short".to_owned(),
        ));
    }
    if expected - 1 != s.last_seq || prev != s.last_hash {
        return Err((
            expected,
            format!(
                "the file ends at entry {}, the archive recorded it to end at {}",
                expected - 1,
                s.last_seq
            ),
        ));
    }
    Ok(())
}

/// Archived entries matching `filter`, in its order, at most `limit`: the
/// segments whose range the filter's sequence bounds reach are read from
/// `dir` (for `audit query` and `export` over history the live table no
/// longer holds). Files are read as they are; `audit verify` is what
/// vouches for them.
pub async fn query(
    segments: &[AuditSegment],
    dir: &Path,
    filter: &AuditFilter,
    limit: usize,
) -> Result<Vec<AuditRow>, VaultError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let after = filter.after_seq.unwrap_or(0);
    let before = filter.before_seq.unwrap_or(i64::MAX);
    let mut reached: Vec<&AuditSegment> = segments
        .iter()
        .filter(|s| s.last_seq > after && s.first_seq < before)
        .collect();
    if !filter.ascending {
        reached.reverse();
    }
    let mut rows = Vec::new();
    for s in reached {
        let path = dir.join(&s.file_name);
        let text = tokio::fs::read_to_string(&path).await.map_err(|e| {
            VaultError::Unavailable(format!("archived segment {}: {e}", path.display()).into())
        })?;
        let mut matched = Vec::new();
        for line in text.lines() {
            if let Ok(SegmentLine::Entry(e)) = serde_json::from_str::<SegmentLine>(line)
                && e.seq > after
                && e.seq < before
            {
                let row = e.row().map_err(|why| {
                    VaultError::Internal(format!("archived segment {}: {why}", s.file_name).into())
                })?;
                if matches(filter, &row) {
                    matched.push(row);
                }
            }
        }
        if !filter.ascending {
            matched.reverse();
        }
        for row in matched {
            rows.push(row);
            if rows.len() >= limit {
                return Ok(rows);
            }
        }
    }
    Ok(rows)
}

/// Whether `row` passes the filter's conditions other than its sequence
/// bounds (as the store's query applies them).
fn matches(f: &AuditFilter, row: &AuditRow) -> bool {
    let d = &row.draft;
    f.actor.as_ref().is_none_or(|a| &d.actor == a)
        && f.action_prefix
            .as_ref()
            .is_none_or(|p| d.action.starts_with(p.as_str()))
        && f.target.as_ref().is_none_or(|t| &d.target == t)
        && f.since.is_none_or(|s| d.at.as_micros() >= s.as_micros())
        && f.until.is_none_or(|u| d.at.as_micros() < u.as_micros())
        && f.outcome.as_ref().is_none_or(|o| &d.outcome == o)
}
