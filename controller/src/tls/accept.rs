//! The listener's TLS connections: accepted with the settings in force at each handshake,
//! the files looked at every [`RELOAD_EVERY`], and each open connection's client certificate
//! checked again whenever new settings come into force, the connection closed if it fails,
//! or once the certificate expires.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tonic::transport::server::Connected;

use super::{Files, Settings, Stamp};

/// How often the files are looked at for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; connections beyond are closed at once, so that clients that
/// never finish theirs cannot take every descriptor from the agents.
const MAX_HANDSHAKES: usize = 256;
/// Refused handshakes are logged at most this often (with how many were not).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What the listener's TLS has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct Status {
    /// Reads of changed files that put new settings in force.
    pub reloads: AtomicU64,
    /// Reads of changed files that did not work (the last good settings stayed).
    pub reloads_failed: AtomicU64,
    /// Handshakes refused or given up (not counting connections closed before a byte).
    pub refused: AtomicU64,
    /// When the controller's certificate in force expires, in seconds since the Unix epoch.
    pub certificate_expiry: AtomicI64,
}

/// The settings in force, read again from their [`Files`] when they change.
pub struct Reloader {
    status: Arc<Status>,
    files: Files,
    stamps: Vec<Stamp>,
    current: Arc<ServerConfig>,
    /// How clients' certificates are checked now: open connections check theirs again when
    /// this changes.
    verifier: watch::Sender<Arc<dyn ClientCertVerifier>>,
}

impl Reloader {
    /// Reads the files; a wrong one is an error naming its flag.
    pub fn new(files: Files) -> anyhow::Result<Reloader> {
        let stamps = files.stamps();
        let settings = files.load()?;
        let mut reloader = Reloader {
            status: Arc::default(),
            files,
            stamps,
            current: settings.config.clone(),
            verifier: watch::Sender::new(settings.verifier.clone()),
        };
        reloader.install(settings);
        Ok(reloader)
    }

    /// Puts `settings` in force: for the next handshakes, the open connections' checks and
    /// `/metrics`.
    fn install(&mut self, settings: Settings) {
        (self.status.certificate_expiry).store(settings.expiry, Ordering::Relaxed);
        self.current = settings.config;
        self.verifier.send_replace(settings.verifier);
    }

