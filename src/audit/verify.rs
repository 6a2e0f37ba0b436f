//! Verification of the audit chain: recomputes every hash and MAC and names
//! the first entry that does not match.

use crate::crypto::{KeyringProvider, MacPurpose};
use crate::domain::VaultError;
use crate::store::Store;

use super::entry_hash;

/// The previous-hash of entry 1.
const GENESIS_HASH: [u8; 32] = [0; 32];

/// Entries read per page while verifying.
const PAGE: i64 = 1000;

/// The result of verifying (a range of) the audit chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries_checked: u64,
    /// The first entry that failed, if any.
    pub first_broken_seq: Option<i64>,
    /// What failed there.
    pub detail: String,
}

impl VerifyReport {
    /// Whether the chain verified.
    pub fn ok(&self) -> bool {
        self.first_broken_seq.is_none()
    }
}

/// Verifies entries `from_seq..=to_seq` (clamped to the chain head). Starting
/// above 1 trusts the stored `prev_hash` of the first entry, whose own MAC
/// still has to verify.
pub async fn verify_chain(
    store: &dyn Store,
    keyring: &dyn KeyringProvider,
    from_seq: i64,
    to_seq: Option<i64>,
) -> Result<VerifyReport, VaultError> {
    let (head_seq, head_hash) = store.audit_head().await?;
    let from = from_seq.max(1);
    let to = to_seq.unwrap_or(head_seq).min(head_seq);
    let mut checked = 0u64;
    let mut expected_seq = from;
    let mut prev: Option<Vec<u8>> = None;
    let broken = |seq: i64, checked: u64, detail: String| VerifyReport {
        entries_checked: checked,
        first_broken_seq: Some(seq),
        detail,
    };
    while expected_seq <= to {
        let rows = store.audit_range(expected_seq, to, PAGE).await?;
        if rows.is_empty() {
            return Ok(broken(expected_seq, checked, "entry missing".to_owned()));
        }
        for row in rows {
            if row.seq != expected_seq {
                return Ok(broken(expected_seq, checked, "entry missing".to_owned()));
            }
            if let Some(p) = &prev {
                if &row.prev_hash != p {
                    return Ok(broken(
                        row.seq,
                        checked,
                        "previous-hash link does not match the entry before it".to_owned(),
                    ));
                }
            } else if row.seq == 1 && row.prev_hash != GENESIS_HASH {
                return Ok(broken(
                    row.seq,
                    checked,
                    "first entry links to a predecessor".to_owned(),
                ));
            }
            let hash = entry_hash(row.seq, &row.prev_hash, &row.draft);
            if hash != row.entry_hash {
                return Ok(broken(
                    row.seq,
                    checked,
                    "entry contents do not match its hash".to_owned(),
                ));
            }
            if !keyring.mac_verify(MacPurpose::AuditChain, &hash, &row.mac) {
                return Ok(broken(
                    row.seq,
                    checked,
                    "entry MAC does not verify under the audit key".to_owned(),
                ));
            }
            checked += 1;
            expected_seq += 1;
            prev = Some(hash);
        }
    }
    if to == head_seq && head_seq > 0 && prev.as_deref() != Some(head_hash.as_slice()) {
        return Ok(broken(
            head_seq,
            checked,
            "chain head does not match the last entry".to_owned(),
        ));
    }
    Ok(VerifyReport {
        entries_checked: checked,
        first_broken_seq: None,
        detail: "ok".to_owned(),
    })
}
