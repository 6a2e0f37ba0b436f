//! `tokenvault.v1.AdminService` (roles admin and auditor). Every call is
//! audited; auditors may only read.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Context;
use super::auth::{Caller, Role};
use super::convert::{self, PageToken};
use crate::audit::Outcome;
use crate::crypto::KekVersion;
use crate::domain::{AccountId, ConnectionId, DeletionReason, ReceiptId, TenantId, VaultError};
use crate::proto::v1 as pb;
use crate::store::{AuditFilter, ConnectionFilter, DeletionTarget, ReceiptFilter};

pub(super) struct Admin(pub Arc<Context>);

const READERS: &[Role] = &[Role::Admin, Role::Auditor];
const ADMIN: &[Role] = &[Role::Admin];

impl Admin {
    /// Authorizes, then records the call itself in the audit log (fail-closed).
    /// Arguments are parsed only after this: a caller who may not call the
    /// RPC learns nothing about its input. `target` is the raw argument,
    /// cut to 128 characters for the log.
    async fn begin<T>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
        roles: &[Role],
        target: &str,
    ) -> Result<Caller, Status> {
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, request, rpc, roles)
            .await?;
        self.0
            .vault
            .audit()
            .record(
                &caller.actor(),
                "admin.call",
                &audit_target(target),
                Outcome::Ok,
                rpc,
            )
            .await?;
        Ok(caller)
    }
}

impl Admin {
    /// One version as KeyStatus reports it.
    async fn key_version_info(&self, version: KekVersion) -> Result<pb::KeyVersionInfo, Status> {
        let status = self.0.vault.keys().status().await?;
        let info = status
            .versions
            .iter()
            .find(|v| v.record.version == version)
            .ok_or_else(|| VaultError::not_found("key version", version))?;
        Ok(convert::key_version(info))
    }
}

