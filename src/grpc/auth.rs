//! Caller authentication and role checks, run at the top of every RPC.
//! An identity comes from the connection's verified client certificate (its
//! URI SAN, else DNS SAN; see `transport`) or, from loopback peers only, from
//! an API key (`authorization: Bearer …`, stored as SHA-256 hashes in the
//! configuration; SIGHUP reloads them with the policy). The policy in force
//! maps the identity to a role.
//!
//! Every refusal is audited. A caller refused *before* it has an identity
//! (no or bad credentials) is counted by the [`RefusalAggregator`], which
//! keeps what anonymous callers can write to the audit log within
//! configured bounds and never answers differently because of it; a caller
//! with an identity that is refused or denied (`authz.deny`) is audited call
//! by call, and fails closed: if that entry cannot be written it gets
//! UNAVAILABLE, never access.
//!
//! Its refusals are [`VaultError`]s like any other, so that they reach the
//! caller through `grpc::status` with their ErrorInfo: `CREDENTIALS_MISSING`
//! or `CREDENTIALS_INVALID` (UNAUTHENTICATED), `ROLE_NOT_ALLOWED`
//! (PERMISSION_DENIED).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ring::digest;
use tonic::{Request, Status};

use super::refusals::{Peer, Reason, RefusalAggregator};
use super::transport::{CertIdentity, PeerInfo};
use crate::audit::{Actor, Outcome};
use crate::config::AuthConfig;
use crate::domain::{ErrorReason, VaultError};
use crate::policy::{Policy, SharedPolicy};
use crate::vault::Vault;

pub use crate::policy::Role;

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Its identity.
    pub identity: String,
    /// Its role.
    pub role: Role,
    /// The policy this call is judged by (one snapshot for the whole call).
    pub policy: Arc<Policy>,
}

impl Caller {
    /// The caller as the audit log names it.
    pub fn actor(&self) -> Actor {
        Actor {
            identity: self.identity.clone(),
            role: self.role.as_str().to_owned(),
        }
    }
}

/// The API keys in force: the SHA-256 of each key and the identity it
/// authenticates as. Swapped whole when SIGHUP reloads the configuration.
/// Deliberately not `Debug`: logs name a key by [`ApiKeyName`] only.
#[derive(Default)]
pub struct ApiKeys(HashMap<[u8; 32], String>);

impl ApiKeys {
    /// The key table of validated configuration (`Config::validate` checked
    /// that every `sha256` is 64 hex digits).
    pub fn from_config(config: &AuthConfig) -> Self {
        Self(
            config
                .api_keys
                .iter()
                .filter_map(|k| {
                    let bytes: [u8; 32] = hex::decode(&k.sha256).ok()?.try_into().ok()?;
                    Some((bytes, k.identity.clone()))
                })
                .collect(),
        )
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The identity of the key whose SHA-256 is `hash`.
    fn identity(&self, hash: &[u8; 32]) -> Option<&str> {
        self.0.get(hash).map(String::as_str)
    }

    /// What differs from `self` in `next`: a key is one (hash, identity)
    /// pair, so a key moved to another identity is removed and added.
    pub fn changes_to(&self, next: &ApiKeys) -> ApiKeyChanges {
        let only_in = |a: &ApiKeys, b: &ApiKeys| {
            let mut names: Vec<ApiKeyName> =
                a.0.iter()
                    .filter(|(hash, identity)| b.0.get(*hash) != Some(*identity))
                    .map(|(hash, identity)| ApiKeyName::new(identity, hash))
                    .collect();
            names.sort();
            names
        };
        ApiKeyChanges {
            added: only_in(next, self),
            removed: only_in(self, next),
            count: next.len(),
        }
    }
}

/// How logs and the audit log name an API key: its identity and the first 8
/// hex digits of the SHA-256 the configuration holds (enough to find the
/// `[[auth.api_keys]]` entry, and to tell two keys of one identity apart;
/// never the key, nor its whole hash).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiKeyName {
    /// The identity the key authenticates as.
    pub identity: String,
    /// The first 8 hex digits of the key's SHA-256.
    pub sha256_prefix: String,
}

impl ApiKeyName {
    fn new(identity: &str, hash: &[u8; 32]) -> Self {
        Self {
            identity: identity.to_owned(),
            sha256_prefix: hex::encode(&hash[..4]),
        }
    }
}

impl std::fmt::Display for ApiKeyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} sha256:{}", self.identity, self.sha256_prefix)
    }
}

/// What a reload changed in the API keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyChanges {
    /// Keys that authenticate now and did not before.
    pub added: Vec<ApiKeyName>,
    /// Keys that authenticated before and no longer do.
    pub removed: Vec<ApiKeyName>,
    /// How many keys are in force now.
    pub count: usize,
}

