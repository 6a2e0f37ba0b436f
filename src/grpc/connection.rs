//! `tokenvault.v1.ConnectionService` (role app).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Context;
use super::auth::Role;
use super::convert::{self, PageToken};
use crate::audit::Outcome;
use crate::crypto::SecretString;
use crate::domain::{AccountId, ConnectionId, DeletionReason, ReceiptId, TenantId, VaultError};
use crate::proto::v1 as pb;
use crate::store::{ConnectionFilter, DeletionTarget};
use crate::vault::{Completer, Completion};

pub(super) struct Connections(pub Arc<Context>);

const APP: &[Role] = &[Role::App];

#[tonic::async_trait]
impl pb::connection_service_server::ConnectionService for Connections {
    async fn begin_authorization(
        &self,
        request: Request<pb::BeginAuthorizationRequest>,
    ) -> Result<Response<pb::BeginAuthorizationResponse>, Status> {
        let rpc = "ConnectionService.BeginAuthorization";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let req = request.get_ref();
        let tenant = TenantId::parse(&req.tenant_id)?;
        let account = AccountId::parse(&req.account_id)?;
        let integration = convert::integration(req.integration)?;
        let hint = req
            .login_hint
            .as_deref()
            .map(convert::login_hint)
            .transpose()?;
        let begun = self
            .0
            .vault
            .authorization_begin(&caller.actor(), tenant, account, integration, hint)
            .await?;
        Ok(Response::new(pb::BeginAuthorizationResponse {
            authorization_url: begun.url,
            state_expires_at: Some(convert::ts(begun.expires_at)),
        }))
    }

    async fn complete_authorization(
        &self,
        request: Request<pb::CompleteAuthorizationRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let rpc = "ConnectionService.CompleteAuthorization";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let req = request.into_inner();
        let tenant = (!req.tenant_id.is_empty())
            .then(|| TenantId::parse(&req.tenant_id))
            .transpose()?;
        let account = (!req.account_id.is_empty())
            .then(|| AccountId::parse(&req.account_id))
            .transpose()?;
        let completion = match req.outcome {
            Some(pb::complete_authorization_request::Outcome::Code(code)) => {
                if code.len() > 2048 {
                    return Err(VaultError::invalid("code", "longer than 2048 bytes").into());
                }
                Completion::Code(SecretString::new(code))
            }
            Some(pb::complete_authorization_request::Outcome::Error(e)) => {
                Completion::Error(e.error, e.error_description)
            }
            None => return Err(VaultError::invalid("outcome", "set code or error").into()),
        };
        let actor = caller.actor();
        let completer = Completer::Caller {
            actor: &actor,
            tenant: tenant.as_ref(),
            account: account.as_ref(),
        };
        let record = self
            .0
            .vault
            .authorization_complete(completer, &req.state, completion)
            .await?;
        let detail = self.0.vault.connection_detail(&record.id).await?;
        Ok(Response::new(convert::connection_listed(
            &detail,
            detail.access_expires_at,
        )))
    }

    async fn get_connection(
        &self,
        request: Request<pb::GetConnectionRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let rpc = "ConnectionService.GetConnection";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let id = ConnectionId::parse(&request.get_ref().connection_id)?;
        let detail = self.0.vault.connection_detail(&id).await?;
        let shown = convert::connection_listed(&detail, detail.access_expires_at);
        // Reads are audited too; no entry, no answer.
        self.0
            .vault
            .audit()
            .record(
                &caller.actor(),
                "connection.get",
                id.as_str(),
                Outcome::Ok,
                "",
            )
            .await?;
        Ok(Response::new(shown))
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        let rpc = "ConnectionService.ListConnections";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let req = request.get_ref();
        let filter = ConnectionFilter {
            tenant: Some(TenantId::parse(&req.tenant_id)?),
            account: req
                .account_id
                .as_deref()
                .map(AccountId::parse)
                .transpose()?,
            integration: req.integration.map(convert::integration).transpose()?,
            include_deleted: req.include_deleted,
            status: req.status.map(convert::connection_status).transpose()?,
            google_subject: None,
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
        let connections: Vec<pb::Connection> = details
            .iter()
            .map(|d| convert::connection_listed(d, None))
            .collect();
        self.0
            .vault
            .audit()
            .record(
                &caller.actor(),
                "connection.list",
                filter.tenant.as_ref().map_or("-", |t| t.as_str()),
                Outcome::Ok,
                format!(
                    "account={} integration={} status={} shown={}",
                    filter.account.as_ref().map_or("*", |a| a.as_str()),
                    filter.integration.map_or("*", |i| i.as_str()),
                    filter.status.map_or("*", |s| s.as_str()),
                    connections.len()
                ),
            )
            .await?;
        Ok(Response::new(pb::ListConnectionsResponse {
            connections,
            next_page_token: next,
        }))
    }

    async fn disconnect(
        &self,
        request: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DeletionReceipt>, Status> {
        let rpc = "ConnectionService.Disconnect";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let req = request.get_ref();
        let target = DeletionTarget::Connection(ConnectionId::parse(&req.connection_id)?);
        let reason = convert::reason_text(&req.reason)?;
        let vault = &self.0.vault;
        let done = vault
            .delete(
                &caller.actor(),
                target,
                DeletionReason::UserDisconnected,
                reason,
            )
            .await?;
        Ok(Response::new(convert::receipt(vault, &done.receipt)))
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeletionReceipt>, Status> {
        let rpc = "ConnectionService.DeleteAccount";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let req = request.get_ref();
        let target = DeletionTarget::Account(
            TenantId::parse(&req.tenant_id)?,
            AccountId::parse(&req.account_id)?,
        );
        let reason = convert::reason_text(&req.reason)?;
        let vault = &self.0.vault;
        let done = vault
            .delete(
                &caller.actor(),
                target,
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
        let rpc = "ConnectionService.GetDeletionReceipt";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let id = ReceiptId::parse(&request.get_ref().receipt_id)?;
        let vault = &self.0.vault;
        let receipt = vault.receipt_get(&id).await?;
        vault
            .audit()
            .record(&caller.actor(), "receipt.get", id.as_str(), Outcome::Ok, "")
            .await?;
        Ok(Response::new(convert::receipt(vault, &receipt)))
    }
}
