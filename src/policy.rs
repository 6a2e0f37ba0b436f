//! The access policy: which identity holds which role and, for sync workers,
//! which purposes they may lease tokens for and which event consumers they
//! may act as. Each purpose names the integrations and scopes it allows,
//! optionally limited to some tenants. Anything not granted is denied.
//!
//! A worker whose every purpose is limited to some tenants is limited to
//! those tenants as a whole ([`Policy::tenant_scope`]): its event stream
//! carries only their events, and a connection of any other tenant answers
//! it exactly as a connection that does not exist.
//!
//! The policy is written in TOML, either inline in the configuration's
//! `[policy]` section or in its own file (`policy.file`). `SIGHUP` reloads it
//! from where it came from; a policy that does not validate is refused and the
//! one in force stays.
//!
//! ```toml
//! [identities."spiffe://crm.internal/calendar-sync"]
//! role = "worker"
//! purposes = ["calendar_sync"]
//! consumers = ["calendar-sync"]
//!
//! [identities."crm-backend"]
//! role = "app"
//! authenticate = "api_key"   # or "certificate"; see below
//!
//! [purposes.calendar_sync]
//! integrations = ["calendar"]
//! scopes = ["https://www.googleapis.com/auth/calendar.events"]
//! tenants = []          # empty: every tenant
//! ```
//!
//! Certificate identities and API-key identities are distinct name spaces:
//! each identity authenticates one way only ([`AuthMethod`]), so a client
//! certificate whose SAN spells an API-key identity's name (or an API key
//! configured for a certificate identity) reaches nothing. An entry says which
//! way with `authenticate`; without it, an identity that holds an API key
//! (`[[auth.api_keys]]`) authenticates by API key, every other one by
//! certificate. The policy is therefore built knowing which identities hold
//! keys ([`ApiKeyHolders`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::domain::{Integration, Purpose, ScopeSet, TenantId, scope_list};

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
    /// Every role.
    pub const ALL: [Role; 4] = [Role::App, Role::Worker, Role::Admin, Role::Auditor];

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
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

/// How an identity proves who it is. An identity is reached one way only: a
/// caller that authenticated the other way is refused, whatever name its
/// credential carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// A client certificate signed by `tls.client_ca_file`, naming the identity
    /// in its URI SAN, else its DNS SAN (`certificate`).
    Certificate,
    /// An API key of `[[auth.api_keys]]`, presented by a loopback peer
    /// (`api_key`).
    ApiKey,
}

impl AuthMethod {
    /// The name the policy file uses: `certificate` or `api_key`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Certificate => "certificate",
            AuthMethod::ApiKey => "api_key",
        }
    }
}

/// As messages name it: `certificate`, `API key`.
impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMethod::Certificate => "certificate",
            AuthMethod::ApiKey => "API key",
        })
    }
}

/// The identities that hold at least one API key (`[[auth.api_keys]]`): what
/// the policy needs to know of the keys to tell how an identity without
/// `authenticate` authenticates, and to refuse `authenticate = "api_key"` for
/// an identity no key names (a typo would otherwise lock it out silently).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiKeyHolders(BTreeSet<String>);

impl ApiKeyHolders {
    /// The holders of keys configured for `identities` (one per key; repeats
    /// are fine).
    pub fn new<'a>(identities: impl IntoIterator<Item = &'a str>) -> Self {
        Self(identities.into_iter().map(str::to_owned).collect())
    }

    /// Whether `identity` holds a key.
    pub fn holds(&self, identity: &str) -> bool {
        self.0.contains(identity)
    }
}

/// A policy as written (the `[policy]` section, or a policy file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyDocument {
    /// Identity (SPIFFE id, DNS name or API-key identity) → its grant.
    pub identities: BTreeMap<String, IdentityEntry>,
    /// Purpose name → what it allows.
    pub purposes: BTreeMap<String, PurposeEntry>,
}

/// One identity's grant, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityEntry {
    /// `app`, `worker`, `admin` or `auditor`.
    pub role: String,
    /// Workers: the purposes it may lease for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<String>,
    /// Workers: the event consumers it may watch and acknowledge as.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<String>,
    /// How it authenticates: `certificate` or `api_key`, and only that way.
    /// Absent: by API key if an `[[auth.api_keys]]` entry names it, else by
    /// certificate. `api_key` for an identity no key names is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticate: Option<AuthMethod>,
}