    /// The settings in force, for handshakes.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.clone()
    }

    /// What the listener has done, as it goes on.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Reads the files again if any changed since last time: `Ok(true)` when new settings are
    /// now in force, `Ok(false)` when nothing changed, an error (the old settings staying)
    /// when the new files do not work. Files that could not be read are tried again next
    /// time; files read that do not work, only once they change again.
    pub fn check(&mut self) -> anyhow::Result<bool> {
        let stamps = self.files.stamps();
        if stamps == self.stamps {
            return Ok(false);
        }
        let settings = match self.files.load() {
            Ok(settings) => settings,
            Err(e) => {
                if !e.chain().any(|cause| cause.is::<io::Error>()) {
                    self.stamps = stamps;
                }
                self.status.reloads_failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.stamps = stamps;
        self.status.reloads.fetch_add(1, Ordering::Relaxed);
        self.install(settings);
        Ok(true)
    }

    /// Accepts TLS connections on `listener` with the settings in force at each handshake,
    /// and looks at the files every [`RELOAD_EVERY`], until `shutdown` turns true.
    pub fn incoming(
        mut self,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) -> ReceiverStream<io::Result<Connection>> {
        let (tx, rx) = mpsc::channel(64);
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let lingering = Arc::new(Semaphore::new(MAX_LINGERING));
        let refused = Arc::new(Refusals {
            status: self.status.clone(),
            last: Mutex::default(),
        });
        tokio::spawn(async move {
            let stop = crate::signalled(shutdown);
            tokio::pin!(stop);
            let mut reload = tokio::time::interval(RELOAD_EVERY);
            let mut last_error = None;
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => match handshakes.clone().try_acquire_owned() {
                            Ok(permit) => {
                                let _ = tcp.set_nodelay(true);
                                let verifier = self.verifier.subscribe();
                                let (acceptor, tx, refused) = (TlsAcceptor::from(self.current()), tx.clone(), refused.clone());
                                let lingering = lingering.clone();
                                tokio::spawn(async move {
                                    match handshake(acceptor, tcp).await {
                                        Ok(tls) => {
                                            let _ = tx.send(Ok(Connection::new(tls, verifier))).await;
                                        }
                                        Err((e, tcp)) => {
                                            refused.note(e);
                                            drop(permit);
                                            // Lingering, but not at the cost of handshakes.
                                            if let (Some(tcp), Ok(_lingers)) = (tcp, lingering.try_acquire_owned()) {
                                                linger(tcp).await;
                                            }
                                        }
                                    }
                                });
                            }
                            Err(_) => refused.note(io::Error::other("too many handshakes under way")),
                        },
                        Err(e) => {
                            // Out of descriptors, say: wait a little rather than spin.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    _ = reload.tick() => match self.check() {
                        Ok(true) => {
                            last_error = None;
                            tracing::info!(files = ?self.files, "TLS files read again; new connections use them");
                        }
                        Ok(false) => {}
                        Err(e) => {
                            let e = format!("{e:#}");
                            if last_error.as_ref() != Some(&e) {
                                tracing::error!(error = %e, "TLS files changed but do not work; the last good ones stay in force");
                                last_error = Some(e);
                            }
                        }
                    },
                    _ = &mut stop => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

/// A TLS handshake on `tcp`; if refused, why, and the connection (to close lingering).
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, (io::Error, Option<TcpStream>)> {
    let peer = match tcp.peer_addr() {
        Ok(addr) => addr.to_string(),
        Err(_) => "a client".to_string(),
    };
    let accept = acceptor.accept(tcp).into_fallible();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err((e, tcp))) => Err((io::Error::new(e.kind(), format!("{peer}: {e}")), Some(tcp))),
        Err(_) => Err((
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{peer}: no handshake within {HANDSHAKE_TIMEOUT:?}"),
            ),
            None,
        )),
    }
}

/// How long a refused client's connection is read (and what it sends dropped) before it is
/// closed.
const LINGER: Duration = Duration::from_secs(1);
/// Refused connections closed lingering at once; more are closed at once. Apart from the
/// handshakes' places: clients refused by the hundred must not keep others from theirs.
const MAX_LINGERING: usize = 64;

/// Closes the connection of a refused handshake so that the client reads why: the alert that
/// says it (a certificate required, or refused) is sent; closed at once, with the client's
/// first request unread (under TLS 1.3 it sends one before it hears), the connection would be
/// reset, and the client would lose the alert and see a connection cut, which it would try
/// again. So: no more writes, then what the client sends is read and dropped until it closes
/// its side, or for [`LINGER`] at most (a lingering close, as nginx makes).
async fn linger(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let drained = async { while let Ok(1..) = tcp.read(&mut sink).await {} };
    let _ = tokio::time::timeout(LINGER, drained).await;
}

/// Refused handshakes, logged at most every [`WARN_EVERY`]: a client shut out (another CA's
/// certificate, a revoked one, none) should be seen, a port scan should not flood the log.
/// A connection closed before its first byte (a TCP probe) is not a refusal.
struct Refusals {
    status: Arc<Status>,
    /// When one was last logged, and how many since.
    last: Mutex<(Option<Instant>, u64)>,
}

impl Refusals {
    fn note(&self, e: io::Error) {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            tracing::debug!(error = %e, "closed before a handshake");
            return;
        }
        self.status.refused.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(not_logged_before) = to_log(&mut last, Instant::now()) {
            tracing::warn!(error = %e, not_logged_before, "TLS handshake refused");
        }
    }
}

/// Whether a refusal at `now` is logged, given when one was `last` logged and how many were
/// not since: if so, how many were not (and `last` starts again from now).
fn to_log(last: &mut (Option<Instant>, u64), now: Instant) -> Option<u64> {
    if last.0.is_some_and(|at| now - at < WARN_EVERY) {
        last.1 += 1;
        return None;
    }
    let not_logged = last.1;
    *last = (Some(now), 0);
    Some(not_logged)
}

/// A client's connection: TLS, closed when new settings come into force that its client's
/// certificate does not pass (revoked, or of a CA no longer trusted), or when it expires.
pub struct Connection {
    tls: TlsStream<TcpStream>,
    /// The checks of clients' certificates, as each comes into force.
    verifiers: WatchStream<Arc<dyn ClientCertVerifier>>,
    /// When a certificate of the client's chain first expires, and a timer that goes off
    /// then (or a day from the last time it went off, whichever is first: tokio's timers
    /// reach two years).
    expiry: Option<(SystemTime, Pin<Box<Sleep>>)>,
    /// Why it failed: once failed, failed for good, whatever a caller makes of the first
    /// error.
    failed: Option<&'static str>,
}

/// The longest a connection's expiry timer is set for at once.
const LOOK_AT_EXPIRY_EVERY: Duration = Duration::from_secs(86_400);

impl Connection {
    fn new(
        tls: TlsStream<TcpStream>,
        verifier: watch::Receiver<Arc<dyn ClientCertVerifier>>,
    ) -> Connection {
        // The first of the chain the client showed to expire (its own, or an intermediate).
        let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
        let expires = chain.iter().filter_map(|c| super::not_after(c).ok()).min();
        let expiry = expires.map(|at| {
            let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0));
            (at, Box::pin(tokio::time::sleep(left(at))))
        });
        Connection {
            tls,
            verifiers: WatchStream::from_changes(verifier),
            expiry,
            failed: None,
        }
    }

    /// An error once settings have come into force that the client's certificate fails, or
    /// once it has expired.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.failed.is_none()
            && let Poll::Ready(Some(verifier)) = Pin::new(&mut self.verifiers).poll_next(cx)
        {
            let certs = self.tls.get_ref().1.peer_certificates().unwrap_or_default();
            let passed = match certs.split_first() {
                Some((own, chain)) => {
                    let now = UnixTime::now();
                    verifier.verify_client_cert(own, chain, now).is_ok()
                }
                None => false,
            };
            if !passed {
                self.failed =
                    Some("the client's certificate does not pass the TLS settings now in force");
            }
        }
        while self.failed.is_none()
            && let Some((at, timer)) = &mut self.expiry
            && timer.as_mut().poll(cx).is_ready()
        {
            match left(*at) {
                Duration::ZERO => self.failed = Some("the client's certificate expired"),
                left => timer.as_mut().reset(tokio::time::Instant::now() + left),
            }
        }
        match self.failed {
            Some(why) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, why)),
            None => Ok(()),
        }
    }
}

/// How long until `at`, at most [`LOOK_AT_EXPIRY_EVERY`]; zero once it has passed (a
/// certificate is valid through the second its `not_after` names).
fn left(at: SystemTime) -> Duration {
    match (at + Duration::from_secs(1)).duration_since(SystemTime::now()) {
        Ok(left) => left.min(LOOK_AT_EXPIRY_EVERY),
        Err(_) => Duration::ZERO,
    }
}

/// Who is at the other end of a [`Connection`], in each request's extensions.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The certificate chain the client showed, its own first.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        Peer {
            certs: self
                .tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.to_vec())),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_every_ten_seconds_with_how_many_were_not() {
        let start = Instant::now();
        let mut last = (None, 0);
        let logged: Vec<Option<u64>> = [0, 1, 2, 9, 10, 10, 25]
            .into_iter()
            .map(|s| to_log(&mut last, start + Duration::from_secs(s)))
            .collect();
        assert_eq!(logged, [Some(0), None, None, None, Some(3), None, Some(1)]);
    }
}
