//! Authorization matrix: every RPC of the four `tokenvault.v1` services called
//! by every caller (each test identity, plus no credentials at all), checked
//! against the roles each RPC allows and the purpose/consumer policy; and the
//! audit trail of denials (who was refused, what, and — for leases — purpose,
//! connection and scopes), with no lease granted or stored for a denied call.
//!
//! The table of RPCs is checked against the compiled descriptor set, so a new
//! RPC without a row fails the matrix test.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use tokenvault::domain::{Integration, Timestamp};
use tokenvault::grpc::Role;
use tokenvault::proto::v1 as pb;
use tokenvault::proto::v1::admin_service_client::AdminServiceClient;
use tokenvault::proto::v1::connection_service_client::ConnectionServiceClient;
use tokenvault::proto::v1::event_service_client::EventServiceClient;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;
use tokenvault::store::{AuditFilter, AuditRow};
use tonic::{Code, Status};

use crate::both_backends;
use crate::support::{
    As, Backend, Bearer, CALENDAR_SCOPE, GMAIL_SCOPE, TestVault, seed_connection, spawn_vault,
};

const PACKAGE: &str = "tokenvault.v1";
const APP: &[Role] = &[Role::App];
const WORKER: &[Role] = &[Role::Worker];
const READERS: &[Role] = &[Role::Admin, Role::Auditor];
const ADMIN: &[Role] = &[Role::Admin];

/// One RPC: its full gRPC name, the roles its handler allows, and the callers
/// whose role passes but whose policy refuses the request the matrix sends.
struct Row {
    rpc: &'static str,
    roles: &'static [Role],
    policy_denied: &'static [As],
}

const fn row(rpc: &'static str, roles: &'static [Role]) -> Row {
    Row {
        rpc,
        roles,
        policy_denied: &[],
    }
}

/// Every RPC, in the order they are called. `RotateKeys` is last: it starts a
/// background rewrap, and nothing should run after it.
const ROWS: &[Row] = &[
    row("tokenvault.v1.ConnectionService/BeginAuthorization", APP),
    row("tokenvault.v1.ConnectionService/CompleteAuthorization", APP),
    row("tokenvault.v1.ConnectionService/GetConnection", APP),
    row("tokenvault.v1.ConnectionService/ListConnections", APP),
    row("tokenvault.v1.ConnectionService/Disconnect", APP),
    row("tokenvault.v1.ConnectionService/DeleteAccount", APP),
    row("tokenvault.v1.ConnectionService/GetDeletionReceipt", APP),
    // The email worker's policy has no calendar_sync purpose.
    Row {
        rpc: "tokenvault.v1.LeaseService/LeaseToken",
        roles: WORKER,
        policy_denied: &[As::EmailWorker],
    },
    row("tokenvault.v1.LeaseService/ReleaseLease", WORKER),
    // The email worker may not act as consumer calendar-sync.
    Row {
        rpc: "tokenvault.v1.EventService/Watch",
        roles: WORKER,
        policy_denied: &[As::EmailWorker],
    },
    Row {
        rpc: "tokenvault.v1.EventService/Ack",
        roles: WORKER,
        policy_denied: &[As::EmailWorker],
    },
    // Connection details carry Google emails and subjects: admins only.
    row("tokenvault.v1.AdminService/ListConnections", ADMIN),
    row("tokenvault.v1.AdminService/GetConnection", ADMIN),
    row("tokenvault.v1.AdminService/GetDeletionReceipt", READERS),
    row("tokenvault.v1.AdminService/ListDeletionReceipts", READERS),
    row("tokenvault.v1.AdminService/KeyStatus", READERS),
    row("tokenvault.v1.AdminService/KeyReport", READERS),
    row("tokenvault.v1.AdminService/QueryAudit", READERS),
    row("tokenvault.v1.AdminService/FollowAudit", READERS),
    row("tokenvault.v1.AdminService/VerifyAudit", READERS),
    row("tokenvault.v1.AdminService/RevokeConnection", ADMIN),
    row("tokenvault.v1.AdminService/DeleteAccount", ADMIN),
    row("tokenvault.v1.AdminService/RetireKey", ADMIN),
    row("tokenvault.v1.AdminService/DestroyKey", ADMIN),
    row("tokenvault.v1.AdminService/RotateKeys", ADMIN),
];

