//! The least an HTTP/1.1 reverse proxy built on hyper 1 can do per request, for
//! `benches/instructions.sh` to measure: no routing, no header rewriting, no pool, no
//! timeouts, no counters. Each client connection gets one backend connection of its own, and
//! each request is handed from hyper's server to hyper's client as it is.
//!
//! Whatever this costs per request, fleet-proxy cannot cost less while it uses hyper's
//! HTTP/1 codec; what fleet-proxy costs beyond it is its own doing.
//!
//!     cargo run --release -p fleet-proxy --example hyper_floor -- LISTEN BACKEND

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::server::conn::http1 as server;
use hyper::{Request, client::conn::http1 as client};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(backend)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: hyper_floor LISTEN_ADDR BACKEND_ADDR");
    };
    let (listen, backend): (SocketAddr, SocketAddr) = (listen.parse()?, backend.parse()?);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(listen, backend))
}

async fn run(listen: SocketAddr, backend: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (client_io, _) = listener.accept().await?;
        client_io.set_nodelay(true)?;
        let upstream = TcpStream::connect(backend).await?;
        upstream.set_nodelay(true)?;
        let (tx, conn) = client::handshake(TokioIo::new(upstream)).await?;
        tokio::spawn(conn);
        let tx = Arc::new(Mutex::new(tx));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let tx = tx.clone();
            // A failed request closes the connection; the floor needs no error responses.
            async move { tx.lock().await.send_request(req).await }
        });
        tokio::spawn(server::Builder::new().serve_connection(TokioIo::new(client_io), service));
    }
}