impl ApiKeyChanges {
    /// Whether the reload changed no key.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// As the audit log records it:
/// `api_keys added=[alice sha256:1a2b3c4d] removed=[] now 3 keys`.
impl std::fmt::Display for ApiKeyChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |names: &[ApiKeyName]| {
            names
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "api_keys added=[{}] removed=[{}] now {} keys",
            list(&self.added),
            list(&self.removed),
            self.count
        )
    }
}

/// The API keys in force, swappable at run time without dropping
/// connections (as [`SharedPolicy`] is for the policy).
pub struct SharedApiKeys {
    current: RwLock<Arc<ApiKeys>>,
}

impl SharedApiKeys {
    /// Holds `keys`.
    pub fn new(keys: ApiKeys) -> Self {
        Self {
            current: RwLock::new(Arc::new(keys)),
        }
    }

    /// The keys in force.
    pub fn current(&self) -> Arc<ApiKeys> {
        // A poisoned lock only means a writer panicked; the Arc inside is
        // still a complete key table (it is replaced whole).
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `keys` in force; returns what changed.
    pub fn replace(&self, keys: ApiKeys) -> ApiKeyChanges {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let changes = current.changes_to(&keys);
        *current = Arc::new(keys);
        changes
    }
}

/// Checks callers against the API keys and the policy in force.
pub struct Authenticator {
    api_keys: Arc<SharedApiKeys>,
    policy: Arc<SharedPolicy>,
    refusals: Arc<RefusalAggregator>,
    /// How long a call refused for its credentials waits for its answer.
    refusal_delay: std::time::Duration,
}

impl Authenticator {
    /// Builds the key table from validated configuration; calls refused for
    /// their credentials are counted and audited by `refusals`.
    pub fn new(
        config: &AuthConfig,
        policy: Arc<SharedPolicy>,
        refusals: Arc<RefusalAggregator>,
    ) -> Self {
        Self {
            api_keys: Arc::new(SharedApiKeys::new(ApiKeys::from_config(config))),
            policy,
            refusals,
            refusal_delay: std::time::Duration::from_millis(config.refusal_delay_ms),
        }
    }

    /// The policy, for reloads.
    pub fn policy(&self) -> &Arc<SharedPolicy> {
        &self.policy
    }

    /// The API keys, for reloads.
    pub fn api_keys(&self) -> &Arc<SharedApiKeys> {
        &self.api_keys
    }

    /// Hashes an API key the way the configuration stores it.
    pub fn hash_api_key(key: &str) -> String {
        hex::encode(digest::digest(&digest::SHA256, key.as_bytes()))
    }

    /// Who the caller says it is, and how it proved it: the verified client
    /// certificate's identity when one was presented, else the identity of
    /// its API key (loopback peers only). Whether the identity may be reached
    /// that way is the policy's to say ([`crate::policy::AuthMethod`]).
    fn identify<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(String, crate::policy::AuthMethod), Reason> {
        let peer = request.extensions().get::<PeerInfo>();
        match peer.and_then(|p| p.certificate.as_ref()) {
            Some(CertIdentity::Named(id)) => {
                return Ok((id.clone(), crate::policy::AuthMethod::Certificate));
            }
            Some(CertIdentity::NoSan) => return Err(Reason::CertificateWithoutSan),
            None => {}
        }
        let Some(value) = request.metadata().get("authorization") else {
            return Err(Reason::NoCredentials);
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Reason::MalformedAuthorization)?;
        if !peer.is_some_and(PeerInfo::is_loopback) {
            return Err(Reason::ApiKeyNotFromLoopback);
        }
        // A SHA-256 digest is 32 bytes: the conversion cannot fail (and if it
        // did, no key would match).
        let hash: [u8; 32] = digest::digest(&digest::SHA256, key.as_bytes())
            .as_ref()
            .try_into()
            .map_err(|_| Reason::UnknownApiKey)?;
        self.api_keys
            .current()
            .identity(&hash)
            .map(|id| (id.to_owned(), crate::policy::AuthMethod::ApiKey))
            .ok_or(Reason::UnknownApiKey)
    }

