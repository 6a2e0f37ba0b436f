//! `tokenvault.v1.LeaseService` (role worker).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Context;
use super::auth::Role;
use super::convert;
use super::requests::{LeaseTokenRequest, ReleaseLeaseRequest};
use crate::proto::v1 as pb;
use crate::vault::LeaseRequest;

pub(super) struct Leases(pub Arc<Context>);

const WORKER: &[Role] = &[Role::Worker];

#[tonic::async_trait]
impl pb::lease_service_server::LeaseService for Leases {
    async fn lease_token(
        &self,
        request: Request<pb::LeaseTokenRequest>,
    ) -> Result<Response<pb::LeaseTokenResponse>, Status> {
        let rpc = "LeaseService.LeaseToken";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, WORKER)
            .await?;
        let deadline = convert::deadline(request.metadata(), self.0.vault.refresh_deadline());
        let req = LeaseTokenRequest::try_from(request.into_inner())?;
        let lease = self
            .0
            .vault
            .lease_token(
                &caller.actor(),
                &caller.policy,
                LeaseRequest {
                    connection: req.connection,
                    purpose: req.purpose,
                    scopes: req.scopes,
                    min_valid: req
                        .min_valid
                        .unwrap_or_else(|| self.0.vault.default_min_valid()),
                    deadline,
                },
            )
            .await?;
        Ok(Response::new(pb::LeaseTokenResponse {
            lease_id: lease.lease_id.to_string(),
            access_token: lease.access_token.expose().to_owned(),
            token_expires_at: Some(convert::ts(lease.token_expires_at)),
            lease_expires_at: Some(convert::ts(lease.lease_expires_at)),
            granted_scopes: lease.scopes.to_strings(),
        }))
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        let rpc = "LeaseService.ReleaseLease";
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, &request, rpc, WORKER)
            .await?;
        let id = ReleaseLeaseRequest::try_from(request.into_inner())?.lease;
        let ended = self.0.vault.lease_release(&caller.actor(), &id).await?;
        Ok(Response::new(pb::ReleaseLeaseResponse {
            lease_id: id.to_string(),
            ended_at: Some(convert::ts(ended)),
        }))
    }
}
