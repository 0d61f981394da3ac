//! fleet-proxy over real sockets: real backends on 127.0.0.1:0 that say which track served.
#![allow(clippy::unwrap_used)]

mod support;

mod admin;
mod binary;
mod compare;
mod drain;
mod hostile;
mod http1_backends;
mod idle;
mod mirror;
mod protocols;
mod resets;
mod routing;
mod unread;
mod upstream;
