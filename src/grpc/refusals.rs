//! Refused authentication, audited so that a reviewer sees every refusal but
//! anonymous callers cannot grow the audit log at will.
//!
//! A caller that fails to authenticate — a gRPC call without usable
//! credentials (see `auth`), a TLS handshake refused for its client
//! certificate (see `transport`) — has done nothing yet; what a reviewer
//! needs is who kept trying, why they were refused and how often. Refusals
//! are therefore counted per *source*, a peer IP address and a [`Reason`],
//! over windows of `audit.refusal_window_seconds`:
//!
//! - the first refusal of a source in a window is written at once
//!   (`authn.refuse`, `count=1`), so a single misconfigured client shows in
//!   the log as soon as it is refused;
//! - further refusals of that source in the window are only counted; when the
//!   window ends, one `authn.refuse` entry per source carries their number
//!   (`count=N window=…s`);
//! - at most `audit.refusal_max_sources` sources are tracked per window (an
//!   attacker may own many addresses); refusals from any other source are
//!   folded into one `authn.refuse.overflow` entry at the end of the window,
//!   with their total and a count per reason.
//!
//! Invariants:
//!
//! - **Bounded growth.** Per window at most `S` first entries, `S`
//!   end-of-window entries and one overflow entry, `S` being
//!   `audit.refusal_max_sources`: `2·S + 1` entries
//!   ([`RefusalLimits::entries_per_window`]), whatever the rate of refusals
//!   or the number of addresses they come from. Memory is bounded the same
//!   way: `S` tallies and one counter per [`Reason`].
//! - **Nothing hidden.** Every refusal is counted in exactly one entry: the
//!   `count=` values of the `authn.refuse*` entries ([`counted`]) add up to
//!   the number of refusals. An entry that cannot be written is logged (warn)
//!   and its count carried into the next window; what is still counted when
//!   the server stops is written by its shutdown.
//! - **Same answer.** Aggregation changes what is written, never what the
//!   caller is told: every refusal of a reason gets the same UNAUTHENTICATED
//!   status (or the same failed handshake), audit outage or not. Only a
//!   source's first refusal of a window waits for the database (so that it is
//!   in the log when the caller hears of it); every other one touches memory
//!   only.
//! - **Per peer, bounded by reason.** One address causes at most one
//!   immediate entry per reason per window, however fast it calls; an
//!   authenticated caller from the same address is not slowed down or
//!   refused (the address is never a reason to refuse).
//! - **Not fail-closed.** A refusal is not an operation the vault performs,
//!   so failing to audit it never turns into another answer, a panic or a
//!   wait. Authenticated denials (`authz.deny`, `lease.deny`, …) are not
//!   refusals in this sense: they stay individually audited and fail closed.
//! - The window's lock is never held across an `.await`.
//! - Every refusal increments `tokenvault_authn_refusals_total{reason}` (no
//!   peer label: its cardinality would be the attacker's to choose); entries
//!   written or failed are counted in
//!   `tokenvault_authn_refusal_entries_total{kind,outcome}`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::audit::{Actor, AuditLog, Outcome};
use crate::config::AuditConfig;
use crate::domain::ErrorReason;

/// The audit action of a refusal entry (a source's first, or its count at
/// the end of a window).
pub const REFUSE: &str = "authn.refuse";

/// The audit action of a window's entry for the sources beyond
/// `audit.refusal_max_sources`.
pub const OVERFLOW: &str = "authn.refuse.overflow";

/// The target of refused TLS handshakes.
pub const HANDSHAKE: &str = "tls.handshake";

/// The target of an end-of-window entry whose source called several RPCs
/// (they are listed in its detail).
const SEVERAL_RPCS: &str = "grpc";

/// The target of overflow entries.
const OTHER_SOURCES: &str = "other-sources";

/// The most RPC names one source's end-of-window entry lists (the API has
/// fewer; a guard, not a limit that applies).
const MAX_TARGETS: usize = 32;

