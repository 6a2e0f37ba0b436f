//! The audit witness: every signed checkpoint, once its batch has committed,
//! appended to a file outside the database, so that someone who can rewrite
//! the database cannot cut the log's tail unnoticed.
//!
//! Why: checkpoints kept only in the database prove nothing to someone who
//! can write to it. Delete the newest entries and their checkpoint rows, move
//! the chain head back to the last entry kept, and what is left verifies. The
//! witness holds every checkpoint a second time, where the database's owner
//! cannot rewrite it quietly — provided the operator puts it there: on
//! another volume, owned by another user, append-only (`chattr +a`), or
//! shipped off the host. `audit verify` compares the two
//! ([`super::verify_with_witness`]): a witnessed checkpoint that the database
//! no longer holds, or holds differently, fails verification, named.
//!
//! Format: JSON Lines, one [`WitnessRecord`] per checkpoint: `seq`,
//! `entry_hash`, `signed_at` (RFC 3339 with microseconds, UTC),
//! `public_key`, `signature` (hex), and `replica` (the vault process that
//! wrote the line). Replicas on one PostgreSQL database each append to their
//! own witness the checkpoints of their chain, and the other chains' newest
//! at each of their own. Every line is also logged
//! at `info` under the target [`LOG_TARGET`], so a log pipeline that ships
//! the vault's logs off the host keeps a copy too.
//!
//! When: the audit writer appends a checkpoint, and fsyncs the file, after
//! the batch that holds it has committed and before it answers that batch's
//! callers; an entry at a checkpoint position is witnessed by the time its
//! `record` returns, unless the append failed. That costs one fsync every
//! `audit.checkpoint_every` entries.
//!
//! If the append fails, the entries are already committed, and their callers
//! are answered as usual: the log fails closed on the database, not on the
//! witness (a full disk under the witness must not stop every lease). The
//! failure is logged at `error` and counted in
//! `tokenvault_audit_witness_errors_total`. Health has no degraded state, and
//! taking a serving replica out of rotation for its witness would turn a disk
//! problem into an outage, so health stays as it is: alert on the counter.
//! No checkpoint of the writer's chain is lost: the writer keeps the highest
//! sequence number it witnessed (at start, read from the file's last line)
//! and, at the next checkpoint, first appends every checkpoint of its chain
//! after it that the database holds. The same catch-up witnesses checkpoints
//! that other transactions wrote to its chain (a deletion's own
//! `deletion.done` entry). On a fleet, where each replica writes a chain of
//! its own (see `store::audit`), each writer also witnesses the other
//! chains' newest checkpoints whenever it names them in its cross-reference
//! entry (see `super::chains`): every witness holds a recent checkpoint of
//! every chain.

use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::domain::Timestamp;
use crate::store::audit::chain_of;
use crate::store::{AuditCheckpoint, AuditStore};

/// The tracing target every witnessed checkpoint is logged under.
pub const LOG_TARGET: &str = "tokenvault::audit::witness";

/// How much of the file's end is read at start to find its last checkpoint.
const TAIL_BYTES: u64 = 64 * 1024;

/// One line of a witness file: a signed checkpoint, as text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessRecord {
    /// The entry the checkpoint vouches for.
    pub seq: i64,
    /// That entry's hash, hex.
    pub entry_hash: String,
    /// When the checkpoint was signed: RFC 3339 with microseconds, UTC (the
    /// signature covers it to the microsecond).
    pub signed_at: String,
    /// The Ed25519 public key that verifies the signature, hex.
    pub public_key: String,
    /// The signature, hex.
    pub signature: String,
    /// The vault process that wrote the line (its replica id).
    pub replica: String,
}

impl WitnessRecord {
    /// The line for checkpoint `c`, written by `replica`.
    pub fn new(c: &AuditCheckpoint, replica: &str) -> Self {
        Self {
            seq: c.seq,
            entry_hash: hex::encode(&c.entry_hash),
            signed_at: c.signed_at.to_string(),
            public_key: hex::encode(&c.public_key),
            signature: hex::encode(&c.signature),
            replica: replica.to_owned(),
        }
    }

    /// The checkpoint this line records; an error names the field that does
    /// not decode.
    pub fn checkpoint(&self) -> Result<AuditCheckpoint, String> {
        let bytes = |field: &str, value: &str| {
            hex::decode(value).map_err(|e| format!("{field} is not hex: {e}"))
        };
        let signed_at = humantime::parse_rfc3339(&self.signed_at)
            .map(Timestamp::from_system)
            .map_err(|e| format!("signed_at is not an RFC 3339 time: {e}"))?;
        Ok(AuditCheckpoint {
            seq: self.seq,
            entry_hash: bytes("entry_hash", &self.entry_hash)?,
            signed_at,
            public_key: bytes("public_key", &self.public_key)?,
            signature: bytes("signature", &self.signature)?,
        })
    }
}

