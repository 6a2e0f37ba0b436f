//! `tokenvault.v1.EventService` (role worker).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::Context;
use super::auth::Role;
use crate::domain::VaultError;
use crate::proto::v1 as pb;

pub(super) struct Events(pub Arc<Context>);

const WORKER: &[Role] = &[Role::Worker];

#[tonic::async_trait]
impl pb::event_service_server::EventService for Events {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let rpc = "EventService.Watch";
        self.0
            .auth
            .authorize(&self.0.vault, &request, rpc, WORKER)
            .await?;
        Err(VaultError::Unimplemented(rpc).into())
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let rpc = "EventService.Ack";
        self.0
            .auth
            .authorize(&self.0.vault, &request, rpc, WORKER)
            .await?;
        Err(VaultError::Unimplemented(rpc).into())
    }
}