/// Why a caller was refused before it had an identity. Each has a fixed
/// message (what the caller is told) and a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// A call with neither a client certificate nor an `authorization` header.
    NoCredentials,
    /// A call whose `authorization` header is not `Bearer <key>`.
    MalformedAuthorization,
    /// A call with an API key from a peer that is not on loopback.
    ApiKeyNotFromLoopback,
    /// A call with an API key the configuration does not hold.
    UnknownApiKey,
    /// A call over a verified client certificate that has no URI or DNS SAN.
    CertificateWithoutSan,
    /// A TLS handshake without a client certificate where one is required.
    NoClientCertificate,
    /// A TLS handshake whose client certificate failed verification.
    Certificate(CertificateProblem),
}

impl Reason {
    /// The metric label (`tokenvault_authn_refusals_total{reason}`).
    pub fn label(self) -> &'static str {
        match self {
            Self::NoCredentials => "no_credentials",
            Self::MalformedAuthorization => "malformed_authorization",
            Self::ApiKeyNotFromLoopback => "api_key_not_from_loopback",
            Self::UnknownApiKey => "unknown_api_key",
            Self::CertificateWithoutSan => "certificate_without_san",
            Self::NoClientCertificate => "no_client_certificate",
            Self::Certificate(p) => p.label(),
        }
    }

    /// Whether the refusal is of a TLS handshake (else of a call).
    pub fn is_handshake(self) -> bool {
        matches!(self, Self::NoClientCertificate | Self::Certificate(_))
    }

    /// The reason a refused call's UNAUTHENTICATED status carries (its
    /// `google.rpc.ErrorInfo`): `CREDENTIALS_MISSING` when nothing was
    /// presented, `CREDENTIALS_INVALID` when what was presented is not
    /// accepted. As coarse as the message on purpose: which key or
    /// certificate check failed is for the audit log, not the caller.
    pub fn error_reason(self) -> ErrorReason {
        match self {
            Self::NoCredentials | Self::NoClientCertificate => ErrorReason::CredentialsMissing,
            Self::MalformedAuthorization
            | Self::ApiKeyNotFromLoopback
            | Self::UnknownApiKey
            | Self::CertificateWithoutSan
            | Self::Certificate(_) => ErrorReason::CredentialsInvalid,
        }
    }
}

/// What the caller is told (a call's UNAUTHENTICATED message) and what the
/// audit log says.
impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoCredentials => {
                "no credentials: present a client certificate, or on loopback an API key as \
                 `authorization: Bearer <key>`"
            }
            Self::MalformedAuthorization => {
                "malformed authorization header; expected `Bearer <key>`"
            }
            Self::ApiKeyNotFromLoopback => "API keys are accepted from loopback peers only",
            Self::UnknownApiKey => "unknown API key",
            Self::CertificateWithoutSan => {
                "the client certificate carries no URI or DNS SAN to identify it"
            }
            Self::NoClientCertificate => "client certificate refused: no certificate presented",
            Self::Certificate(p) => return write!(f, "client certificate refused: {}", p.name()),
        })
    }
}

/// Why a client certificate failed verification, in the few classes a
/// reviewer tells apart (the variants of `rustls::CertificateError` carry
/// times and names that would make every refusal a source of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CertificateProblem {
    /// Not issued by a CA in `tls.client_ca_file`.
    UnknownIssuer,
    /// Past its validity.
    Expired,
    /// Before its validity.
    NotValidYet,
    /// Revoked.
    Revoked,
    /// Its signature does not verify.
    BadSignature,
    /// Not valid for the name it was checked against.
    NotValidForName,
    /// Not issued for client authentication.
    InvalidPurpose,
    /// Not a well-formed certificate.
    BadEncoding,
    /// Anything else rustls refuses.
    Other,
}

impl CertificateProblem {
    /// The class of a rustls certificate error.
    pub fn of(e: &rustls::CertificateError) -> Self {
        use rustls::CertificateError as E;
        match e {
            E::UnknownIssuer => Self::UnknownIssuer,
            E::Expired | E::ExpiredContext { .. } => Self::Expired,
            E::NotValidYet | E::NotValidYetContext { .. } => Self::NotValidYet,
            E::Revoked => Self::Revoked,
            E::BadSignature => Self::BadSignature,
            E::NotValidForName | E::NotValidForNameContext { .. } => Self::NotValidForName,
            E::InvalidPurpose | E::InvalidPurposeContext { .. } => Self::InvalidPurpose,
            E::BadEncoding => Self::BadEncoding,
            _ => Self::Other,
        }
    }