/// The audit writer's side of a witness file: appends checkpoints once they
/// have committed. Opened at start; the writer owns it.
pub struct Witness {
    path: PathBuf,
    /// Opened for reading and appending (`O_APPEND`): every write lands at
    /// the end, whoever else appends.
    file: Arc<File>,
    replica: String,
    /// The highest sequence number witnessed of this writer's chain (at
    /// start, the file's last line's).
    last_seq: i64,
    /// The newest checkpoint witnessed of each other chain, since start.
    others: std::collections::BTreeMap<i64, i64>,
    /// Whether the file may end inside a line (a crash or a failed append cut
    /// it off): the next append starts on a new line.
    torn: bool,
    /// Whether the last append failed.
    behind: bool,
}

impl Witness {
    /// Opens the witness file at `path` for appending, creating it (mode
    /// 0600) if missing; an existing file keeps its owner and mode.
    /// `replica` names this process in every line it writes.
    pub fn open(path: &Path, replica: &str) -> io::Result<Self> {
        let mut file = crate::files::private_options()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let (last_seq, torn) = read_tail(&mut file)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
            replica: replica.to_owned(),
            last_seq,
            others: std::collections::BTreeMap::new(),
            torn,
            behind: false,
        })
    }

    /// Where the witness is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The highest sequence number witnessed so far (0 for none).
    pub fn last_seq(&self) -> i64 {
        self.last_seq
    }

    /// Appends `committed`, the checkpoints of a batch that has committed
    /// (ascending), after any checkpoint the database holds between the last
    /// one witnessed and them; `every` is the checkpoint interval. Never
    /// fails the batch: see the module documentation.
    pub(super) async fn after_commit(
        &mut self,
        store: &dyn AuditStore,
        committed: Vec<AuditCheckpoint>,
        every: i64,
    ) {
        let Some(first) = committed.first().map(|c| c.seq) else {
            return;
        };
        let mut checkpoints = Vec::new();
        // More than one interval since the last checkpoint witnessed, on the
        // same chain: the ones in between were left out by a failed append,
        // or written by another transaction or replica. (A writer that moved
        // to another chain, after its connection was replaced, starts
        // witnessing that chain where it starts writing it.)
        let same_chain = chain_of(first) == chain_of(self.last_seq);
        if same_chain && first.saturating_sub(self.last_seq) > every {
            match store.audit_checkpoints(self.last_seq + 1, first - 1).await {
                Ok(missed) => checkpoints = missed,
                Err(e) => {
                    self.failed(&format!(
                        "reading the checkpoints not witnessed yet from the database: {e}"
                    ));
                    return;
                }
            }
        }
        checkpoints.extend(committed);
        if self.write(&checkpoints).await {
            // The newest of this writer's own chain (one it moved to
            // replaces the chain it wrote before).
            let newest = checkpoints.iter().map(|c| c.seq).max().unwrap_or(0);
            self.last_seq = if chain_of(newest) == chain_of(self.last_seq) {
                self.last_seq.max(newest)
            } else {
                newest
            };
            metrics::gauge!("tokenvault_audit_witness_seq").set(self.last_seq as f64);
        }
    }

    /// Appends the other chains' newest checkpoints (`others`, as this
    /// writer's cross-reference entry names them; see `super::chains`) that
    /// this witness does not hold yet. So every replica's witness holds, at
    /// most a checkpoint interval behind, a recent checkpoint of every chain,
    /// and a chain cut below it is named by `audit verify` on any replica.
    pub(super) async fn other_chains(&mut self, others: Vec<AuditCheckpoint>) {
        let new: Vec<AuditCheckpoint> = others
            .into_iter()
            .filter(|c| {
                self.others
                    .get(&chain_of(c.seq))
                    .is_none_or(|seen| c.seq > *seen)
            })
            .collect();
        if !new.is_empty() && self.write(&new).await {
            for c in new {
                self.others.insert(chain_of(c.seq), c.seq);
            }
        }
    }

    /// Appends `checkpoints` and syncs the file; false (logged and counted)
    /// when that failed.
    async fn write(&mut self, checkpoints: &[AuditCheckpoint]) -> bool {
        let mut text = String::new();
        if self.torn {
            text.push('\n');
        }
        for c in checkpoints {
            let record = WitnessRecord::new(c, &self.replica);
            tracing::info!(
                target: LOG_TARGET,
                seq = record.seq,
                entry_hash = %record.entry_hash,
                signed_at = %record.signed_at,
                public_key = %record.public_key,
                signature = %record.signature,
                replica = %record.replica,
                "audit checkpoint witnessed"
            );
            match serde_json::to_string(&record) {
                Ok(line) => {
                    text.push_str(&line);
                    text.push('\n');
                }
                Err(e) => {
                    self.failed(&format!("encoding checkpoint {}: {e}", c.seq));
                    return false;
                }
            }
        }
        let file = Arc::clone(&self.file);
        let written = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut out: &File = &file;
            out.write_all(text.as_bytes())?;
            file.sync_data()
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        match written {
            Ok(()) => {
                if self.behind {
                    tracing::info!(witness = %self.path.display(), "the audit witness caught up");
                }
                self.behind = false;
                self.torn = false;
                true
            }
            Err(e) => {
                // The append may have stopped inside a line.
                self.torn = true;
                self.failed(&format!("appending to the file: {e}"));
                false
            }
        }
    }

    fn failed(&mut self, why: &str) {
        self.behind = true;
        metrics::counter!("tokenvault_audit_witness_errors_total").increment(1);
        tracing::error!(
            witness = %self.path.display(),
            error = why,
            last_witnessed = self.last_seq,
            "the audit witness was not written; the checkpoints are committed in the database \
             and will be appended at the next checkpoint"
        );
    }
}

