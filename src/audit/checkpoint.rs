//! Signed checkpoints of the audit chain.
//!
//! Every `audit.checkpoint_every` entries the writer signs the entry's hash
//! with an Ed25519 key derived from the keyring's MAC root, in the same
//! transaction as the entry. The public key is not secret: a reviewer who
//! holds it can check that the entries between two checkpoints are the ones
//! the vault wrote (recomputing the SHA-256 chain needs no key), without the
//! MAC key and without the whole history. A checkpoint past the chain head
//! proves that the tail of the log was cut off — as long as it is still in
//! the database; each one is also written to the audit witness outside it
//! (see the `witness` module).

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use zeroize::Zeroizing;

use crate::crypto::{KeyringProvider, MacPurpose};
use crate::domain::Timestamp;
use crate::store::AuditCheckpoint;

/// The fixed input the signing seed is derived from (the MAC subkey is
/// purpose-bound already; this names the algorithm and version).
const SEED_INPUT: &[u8] = b"ed25519-seed/v1";

/// Signs checkpoints. Holds the private key; deliberately not `Debug`.
pub struct CheckpointSigner {
    key: Ed25519KeyPair,
    every: i64,
}

impl CheckpointSigner {
    /// Derives the signing key from the keyring; signs every `every`-th entry.
    pub fn new(keyring: &dyn KeyringProvider, every: u64) -> Self {
        let seed = Zeroizing::new(keyring.mac(MacPurpose::AuditCheckpoint, SEED_INPUT));
        // Invariant: any 32 bytes are a valid Ed25519 seed.
        let key = Ed25519KeyPair::from_seed_unchecked(seed.as_slice())
            .expect("a 32-byte Ed25519 seed is always accepted");
        Self {
            key,
            every: i64::try_from(every.max(1)).unwrap_or(i64::MAX),
        }
    }

    /// Every how many entries a checkpoint is signed.
    pub fn every(&self) -> i64 {
        self.every
    }

    /// The public key that verifies this keyring's checkpoints.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// A signed checkpoint for entry `seq` when it falls on a checkpoint
    /// position: every `every`-th entry of its chain.
    pub fn checkpoint(&self, seq: i64, entry_hash: &[u8]) -> Option<AuditCheckpoint> {
        if !self.is_position(seq) {
            return None;
        }
        Some(self.sign(seq, entry_hash))
    }

    /// Whether entry `seq` falls on a checkpoint position.
    pub fn is_position(&self, seq: i64) -> bool {
        crate::store::audit::chain_position(seq) % self.every == 0
    }

    /// A signed checkpoint for entry `seq`, wherever it falls (the seal that
    /// ends an archive segment).
    pub fn sign(&self, seq: i64, entry_hash: &[u8]) -> AuditCheckpoint {
        let signed_at = Timestamp::now();
        let signature = self.key.sign(&message(seq, entry_hash, signed_at));
        AuditCheckpoint {
            seq,
            entry_hash: entry_hash.to_vec(),
            signed_at,
            public_key: self.public_key(),
            signature: signature.as_ref().to_vec(),
        }
    }
}

/// The bytes a checkpoint's signature covers: a domain label, the sequence
/// number, the signing time and the entry hash (length-prefixed).
pub fn message(seq: i64, entry_hash: &[u8], signed_at: Timestamp) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + entry_hash.len());
    m.extend_from_slice(b"tokenvault-audit-checkpoint-v1\0");
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&signed_at.as_micros().to_be_bytes());
    m.extend_from_slice(&(entry_hash.len() as u64).to_be_bytes());
    m.extend_from_slice(entry_hash);
    m
}

/// Whether `c` carries a valid signature by `public_key` (which must be the
/// one the checkpoint names, too).
pub fn signature_valid(c: &AuditCheckpoint, public_key: &[u8]) -> bool {
    c.public_key == public_key
        && UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&message(c.seq, &c.entry_hash, c.signed_at), &c.signature)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::LocalKeyring;

    fn keyring(dir: &std::path::Path) -> LocalKeyring {
        LocalKeyring::init(dir.join("keyring.json")).unwrap()
    }

    #[test]
    fn signs_on_checkpoint_positions_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let signer = CheckpointSigner::new(&keyring(dir.path()), 10);
        assert!(signer.checkpoint(9, &[1; 32]).is_none());
        // Positions count within a chain: chain 1's 10th entry, not 2^40 + 10.
        let chain_1 = *crate::store::audit::chain_range(1).start() - 1;
        assert!(signer.checkpoint(chain_1 + 10, &[1; 32]).is_some());
        assert!(signer.checkpoint(chain_1 + 9, &[1; 32]).is_none());
        let c = signer.checkpoint(20, &[1; 32]).unwrap();
        assert!(signature_valid(&c, &signer.public_key()));

        let mut edited = c.clone();
        edited.entry_hash[0] ^= 1;
        assert!(!signature_valid(&edited, &signer.public_key()));
        let mut moved = c.clone();
        moved.seq = 30;
        assert!(!signature_valid(&moved, &signer.public_key()));

        // Another keyring's signer neither produces nor accepts this key.
        let other_dir = tempfile::tempdir().unwrap();
        let other = CheckpointSigner::new(&keyring(other_dir.path()), 10);
        assert_ne!(other.public_key(), signer.public_key());
        let forged = other.checkpoint(20, &[1; 32]).unwrap();
        assert!(!signature_valid(&forged, &signer.public_key()));
    }

    #[test]
    fn the_key_is_stable_for_a_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let k = keyring(dir.path());
        assert_eq!(
            CheckpointSigner::new(&k, 1).public_key(),
            CheckpointSigner::new(&k, 1000).public_key()
        );
    }
}