fn kek_version(v: u32) -> Result<KekVersion, VaultError> {
    KekVersion::new(v).ok_or_else(|| VaultError::invalid("version", "must be at least 1"))
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for Admin {
    async fn list_connections(
        &self,
        request: Request<pb::AdminListConnectionsRequest>,
    ) -> Result<Response<pb::AdminListConnectionsResponse>, Status> {
        self.begin(
            &request,
            "AdminService.ListConnections",
            ADMIN,
            "connections",
        )
        .await?;
        let req = request.get_ref();
        let filter = ConnectionFilter {
            tenant: req.tenant_id.as_deref().map(TenantId::parse).transpose()?,
            account: req
                .account_id
                .as_deref()
                .map(AccountId::parse)
                .transpose()?,
            integration: req.integration.map(convert::integration).transpose()?,
            include_deleted: req.include_deleted,
            status: req.status.map(convert::connection_status).transpose()?,
            google_subject: req.google_subject.clone(),
        };
        let key = format!("{filter:?}");
        let page = PageToken::request(req.page_size, &req.page_token, &key)?;
        let details = self.0.vault.connection_details(&filter, &page).await?;
        let next = PageToken::next(
            &page,
            details.len(),
            details.last().map(|d| d.connection.id.as_str()),
            &key,
        );
        Ok(Response::new(pb::AdminListConnectionsResponse {
            connections: details.iter().map(convert::connection_detail).collect(),
            next_page_token: next,
        }))
    }

    async fn get_connection(
        &self,
        request: Request<pb::GetConnectionRequest>,
    ) -> Result<Response<pb::ConnectionDetail>, Status> {
        let target = request.get_ref().connection_id.clone();
        self.begin(&request, "AdminService.GetConnection", ADMIN, &target)
            .await?;
        let id = ConnectionId::parse(&target)?;
        let detail = self.0.vault.connection_detail(&id).await?;
        Ok(Response::new(convert::connection_detail(&detail)))
    }

    async fn revoke_connection(
        &self,
        request: Request<pb::RevokeConnectionRequest>,
    ) -> Result<Response<pb::DeletionReceipt>, Status> {
        let caller = self
            .begin(
                &request,
                "AdminService.RevokeConnection",
                ADMIN,
                &request.get_ref().connection_id,
            )
            .await?;
        let req = request.get_ref();
        let id = ConnectionId::parse(&req.connection_id)?;
        let reason = convert::reason_text(&req.reason)?;
        let vault = &self.0.vault;
        let done = vault
            .delete(
                &caller.actor(),
                DeletionTarget::Connection(id),
                DeletionReason::AdminRevoked,
                reason,
            )
            .await?;
        Ok(Response::new(convert::receipt(vault, &done.receipt)))
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeletionReceipt>, Status> {
        let target = format!(
            "{}/{}",
            request.get_ref().tenant_id,
            request.get_ref().account_id
        );
        let caller = self
            .begin(&request, "AdminService.DeleteAccount", ADMIN, &target)
            .await?;
        let req = request.get_ref();
        let tenant = TenantId::parse(&req.tenant_id)?;
        let account = AccountId::parse(&req.account_id)?;
        let reason = convert::reason_text(&req.reason)?;
        let vault = &self.0.vault;
        let done = vault
            .delete(
                &caller.actor(),
                DeletionTarget::Account(tenant, account),
                DeletionReason::AccountDeleted,
                reason,
            )
            .await?;
        Ok(Response::new(convert::receipt(vault, &done.receipt)))
    }

    async fn get_deletion_receipt(
        &self,
        request: Request<pb::GetDeletionReceiptRequest>,
    ) -> Result<Response<pb::DeletionReceipt>, Status> {
        self.begin(
            &request,
            "AdminService.GetDeletionReceipt",
            READERS,
            &request.get_ref().receipt_id,
        )
        .await?;
        let id = ReceiptId::parse(&request.get_ref().receipt_id)?;
        let vault = &self.0.vault;
        let receipt = vault.receipt_get(&id).await?;
        Ok(Response::new(convert::receipt(vault, &receipt)))
    }

    async fn list_deletion_receipts(
        &self,
        request: Request<pb::ListDeletionReceiptsRequest>,
    ) -> Result<Response<pb::ListDeletionReceiptsResponse>, Status> {
        self.begin(
            &request,
            "AdminService.ListDeletionReceipts",
            READERS,
            "receipts",
        )
        .await?;
        let req = request.get_ref();
        let vault = &self.0.vault;
        let filter = ReceiptFilter {
            incomplete_only: req.incomplete_only || req.overdue_only,
            requested_before: req.overdue_only.then(|| vault.receipt_sla_cutoff()),
            tenant: req.tenant_id.as_deref().map(TenantId::parse).transpose()?,
            account: req
                .account_id
                .as_deref()
                .map(AccountId::parse)
                .transpose()?,
        };
        // The SLA cutoff moves with the clock; the token binds the filters as asked.
        let key = format!(
            "{}|{}|{:?}|{:?}",
            req.incomplete_only, req.overdue_only, filter.tenant, filter.account
        );
        let page = PageToken::request(req.page_size, &req.page_token, &key)?;
        let records = vault.receipt_list(&filter, &page).await?;
        let next = PageToken::next(
            &page,
            records.len(),
            records.last().map(|r| r.receipt_id.as_str()),
            &key,
        );
        Ok(Response::new(pb::ListDeletionReceiptsResponse {
            receipts: records.iter().map(|r| convert::receipt(vault, r)).collect(),
            next_page_token: next,
        }))
    }

    async fn key_status(
        &self,
        request: Request<pb::KeyStatusRequest>,
    ) -> Result<Response<pb::KeyStatusResponse>, Status> {
        self.begin(&request, "AdminService.KeyStatus", READERS, "keys")
            .await?;
        let status = self.0.vault.keys().status().await?;
        Ok(Response::new(convert::key_status(&status)))
    }

    async fn rotate_keys(
        &self,
        request: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotationProgress>, Status> {
        let caller = self
            .begin(&request, "AdminService.RotateKeys", ADMIN, "keys")
            .await?;
        let run = self.0.vault.keys().rotate(&caller.actor()).await?;
        Ok(Response::new(convert::rotation(&run)))
    }

    async fn retire_key(
        &self,
        request: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::KeyVersionInfo>, Status> {
        let raw = request.get_ref().version;
        let caller = self
            .begin(
                &request,
                "AdminService.RetireKey",
                ADMIN,
                &format!("kek:{raw}"),
            )
            .await?;
        let version = kek_version(raw)?;
        self.0.vault.keys().retire(version, &caller.actor()).await?;
        Ok(Response::new(self.key_version_info(version).await?))
    }

    async fn destroy_key(
        &self,
        request: Request<pb::DestroyKeyRequest>,
    ) -> Result<Response<pb::KeyVersionInfo>, Status> {
        let raw = request.get_ref().version;
        let caller = self
            .begin(
                &request,
                "AdminService.DestroyKey",
                ADMIN,
                &format!("kek:{raw}"),
            )
            .await?;
        let version = kek_version(raw)?;
        self.0
            .vault
            .keys()
            .destroy(version, &caller.actor())
            .await?;
        Ok(Response::new(self.key_version_info(version).await?))
    }

    async fn key_report(
        &self,
        request: Request<pb::KeyReportRequest>,
    ) -> Result<Response<pb::KeyReportResponse>, Status> {
        self.begin(&request, "AdminService.KeyReport", READERS, "keys")
            .await?;
        let status = self.0.vault.keys().status().await?;
        Ok(Response::new(convert::key_report(&status)))
    }

    async fn query_audit(
        &self,
        request: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        self.begin(&request, "AdminService.QueryAudit", READERS, "audit")
            .await?;
        let req = request.get_ref();
        let outcome = match req.outcome.map(pb::AuditOutcome::try_from) {
            None => None,
            Some(Ok(pb::AuditOutcome::Success)) => Some("ok".to_owned()),
            Some(Ok(pb::AuditOutcome::Denied)) => Some("denied".to_owned()),
            Some(Ok(pb::AuditOutcome::Failure)) => Some("failed".to_owned()),
            Some(_) => return Err(VaultError::invalid("outcome", "unknown or unspecified").into()),
        };
        // No audit field holds a control character; PostgreSQL refuses NUL in text.
        for (field, value) in [
            ("actor", &req.actor),
            ("action", &req.action),
            ("target", &req.target),
        ] {
            if value
                .as_deref()
                .is_some_and(|v| v.chars().any(char::is_control))
            {
                return Err(
                    VaultError::invalid(field, "must not contain control characters").into(),
                );
            }
        }
        let mut filter = AuditFilter {
            actor: req.actor.clone(),
            action_prefix: req.action.clone(),
            target: req.target.clone(),
            since: req.since.as_ref().map(convert::from_ts),
            until: req.until.as_ref().map(convert::from_ts),
            outcome,
            before_seq: None,
            after_seq: req.after_seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
            ascending: !req.newest_first,
        };
        if let (Some(since), Some(until)) = (filter.since, filter.until)
            && since > until
        {
            return Err(VaultError::invalid("since", "is after until").into());
        }
        let key = format!("{filter:?}");
        let page = PageToken::request(req.page_size, &req.page_token, &key)?;
        if let Some(after) = &page.after {
            let seq: i64 = after
                .parse()
                .map_err(|_| VaultError::invalid("page_token", "malformed"))?;
            if filter.ascending {
                filter.after_seq = Some(filter.after_seq.map_or(seq, |a| a.max(seq)));
            } else {
                filter.before_seq = Some(seq);
            }
        }
        let (rows, last_seq) = self.0.vault.audit_query(&filter, page.limit).await?;
        let last = rows.last().map(|r| r.seq.to_string());
        Ok(Response::new(pb::QueryAuditResponse {
            entries: rows.iter().map(convert::audit_entry).collect(),
            next_page_token: PageToken::next(&page, rows.len(), last.as_deref(), &key),
            last_seq: u64::try_from(last_seq).unwrap_or(0),
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        self.begin(&request, "AdminService.VerifyAudit", READERS, "audit")
            .await?;
        let req = request.get_ref();
        let from = req
            .from_seq
            .map_or(1, |s| i64::try_from(s).unwrap_or(i64::MAX));
        let to = req.to_seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
        if to.is_some_and(|to| to < from) {
            return Err(VaultError::invalid("from_seq", "is greater than to_seq").into());
        }
        let report = self.0.vault.audit_verify(from, to).await?;
        let unsigned = |s: i64| u64::try_from(s).unwrap_or(0);
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: report.ok(),
            entries_checked: report.entries_checked,
            first_broken_seq: report.first_broken_seq.map(unsigned),
            detail: report.detail,
            from_seq: unsigned(report.from_seq),
            to_seq: unsigned(report.to_seq),
            checkpoints_verified: report.checkpoints_verified,
            checkpoint_public_key: hex::encode(&report.checkpoint_public_key),
        }))
    }
}

/// A caller-supplied target as the audit log records it: at most 128
/// characters, control characters replaced.
fn audit_target(raw: &str) -> String {
    raw.chars()
        .take(128)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
