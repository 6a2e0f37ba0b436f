//! Cross-references between audit chains.
//!
//! A fleet's log is one chain per audit writer (see `store::audit`). Each
//! chain proves its own entries complete and in order; what proves the
//! chains together is this: whenever a writer's chain reaches a checkpoint
//! position, the writer appends an `audit.chains` entry to its chain naming
//! every other chain's latest signed checkpoint (its sequence number and the
//! hash it signs). The entry is hashed, MAC'd and signed over like any other,
//! so a chain vouches for what the others held when it was written.
//!
//! `audit verify` checks every reference against the checkpoints it verified
//! in the chain named: a reference past that chain's last entry means the
//! chain was cut short (or removed) below a point another chain recorded; a
//! reference whose hash differs means the chain was rewritten. A reader of
//! the merged log sees each entry's place among the others' checkpoints.
//!
//! The writer also appends the checkpoints it names to its audit witness
//! (see the `witness` module), so each replica's witness holds a recent
//! checkpoint of every chain, outside the database: a chain cut together
//! with the references to it is still named by `audit verify` there.

use crate::domain::VaultError;
use crate::store::audit::chain_of;
use crate::store::{AuditCheckpoint, AuditDraft, AuditRow, AuditStore};

use super::{Actor, AuditLog, Outcome};

/// The action of a cross-reference entry.
pub const CROSS_REFERENCE: &str = "audit.chains";

/// One chain's checkpoint as another chain's entry names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrossRef {
    /// The entry that names it.
    pub by_seq: i64,
    /// The checkpoint's entry (its chain is `chain_of(seq)`).
    pub seq: i64,
    /// The hash that checkpoint signs.
    pub entry_hash: Vec<u8>,
}

/// The cross-reference entry chain `own` appends now, with the checkpoints
/// it names: every other chain's latest; `None` when no other chain has one.
pub async fn draft(
    store: &dyn AuditStore,
    own: i64,
) -> Result<Option<(AuditDraft, Vec<AuditCheckpoint>)>, VaultError> {
    let mut named = Vec::new();
    for head in store.audit_heads().await? {
        if head.chain == own {
            continue;
        }
        if let Some(c) = store.audit_checkpoint_last(head.chain).await? {
            named.push(c);
        }
    }
    if named.is_empty() {
        return Ok(None);
    }
    let detail: Vec<String> = named
        .iter()
        .map(|c| {
            format!(
                "chain {} checkpoint {} entry_hash {}",
                chain_of(c.seq),
                c.seq,
                hex::encode(&c.entry_hash)
            )
        })
        .collect();
    let draft = AuditLog::draft(
        &Actor::system(),
        CROSS_REFERENCE,
        &format!("chain {own}"),
        Outcome::Ok,
        detail.join("; "),
    );
    Ok(Some((draft, named)))
}

/// The references a verified entry makes: none unless it is a
/// cross-reference entry; an error when it is one that does not parse (its
/// hash and MAC verified, so the vault wrote it so: a defect, named).
pub fn references(row: &AuditRow) -> Result<Vec<CrossRef>, String> {
    if row.draft.action != CROSS_REFERENCE {
        return Ok(Vec::new());
    }
    let malformed = || format!("the cross-reference entry {} does not parse", row.seq);
    let mut refs = Vec::new();
    for part in row.draft.detail.split("; ") {
        let words: Vec<&str> = part.split(' ').collect();
        let ["chain", chain, "checkpoint", seq, "entry_hash", hash] = words[..] else {
            return Err(malformed());
        };
        let chain: i64 = chain.parse().map_err(|_| malformed())?;
        let seq: i64 = seq.parse().map_err(|_| malformed())?;
        let entry_hash = hex::decode(hash).map_err(|_| malformed())?;
        if chain_of(seq) != chain || chain == chain_of(row.seq) {
            return Err(malformed());
        }
        refs.push(CrossRef {
            by_seq: row.seq,
            seq,
            entry_hash,
        });
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Timestamp;
    use crate::store::audit::chain_range;

    fn row(seq: i64, action: &str, detail: &str) -> AuditRow {
        AuditRow {
            seq,
            draft: AuditDraft {
                at: Timestamp::from_micros(1),
                actor: "tokenvault".into(),
                role: "system".into(),
                action: action.into(),
                target: "chain 0".into(),
                outcome: "ok".into(),
                detail: detail.into(),
            },
            prev_hash: Vec::new(),
            entry_hash: Vec::new(),
            mac: Vec::new(),
        }
    }

    #[test]
    fn references_parse_and_refuse_what_the_writer_never_writes() {
        let c1 = *chain_range(1).start() + 999;
        let c2 = *chain_range(2).start() + 1999;
        let detail = format!(
            "chain 1 checkpoint {c1} entry_hash {}; chain 2 checkpoint {c2} entry_hash {}",
            "ab".repeat(32),
            "cd".repeat(32)
        );
        let refs = references(&row(1000, CROSS_REFERENCE, &detail)).unwrap();
        assert_eq!(refs.len(), 2);
        assert_eq!((refs[0].by_seq, refs[0].seq), (1000, c1));
        assert_eq!(refs[1].entry_hash, vec![0xcd; 32]);

        assert!(
            references(&row(5, "lease.grant", &detail))
                .unwrap()
                .is_empty()
        );
        // A checkpoint that is not in the chain it names, a reference to the
        // entry's own chain, and garbage are all refused.
        for bad in [
            format!("chain 2 checkpoint {c1} entry_hash {}", "ab".repeat(32)),
            format!("chain 0 checkpoint 10 entry_hash {}", "ab".repeat(32)),
            "chain 1 checkpoint x entry_hash zz".to_owned(),
            String::new(),
        ] {
            assert!(
                references(&row(1000, CROSS_REFERENCE, &bad)).is_err(),
                "{bad}"
            );
        }
    }
}