/// One purpose, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurposeEntry {
    /// The integrations whose connections it may lease (`calendar`, `email`).
    pub integrations: Vec<String>,
    /// The scopes it may lease.
    pub scopes: Vec<String>,
    /// Only these tenants; empty means every tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
}

/// What one identity may do.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Its role.
    pub role: Role,
    /// The one way it authenticates (written, or derived from the API keys).
    authenticate: AuthMethod,
    purposes: BTreeSet<String>,
    consumers: BTreeSet<String>,
    /// The tenants it may see, from its purposes' limits.
    tenants: TenantScope,
}

impl Grant {
    /// The one way this identity authenticates; a caller that proved it the
    /// other way is refused.
    pub fn authenticate(&self) -> AuthMethod {
        self.authenticate
    }
}

#[derive(Debug, Clone)]
struct PurposeRule {
    integrations: BTreeSet<Integration>,
    scopes: ScopeSet,
    /// Empty: every tenant.
    tenants: BTreeSet<TenantId>,
}

/// The tenants whose data an identity may see: their connections (as leases
/// and as answers about connection ids) and their events.
///
/// Tenant limits are written on purposes, so only a worker can be limited: it
/// is limited when every purpose it holds names tenants, and then to the
/// union of those tenants. A worker holding one purpose without a limit, or
/// no purpose at all (a watcher only), and every other role, see every tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    /// Every tenant: no limit applies.
    All,
    /// Only these tenants (none, for an identity the policy does not name).
    Only(BTreeSet<TenantId>),
}

/// What an identity the policy does not name may see: nothing.
static NO_TENANT: TenantScope = TenantScope::Only(BTreeSet::new());

impl TenantScope {
    /// Whether data of `tenant` may be shown. Data that names no tenant can
    /// be attributed to none, so only a caller without a limit gets it.
    pub fn sees(&self, tenant: Option<&TenantId>) -> bool {
        match self {
            TenantScope::All => true,
            TenantScope::Only(tenants) => tenant.is_some_and(|t| tenants.contains(t)),
        }
    }

    /// Whether a tenant limit applies.
    pub fn is_limited(&self) -> bool {
        matches!(self, TenantScope::Only(_))
    }

    /// The scope of a role holding `purposes` (names defined in `rules`).
    fn of(role: Role, purposes: &BTreeSet<String>, rules: &HashMap<String, PurposeRule>) -> Self {
        if role != Role::Worker {
            return TenantScope::All;
        }
        let mut tenants = BTreeSet::new();
        let mut limited = false;
        // `Policy::build` checks that every granted purpose is defined.
        for rule in purposes.iter().filter_map(|p| rules.get(p)) {
            if rule.tenants.is_empty() {
                return TenantScope::All;
            }
            limited = true;
            tenants.extend(rule.tenants.iter().cloned());
        }
        if limited {
            TenantScope::Only(tenants)
        } else {
            TenantScope::All
        }
    }
}

/// A validated policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    identities: HashMap<String, Grant>,
    purposes: HashMap<String, PurposeRule>,
    /// Identities that hold API keys but authenticate by certificate.
    keys_refused: BTreeSet<String>,
}

/// What a lease asks for, for the policy check.
#[derive(Debug)]
pub struct LeaseAsk<'a> {
    /// The stated purpose.
    pub purpose: &'a Purpose,
    /// The connection's integration.
    pub integration: Integration,
    /// The connection's tenant.
    pub tenant: &'a TenantId,
    /// The requested scopes.
    pub scopes: &'a ScopeSet,
}