    /// Its name, as rustls spells the error.
    fn name(self) -> &'static str {
        match self {
            Self::UnknownIssuer => "UnknownIssuer",
            Self::Expired => "Expired",
            Self::NotValidYet => "NotValidYet",
            Self::Revoked => "Revoked",
            Self::BadSignature => "BadSignature",
            Self::NotValidForName => "NotValidForName",
            Self::InvalidPurpose => "InvalidPurpose",
            Self::BadEncoding => "BadEncoding",
            Self::Other => "Other",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::UnknownIssuer => "certificate_unknown_issuer",
            Self::Expired => "certificate_expired",
            Self::NotValidYet => "certificate_not_valid_yet",
            Self::Revoked => "certificate_revoked",
            Self::BadSignature => "certificate_bad_signature",
            Self::NotValidForName => "certificate_not_valid_for_name",
            Self::InvalidPurpose => "certificate_invalid_purpose",
            Self::BadEncoding => "certificate_bad_encoding",
            Self::Other => "certificate_other",
        }
    }
}

/// The address a refusal came from, as sources are keyed: the peer's IP
/// address (its port changes with every connection), an IPv4-mapped IPv6
/// address as IPv4; unknown when the transport does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer(Option<IpAddr>);

impl Peer {
    /// The peer of a connection from `remote`.
    pub fn of(remote: Option<SocketAddr>) -> Self {
        Self(remote.map(|a| a.ip().to_canonical()))
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(ip) => write!(f, "{ip}"),
            None => f.write_str("unknown"),
        }
    }
}

/// How much refused authentication may write, from `[audit]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalLimits {
    /// How long refusals are counted before their entries are written.
    pub window: Duration,
    /// The most sources (peer address and reason) audited individually per
    /// window.
    pub max_sources: usize,
}

impl RefusalLimits {
    /// The most audit entries refused authentication writes per window:
    /// `2 × max_sources + 1`.
    pub fn entries_per_window(&self) -> usize {
        2 * self.max_sources + 1
    }
}

impl From<&AuditConfig> for RefusalLimits {
    fn from(config: &AuditConfig) -> Self {
        Self {
            window: Duration::from_secs(config.refusal_window_seconds),
            max_sources: usize::try_from(config.refusal_max_sources).unwrap_or(usize::MAX),
        }
    }
}

/// The refusals of one source in the current window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Source {
    peer: Peer,
    reason: Reason,
}

/// What a source did in the current window.
#[derive(Default)]
struct Tally {
    /// Refusals counted in no entry yet.
    unrecorded: u64,
    /// What was refused: RPC names, or [`HANDSHAKE`].
    targets: BTreeSet<&'static str>,
}

impl Tally {
    fn add(&mut self, targets: impl IntoIterator<Item = &'static str>, n: u64) {
        self.unrecorded += n;
        for t in targets {
            if self.targets.len() < MAX_TARGETS || self.targets.contains(t) {
                self.targets.insert(t);
            }
        }
    }
}

/// The current window.
struct Window {
    opened: Instant,
    /// At most `max_sources` entries.
    sources: HashMap<Source, Tally>,
    /// Refusals of sources beyond `max_sources`, per reason.
    overflow: BTreeMap<Reason, u64>,
}

impl Window {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            sources: HashMap::new(),
            overflow: BTreeMap::new(),
        }
    }
}

/// Counts refused authentication and writes its audit entries within
/// [`RefusalLimits`]; shared by the authenticator and the TLS acceptor, its
/// windows closed by [`RefusalAggregator::run`]. See the module
/// documentation for the invariants.
pub struct RefusalAggregator {
    limits: RefusalLimits,
    window: Mutex<Window>,
}

impl RefusalAggregator {
    /// An aggregator with an empty window opening now.
    pub fn new(limits: RefusalLimits) -> Self {
        Self {
            limits,
            window: Mutex::new(Window::new()),
        }
    }