/// Each test identity, and `None` for a caller with no credentials.
const CALLERS: [Option<As>; 7] = [
    None,
    Some(As::App),
    Some(As::Worker),
    Some(As::EmailWorker),
    Some(As::Admin),
    Some(As::Auditor),
    Some(As::Nobody),
];

/// The role the test policy gives each identity.
fn role_of(who: As) -> Option<Role> {
    match who {
        As::App => Some(Role::App),
        As::Worker | As::EmailWorker => Some(Role::Worker),
        As::Admin => Some(Role::Admin),
        As::Auditor => Some(Role::Auditor),
        As::Nobody => None,
    }
}

fn caller_name(who: Option<As>) -> String {
    who.map_or_else(|| "no-creds".to_owned(), |w| format!("{w:?}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Unauthenticated,
    Denied,
    /// Anything but UNAUTHENTICATED and PERMISSION_DENIED.
    Allowed,
}

impl Expect {
    fn of(row: &Row, who: Option<As>) -> Self {
        let Some(who) = who else {
            return Expect::Unauthenticated;
        };
        match role_of(who) {
            Some(role) if row.roles.contains(&role) && !row.policy_denied.contains(&who) => {
                Expect::Allowed
            }
            _ => Expect::Denied,
        }
    }

    fn admits(self, code: Code) -> bool {
        match self {
            Expect::Unauthenticated => code == Code::Unauthenticated,
            Expect::Denied => code == Code::PermissionDenied,
            // Allowed: past authorization, the call is answered on its merits
            // (ok, or a documented refusal of its arguments) — never a crash.
            Expect::Allowed => !matches!(
                code,
                Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::Internal
                    | Code::Unknown
                    | Code::DataLoss
            ),
        }
    }
}

/// Every `package.Service/Method` of `tokenvault.v1` in the compiled descriptor set.
fn rpcs_in_descriptor() -> BTreeSet<String> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(tokenvault::proto::FILE_DESCRIPTOR_SET)
        .expect("decode the descriptor set");
    set.file
        .iter()
        .filter(|f| f.package() == PACKAGE)
        .flat_map(|f| {
            f.service.iter().flat_map(|s| {
                s.method
                    .iter()
                    .map(move |m| format!("{PACKAGE}.{}/{}", s.name(), m.name()))
            })
        })
        .collect()
}

/// What the matrix's requests refer to.
struct Fixtures {
    /// A live CALENDAR connection (tenant acme).
    calendar: String,
    /// A deleted connection: Disconnect/RevokeConnection on it are idempotent.
    tombstone: String,
    /// The receipt of that deletion.
    receipt: String,
    /// The newest event cursor (from that deletion).
    cursor: u64,
}

async fn fixtures(tv: &TestVault) -> Fixtures {
    let calendar = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.matrix-access",
        Some("1//matrix-refresh"),
    )
    .await;
    let gone = seed_connection(
        &tv.vault,
        "acme",
        "gone",
        Integration::Calendar,
        "ya29.matrix-gone",
        None,
    )
    .await;
    let receipt = tv
        .connections(As::App)
        .disconnect(pb::DisconnectRequest {
            connection_id: gone.id.to_string(),
            reason: "authz matrix fixture".into(),
        })
        .await
        .expect("disconnect the fixture connection")
        .into_inner()
        .receipt
        .unwrap();
    let head = tv
        .vault
        .store()
        .event_state()
        .await
        .expect("event state")
        .head;
    assert!(head > 0, "the fixture deletion wrote no event");
    Fixtures {
        calendar: calendar.id.to_string(),
        tombstone: gone.id.to_string(),
        receipt: receipt.receipt_id,
        cursor: u64::try_from(head).unwrap(),
    }
}

fn bearer(who: Option<As>) -> Bearer {
    Bearer(who.map(|w| format!("Bearer {}", w.key()).parse().expect("ascii key")))
}