impl Policy {
    /// Validates a written policy against the API keys in force (`keys`: who
    /// holds one, which decides how an identity without `authenticate`
    /// authenticates); the error names the offending entry.
    pub fn build(doc: &PolicyDocument, keys: &ApiKeyHolders) -> Result<Self, String> {
        let mut purposes = HashMap::new();
        for (name, p) in &doc.purposes {
            let at = format!("purposes.{name}");
            Purpose::parse(name).map_err(|e| format!("{at}: {e}"))?;
            if p.integrations.is_empty() {
                return Err(format!("{at}.integrations: name at least one integration"));
            }
            let integrations = p
                .integrations
                .iter()
                .map(|i| Integration::parse(i).map_err(|e| format!("{at}.integrations: {e}")))
                .collect::<Result<BTreeSet<_>, _>>()?;
            if p.scopes.is_empty() {
                return Err(format!("{at}.scopes: name at least one scope"));
            }
            let scopes = ScopeSet::parse(p.scopes.iter().map(String::as_str))
                .map_err(|e| format!("{at}.scopes: {e}"))?;
            let tenants = p
                .tenants
                .iter()
                .map(|t| TenantId::parse(t).map_err(|e| format!("{at}.tenants: {e}")))
                .collect::<Result<BTreeSet<_>, _>>()?;
            purposes.insert(
                name.clone(),
                PurposeRule {
                    integrations,
                    scopes,
                    tenants,
                },
            );
        }
        let mut identities = HashMap::new();
        let mut keys_refused = BTreeSet::new();
        for (identity, entry) in &doc.identities {
            let at = format!("identities.\"{identity}\"");
            if identity.trim().is_empty() || identity.len() > 512 {
                return Err(format!("{at}: an identity is 1 to 512 characters"));
            }
            let role = Role::parse(&entry.role).ok_or_else(|| {
                format!(
                    "{at}.role: unknown role {:?}; expected app, worker, admin or auditor",
                    entry.role
                )
            })?;
            if role != Role::Worker && !(entry.purposes.is_empty() && entry.consumers.is_empty()) {
                return Err(format!(
                    "{at}: only a worker has purposes and consumers (this identity is {role})"
                ));
            }
            for p in &entry.purposes {
                if !purposes.contains_key(p) {
                    return Err(format!(
                        "{at}.purposes: {p:?} is not defined under [purposes]"
                    ));
                }
            }
            for c in &entry.consumers {
                crate::domain::ConsumerName::parse(c)
                    .map_err(|e| format!("{at}.consumers: {e}"))?;
            }
            let has_key = keys.holds(identity);
            let authenticate = match entry.authenticate {
                Some(AuthMethod::ApiKey) if !has_key => {
                    return Err(format!(
                        "{at}.authenticate: \"api_key\", but no [[auth.api_keys]] entry names \
                         this identity"
                    ));
                }
                Some(method) => method,
                None if has_key => AuthMethod::ApiKey,
                None => AuthMethod::Certificate,
            };
            if authenticate == AuthMethod::Certificate && has_key {
                keys_refused.insert(identity.clone());
            }
            let granted: BTreeSet<String> = entry.purposes.iter().cloned().collect();
            identities.insert(
                identity.clone(),
                Grant {
                    role,
                    authenticate,
                    tenants: TenantScope::of(role, &granted, &purposes),
                    purposes: granted,
                    consumers: entry.consumers.iter().cloned().collect(),
                },
            );
        }
        Ok(Self {
            identities,
            purposes,
            keys_refused,
        })
    }

    /// Identities that hold API keys the policy makes useless: they
    /// authenticate by certificate (`authenticate = "certificate"`), so their
    /// keys are refused. Not an error (it lets an identity move from keys to
    /// certificates before its keys are removed); worth a warning.
    pub fn api_keys_refused(&self) -> impl Iterator<Item = &str> {
        self.keys_refused.iter().map(String::as_str)
    }

    /// The identity's grant, if the policy names it.
    pub fn grant(&self, identity: &str) -> Option<&Grant> {
        self.identities.get(identity)
    }

    /// How many identities and purposes it defines.
    pub fn size(&self) -> (usize, usize) {
        (self.identities.len(), self.purposes.len())
    }

    /// Whether `identity` is a worker granted `purpose` at all (checked
    /// before anything is looked up, so a caller without the purpose learns
    /// nothing about connections).
    pub fn allows_purpose(&self, identity: &str, purpose: &Purpose) -> bool {
        self.identities
            .get(identity)
            .is_some_and(|g| g.role == Role::Worker && g.purposes.contains(purpose.as_str()))
    }

