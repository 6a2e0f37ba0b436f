//! `tokenvault.v1.ConnectionService` (role app).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Context;
use super::auth::Role;
use super::convert::{self, PageToken};
use super::requests::{
    BeginAuthorizationRequest, CompleteAuthorizationRequest, DeleteAccountRequest,
    DisconnectRequest, GetConnectionRequest, GetDeletionReceiptRequest, ListConnectionsRequest,
};
use crate::audit::Outcome;
use crate::domain::DeletionReason;
use crate::proto::v1 as pb;
use crate::store::DeletionTarget;
use crate::vault::Completer;

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
        let req = BeginAuthorizationRequest::try_from(request.into_inner())?;
        let begun = self
            .0
            .vault
            .authorization_begin(
                &caller.actor(),
                req.tenant,
                req.account,
                req.integration,
                req.login_hint.as_deref(),
            )
            .await?;
        Ok(Response::new(pb::BeginAuthorizationResponse {
            authorization_url: begun.url,
            state_expires_at: Some(convert::ts(begun.expires_at)),
        }))
    }

    async fn complete_authorization(
        &self,
        request: Request<pb::CompleteAuthorizationRequest>,
    ) -> Result<Response<pb::CompleteAuthorizationResponse>, Status> {
        let rpc = "ConnectionService.CompleteAuthorization";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let req = CompleteAuthorizationRequest::try_from(request.into_inner())?;
        let actor = caller.actor();
        let completer = Completer::Caller {
            actor: &actor,
            tenant: req.tenant.as_ref(),
            account: req.account.as_ref(),
        };
        let record = self
            .0
            .vault
            .authorization_complete(completer, req.state.expose(), req.completion)
            .await?;
        let detail = self.0.vault.connection_detail(&record.id, false).await?;
        Ok(Response::new(pb::CompleteAuthorizationResponse {
            connection: Some(convert::connection_listed(
                &detail,
                detail.access_expires_at,
            )),
        }))
    }

    async fn get_connection(
        &self,
        request: Request<pb::GetConnectionRequest>,
    ) -> Result<Response<pb::GetConnectionResponse>, Status> {
        let rpc = "ConnectionService.GetConnection";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let id = GetConnectionRequest::try_from(request.into_inner())?.connection;
        let detail = self.0.vault.connection_detail(&id, false).await?;
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
        Ok(Response::new(pb::GetConnectionResponse {
            connection: Some(shown),
        }))
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
        let ListConnectionsRequest {
            filter,
            page,
            page_key,
        } = ListConnectionsRequest::try_from(request.into_inner())?;
        let details = self
            .0
            .vault
            .connection_details(&filter, &page, false)
            .await?;
        let next = PageToken::next(
            &page,
            details.len(),
            details.last().map(|d| d.connection.id.as_str()),
            &page_key,
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
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        let rpc = "ConnectionService.Disconnect";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let req = DisconnectRequest::try_from(request.into_inner())?;
        let vault = &self.0.vault;
        let done = vault
            .delete(
                &caller.actor(),
                DeletionTarget::Connection(req.connection),
                DeletionReason::UserDisconnected,
                &req.reason,
            )
            .await?;
        Ok(Response::new(pb::DisconnectResponse {
            receipt: Some(convert::receipt(vault, &done.receipt)),
        }))
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeleteAccountResponse>, Status> {
        let rpc = "ConnectionService.DeleteAccount";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
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
        Ok(Response::new(pb::DeleteAccountResponse {
            receipt: Some(convert::receipt(vault, &done.receipt)),
        }))
    }

    async fn get_deletion_receipt(
        &self,
        request: Request<pb::GetDeletionReceiptRequest>,
    ) -> Result<Response<pb::GetDeletionReceiptResponse>, Status> {
        let rpc = "ConnectionService.GetDeletionReceipt";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, APP)
            .await?;
        let id = GetDeletionReceiptRequest::try_from(request.into_inner())?.receipt;
        let vault = &self.0.vault;
        let receipt = vault.receipt_get(&id).await?;
        vault
            .audit()
            .record(&caller.actor(), "receipt.get", id.as_str(), Outcome::Ok, "")
            .await?;
        Ok(Response::new(pb::GetDeletionReceiptResponse {
            receipt: Some(convert::receipt(vault, &receipt)),
        }))
    }
}