/// The sequence number of the last checkpoint record in the file's last
/// [`TAIL_BYTES`] (0 for none), and whether the file ends inside a line.
fn read_tail(file: &mut File) -> io::Result<(i64, bool)> {
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let torn = tail.last().is_some_and(|b| *b != b'\n');
    let last_seq = tail
        .split(|b| *b == b'\n')
        .rev()
        .find_map(|line| serde_json::from_slice::<WitnessRecord>(line).ok())
        .map_or(0, |r| r.seq);
    Ok((last_seq, torn))
}

/// A checkpoint as a witness file holds it, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witnessed {
    /// The checkpoint.
    pub checkpoint: AuditCheckpoint,
    /// The vault process that witnessed it.
    pub replica: String,
    /// The witness file.
    pub file: PathBuf,
    /// Its line in the file, from 1.
    pub line: usize,
}

/// What a witness file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WitnessContents {
    /// Every checkpoint record, in file order.
    pub checkpoints: Vec<Witnessed>,
    /// Lines (from 1) that are not checkpoint records: cut off by a crash or
    /// a failed append, or written by something else. They prove nothing
    /// either way: without a checkpoint there is no signature to check.
    pub unreadable: Vec<usize>,
}

/// Reads the witness file at `path`; `None` when there is no such file.
pub async fn read(path: &Path) -> io::Result<Option<WitnessContents>> {
    match tokio::fs::read(path).await {
        Ok(bytes) => Ok(Some(parse(path, &bytes))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses the contents of the witness file at `path`. Blank lines are skipped.
pub fn parse(path: &Path, bytes: &[u8]) -> WitnessContents {
    let mut contents = WitnessContents::default();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = serde_json::from_slice::<WitnessRecord>(line)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                let checkpoint = r.checkpoint()?;
                Ok((r.replica, checkpoint))
            });
        match parsed {
            Ok((replica, checkpoint)) => contents.checkpoints.push(Witnessed {
                checkpoint,
                replica,
                file: path.to_path_buf(),
                line: i + 1,
            }),
            Err(_) => contents.unreadable.push(i + 1),
        }
    }
    contents
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(seq: i64) -> AuditCheckpoint {
        AuditCheckpoint {
            seq,
            entry_hash: vec![seq as u8; 32],
            signed_at: Timestamp::from_micros(1_700_000_000_123_456 + seq),
            public_key: vec![7; 32],
            signature: vec![9; 64],
        }
    }

    fn line(seq: i64) -> String {
        serde_json::to_string(&WitnessRecord::new(&checkpoint(seq), "vault-test")).unwrap()
    }

    #[test]
    fn a_record_gives_back_the_checkpoint_to_the_microsecond() {
        let record = WitnessRecord::new(&checkpoint(8), "vault-a");
        assert_eq!(record.checkpoint().unwrap(), checkpoint(8));
        let text = serde_json::to_string(&record).unwrap();
        for field in [
            "seq",
            "entry_hash",
            "signed_at",
            "public_key",
            "signature",
            "replica",
        ] {
            assert!(text.contains(&format!("\"{field}\":")), "{text}");
        }
        let back: WitnessRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn parsing_keeps_records_and_names_the_lines_that_are_not() {
        let path = Path::new("/witness.jsonl");
        let text = format!(
            "{}\n\nnot json\n{}\n{{\"seq\":1}}\n{}",
            line(4),
            line(8),
            &line(12)[..20]
        );
        let contents = parse(path, text.as_bytes());
        let seqs: Vec<(i64, usize)> = contents
            .checkpoints
            .iter()
            .map(|w| (w.checkpoint.seq, w.line))
            .collect();
        assert_eq!(seqs, vec![(4, 1), (8, 4)]);
        assert_eq!(contents.unreadable, vec![3, 5, 6]);
        assert_eq!(contents.checkpoints[0].replica, "vault-test");
        assert_eq!(contents.checkpoints[0].file, path);
    }

    #[test]
    fn opening_finds_the_last_checkpoint_and_a_torn_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.jsonl");
        let w = Witness::open(&path, "vault-a").unwrap();
        assert_eq!((w.last_seq, w.torn), (0, false));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{mode:04o}");

        std::fs::write(&path, format!("{}\n{}\n", line(4), line(8))).unwrap();
        let w = Witness::open(&path, "vault-a").unwrap();
        assert_eq!((w.last_seq, w.torn), (8, false));

        std::fs::write(
            &path,
            format!("{}\n{}\n{}", line(4), line(8), &line(12)[..9]),
        )
        .unwrap();
        let w = Witness::open(&path, "vault-a").unwrap();
        assert_eq!((w.last_seq, w.torn), (8, true));
    }
}