    /// Whether `identity` may lease for `ask`; the error says what is not
    /// granted (names only, never a secret; of the scopes, at most a few
    /// excerpts, see [`scope_list`]).
    pub fn check_lease(&self, identity: &str, ask: &LeaseAsk<'_>) -> Result<(), String> {
        let purpose = ask.purpose.as_str();
        let Some(grant) = self.identities.get(identity) else {
            return Err(format!("{identity} is not in the policy"));
        };
        if grant.role != Role::Worker || !grant.purposes.contains(purpose) {
            return Err(format!(
                "the policy does not allow {identity} the purpose {purpose:?}"
            ));
        }
        let Some(rule) = self.purposes.get(purpose) else {
            return Err(format!("purpose {purpose:?} is not defined"));
        };
        if !rule.integrations.contains(&ask.integration) {
            return Err(format!(
                "purpose {purpose:?} does not allow {} connections",
                ask.integration
            ));
        }
        if !rule.tenants.is_empty() && !rule.tenants.contains(ask.tenant) {
            return Err(format!(
                "purpose {purpose:?} does not allow tenant {}",
                ask.tenant
            ));
        }
        if !rule.scopes.covers(ask.scopes) {
            return Err(format!(
                "purpose {purpose:?} does not allow {}",
                scope_list(rule.scopes.missing_from(ask.scopes))
            ));
        }
        Ok(())
    }

    /// The tenants `identity` may see (see [`TenantScope`]); an identity the
    /// policy does not name sees none.
    pub fn tenant_scope(&self, identity: &str) -> &TenantScope {
        self.identities
            .get(identity)
            .map_or(&NO_TENANT, |g| &g.tenants)
    }

    /// Whether `identity` may watch and acknowledge as `consumer`.
    pub fn may_consume(&self, identity: &str, consumer: &str) -> bool {
        self.identities
            .get(identity)
            .is_some_and(|g| g.role == Role::Worker && g.consumers.contains(consumer))
    }
}

/// Where the policy is read from, for reloads.
#[derive(Debug, Clone)]
pub enum PolicySource {
    /// A policy file.
    File(PathBuf),
    /// The `[policy]` section of a configuration file. The policy does not
    /// know the configuration's format: whoever reloads reads the file once,
    /// for the policy and the API keys alike, and hands its `[policy]` to
    /// [`SharedPolicy::reload`].
    ConfigFile(PathBuf),
    /// Fixed at start-up (configuration from the environment or code only).
    Fixed,
}

/// Reads and validates a policy file against the API keys in force.
pub fn load_file(path: &Path, keys: &ApiKeyHolders) -> Result<Policy, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let doc: PolicyDocument = toml_parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Policy::build(&doc, keys).map_err(|e| format!("{}: {e}", path.display()))
}

fn toml_parse(text: &str) -> Result<PolicyDocument, String> {
    use figment::Figment;
    use figment::providers::{Format, Toml};
    Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| e.to_string())
}

/// The policy in force, swappable at run time without dropping connections.
pub struct SharedPolicy {
    current: RwLock<Arc<Policy>>,
    source: PolicySource,
}

