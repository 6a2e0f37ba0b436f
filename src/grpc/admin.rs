//! `tokenvault.v1.AdminService` (roles admin and auditor). Every call is
//! audited; auditors may only read. `FollowAudit` is audited once, when its
//! stream opens, not for each batch it sends.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use super::Context;
use super::auth::{Caller, Role};
use super::convert::{self, PageToken};
use super::requests::{
    DeleteAccountRequest, DestroyKeyRequest, DisconnectRequest, GetConnectionRequest,
    GetDeletionReceiptRequest, ListConnectionsRequest, ListDeletionReceiptsRequest,
    QueryAuditRequest, RetireKeyRequest, VerifyAuditRequest, audit_page_after, follow_from,
};
use crate::audit::Outcome;
use crate::crypto::KekVersion;
use crate::domain::{DeletionReason, VaultError};
use crate::proto::v1 as pb;
use crate::store::{DeletionTarget, ReceiptFilter};

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

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for Admin {
    async fn list_connections(
        &self,
        request: Request<pb::AdminServiceListConnectionsRequest>,
    ) -> Result<Response<pb::AdminServiceListConnectionsResponse>, Status> {
        self.begin(
            &request,
            "AdminService.ListConnections",
            ADMIN,
            "connections",
        )
        .await?;
        let ListConnectionsRequest {
            filter,
            page,
            page_key,
        } = ListConnectionsRequest::try_from(request.into_inner())?;
        let details = self
            .0
            .vault
            .connection_details(&filter, &page, true)
            .await?;
        let next = PageToken::next(
            &page,
            details.len(),
            details.last().map(|d| d.connection.id.as_str()),
            &page_key,
        );
        Ok(Response::new(pb::AdminServiceListConnectionsResponse {
            connections: details.iter().map(convert::connection_detail).collect(),
            next_page_token: next,
        }))
    }

    async fn get_connection(
        &self,
        request: Request<pb::AdminServiceGetConnectionRequest>,
    ) -> Result<Response<pb::AdminServiceGetConnectionResponse>, Status> {
        self.begin(
            &request,
            "AdminService.GetConnection",
            ADMIN,
            &request.get_ref().connection_id,
        )
        .await?;
        let id = GetConnectionRequest::try_from(request.into_inner())?.connection;
        let detail = self.0.vault.connection_detail(&id, true).await?;
        Ok(Response::new(pb::AdminServiceGetConnectionResponse {
            connection: Some(convert::connection_detail(&detail)),
        }))
    }

    async fn revoke_connection(
        &self,
        request: Request<pb::RevokeConnectionRequest>,
    ) -> Result<Response<pb::RevokeConnectionResponse>, Status> {
        let caller = self
            .begin(
                &request,
                "AdminService.RevokeConnection",
                ADMIN,
                &request.get_ref().connection_id,
            )
            .await?;
        let req = DisconnectRequest::try_from(request.into_inner())?;
        let vault = &self.0.vault;
        let done = vault
            .delete(
                &caller.actor(),
                DeletionTarget::Connection(req.connection),
                DeletionReason::AdminRevoked,
                &req.reason,
            )
            .await?;
        Ok(Response::new(pb::RevokeConnectionResponse {
            receipt: Some(convert::receipt(vault, &done.receipt)),
        }))
    }

    async fn delete_account(
        &self,
        request: Request<pb::AdminServiceDeleteAccountRequest>,
    ) -> Result<Response<pb::AdminServiceDeleteAccountResponse>, Status> {
        let target = format!(
            "{}/{}",
            request.get_ref().tenant_id,
            request.get_ref().account_id
        );
        let caller = self
            .begin(&request, "AdminService.DeleteAccount", ADMIN, &target)
            .await?;
        let req = DeleteAccountRequest::try_from(request.into_inner())?;
        let vault = &self.0.vault;
        let done = vault
            .delete(
                &caller.actor(),
                DeletionTarget::Account(req.tenant, req.account),
                DeletionReason::AccountDeleted,
                &req.reason,
            )
            .await?;
        Ok(Response::new(pb::AdminServiceDeleteAccountResponse {
            receipt: Some(convert::receipt(vault, &done.receipt)),
        }))
    }

    async fn get_deletion_receipt(
        &self,
        request: Request<pb::AdminServiceGetDeletionReceiptRequest>,
    ) -> Result<Response<pb::AdminServiceGetDeletionReceiptResponse>, Status> {
        self.begin(
            &request,
            "AdminService.GetDeletionReceipt",
            READERS,
            &request.get_ref().receipt_id,
        )
        .await?;
        let id = GetDeletionReceiptRequest::try_from(request.into_inner())?.receipt;
        let vault = &self.0.vault;
        let receipt = vault.receipt_get(&id).await?;
        Ok(Response::new(pb::AdminServiceGetDeletionReceiptResponse {
            receipt: Some(convert::receipt(vault, &receipt)),
        }))
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
        let req = ListDeletionReceiptsRequest::try_from(request.into_inner())?;
        let vault = &self.0.vault;
        let filter = ReceiptFilter {
            incomplete_only: req.incomplete_only || req.overdue_only,
            requested_before: req.overdue_only.then(|| vault.receipt_sla_cutoff()),
            tenant: req.tenant,
            account: req.account,
        };
        let records = vault.receipt_list(&filter, &req.page).await?;
        let next = PageToken::next(
            &req.page,
            records.len(),
            records.last().map(|r| r.receipt_id.as_str()),
            &req.page_key,
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
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        let caller = self
            .begin(&request, "AdminService.RotateKeys", ADMIN, "keys")
            .await?;
        let run = self.0.vault.keys().rotate(&caller.actor()).await?;
        Ok(Response::new(pb::RotateKeysResponse {
            rotation: Some(convert::rotation(&run)),
        }))
    }

    async fn retire_key(
        &self,
        request: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::RetireKeyResponse>, Status> {
        let raw = request.get_ref().version;
        let caller = self
            .begin(
                &request,
                "AdminService.RetireKey",
                ADMIN,
                &format!("kek:{raw}"),
            )
            .await?;
        let version = RetireKeyRequest::try_from(request.into_inner())?.version;
        self.0.vault.keys().retire(version, &caller.actor()).await?;
        Ok(Response::new(pb::RetireKeyResponse {
            version: Some(self.key_version_info(version).await?),
        }))
    }

    async fn destroy_key(
        &self,
        request: Request<pb::DestroyKeyRequest>,
    ) -> Result<Response<pb::DestroyKeyResponse>, Status> {
        let raw = request.get_ref().version;
        let caller = self
            .begin(
                &request,
                "AdminService.DestroyKey",
                ADMIN,
                &format!("kek:{raw}"),
            )
            .await?;
        let version = DestroyKeyRequest::try_from(request.into_inner())?.version;
        self.0
            .vault
            .keys()
            .destroy(version, &caller.actor())
            .await?;
        Ok(Response::new(pb::DestroyKeyResponse {
            version: Some(self.key_version_info(version).await?),
        }))
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
        let QueryAuditRequest {
            filter,
            page,
            page_key,
        } = QueryAuditRequest::try_from(request.into_inner())?;
        let (rows, last_seq) = self.0.vault.audit_query(&filter, page.limit).await?;
        let after = audit_page_after(&filter.resume, &rows);
        Ok(Response::new(pb::QueryAuditResponse {
            entries: rows.iter().map(convert::audit_entry).collect(),
            next_page_token: PageToken::next(&page, rows.len(), after.as_deref(), &page_key),
            last_seq: u64::try_from(last_seq).unwrap_or(0),
        }))
    }

    type FollowAuditStream =
        Pin<Box<dyn Stream<Item = Result<pb::FollowAuditResponse, Status>> + Send>>;

    async fn follow_audit(
        &self,
        request: Request<pb::FollowAuditRequest>,
    ) -> Result<Response<Self::FollowAuditStream>, Status> {
        // The one audit entry of the whole follow: the reads that feed the
        // stream are not audited (see `vault::audit_follow`).
        self.begin(&request, "AdminService.FollowAudit", READERS, "audit")
            .await?;
        let req = request.into_inner();
        let from = follow_from(&req)?;
        let rx = self.0.vault.audit_follow(from).await?;
        let stream = ReceiverStream::new(rx).map(|item| match item {
            Ok(batch) => Ok(pb::FollowAuditResponse {
                entries: batch.rows.iter().map(convert::audit_entry).collect(),
                caught_up: batch.caught_up,
            }),
            Err(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        self.begin(&request, "AdminService.VerifyAudit", READERS, "audit")
            .await?;
        let req = VerifyAuditRequest::try_from(request.into_inner())?;
        let report = self.0.vault.audit_verify(req.from_seq, req.to_seq).await?;
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
            checkpoints_witnessed: report.checkpoints_witnessed,
            witness_files: report
                .witness_files
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
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