    /// Its limits.
    pub fn limits(&self) -> RefusalLimits {
        self.limits
    }

    /// Counts a call refused for `reason` from `peer`; when it is the
    /// source's first refusal of the window, writes its entry (actor
    /// `anonymous`, target the RPC) before returning. Never fails: see the
    /// module documentation.
    pub async fn refuse_call(
        &self,
        audit: &AuditLog,
        peer: Peer,
        reason: Reason,
        rpc: &'static str,
    ) {
        let anonymous = Actor {
            identity: "anonymous".to_owned(),
            role: String::new(),
        };
        self.refuse(
            audit,
            Source { peer, reason },
            rpc,
            anonymous,
            reason.to_string(),
        )
        .await;
    }

    /// Counts a TLS handshake from `remote` refused for `reason`, `why`
    /// being rustls' own account of it; when it is the source's first
    /// refusal of the window, writes its entry (actor `tls:<address:port>`,
    /// target [`HANDSHAKE`]). Returns whether it was the first (the caller
    /// logs the first at warn and the rest at debug, so logs are bounded
    /// too).
    pub async fn refuse_handshake(
        &self,
        audit: &AuditLog,
        remote: SocketAddr,
        reason: Reason,
        why: String,
    ) -> bool {
        let actor = Actor {
            identity: format!("tls:{remote}"),
            role: String::new(),
        };
        let source = Source {
            peer: Peer::of(Some(remote)),
            reason,
        };
        self.refuse(audit, source, HANDSHAKE, actor, why).await
    }

    async fn refuse(
        &self,
        audit: &AuditLog,
        source: Source,
        target: &'static str,
        actor: Actor,
        why: String,
    ) -> bool {
        metrics::counter!("tokenvault_authn_refusals_total", "reason" => source.reason.label())
            .increment(1);
        if !self.count(source, [target], 1, true) {
            return false;
        }
        let detail = format!("{why}; peer={} count=1", source.peer);
        let written = audit
            .record(&actor, REFUSE, target, Outcome::Denied, detail)
            .await;
        entry_metric("first", written.is_ok());
        if let Err(e) = written {
            tracing::warn!(
                error = %e,
                peer = %source.peer,
                reason = source.reason.label(),
                "could not audit a refused authentication; it is counted in the next entry for its source"
            );
            self.count(source, [target], 1, false);
        }
        true
    }

