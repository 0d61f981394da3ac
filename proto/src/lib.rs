//! The fleet.v1 gRPC contract, generated from `fleet/v1/fleet.proto`.
//!
//! Only the controller, the agent and fleetctl touch these types; everything inside converts
//! them to domain types at the edge.

pub mod admin;
pub mod connect;
pub mod names;
pub mod pem;
pub mod tally;

/// How a hello's capabilities name the agent's workload driver: `driver:kubernetes`.
pub const DRIVER_CAPABILITY: &str = "driver:";

/// The largest fleet manifest a controller takes (bytes): it keeps each in one store write,
/// with a release it starts, and etcd takes 1.5 MiB a request by default.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

#[allow(clippy::all, missing_docs, rust_2018_idioms)] // Generated code.
pub mod v1 {
    tonic::include_proto!("fleet.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("fleet_v1_descriptor");
}

/// The client of the part of etcd's v3 API (KV and Lease) that the controller's etcd store
/// uses, generated from `etcd/rpc.proto`.
#[allow(clippy::all, missing_docs, rust_2018_idioms)] // Generated code.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::{AgentMessage, DesiredState, Hello, RouteTable, agent_message, route_table};

    #[test]
    fn messages_round_trip_through_the_wire_format() {
        let desired = DesiredState {
            epoch: 3,
            seq: 7,
            release_id: "r1".into(),
            routes: Some(RouteTable {
                canary_weight_bp: 500,
                sticky: Some(route_table::Sticky::StickyCookie("fleet-bucket".into())),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = desired.encode_to_vec();
        assert_eq!(DesiredState::decode(bytes.as_slice()), Ok(desired));
        let hello = AgentMessage {
            message: Some(agent_message::Message::Hello(Hello {
                region: "us-west-1".into(),
                ..Default::default()
            })),
        };
        assert_eq!(
            AgentMessage::decode(hello.encode_to_vec().as_slice()),
            Ok(hello)
        );
    }

    #[test]
    fn the_descriptor_set_describes_both_services() {
        let text = String::from_utf8_lossy(super::v1::FILE_DESCRIPTOR_SET);
        assert!(text.contains("ReleaseService") && text.contains("AgentService"));
    }
}