impl SharedPolicy {
    /// Holds `policy`, reloadable from `source`.
    pub fn new(policy: Policy, source: PolicySource) -> Self {
        Self {
            current: RwLock::new(Arc::new(policy)),
            source,
        }
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        // A poisoned lock only means a writer panicked after validation; the
        // Arc inside is still a complete policy.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the policy from its source, built against `keys` (the API
    /// keys that will be in force with it). A `ConfigFile` source takes
    /// `from_config`, the `[policy]` of that file as the caller has just read
    /// it. On error the policy in force is kept and the error says why.
    pub fn reload(
        &self,
        keys: &ApiKeyHolders,
        from_config: Option<&PolicyDocument>,
    ) -> Result<(usize, usize), String> {
        let policy = match &self.source {
            PolicySource::File(path) => load_file(path, keys)?,
            PolicySource::ConfigFile(path) => {
                let doc = from_config.ok_or_else(|| {
                    format!("{} must be read again to reload its policy", path.display())
                })?;
                Policy::build(doc, keys).map_err(|e| format!("policy: {e}"))?
            }
            PolicySource::Fixed => {
                return Err("the policy came from the environment; restart to change it".to_owned());
            }
        };
        let size = policy.size();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAL: &str = "https://www.googleapis.com/auth/calendar.events";
    const GMAIL: &str = "https://www.googleapis.com/auth/gmail.modify";

    /// Builds `d` as if no API key were configured.
    fn build(d: &PolicyDocument) -> Result<Policy, String> {
        Policy::build(d, &ApiKeyHolders::default())
    }

    fn doc() -> PolicyDocument {
        toml_parse(&format!(
            r#"
            [identities."spiffe://t/calendar-sync"]
            role = "worker"
            purposes = ["calendar_sync"]
            consumers = ["calendar-sync"]
            [identities.app]
            role = "app"
            [purposes.calendar_sync]
            integrations = ["calendar"]
            scopes = ["{CAL}"]
            [purposes.acme_only]
            integrations = ["email"]
            scopes = ["{GMAIL}"]
            tenants = ["acme"]
            "#
        ))
        .unwrap()
    }

    fn ask<'a>(
        purpose: &'a Purpose,
        integration: Integration,
        tenant: &'a TenantId,
        scopes: &'a ScopeSet,
    ) -> LeaseAsk<'a> {
        LeaseAsk {
            purpose,
            integration,
            tenant,
            scopes,
        }
    }

    #[test]
    fn grants_exactly_what_is_written() {
        let p = build(&doc()).unwrap();
        let cal = Purpose::parse("calendar_sync").unwrap();
        let t = TenantId::parse("t1").unwrap();
        let s = ScopeSet::parse([CAL]).unwrap();
        let w = "spiffe://t/calendar-sync";
        assert!(
            p.check_lease(w, &ask(&cal, Integration::Calendar, &t, &s))
                .is_ok()
        );
        let e = p
            .check_lease(w, &ask(&cal, Integration::Email, &t, &s))
            .unwrap_err();
        assert!(e.contains("email"), "{e}");
        let gmail = ScopeSet::parse([CAL, GMAIL]).unwrap();
        let e = p
            .check_lease(w, &ask(&cal, Integration::Calendar, &t, &gmail))
            .unwrap_err();
        assert!(e.contains(GMAIL), "{e}");
        let other = Purpose::parse("acme_only").unwrap();
        assert!(
            p.check_lease(w, &ask(&other, Integration::Email, &t, &s))
                .is_err()
        );
        assert!(
            p.check_lease("app", &ask(&cal, Integration::Calendar, &t, &s))
                .is_err()
        );
        assert!(
            p.check_lease("stranger", &ask(&cal, Integration::Calendar, &t, &s))
                .is_err()
        );
        assert!(p.may_consume(w, "calendar-sync"));
        assert!(!p.may_consume(w, "email-sync"));
        assert!(!p.may_consume("app", "calendar-sync"));
    }

    #[test]
    fn tenant_limits_apply() {
        let mut d = doc();
        d.identities
            .get_mut("spiffe://t/calendar-sync")
            .unwrap()
            .purposes
            .push("acme_only".into());
        let p = build(&d).unwrap();
        let purpose = Purpose::parse("acme_only").unwrap();
        let s = ScopeSet::parse([GMAIL]).unwrap();
        let acme = TenantId::parse("acme").unwrap();
        let other = TenantId::parse("globex").unwrap();
        let w = "spiffe://t/calendar-sync";
        assert!(
            p.check_lease(w, &ask(&purpose, Integration::Email, &acme, &s))
                .is_ok()
        );
        let e = p
            .check_lease(w, &ask(&purpose, Integration::Email, &other, &s))
            .unwrap_err();
        assert!(e.contains("globex"), "{e}");
    }

