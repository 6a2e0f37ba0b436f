//! Verification of the audit chain: recomputes every hash and MAC, checks the
//! signed checkpoints in the range, and names the first entry that does not
//! match.

use std::collections::BTreeMap;

use crate::crypto::{KeyringProvider, MacPurpose};
use crate::domain::VaultError;
use crate::store::AuditStore;

use super::checkpoint::{CheckpointSigner, signature_valid};
use super::entry_hash;

/// The previous-hash of entry 1.
const GENESIS_HASH: [u8; 32] = [0; 32];

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
}

impl VerifyReport {
    /// Whether the chain verified.
    pub fn ok(&self) -> bool {
        self.first_broken_seq.is_none()
    }
}

/// Verifies entries `from_seq..=to_seq` (clamped to the chain head). Starting
/// above 1 trusts the stored `prev_hash` of the first entry, which its own MAC
/// covers. Every signed checkpoint in the range must match the entry it
/// names, and no checkpoint may lie beyond the chain head (a truncated log).
pub async fn verify_chain(
    store: &dyn AuditStore,
    keyring: &dyn KeyringProvider,
    from_seq: i64,
    to_seq: Option<i64>,
) -> Result<VerifyReport, VaultError> {
    let (head_seq, head_hash) = store.audit_head().await?;
    let public_key = CheckpointSigner::new(keyring, 1).public_key();
    let from = from_seq.max(1);
    let to = to_seq.unwrap_or(head_seq).min(head_seq);
    let mut report = VerifyReport {
        entries_checked: 0,
        first_broken_seq: None,
        detail: String::new(),
        from_seq: from,
        to_seq: to,
        checkpoints_verified: 0,
        checkpoint_public_key: public_key.clone(),
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
    let mut prev: Option<Vec<u8>> = None;
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
            let hash = entry_hash(row.seq, &row.prev_hash, &row.draft);
            if hash != row.entry_hash {
                return broken(
                    report,
                    row.seq,
                    "entry contents do not match its hash".to_owned(),
                );
            }
            if !keyring.mac_verify(MacPurpose::AuditChain, &hash, &row.mac) {
                return broken(
                    report,
                    row.seq,
                    "entry MAC does not verify under the audit key".to_owned(),
                );
            }
            if let Some(c) = checkpoints.remove(&row.seq) {
                if !signature_valid(&c, &public_key) {
                    return broken(
                        report,
                        row.seq,
                        "the signed checkpoint of this entry does not verify".to_owned(),
                    );
                }
                if c.entry_hash != hash {
                    return broken(
                        report,
                        row.seq,
                        "entry does not match its signed checkpoint".to_owned(),
                    );
                }
                report.checkpoints_verified += 1;
            }
            expected_seq += 1;
            prev = Some(hash);
        }
    }
    if to == head_seq && head_seq > 0 && prev.as_deref() != Some(head_hash.as_slice()) {
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