/// Calls `rpc` as `who` with a request valid for the roles that may call it;
/// returns the status code (OK on success).
async fn call(tv: &TestVault, fx: &Fixtures, who: Option<As>, rpc: &str) -> Result<(), Status> {
    let mut conns = ConnectionServiceClient::with_interceptor(tv.channel.clone(), bearer(who));
    let mut leases = LeaseServiceClient::with_interceptor(tv.channel.clone(), bearer(who));
    let mut events = EventServiceClient::with_interceptor(tv.channel.clone(), bearer(who));
    let mut admin = AdminServiceClient::with_interceptor(tv.channel.clone(), bearer(who));
    let method = rpc
        .strip_prefix(PACKAGE)
        .and_then(|r| r.strip_prefix('.'))
        .unwrap_or(rpc);
    let get = || pb::GetConnectionRequest {
        connection_id: fx.calendar.clone(),
    };
    let receipt = || pb::GetDeletionReceiptRequest {
        receipt_id: fx.receipt.clone(),
    };
    let throwaway = || pb::DeleteAccountRequest {
        tenant_id: "acme".into(),
        account_id: "throwaway".into(),
        reason: "authz matrix".into(),
    };
    // AdminService's copies of the three requests above.
    let admin_get = || pb::AdminServiceGetConnectionRequest {
        connection_id: fx.calendar.clone(),
    };
    let admin_receipt = || pb::AdminServiceGetDeletionReceiptRequest {
        receipt_id: fx.receipt.clone(),
    };
    let admin_throwaway = || pb::AdminServiceDeleteAccountRequest {
        tenant_id: "acme".into(),
        account_id: "throwaway".into(),
        reason: "authz matrix".into(),
    };
    match method {
        "ConnectionService/BeginAuthorization" => conns
            .begin_authorization(pb::BeginAuthorizationRequest {
                tenant_id: "acme".into(),
                account_id: "alice".into(),
                integration: pb::Integration::Calendar as i32,
                login_hint: None,
            })
            .await
            .map(drop),
        "ConnectionService/CompleteAuthorization" => conns
            .complete_authorization(pb::CompleteAuthorizationRequest {
                state: "no-such-state".into(),
                outcome: Some(pb::complete_authorization_request::Outcome::Code(
                    "no-such-code".into(),
                )),
                tenant_id: "acme".into(),
                account_id: "alice".into(),
            })
            .await
            .map(drop),
        "ConnectionService/GetConnection" => conns.get_connection(get()).await.map(drop),
        "ConnectionService/ListConnections" => conns
            .list_connections(pb::ListConnectionsRequest {
                tenant_id: "acme".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "ConnectionService/Disconnect" => conns
            .disconnect(pb::DisconnectRequest {
                connection_id: fx.tombstone.clone(),
                reason: String::new(),
            })
            .await
            .map(drop),
        "ConnectionService/DeleteAccount" => conns.delete_account(throwaway()).await.map(drop),
        "ConnectionService/GetDeletionReceipt" => {
            conns.get_deletion_receipt(receipt()).await.map(drop)
        }
        "LeaseService/LeaseToken" => leases
            .lease_token(pb::LeaseTokenRequest {
                connection_id: fx.calendar.clone(),
                purpose: "calendar_sync".into(),
                scopes: vec![CALENDAR_SCOPE.into()],
                min_valid_seconds: 0,
            })
            .await
            .map(drop),
        "LeaseService/ReleaseLease" => leases
            .release_lease(pb::ReleaseLeaseRequest {
                lease_id: "lease_00000000-0000-4000-8000-000000000000".into(),
            })
            .await
            .map(drop),
        // The stream opening is the answer; dropping it cancels the watch.
        "EventService/Watch" => events
            .watch(pb::WatchRequest {
                consumer: "calendar-sync".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "EventService/Ack" => events
            .ack(pb::AckRequest {
                consumer: "calendar-sync".into(),
                cursor: fx.cursor,
            })
            .await
            .map(drop),
        "AdminService/ListConnections" => admin
            .list_connections(pb::AdminServiceListConnectionsRequest::default())
            .await
            .map(drop),
        "AdminService/GetConnection" => admin.get_connection(admin_get()).await.map(drop),
        "AdminService/GetDeletionReceipt" => {
            admin.get_deletion_receipt(admin_receipt()).await.map(drop)
        }
        "AdminService/ListDeletionReceipts" => admin
            .list_deletion_receipts(pb::ListDeletionReceiptsRequest::default())
            .await
            .map(drop),
        "AdminService/KeyStatus" => admin.key_status(pb::KeyStatusRequest {}).await.map(drop),
        "AdminService/KeyReport" => admin.key_report(pb::KeyReportRequest {}).await.map(drop),
        "AdminService/QueryAudit" => admin
            .query_audit(pb::QueryAuditRequest {
                page_size: 1,
                ..Default::default()
            })
            .await
            .map(drop),
        // The stream opening is the answer; dropping it ends the follow.
        "AdminService/FollowAudit" => admin
            .follow_audit(pb::FollowAuditRequest {
                after_seq: None,
                backlog: 1,
                after_seqs: Vec::new(),
            })
            .await
            .map(drop),
        "AdminService/VerifyAudit" => admin
            .verify_audit(pb::VerifyAuditRequest::default())
            .await
            .map(drop),
        "AdminService/RevokeConnection" => admin
            .revoke_connection(pb::RevokeConnectionRequest {
                connection_id: fx.tombstone.clone(),
                reason: String::new(),
            })
            .await
            .map(drop),
        "AdminService/DeleteAccount" => admin.delete_account(admin_throwaway()).await.map(drop),
        // No such version: NOT_FOUND once past the role check, nothing changes.
        "AdminService/RetireKey" => admin
            .retire_key(pb::RetireKeyRequest { version: 999 })
            .await
            .map(drop),
        "AdminService/DestroyKey" => admin
            .destroy_key(pb::DestroyKeyRequest { version: 999 })
            .await
            .map(drop),
        "AdminService/RotateKeys" => admin.rotate_keys(pb::RotateKeysRequest {}).await.map(drop),
        other => panic!("no request for {other}: add one to `call`"),
    }
}

fn short(code: Code) -> String {
    match code {
        Code::Ok => "ok".to_owned(),
        Code::Unauthenticated => "UNAUTHN".to_owned(),
        Code::PermissionDenied => "DENIED".to_owned(),
        Code::InvalidArgument => "INVALID".to_owned(),
        Code::FailedPrecondition => "PRECOND".to_owned(),
        Code::NotFound => "NOT_FOUND".to_owned(),
        Code::Unimplemented => "UNIMPL".to_owned(),
        Code::OutOfRange => "OUT_OF_RANGE".to_owned(),
        other => format!("{other:?}"),
    }
}

async fn every_role_against_every_rpc(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };

    // The table covers exactly the RPCs the protos define.
    let table: BTreeSet<String> = ROWS.iter().map(|r| r.rpc.to_owned()).collect();
    assert_eq!(table.len(), ROWS.len(), "a row is listed twice");
    let defined = rpcs_in_descriptor();
    let missing: Vec<&String> = defined.difference(&table).collect();
    let unknown: Vec<&String> = table.difference(&defined).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "the matrix must have one row per RPC ({} defined, {} rows): \
         RPCs without a row {missing:?}; rows for no RPC {unknown:?}",
        defined.len(),
        ROWS.len()
    );

    let fx = fixtures(&tv).await;
    let width = ROWS.iter().map(|r| r.rpc.len()).max().unwrap_or(0) - PACKAGE.len() - 1;
    let mut table = format!("{:width$}", "rpc \\ caller");
    for who in CALLERS {
        let _ = write!(table, " | {:>13}", caller_name(who));
    }
    table.push('\n');
    let mut mismatches = Vec::new();
    for row in ROWS {
        let name = &row.rpc[PACKAGE.len() + 1..];
        let _ = write!(table, "{name:width$}");
        for who in CALLERS {
            let want = Expect::of(row, who);
            let got = call(&tv, &fx, who, row.rpc).await;
            let (code, message) = match &got {
                Ok(()) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            };
            let ok = want.admits(code);
            let mark = if ok { ' ' } else { '!' };
            let _ = write!(table, " | {:>12}{mark}", short(code));
            if !ok {
                mismatches.push(format!(
                    "{name} as {}: expected {want:?}, got {code:?} ({message})",
                    caller_name(who)
                ));
            }
        }
        table.push('\n');
    }
    println!("authorization matrix ({backend:?}; '!' marks a mismatch):\n{table}");
    assert!(
        mismatches.is_empty(),
        "{} of {} calls did not get the expected authorization answer:\n{}\n\n{table}",
        mismatches.len(),
        ROWS.len() * CALLERS.len(),
        mismatches.join("\n")
    );
}
both_backends!(matrix, every_role_against_every_rpc);

/// The newest audit sequence number (0 when the log is empty).
async fn audit_seq(tv: &TestVault) -> i64 {
    tv.vault.store().audit_head().await.expect("audit head").0
}

/// Audit entries written after `after`, oldest first.
async fn audit_since(tv: &TestVault, after: i64) -> Vec<AuditRow> {
    tv.vault
        .store()
        .audit_query(
            &AuditFilter {
                after_seq: Some(after),
                ascending: true,
                ..Default::default()
            },
            1000,
        )
        .await
        .expect("query the audit log")
}

fn describe(rows: &[AuditRow]) -> String {
    rows.iter()
        .map(|r| {
            let d = &r.draft;
            format!(
                "  #{} actor={:?} role={:?} action={} target={} outcome={} detail={:?}",
                r.seq, d.actor, d.role, d.action, d.target, d.outcome, d.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One denied call and the audit entry it must leave.
struct Denial {
    what: &'static str,
    code: Code,
    actor: &'static str,
    role: &'static str,
    action: &'static str,
    target: String,
    /// Substrings the entry's detail must contain.
    detail: Vec<String>,
}

async fn every_denial_is_audited(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let calendar = seed_connection(
        &tv.vault,
        "acme",
        "carol",
        Integration::Calendar,
        "ya29.denial-calendar",
        Some("1//denial-calendar"),
    )
    .await
    .id
    .to_string();
    // seed_connection records calendar.events as granted even for EMAIL: the
    // policy's integration check must refuse before any scope check.
    let email = seed_connection(
        &tv.vault,
        "acme",
        "carol",
        Integration::Email,
        "ya29.denial-email",
        Some("1//denial-email"),
    )
    .await
    .id
    .to_string();
    let open_before = tv
        .vault
        .store()
        .lease_open_count(Timestamp::now(), Timestamp::from_micros(0), None)
        .await
        .expect("count open leases");
    let start = audit_seq(&tv).await;

    let lease = |connection: &str, scope: &str| pb::LeaseTokenRequest {
        connection_id: connection.to_owned(),
        purpose: "calendar_sync".into(),
        scopes: vec![scope.to_owned()],
        min_valid_seconds: 0,
    };
    let worker = As::Worker.identity();
    let cases: Vec<(Denial, Result<(), Status>)> = vec![
        (
            Denial {
                what: "no credentials, LeaseToken",
                code: Code::Unauthenticated,
                actor: "anonymous",
                role: "",
                action: "authn.refuse",
                target: "LeaseService.LeaseToken".into(),
                detail: vec!["no credentials".into()],
            },
            LeaseServiceClient::with_interceptor(tv.channel.clone(), bearer(None))
                .lease_token(lease(&calendar, CALENDAR_SCOPE))
                .await
                .map(drop),
        ),
        (
            Denial {
                what: "identity without a role, LeaseToken",
                code: Code::PermissionDenied,
                actor: As::Nobody.identity(),
                role: "",
                action: "authz.deny",
                target: "LeaseService.LeaseToken".into(),
                detail: vec!["no role".into()],
            },
            tv.leases(As::Nobody)
                .lease_token(lease(&calendar, CALENDAR_SCOPE))
                .await
                .map(drop),
        ),
        (
            Denial {
                what: "auditor, RotateKeys",
                code: Code::PermissionDenied,
                actor: As::Auditor.identity(),
                role: "auditor",
                action: "authz.deny",
                target: "AdminService.RotateKeys".into(),
                detail: vec!["role auditor may not call AdminService.RotateKeys".into()],
            },
            tv.admin(As::Auditor)
                .rotate_keys(pb::RotateKeysRequest {})
                .await
                .map(drop),
        ),
        (
            Denial {
                what: "app, LeaseToken",
                code: Code::PermissionDenied,
                actor: As::App.identity(),
                role: "app",
                action: "authz.deny",
                target: "LeaseService.LeaseToken".into(),
                detail: vec!["role app may not call LeaseService.LeaseToken".into()],
            },
            tv.leases(As::App)
                .lease_token(lease(&calendar, CALENDAR_SCOPE))
                .await
                .map(drop),
        ),
        (
            Denial {
                what: "calendar worker, LeaseToken of an EMAIL connection",
                code: Code::PermissionDenied,
                actor: worker,
                role: "worker",
                action: "lease.deny",
                target: email.clone(),
                detail: vec![
                    "purpose=calendar_sync".into(),
                    format!("scopes={CALENDAR_SCOPE}"),
                    "email".into(),
                ],
            },
            tv.leases(As::Worker)
                .lease_token(lease(&email, CALENDAR_SCOPE))
                .await
                .map(drop),
        ),
        (
            Denial {
                what: "calendar worker, LeaseToken with the Gmail scope",
                code: Code::PermissionDenied,
                actor: worker,
                role: "worker",
                action: "lease.deny",
                target: calendar.clone(),
                detail: vec![
                    "purpose=calendar_sync".into(),
                    format!("scopes={GMAIL_SCOPE}"),
                ],
            },
            tv.leases(As::Worker)
                .lease_token(lease(&calendar, GMAIL_SCOPE))
                .await
                .map(drop),
        ),
        (
            Denial {
                what: "email worker, LeaseToken for purpose calendar_sync",
                code: Code::PermissionDenied,
                actor: As::EmailWorker.identity(),
                role: "worker",
                action: "lease.deny",
                target: calendar.clone(),
                detail: vec![
                    "purpose=calendar_sync".into(),
                    format!("scopes={CALENDAR_SCOPE}"),
                ],
            },
            tv.leases(As::EmailWorker)
                .lease_token(lease(&calendar, CALENDAR_SCOPE))
                .await
                .map(drop),
        ),
        (
            Denial {
                what: "calendar worker, Watch as email-sync",
                code: Code::PermissionDenied,
                actor: worker,
                role: "worker",
                action: "authz.deny",
                target: "EventService.Watch".into(),
                detail: vec!["email-sync".into()],
            },
            tv.events(As::Worker)
                .watch(pb::WatchRequest {
                    consumer: "email-sync".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            Denial {
                what: "calendar worker, Ack as email-sync",
                code: Code::PermissionDenied,
                actor: worker,
                role: "worker",
                action: "authz.deny",
                target: "EventService.Ack".into(),
                detail: vec!["email-sync".into()],
            },
            tv.events(As::Worker)
                .ack(pb::AckRequest {
                    consumer: "email-sync".into(),
                    cursor: 1,
                })
                .await
                .map(drop),
        ),
    ];

    let entries = audit_since(&tv, start).await;
    let mut failures = Vec::new();
    for (want, got) in &cases {
        match got {
            Err(s) if s.code() == want.code => {}
            Err(s) => failures.push(format!(
                "{}: expected {:?}, got {:?} ({})",
                want.what,
                want.code,
                s.code(),
                s.message()
            )),
            Ok(()) => failures.push(format!("{}: expected {:?}, got OK", want.what, want.code)),
        }
        let found = entries.iter().any(|e| {
            let d = &e.draft;
            d.outcome == "denied"
                && d.actor == want.actor
                && d.role == want.role
                && d.action == want.action
                && d.target == want.target
                && want.detail.iter().all(|s| d.detail.contains(s.as_str()))
        });
        if !found {
            failures.push(format!(
                "{}: no denied audit entry actor={:?} role={:?} action={} target={} \
                 with detail containing {:?}",
                want.what, want.actor, want.role, want.action, want.target, want.detail
            ));
        }
    }
    let grants: Vec<AuditRow> = entries
        .iter()
        .filter(|e| e.draft.action == "lease.grant")
        .cloned()
        .collect();
    if !grants.is_empty() {
        failures.push(format!(
            "denied calls left lease.grant entries:\n{}",
            describe(&grants)
        ));
    }
    let open_after = tv
        .vault
        .store()
        .lease_open_count(Timestamp::now(), Timestamp::from_micros(0), None)
        .await
        .expect("count open leases");
    if open_after != open_before {
        failures.push(format!(
            "open leases went from {open_before} to {open_after} after denied calls only"
        ));
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}\n\naudit entries written by the calls:\n{}",
        failures.len(),
        failures.join("\n"),
        describe(&entries)
    );
    assert_eq!(open_before, 0, "no lease was ever granted in this test");
}
both_backends!(denials_audited, every_denial_is_audited);