    #[test]
    fn a_worker_is_tenant_limited_only_when_every_purpose_is() {
        let acme = TenantId::parse("acme").unwrap();
        let globex = TenantId::parse("globex").unwrap();
        let w = "spiffe://t/calendar-sync";
        let mut d = doc();
        d.identities.get_mut(w).unwrap().purposes = vec!["acme_only".into()];
        let p = build(&d).unwrap();
        let scope = p.tenant_scope(w);
        assert!(scope.is_limited());
        assert!(scope.sees(Some(&acme)));
        assert!(!scope.sees(Some(&globex)));
        assert!(!scope.sees(None), "an event naming no tenant is not shown");

        // One purpose without a limit lifts it.
        d.identities
            .get_mut(w)
            .unwrap()
            .purposes
            .push("calendar_sync".into());
        let p = build(&d).unwrap();
        assert_eq!(p.tenant_scope(w), &TenantScope::All);

        // No purpose at all (a watcher only), and the other roles: no limit.
        d.identities.get_mut(w).unwrap().purposes.clear();
        let p = build(&d).unwrap();
        assert_eq!(p.tenant_scope(w), &TenantScope::All);
        assert_eq!(p.tenant_scope("app"), &TenantScope::All);

        // An identity the policy does not name sees nothing.
        assert!(!p.tenant_scope("stranger").sees(Some(&acme)));
    }

    #[test]
    fn invalid_policies_are_refused_with_the_entry_named() {
        let mut d = doc();
        d.identities.get_mut("app").unwrap().role = "root".into();
        assert!(build(&d).unwrap_err().contains("identities.\"app\".role"));

        let mut d = doc();
        d.identities
            .get_mut("spiffe://t/calendar-sync")
            .unwrap()
            .purposes
            .push("nope".into());
        assert!(build(&d).unwrap_err().contains("\"nope\""));

        let mut d = doc();
        d.identities.get_mut("app").unwrap().purposes = vec!["calendar_sync".into()];
        assert!(build(&d).unwrap_err().contains("only a worker"));

        let mut d = doc();
        d.purposes.get_mut("calendar_sync").unwrap().integrations = vec!["fax".into()];
        assert!(
            build(&d)
                .unwrap_err()
                .contains("purposes.calendar_sync.integrations")
        );

        let mut d = doc();
        d.purposes.get_mut("calendar_sync").unwrap().scopes = vec![];
        assert!(build(&d).unwrap_err().contains("scopes"));

        assert!(toml_parse("[identities.x]\nrole = \"app\"\ncolour = 1\n").is_err());
    }

    #[test]
    fn each_identity_authenticates_one_way() {
        let w = "spiffe://t/calendar-sync";
        let method = |p: &Policy, id: &str| p.grant(id).map(Grant::authenticate);

        // Unsaid: an identity holding an API key authenticates by key, the
        // others by certificate.
        let p = Policy::build(&doc(), &ApiKeyHolders::new(["app", "not-in-the-policy"])).unwrap();
        assert_eq!(method(&p, "app"), Some(AuthMethod::ApiKey));
        assert_eq!(method(&p, w), Some(AuthMethod::Certificate));
        assert_eq!(p.api_keys_refused().count(), 0);
        let p = build(&doc()).unwrap();
        assert_eq!(method(&p, "app"), Some(AuthMethod::Certificate));

        // Said: it holds whatever the keys, and keys it makes useless are listed.
        let mut d = doc();
        d.identities.get_mut("app").unwrap().authenticate = Some(AuthMethod::Certificate);
        let p = Policy::build(&d, &ApiKeyHolders::new(["app"])).unwrap();
        assert_eq!(method(&p, "app"), Some(AuthMethod::Certificate));
        assert_eq!(p.api_keys_refused().collect::<Vec<_>>(), ["app"]);

        // `api_key` for an identity no key names is an error naming it.
        let mut d = doc();
        d.identities.get_mut(w).unwrap().authenticate = Some(AuthMethod::ApiKey);
        let e = build(&d).unwrap_err();
        assert!(
            e.contains(&format!("identities.\"{w}\".authenticate")),
            "{e}"
        );
        let p = Policy::build(&d, &ApiKeyHolders::new([w])).unwrap();
        assert_eq!(method(&p, w), Some(AuthMethod::ApiKey));

        // Written as snake_case; anything else is refused.
        let parsed =
            toml_parse("[identities.x]\nrole = \"app\"\nauthenticate = \"api_key\"\n").unwrap();
        assert_eq!(
            parsed.identities["x"].authenticate,
            Some(AuthMethod::ApiKey)
        );
        assert!(
            toml_parse("[identities.x]\nrole = \"app\"\nauthenticate = \"password\"\n").is_err()
        );
    }
}
