//! The connection cipher: the only way the rest of the vault seals or opens
//! a secret. The key manager makes a [`Cipher`] for one owner (a connection,
//! a pending OAuth state, a revocation-outbox row), holding that owner's DEK
//! and building the associated data from the owner inside, in the manner of
//! rustls handing a connection an encrypter rather than a key.
//!
//! Invariants:
//! - no raw DEK leaves the key manager: a `Cipher` seals and opens, it does
//!   not hand out its key, and its `Debug` names only its owner and version;
//! - a value sealed for one owner and token kind opens only as that owner's
//!   value of that kind (the associated data binds tenant, account, owner id
//!   and kind);
//! - unwrapped connection DEKs may be cached ([`DekCache`]), keyed by the
//!   exact wrapped bytes they came from, bounded in number and age, and
//!   dropped when their connection is deleted or rewrapped or their version
//!   leaves service; cached keys are zeroized when the last holder drops.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::crypto::{
    DekContext, KekVersion, Key256, SecretString, TokenKind, WrappedDek, open, seal,
};
use crate::domain::{ConnectionId, ReceiptId, TenantId, VaultError};
use crate::store::{ConnectionRecord, WrappedKeyOwner};
use crate::vault::expiring::ExpiringMap;

/// Seals and opens the secrets of one owner under that owner's DEK. Made by
/// the key manager ([`super::KeyManager::new_cipher`],
/// [`super::KeyManager::open_cipher`],
/// [`super::KeyManager::connection_cipher`]).
pub struct Cipher {
    dek: Arc<Key256>,
    owner: KeyContext,
    wrapped: WrappedDek,
}

impl Cipher {
    pub(super) fn new(dek: Arc<Key256>, owner: KeyContext, wrapped: WrappedDek) -> Self {
        Self {
            dek,
            owner,
            wrapped,
        }
    }

    /// Seals `plain` as this owner's value of `kind`.
    pub fn seal(&self, kind: TokenKind, plain: &[u8]) -> Result<Vec<u8>, VaultError> {
        Ok(seal(&self.dek, &self.owner.as_dek().token(kind), plain)?)
    }

    /// Opens this owner's sealed value of `kind`; a value sealed for another
    /// owner or kind, or altered, is refused.
    pub fn open(&self, kind: TokenKind, sealed: &[u8]) -> Result<SecretString, VaultError> {
        let plain = open(&self.dek, &self.owner.as_dek().token(kind), sealed)?;
        Ok(plain.into_secret_string()?)
    }

    /// The owner's DEK as stored: wrapped by a KEK version.
    pub fn wrapped(&self) -> &WrappedDek {
        &self.wrapped
    }
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cipher")
            .field("owner", &self.owner.connection)
            .field("kek_version", &self.wrapped.kek_version)
            .finish_non_exhaustive()
    }
}

/// The associated-data context of a wrapped key, owned.
pub struct KeyContext {
    tenant: String,
    account: String,
    connection: String,
}

impl KeyContext {
    /// As the envelope functions take it.
    pub(crate) fn as_dek(&self) -> DekContext<'_> {
        DekContext {
            tenant: &self.tenant,
            account: &self.account,
            connection: &self.connection,
        }
    }

    /// A connection's key: bound to its tenant, account and id.
    pub(crate) fn connection(c: &ConnectionRecord) -> Self {
        Self {
            tenant: c.tenant.as_str().to_owned(),
            account: c.account.as_str().to_owned(),
            connection: c.id.as_str().to_owned(),
        }
    }

    /// A pending authorization's key: bound to its tenant, account and state.
    pub(crate) fn oauth_state(tenant: &str, account: &str, state_hash: &[u8]) -> Self {
        Self {
            tenant: tenant.to_owned(),
            account: account.to_owned(),
            connection: format!(
                "authz-{}",
                hex::encode(&state_hash[..state_hash.len().min(16)])
            ),
        }
    }

    /// A revocation-outbox key: bound to its receipt, tenant and connection.
    pub(crate) fn outbox(
        receipt: &ReceiptId,
        tenant: &TenantId,
        connection: &ConnectionId,
    ) -> Self {
        Self {
            tenant: receipt.as_str().to_owned(),
            account: tenant.as_str().to_owned(),
            connection: connection.as_str().to_owned(),
        }
    }

    pub(super) fn of(owner: &WrappedKeyOwner) -> Self {
        match owner {
            WrappedKeyOwner::Connection {
                id,
                tenant,
                account,
            } => Self {
                tenant: tenant.as_str().to_owned(),
                account: account.as_str().to_owned(),
                connection: id.as_str().to_owned(),
            },
            WrappedKeyOwner::OauthState {
                state_hash,
                tenant,
                account,
            } => Self::oauth_state(tenant.as_str(), account.as_str(), state_hash),
            WrappedKeyOwner::Outbox {
                receipt,
                connection,
                tenant,
            } => Self::outbox(receipt, tenant, connection),
        }
    }
}