    /// Adds `n` refusals of `source` to the current window. With `first`,
    /// a source not yet in the window that fits in it is added with nothing
    /// unrecorded and `true` is returned: the caller writes its entry.
    fn count(
        &self,
        source: Source,
        targets: impl IntoIterator<Item = &'static str>,
        n: u64,
        first: bool,
    ) -> bool {
        let mut window = self.lock();
        if let Some(tally) = window.sources.get_mut(&source) {
            tally.add(targets, n);
            return false;
        }
        if window.sources.len() < self.limits.max_sources {
            let mut tally = Tally::default();
            tally.add(targets, if first { 0 } else { n });
            window.sources.insert(source, tally);
            return first;
        }
        *window.overflow.entry(source.reason).or_default() += n;
        false
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        // A poisoned lock only means a thread panicked while counting; the
        // counts are still whole numbers worth writing.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the current window and opens the next one; returns the ended
    /// window.
    fn take(&self) -> Window {
        std::mem::replace(&mut *self.lock(), Window::new())
    }

    /// Ends the current window and writes its entries: one per source with
    /// unrecorded refusals, one for the overflow. Entries that cannot be
    /// written are counted again in the new window. Returns how many entries
    /// were written.
    pub async fn flush(&self, audit: &AuditLog) -> usize {
        let ended = self.take();
        let seconds = ended.opened.elapsed().as_secs_f64();
        let mut written = 0;
        let mut sources: Vec<(Source, Tally)> = ended
            .sources
            .into_iter()
            .filter(|(_, t)| t.unrecorded > 0)
            .collect();
        sources.sort_by_key(|(s, _)| *s);
        for (source, tally) in sources {
            let (actor, target) = if source.reason.is_handshake() {
                (format!("tls:{}", source.peer), HANDSHAKE)
            } else {
                let target = match tally.targets.iter().next() {
                    Some(only) if tally.targets.len() == 1 => *only,
                    _ => SEVERAL_RPCS,
                };
                ("anonymous".to_owned(), target)
            };
            let mut detail = format!(
                "{}; peer={} count={} window={seconds:.1}s",
                source.reason, source.peer, tally.unrecorded
            );
            if tally.targets.len() > 1 {
                let rpcs: Vec<&str> = tally.targets.iter().copied().collect();
                detail.push_str(&format!(" rpcs={}", rpcs.join(",")));
            }
            let actor = Actor {
                identity: actor,
                role: String::new(),
            };
            let result = audit
                .record(&actor, REFUSE, target, Outcome::Denied, detail)
                .await;
            entry_metric("aggregate", result.is_ok());
            match result {
                Ok(_) => written += 1,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        peer = %source.peer,
                        reason = source.reason.label(),
                        count = tally.unrecorded,
                        "could not audit refused authentication; counted again in the next window"
                    );
                    self.count(source, tally.targets, tally.unrecorded, false);
                }
            }
        }
        let total: u64 = ended.overflow.values().sum();
        if total > 0 {
            let by_reason: Vec<String> = ended
                .overflow
                .iter()
                .map(|(reason, n)| format!("{}={n}", reason.label()))
                .collect();
            let detail = format!(
                "count={total} window={seconds:.1}s from sources beyond the first {} of the \
                 window (audit.refusal_max_sources); by reason: {}",
                self.limits.max_sources,
                by_reason.join(", ")
            );
            let anonymous = Actor {
                identity: "anonymous".to_owned(),
                role: String::new(),
            };
            let result = audit
                .record(&anonymous, OVERFLOW, OTHER_SOURCES, Outcome::Denied, detail)
                .await;
            entry_metric("overflow", result.is_ok());
            match result {
                Ok(_) => written += 1,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        count = total,
                        "could not audit refused authentication from other sources; counted again in the next window"
                    );
                    let mut window = self.lock();
                    for (reason, n) in ended.overflow {
                        *window.overflow.entry(reason).or_default() += n;
                    }
                }
            }
        }
        written
    }

    /// Closes a window every `audit.refusal_window_seconds` until `stop`.
    /// The window open at `stop` is left to the server, which flushes it
    /// once in-flight calls have drained.
    pub async fn run(self: Arc<Self>, audit: AuditLog, mut stop: watch::Receiver<bool>) {
        let period = self.limits.window;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = crate::vault::stopped(&mut stop) => break,
            }
            self.flush(&audit).await;
        }
    }
}

fn entry_metric(kind: &'static str, ok: bool) {
    metrics::counter!(
        "tokenvault_authn_refusal_entries_total",
        "kind" => kind,
        "outcome" => if ok { "written" } else { "failed" }
    )
    .increment(1);
}

