//! `tokenvault.v1.EventService` (role worker).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use super::Context;
use super::auth::{Caller, Role};
use super::convert;
use crate::audit::Outcome;
use crate::domain::{ConsumerName, VaultError};
use crate::proto::v1 as pb;
use crate::vault::WatchRequest;

pub(super) struct Events(pub Arc<Context>);

const WORKER: &[Role] = &[Role::Worker];

impl Events {
    /// Authorizes the call and checks the caller may act as `consumer`
    /// (refusals audited).
    async fn consumer<T>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
        consumer: &str,
    ) -> Result<(Caller, ConsumerName), Status> {
        let caller = self
            .0
            .auth
            .authorize(&self.0.vault, request, rpc, WORKER)
            .await?;
        let consumer = ConsumerName::parse(consumer)?;
        if !caller
            .policy
            .may_consume(&caller.identity, consumer.as_str())
        {
            self.0
                .vault
                .audit()
                .record(
                    &caller.actor(),
                    "authz.deny",
                    rpc,
                    Outcome::Denied,
                    format!("may not act as consumer {consumer}"),
                )
                .await?;
            return Err(VaultError::PermissionDenied(
                format!("{} may not act as consumer {consumer}", caller.identity).into(),
            )
            .into());
        }
        Ok((caller, consumer))
    }
}

#[tonic::async_trait]
impl pb::event_service_server::EventService for Events {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.get_ref();
        let (_, consumer) = self
            .consumer(&request, "EventService.Watch", &req.consumer)
            .await?;
        let watch = WatchRequest {
            consumer,
            after_cursor: req
                .after_cursor
                .map(|c| {
                    i64::try_from(c).map_err(|_| VaultError::invalid("after_cursor", "too large"))
                })
                .transpose()?,
            kinds: req
                .kinds
                .iter()
                .map(|k| convert::event_kind(*k))
                .collect::<Result<_, _>>()?,
            integrations: req
                .integrations
                .iter()
                .map(|i| convert::integration(*i))
                .collect::<Result<_, _>>()?,
        };
        let rx = self.0.vault.events_watch(watch).await?;
        let stream = ReceiverStream::new(rx).map(|item| match item {
            Ok(e) => Ok(convert::event(&e)),
            Err(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let req = request.get_ref();
        let (caller, consumer) = self
            .consumer(&request, "EventService.Ack", &req.consumer)
            .await?;
        if req.cursor == 0 {
            return Err(VaultError::invalid("cursor", "must be a positive cursor").into());
        }
        let cursor =
            i64::try_from(req.cursor).map_err(|_| VaultError::invalid("cursor", "too large"))?;
        let position = self
            .0
            .vault
            .events_ack(&caller.actor(), &consumer, cursor)
            .await?;
        Ok(Response::new(pb::AckResponse {
            position: u64::try_from(position).unwrap_or(0),
        }))
    }
}
