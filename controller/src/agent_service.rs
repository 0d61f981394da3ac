//! `fleet.v1.AgentService`: one long-lived stream per agent, dialled by the agent.

use std::pin::Pin;
use std::sync::Arc;

use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_server::AgentService;
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::Limits;
use crate::identity;
use crate::release_service::stopping;
use crate::runtime::Controller;

pub struct Agents {
    pub controller: Arc<Controller>,
    /// Whether the listener is mutual TLS: then an agent speaks only for the cluster its
    /// certificate names ([`identity`]).
    pub mutual: bool,
    /// Agents' streams are let go when this turns true: a stream still read would hold the
    /// server's graceful shutdown until its agent hangs up.
    pub shutdown: watch::Receiver<bool>,
    pub limits: Limits,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Agents {
    type SessionStream = Outbound;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let names = identity::peer_names(&request, self.mutual)?;
        let mut inbound = request.into_inner();
        let mut shutdown = self.shutdown.clone();
        let Limits {
            hello_within,
            silent_after,
            ..
        } = self.limits;
        let first = tokio::select! {
            first = tokio::time::timeout(hello_within, inbound.next()) => first,
            _ = shutdown.wait_for(|stop| *stop) => return Err(stopping()),
        };
        let first = first
            .map_err(|_| Status::deadline_exceeded(format!("no hello within {hello_within:?}")))?
            .ok_or_else(|| Status::invalid_argument("the stream ended before hello"))??;
        let Some(pb::agent_message::Message::Hello(hello)) = first.message else {
            return Err(Status::invalid_argument("the first message must be hello"));
        };
        if !fleet_yaml::is_dns_label(&hello.region) || !fleet_yaml::is_dns_label(&hello.cluster) {
            return Err(Status::invalid_argument(format!(
                "hello needs a region and a cluster as the manifest names them (lowercase DNS labels), not {:?} and {:?}",
                hello.region, hello.cluster
            )));
        }
        if let Some(names) = names {
            identity::check_agent(&names, &hello.region, &hello.cluster).map_err(|e| {
                tracing::warn!(region = %hello.region, cluster = %hello.cluster, %e, "agent refused");
                Status::permission_denied(e)
            })?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (region, cluster) = (hello.region.clone(), hello.cluster.clone());
        let conn = self.controller.agent_connected(hello, tx).map_err(|held| {
            tracing::warn!(%region, %cluster, %held, "a second agent for a cluster refused");
            Status::already_exists(format!(
                "{held}. An agent that is gone is let go once silent for {silent_after:?}"
            ))
        })?;
        let controller = self.controller.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = tokio::time::timeout(silent_after, inbound.next()) => message,
                    // The agents are let go as one by `disconnect_agents`: a stream told gone
                    // here would record its region unreachable in running releases first.
                    _ = shutdown.wait_for(|stop| *stop) => return,
                };
                let Ok(message) = message else {
                    tracing::warn!(%region, %cluster, "agent silent for {silent_after:?}; letting it go");
                    break;
                };
                let Some(message) = message else {
                    break;
                };
                match message {
                    Ok(pb::AgentMessage {
                        message: Some(pb::agent_message::Message::Status(status)),
                    }) => {
                        controller.agent_status(conn, status);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "agent stream failed");
                        break;
                    }
                }
            }
            controller.agent_gone(conn);
        });
        let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        Ok(Response::new(Box::pin(outbound)))
    }
}