/// The number of refusals an `authn.refuse` or `authn.refuse.overflow`
/// entry counts: its detail's `count=N`. The last one: what precedes it in a
/// first entry (rustls' account of a certificate) is not ours to trust.
pub fn counted(detail: &str) -> Option<u64> {
    let (_, rest) = detail.rsplit_once("count=")?;
    let digits = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or_default();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aggregator(max_sources: usize) -> RefusalAggregator {
        RefusalAggregator::new(RefusalLimits {
            window: Duration::from_secs(60),
            max_sources,
        })
    }

    fn source(ip: &str, reason: Reason) -> Source {
        Source {
            peer: Peer::of(Some(SocketAddr::new(ip.parse().unwrap(), 1))),
            reason,
        }
    }

    #[test]
    fn only_the_first_refusal_of_a_source_is_written_at_once() {
        let agg = aggregator(4);
        let s = source("192.0.2.1", Reason::NoCredentials);
        assert!(agg.count(s, ["A.B"], 1, true));
        for _ in 0..99 {
            assert!(!agg.count(s, ["A.C"], 1, true));
        }
        // Another reason from the same address is another source.
        assert!(agg.count(source("192.0.2.1", Reason::UnknownApiKey), ["A.B"], 1, true));
        let ended = agg.take();
        let tally = &ended.sources[&s];
        assert_eq!(tally.unrecorded, 99);
        assert_eq!(tally.targets.len(), 2);
        // The next window starts empty: the source is written at once again.
        assert!(agg.count(s, ["A.B"], 1, true));
    }

    #[test]
    fn sources_beyond_the_limit_are_folded_into_the_overflow_and_nothing_is_lost() {
        let agg = aggregator(4);
        let mut first = 0u64;
        for i in 0..1000u32 {
            let ip = std::net::Ipv6Addr::from(
                0x2001_0db8_0000_0000_0000_0000_0000_0000u128 + u128::from(i),
            );
            let s = Source {
                peer: Peer(Some(IpAddr::V6(ip))),
                reason: Reason::NoCredentials,
            };
            for _ in 0..3 {
                if agg.count(s, ["A.B"], 1, true) {
                    first += 1;
                }
            }
        }
        assert_eq!(first, 4, "one entry at once per tracked source");
        let ended = agg.take();
        assert_eq!(ended.sources.len(), 4);
        let tallied: u64 = ended.sources.values().map(|t| t.unrecorded).sum();
        let overflow: u64 = ended.overflow.values().sum();
        assert_eq!(first + tallied + overflow, 3000);
        assert_eq!(ended.overflow.len(), 1, "one counter per reason");
    }

    #[test]
    fn a_count_carried_over_is_not_written_at_once() {
        let agg = aggregator(1);
        let s = source("192.0.2.7", Reason::UnknownApiKey);
        assert!(!agg.count(s, ["A.B"], 5, false));
        assert!(
            !agg.count(s, ["A.B"], 1, true),
            "the source is in the window"
        );
        assert_eq!(agg.take().sources[&s].unrecorded, 6);
    }

    #[test]
    fn ipv4_mapped_peers_are_their_ipv4_address_and_ports_do_not_matter() {
        let a = Peer::of(Some("[::ffff:10.0.0.1]:5".parse().unwrap()));
        let b = Peer::of(Some("10.0.0.1:6".parse().unwrap()));
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "10.0.0.1");
        assert_eq!(Peer::of(None).to_string(), "unknown");
    }

    #[test]
    fn counts_read_back_from_details() {
        assert_eq!(counted("unknown API key; peer=::1 count=1"), Some(1));
        assert_eq!(
            counted("no credentials: …; peer=10.0.0.1 count=1999 window=60.0s"),
            Some(1999)
        );
        assert_eq!(counted("count=7 window=1.0s from sources beyond"), Some(7));
        assert_eq!(counted("no count here"), None);
        assert_eq!(
            counted("client certificate refused: Other(\"count=9\"); peer=::1 count=1"),
            Some(1)
        );
    }

    #[test]
    fn reasons_keep_the_messages_callers_were_given() {
        assert!(
            Reason::NoCredentials
                .to_string()
                .starts_with("no credentials")
        );
        assert!(
            Reason::ApiKeyNotFromLoopback
                .to_string()
                .contains("loopback")
        );
        assert!(Reason::CertificateWithoutSan.to_string().contains("SAN"));
        assert_eq!(
            Reason::Certificate(CertificateProblem::of(
                &rustls::CertificateError::UnknownIssuer
            ))
            .to_string(),
            "client certificate refused: UnknownIssuer"
        );
        assert!(Reason::NoClientCertificate.is_handshake());
        assert!(!Reason::UnknownApiKey.is_handshake());
    }

    #[test]
    fn only_a_call_without_credentials_is_told_they_are_missing() {
        assert_eq!(
            Reason::NoCredentials.error_reason(),
            ErrorReason::CredentialsMissing
        );
        for reason in [
            Reason::MalformedAuthorization,
            Reason::ApiKeyNotFromLoopback,
            Reason::UnknownApiKey,
            Reason::CertificateWithoutSan,
        ] {
            assert_eq!(
                reason.error_reason(),
                ErrorReason::CredentialsInvalid,
                "{reason}"
            );
        }
    }
}
