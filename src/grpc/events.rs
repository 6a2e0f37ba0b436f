//! `tokenvault.v1.EventService` (role worker). A tenant-limited worker's
//! stream is filtered to its tenants in the vault (`vault::events`).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use super::Context;
use super::auth::{Caller, Role};
use super::convert;
use super::requests::AckRequest;
use crate::audit::Outcome;
use crate::domain::{ConsumerName, ErrorReason, VaultError};
use crate::proto::v1 as pb;
use crate::vault::{WatchRequest, Watcher};

pub(super) struct Events(pub Arc<Context>);

const WORKER: &[Role] = &[Role::Worker];

impl Events {
    /// Authorizes the call and checks the caller may act as `consumer`
    /// (refusals audited). The consumer is parsed here, before the rest of
    /// the request (`requests.rs` parses the rest, given the consumer), so a
    /// caller that may not act as it is refused whatever the other fields hold.
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
            .because(ErrorReason::ConsumerNotAllowed)
            .into());
        }
        Ok((caller, consumer))
    }
}

#[tonic::async_trait]
impl pb::event_service_server::EventService for Events {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (caller, consumer) = self
            .consumer(&request, "EventService.Watch", &request.get_ref().consumer)
            .await?;
        let watch = WatchRequest::try_from((consumer, request.into_inner()))?;
        // The vault filters by tenant with the policy in force at each page.
        let watcher = Watcher {
            identity: caller.identity,
            policy: self.0.auth.policy().clone(),
        };
        let rx = self.0.vault.events_watch(watch, watcher).await?;
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
        let (caller, consumer) = self
            .consumer(&request, "EventService.Ack", &request.get_ref().consumer)
            .await?;
        // A tenant-limited caller is not sent other tenants' events, and a
        // consumer's ack covers every event before it: acking for a consumer
        // that deletion receipts wait for would record other tenants'
        // deletions as purged by a worker that never saw them.
        if caller.policy.tenant_scope(&caller.identity).is_limited()
            && self.0.vault.receipts_wait_for(&consumer)
        {
            self.0
                .vault
                .audit()
                .record(
                    &caller.actor(),
                    "authz.deny",
                    "EventService.Ack",
                    Outcome::Denied,
                    format!(
                        "tenant-limited caller may not acknowledge for required consumer {consumer}"
                    ),
                )
                .await?;
            return Err(VaultError::PermissionDenied(
                format!(
                    "{} is limited to some tenants and may not acknowledge as {consumer}: \
                     deletion receipts wait for {consumer}, whose acknowledgements cover every tenant's events",
                    caller.identity
                )
                .into(),
            )
            .because(ErrorReason::ConsumerNotAllowed)
            .into());
        }
        let ack = AckRequest::try_from((consumer, request.into_inner()))?;
        let position = self
            .0
            .vault
            .events_ack(&caller.actor(), &ack.consumer, ack.cursor)
            .await?;
        Ok(Response::new(pb::AckResponse {
            position: u64::try_from(position).unwrap_or(0),
        }))
    }
}
