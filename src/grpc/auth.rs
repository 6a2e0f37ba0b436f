//! Caller authentication and role checks, run at the top of every RPC.
//! An identity comes from the connection's verified client certificate (its
//! URI SAN, else DNS SAN; see `transport`) or, from loopback peers only, from
//! an API key (`authorization: Bearer …`, stored as SHA-256 hashes in the
//! configuration). The policy in force maps the identity to a role. Every
//! refusal is written to the audit log.

use std::collections::HashMap;
use std::sync::Arc;

use ring::digest;
use tonic::{Request, Status};

use super::transport::{CertIdentity, PeerInfo};
use crate::audit::{Actor, Outcome};
use crate::config::AuthConfig;
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

/// Checks callers against the configured keys and the policy in force.
pub struct Authenticator {
    api_keys: HashMap<[u8; 32], String>,
    policy: Arc<SharedPolicy>,
}

impl Authenticator {
    /// Builds the key table from validated configuration.
    pub fn new(config: &AuthConfig, policy: Arc<SharedPolicy>) -> Self {
        let api_keys = config
            .api_keys
            .iter()
            .filter_map(|k| {
                let bytes: [u8; 32] = hex::decode(&k.sha256).ok()?.try_into().ok()?;
                Some((bytes, k.identity.clone()))
            })
            .collect();
        Self { api_keys, policy }
    }

    /// The policy, for reloads.
    pub fn policy(&self) -> &Arc<SharedPolicy> {
        &self.policy
    }

    /// Hashes an API key the way the configuration stores it.
    pub fn hash_api_key(key: &str) -> String {
        hex::encode(digest::digest(&digest::SHA256, key.as_bytes()))
    }

    fn identify<T>(&self, request: &Request<T>) -> Result<String, &'static str> {
        let peer = request.extensions().get::<PeerInfo>();
        match peer.and_then(|p| p.certificate.as_ref()) {
            Some(CertIdentity::Named(id)) => return Ok(id.clone()),
            Some(CertIdentity::NoSan) => {
                return Err("the client certificate carries no URI or DNS SAN to identify it");
            }
            None => {}
        }
        let Some(value) = request.metadata().get("authorization") else {
            return Err(
                "no credentials: present a client certificate, or on loopback an API key as `authorization: Bearer <key>`",
            );
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("malformed authorization header; expected `Bearer <key>`")?;
        if !peer.is_some_and(PeerInfo::is_loopback) {
            return Err("API keys are accepted from loopback peers only");
        }
        let hash: [u8; 32] = digest::digest(&digest::SHA256, key.as_bytes())
            .as_ref()
            .try_into()
            .map_err(|_| "hash length")?;
        self.api_keys.get(&hash).cloned().ok_or("unknown API key")
    }

    /// Authenticates the caller and checks that its role is one of `allowed`.
    /// Refusals are audited (fail-closed: if the audit fails the caller gets
    /// UNAVAILABLE, never access).
    pub async fn authorize<T>(
        &self,
        vault: &Arc<Vault>,
        request: &Request<T>,
        rpc: &'static str,
        allowed: &[Role],
    ) -> Result<Caller, Status> {
        let identity = match self.identify(request) {
            Ok(id) => id,
            Err(why) => {
                let anon = Actor {
                    identity: "anonymous".to_owned(),
                    role: String::new(),
                };
                vault
                    .audit()
                    .record(&anon, "authn.refuse", rpc, Outcome::Denied, why)
                    .await?;
                return Err(Status::unauthenticated(why));
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
            return Err(Status::permission_denied(format!(
                "{identity} has no role in the policy"
            )));
        };
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
            return Err(Status::permission_denied(format!(
                "role {role} may not call {rpc}"
            )));
        }
        Ok(caller)
    }
}