    /// Authenticates the caller and checks that its role is one of `allowed`.
    /// A caller without a usable credential gets UNAUTHENTICATED, counted and
    /// audited by the [`RefusalAggregator`] (whose audit entry, when it
    /// writes one, never changes the answer), after `auth.refusal_delay_ms`. An identified caller that is
    /// refused or denied is audited one entry per call, fail-closed: if the
    /// entry cannot be written the caller gets UNAVAILABLE, never access.
    pub async fn authorize<T>(
        &self,
        vault: &Arc<Vault>,
        request: &Request<T>,
        rpc: &'static str,
        allowed: &[Role],
    ) -> Result<Caller, Status> {
        let (identity, method) = match self.identify(request) {
            Ok(id) => id,
            Err(reason) => {
                let peer = Peer::of(
                    request
                        .extensions()
                        .get::<PeerInfo>()
                        .and_then(|p| p.remote),
                );
                self.refusals
                    .refuse_call(vault.audit(), peer, reason, rpc)
                    .await;
                // The answer is the same, only later (`auth.refusal_delay_ms`):
                // a client looping on refused calls gets one per delay per
                // stream, and the waiting costs a timer, not a core.
                if !self.refusal_delay.is_zero() {
                    tokio::time::sleep(self.refusal_delay).await;
                }
                return Err(VaultError::Unauthenticated(reason.to_string().into())
                    .because(reason.error_reason())
                    .into());
            }
        };
        let policy = self.policy.current();
        let Some(role) = policy.grant(&identity).map(|g| g.role) else {
            let actor = Actor {
                identity: identity.clone(),
                role: String::new(),
            };
            vault
                .audit()
                .record(
                    &actor,
                    "authz.deny",
                    rpc,
                    Outcome::Denied,
                    "identity has no role",
                )
                .await?;
            return Err(VaultError::PermissionDenied(
                format!("{identity} has no role in the policy").into(),
            )
            .because(ErrorReason::RoleNotAllowed)
            .into());
        };
        // Certificate identities and API-key identities are distinct: an
        // identity is reached only the way the policy says it authenticates,
        // so a CA-signed certificate whose SAN spells an API-key identity's
        // name (or a key configured for a certificate identity) gets nothing.
        // Naming the expected method tells the operator what is wrong and an
        // attacker nothing: the caller already holds a valid credential.
        if let Some(expected) = policy
            .grant(&identity)
            .map(|g| g.authenticate())
            .filter(|expected| *expected != method)
        {
            let why = format!("{identity} authenticates by {expected}, not by {method}");
            let actor = Actor {
                identity: identity.clone(),
                role: String::new(),
            };
            vault
                .audit()
                .record(&actor, "authn.method", rpc, Outcome::Denied, why.as_str())
                .await?;
            return Err(VaultError::Unauthenticated(why.into())
                .because(ErrorReason::CredentialsInvalid)
                .into());
        }
        let caller = Caller {
            identity,
            role,
            policy,
        };
        if !allowed.contains(&role) {
            vault
                .audit()
                .record(
                    &caller.actor(),
                    "authz.deny",
                    rpc,
                    Outcome::Denied,
                    format!("role {role} may not call {rpc}"),
                )
                .await?;
            return Err(VaultError::PermissionDenied(
                format!("role {role} may not call {rpc}").into(),
            )
            .because(ErrorReason::RoleNotAllowed)
            .into());
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyConfig;

    fn keys(entries: &[(&str, &str)]) -> ApiKeys {
        ApiKeys::from_config(&AuthConfig {
            api_keys: entries
                .iter()
                .map(|(identity, key)| ApiKeyConfig {
                    identity: (*identity).to_owned(),
                    sha256: Authenticator::hash_api_key(key),
                })
                .collect(),
            ..AuthConfig::default()
        })
    }

    #[test]
    fn changes_name_identities_and_hash_prefixes_never_keys() {
        let before = keys(&[("alice", "key-a"), ("bob", "key-b")]);
        let after = keys(&[("alice", "key-a"), ("carol", "key-c")]);
        let changes = before.changes_to(&after);
        let (carol, bob) = (
            Authenticator::hash_api_key("key-c"),
            Authenticator::hash_api_key("key-b"),
        );
        let (carol, bob) = (&carol[..8], &bob[..8]);
        assert_eq!(
            changes.to_string(),
            format!("api_keys added=[carol sha256:{carol}] removed=[bob sha256:{bob}] now 2 keys")
        );
        let text = changes.to_string();
        assert!(!text.contains("key-b") && !text.contains(&Authenticator::hash_api_key("key-b")));
        assert!(
            before
                .changes_to(&keys(&[("bob", "key-b"), ("alice", "key-a")]))
                .is_empty()
        );
    }

    #[test]
    fn a_key_moved_to_another_identity_is_removed_and_added() {
        let changes = keys(&[("alice", "key")]).changes_to(&keys(&[("mallory", "key")]));
        assert_eq!(changes.added.len(), 1);
        assert_eq!(changes.added[0].identity, "mallory");
        assert_eq!(changes.removed.len(), 1);
        assert_eq!(changes.removed[0].identity, "alice");
    }

    #[test]
    fn a_replaced_key_table_is_the_one_in_force() {
        let shared = SharedApiKeys::new(keys(&[("alice", "key-a")]));
        let hash = |k: &str| -> [u8; 32] {
            hex::decode(Authenticator::hash_api_key(k))
                .unwrap()
                .try_into()
                .unwrap()
        };
        assert_eq!(shared.current().identity(&hash("key-a")), Some("alice"));
        let changes = shared.replace(keys(&[("bob", "key-b")]));
        assert_eq!(changes.removed[0].identity, "alice");
        assert_eq!(shared.current().identity(&hash("key-a")), None);
        assert_eq!(shared.current().identity(&hash("key-b")), Some("bob"));
    }
}