/// Unwrapped connection DEKs, by connection, each kept for the TTL (see
/// [`ExpiringMap`] for how a full cache makes room).
pub(super) struct DekCache {
    entries: Mutex<ExpiringMap<ConnectionId, CachedDek>>,
    enabled: bool,
    /// Moves on every drop, so an unwrap that was in flight when its connection was
    /// dropped does not put the key back.
    epoch: std::sync::atomic::AtomicU64,
}

struct CachedDek {
    version: KekVersion,
    wrapped: Vec<u8>,
    key: Arc<Key256>,
}

impl DekCache {
    /// A cache holding at most `capacity` keys, each for at most `ttl`
    /// (either zero: no caching).
    pub(super) fn new(ttl: Duration, capacity: usize) -> Self {
        let entries = ExpiringMap::new(ttl, capacity);
        Self {
            enabled: entries.enabled(),
            entries: Mutex::new(entries),
            epoch: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExpiringMap<ConnectionId, CachedDek>> {
        // A panic while holding the lock leaves a map that is still usable.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many keys it holds.
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    pub(super) fn get(&self, id: &ConnectionId, wrapped: &WrappedDek) -> Option<Arc<Key256>> {
        if !self.enabled() {
            return None;
        }
        let mut entries = self.lock();
        let e = entries.get(id)?;
        (e.version == wrapped.kek_version && e.wrapped == wrapped.bytes).then(|| e.key.clone())
    }

    /// The epoch to pass to [`DekCache::put`] for an unwrap that starts now.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Caches `key`, unless something was dropped since `epoch` was read.
    pub(super) fn put(
        &self,
        id: &ConnectionId,
        wrapped: &WrappedDek,
        key: Arc<Key256>,
        epoch: u64,
    ) {
        if !self.enabled() {
            return;
        }
        let mut entries = self.lock();
        if self.epoch() != epoch {
            return;
        }
        entries.put(
            id.clone(),
            CachedDek {
                version: wrapped.kek_version,
                wrapped: wrapped.bytes.clone(),
                key,
            },
        );
    }

    pub(super) fn forget(&self, id: &ConnectionId) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        entries.remove(id);
    }

    /// Drops every entry whose version is not in `usable`, and expired ones.
    pub(super) fn keep_only(&self, usable: &BTreeSet<KekVersion>) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        entries.retain(|e| usable.contains(&e.version));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(ttl: Duration, capacity: usize) -> DekCache {
        DekCache::new(ttl, capacity)
    }

    fn wrapped(version: u32, byte: u8) -> WrappedDek {
        WrappedDek {
            kek_version: KekVersion::new(version).unwrap(),
            bytes: vec![byte; 65],
        }
    }

    #[test]
    fn the_dek_cache_answers_only_for_the_exact_wrapped_key() {
        let c = cache(Duration::from_secs(30), 10);
        let id = ConnectionId::from_stored("conn_a".into());
        let w = wrapped(1, 7);
        c.put(&id, &w, Arc::new(Key256::from_bytes([1; 32])), c.epoch());
        assert!(c.get(&id, &w).is_some());
        // Rewrapped elsewhere (new bytes or version): a miss, never the old key.
        assert!(c.get(&id, &wrapped(1, 8)).is_none());
        assert!(c.get(&id, &wrapped(2, 7)).is_none());
        c.forget(&id);
        assert!(c.get(&id, &w).is_none());
        // An unwrap that started before the connection was dropped does not put it back.
        let before = c.epoch();
        c.forget(&id);
        c.put(&id, &w, Arc::new(Key256::from_bytes([1; 32])), before);
        assert!(c.get(&id, &w).is_none());
    }

    #[test]
    fn the_dek_cache_is_bounded_expires_and_drops_unusable_versions() {
        let c = cache(Duration::from_secs(30), 2);
        let ids: Vec<_> = (0..3)
            .map(|n| ConnectionId::from_stored(format!("conn_{n}")))
            .collect();
        for (n, id) in ids.iter().enumerate() {
            c.put(
                id,
                &wrapped(1 + n as u32 % 2, 1),
                Arc::new(Key256::from_bytes([2; 32])),
                c.epoch(),
            );
        }
        assert_eq!(c.lock().len(), 2, "capacity holds");
        let usable: BTreeSet<KekVersion> = [KekVersion::new(2).unwrap()].into();
        c.keep_only(&usable);
        assert_eq!(c.lock().len(), 1, "only the version 2 key is left");
        assert!(c.get(&ids[1], &wrapped(2, 1)).is_some());
        assert!(c.get(&ids[2], &wrapped(1, 1)).is_none());

        let expired = cache(Duration::from_millis(1), 10);
        expired.put(
            &ids[0],
            &wrapped(1, 1),
            Arc::new(Key256::from_bytes([3; 32])),
            expired.epoch(),
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(expired.get(&ids[0], &wrapped(1, 1)).is_none());

        let off = cache(Duration::ZERO, 10);
        off.put(
            &ids[0],
            &wrapped(1, 1),
            Arc::new(Key256::from_bytes([4; 32])),
            off.epoch(),
        );
        assert_eq!(off.lock().len(), 0, "a zero TTL turns the cache off");
    }
}
