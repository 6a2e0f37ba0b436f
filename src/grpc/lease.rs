//! `tokenvault.v1.LeaseService` (role worker).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Context;
use super::auth::Role;
use crate::domain::VaultError;
use crate::proto::v1 as pb;

pub(super) struct Leases(pub Arc<Context>);

const WORKER: &[Role] = &[Role::Worker];

#[tonic::async_trait]
impl pb::lease_service_server::LeaseService for Leases {
    async fn lease_token(
        &self,
        request: Request<pb::LeaseTokenRequest>,
    ) -> Result<Response<pb::LeaseTokenResponse>, Status> {
        let rpc = "LeaseService.LeaseToken";
        self.0
            .auth
            .authorize(&self.0.vault, &request, rpc, WORKER)
            .await?;
        Err(VaultError::Unimplemented(rpc).into())
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        let rpc = "LeaseService.ReleaseLease";
        self.0
            .auth
            .authorize(&self.0.vault, &request, rpc, WORKER)
            .await?;
        Err(VaultError::Unimplemented(rpc).into())
    }
}
