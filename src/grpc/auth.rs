//! Caller authentication and role checks, run at the top of every RPC.
//! Identities come from API keys (`authorization: Bearer …`, accepted only
//! from loopback peers, stored as SHA-256 hashes in the configuration); the
//! configured role table maps each identity to one role. Every refusal is
//! written to the audit log.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use ring::digest;
use tonic::{Request, Status};

use crate::audit::{Actor, Outcome};
use crate::config::AuthConfig;
use crate::vault::Vault;

/// The roles of the design contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The product backend.
    App,
    /// A sync worker.
    Worker,
    /// An administrator.
    Admin,
    /// A read-only security reviewer.
    Auditor,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "app" => Some(Role::App),
            "worker" => Some(Role::Worker),
            "admin" => Some(Role::Admin),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::App => "app",
            Role::Worker => "worker",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Its identity.
    pub identity: String,
    /// Its role.
    pub role: Role,
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

/// Checks callers against the configured keys and roles.
pub struct Authenticator {
    api_keys: HashMap<[u8; 32], String>,
    roles: HashMap<String, Role>,
}

impl Authenticator {
    /// Builds the tables from validated configuration.
    pub fn new(config: &AuthConfig) -> Self {
        let api_keys = config
            .api_keys
            .iter()
            .filter_map(|k| {
                let bytes: [u8; 32] = hex::decode(&k.sha256).ok()?.try_into().ok()?;
                Some((bytes, k.identity.clone()))
            })
            .collect();
        let roles = config
            .roles
            .iter()
            .filter_map(|(id, role)| Some((id.clone(), Role::parse(role)?)))
            .collect();
        Self { api_keys, roles }
    }

    /// Hashes an API key the way the configuration stores it.
    pub fn hash_api_key(key: &str) -> String {
        hex::encode(digest::digest(&digest::SHA256, key.as_bytes()))
    }

    fn identify<T>(&self, request: &Request<T>) -> Result<String, &'static str> {
        let Some(value) = request.metadata().get("authorization") else {
            return Err("no credentials: send an API key as `authorization: Bearer <key>`");
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("malformed authorization header; expected `Bearer <key>`")?;
        let loopback = request.remote_addr().is_some_and(|a| a.ip().is_loopback());
        if !loopback {
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
        let Some(role) = self.roles.get(&identity).copied() else {
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
        let caller = Caller { identity, role };
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
