//! A small client of etcd's KV and Lease APIs (`fleet_proto::etcd`, over tonic), for the etcd
//! store and the controller's leadership. With a user and password, it authenticates when
//! etcd first asks for a token, and again whenever etcd no longer takes the one it has
//! (expired, or etcd restarted), then makes the call once more. A call that a member lost
//! fails is made again for a few seconds ([`Etcd::call`]). TLS files renewed in place are
//! used for new calls once etcd takes them ([`watch_files`]).
//!
//! It runs on a runtime of its own, so that the store, whose callers hold the controller's
//! lock and expect the embedded store's blocking calls, can wait for an answer from any
//! thread ([`Etcd::block_on`]) without stalling the tasks that carry it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::{Context, anyhow};
use arc_swap::ArcSwap;
use fleet_proto::connect::{self, ClientTls, TlsFlags};
use fleet_proto::etcd as pb;
use fleet_proto::etcd::auth_client::AuthClient;
use fleet_proto::etcd::kv_client::KvClient;
use fleet_proto::etcd::lease_client::LeaseClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// How long one try of a call to etcd may take (to connect, and then to answer).
const TRY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a call is tried again when a try failed the way a member lost makes it fail
/// ([`passed_over`]), or took longer than [`TRY_TIMEOUT`]; then it counts as failed. Above
/// an etcd election (1 s by default).
const CALL_FOR: Duration = Duration::from_secs(5);

/// Keys read per call when listing a prefix (few in tests, to read several pages). A stored
/// release is some kilobytes per region.
const PAGE: i64 = if cfg!(test) { 5 } else { 100 };

/// The largest answer taken from etcd: above a page of the largest releases (etcd's own
/// limit on a request, 1.5 MiB by default, bounds each value).
const MAX_ANSWER: usize = 256 * 1024 * 1024;

/// Where the controller's keys are: `--etcd` endpoints and a key prefix.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port` of one or more members.
    pub endpoints: Vec<String>,
    /// Put before every key, so that several fleets of controllers can share one etcd.
    pub prefix: String,
    /// For `https://` endpoints: the CA to trust (else the system's roots), and the client
    /// certificate to show an etcd that asks for one (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
    pub tls: ClientTls,
    /// The user to authenticate as, for an etcd with authentication enabled (`--etcd-user`,
    /// `--etcd-password-file`).
    pub user: Option<Credentials>,
}

/// An etcd user and its password.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: Password,
}

/// A password: given, or read from a file each time etcd is authenticated to, so that a
/// password renewed in place (a Secret mounted as a file) is used from the next token on
/// (`Etcd::authenticate` falls back on the password etcd last took).
#[derive(Clone)]
pub enum Password {
    Given(String),
    /// `--etcd-password-file`.
    File(PathBuf),
}

impl Password {
    /// The password of `user`: the one given, or the file's (its trailing newline is not
    /// part of it); an error names the file and the fix.
    pub fn read(&self, user: &str) -> anyhow::Result<String> {
        let file = match self {
            Password::Given(password) => return Ok(password.clone()),
            Password::File(file) => file,
        };
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--etcd-password-file {}: cannot read it", file.display()))?;
        let password = text.strip_suffix('\n').unwrap_or(&text);
        let password = password.strip_suffix('\r').unwrap_or(password);
        anyhow::ensure!(
            !password.is_empty(),
            "--etcd-password-file {} is empty: put the password of etcd user {user:?} in it",
            file.display()
        );
        Ok(password.to_string())
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} (password not shown)", self.user)
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The token etcd gave for the credentials, which every call carries (metadata `token`).
#[derive(Clone, Default)]
struct Token(Arc<RwLock<Option<AsciiMetadataValue>>>);

impl tonic::service::Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let token = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(token) = token {
            request.metadata_mut().insert("token", token);
        }
        Ok(request)
    }
}

/// A channel whose calls carry the token.
type Authed = InterceptedService<Channel, Token>;

/// The flags that give [`EtcdOptions::tls`].
const TLS_FLAGS: TlsFlags = TlsFlags {
    ca: "--etcd-ca",
    cert: "--etcd-cert",
    key: "--etcd-key",
};

/// A connection to etcd, cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    /// Replaced when the TLS files change (`watch_files`).
    clients: Arc<ArcSwap<Clients>>,
    /// Whom to authenticate as, if etcd asks.
    user: Option<Arc<Credentials>>,
    /// The password etcd last took, tried when it refuses the file's or the file cannot be
    /// read.
    taken: Arc<std::sync::Mutex<Option<String>>>,
    /// The last authentication took that password, not the file's: etcd refused the file's
    /// or it could not be read. The controller works on until it restarts.
    file_refused: Arc<std::sync::atomic::AtomicBool>,
    token: Token,
    prefix: Arc<str>,
    runtime: Arc<Runtime>,
}

/// The clients of one channel to the endpoints.
struct Clients {
    kv: KvClient<Authed>,
    lease: LeaseClient<Authed>,
    auth: AuthClient<Channel>,
}

impl Clients {
    /// Clients of a channel balanced over `endpoints`, made on `rt` (its worker task is
    /// spawned there).
    fn of(endpoints: Vec<Endpoint>, token: &Token, rt: &tokio::runtime::Handle) -> Clients {
        let channel = {
            let _on = rt.enter();
            Channel::balance_list(endpoints.into_iter())
        };
        Clients {
            auth: AuthClient::new(channel.clone()),
            kv: KvClient::with_interceptor(channel.clone(), token.clone())
                .max_decoding_message_size(MAX_ANSWER),
            lease: LeaseClient::with_interceptor(channel, token.clone()),
        }
    }
}

/// The runtime the connection lives on; shut down without waiting when the last clone goes.
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Etcd {
    /// Connects lazily to `options.endpoints` (balanced over them); calls fail while none
    /// answers.
    pub fn connect(options: &EtcdOptions) -> anyhow::Result<Etcd> {
        // As the files are before they are read: a change meanwhile is seen.
        let seen = crate::tls::stamps(&tls_files(options));
        let endpoints = endpoints(options)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fleet-etcd")
            .enable_all()
            .build()?;
        // Owned at once by what shuts it down without waiting: a bare runtime dropped in a
        // caller's async context would panic.
        let handle = rt.handle().clone();
        let runtime = Arc::new(Runtime(Some(rt)));
        let token = Token::default();
        let clients = Arc::new(ArcSwap::from_pointee(Clients::of(
            endpoints, &token, &handle,
        )));
        if options.tls.is_set() {
            let weak = Arc::downgrade(&clients);
            handle.spawn(watch_files(options.clone(), token.clone(), weak, seen));
        }
        Ok(Etcd {
            clients,
            user: options.user.clone().map(Arc::new),
            taken: Arc::default(),
            file_refused: Arc::default(),
            token,
            prefix: options.prefix.as_str().into(),
            runtime,
        })
    }

    /// `name` under the prefix.
    pub fn key(&self, name: &str) -> Vec<u8> {
        format!("{}{name}", self.prefix).into_bytes()
    }

    /// Runs `f` on the connection's runtime and waits for it on this thread, which may be
    /// any thread, a runtime's or not.
    pub fn block_on<T: Send + 'static>(
        &self,
        f: impl Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.spawn(async move {
            let _ = tx.send(f.await);
        });
        let wait = || rx.recv().map_err(|_| anyhow!("the etcd client stopped"))?;
        // On a worker of a multi-threaded runtime, its other tasks move to another worker
        // meanwhile: an etcd slow to answer (up to CALL_FOR) stalls no one else.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
    }

    /// Spawns `f` on the connection's runtime.
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.runtime.0 {
            rt.spawn(f);
        }
    }

    /// Makes `call`; when etcd asks for a token it was not given or no longer takes, it
    /// authenticates (if it has a user to) and makes it once more. A try that did not get
    /// through to a member, that the cluster dropped or turned away while it chose a new
    /// leader, or that went unanswered for [`TRY_TIMEOUT`] (one sent through a member to a
    /// leader that died) is made again, while [`CALL_FOR`] has not passed: a member lost must
    /// not cost the lead. Every call may be made twice, and a try given up on may still reach
    /// etcd after the next: the store's transactions each hold only while the last write is
    /// the one the controller made (`EtcdStore::transact`), the import's write each key once,
    /// and the rest read, or renew or revoke a lease.
    async fn call<T, Answer>(&self, call: impl Fn() -> Answer) -> anyhow::Result<T>
    where
        Answer: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + CALL_FOR;
        let mut wait = Duration::from_millis(25);
        let mut authenticated = false;
        let mut again = || {
            let wait_now = wait;
            wait = (wait * 2).min(Duration::from_millis(400));
            (tokio::time::Instant::now() + wait_now < deadline).then_some(wait_now)
        };
        let answer = loop {
            match within(call()).await {
                Err(status) if self.user.is_some() && wants_token(&status) && !authenticated => {
                    match self.authenticate().await? {
                        Ok(()) => authenticated = true,
                        // Taking a token, a member lost too: as for any call.
                        Err(status) => match again() {
                            Some(wait) => tokio::time::sleep(wait).await,
                            None => break Err(status),
                        },
                    }
                }
                Err(status) if passed_over(&status) || timed_out(&status) => match again() {
                    Some(wait) => {
                        tracing::debug!(error = %said(status), "etcd call made again");
                        // A member that came back may want a token again.
                        authenticated = false;
                        tokio::time::sleep(wait).await;
                    }
                    None => break Err(status),
                },
                answer => break answer,
            }
        };
        match answer {
            Ok(answer) => Ok(answer.into_inner()),
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                let user = self.user.as_ref().map_or("(none)", |u| u.user.as_str());
                Err(anyhow!(
                    "{}: etcd user {user:?} needs read and write permission on the keys under {:?} (--etcd-user, --etcd-prefix)",
                    said(status),
                    self.prefix
                ))
            }
            Err(status) => Err(said(status)),
        }
    }

    /// Turns authentication on, with `user` (and `password`) as etcd's root: for the tests of
    /// an etcd that asks for a user.
    #[cfg(test)]
    pub async fn enable_auth_for_tests(&self, user: &str, password: &str) -> anyhow::Result<()> {
        let mut auth = self.clients.load().auth.clone();
        let name = user.to_string();
        let add = pb::AuthUserAddRequest {
            name: name.clone(),
            password: password.into(),
        };
        auth.user_add(add).await.map_err(said)?;
        // etcd 3.4 grants the root role without its being added; later ones want it added.
        let _ = auth
            .role_add(pb::AuthRoleAddRequest {
                name: "root".into(),
            })
            .await;
        let grant = pb::AuthUserGrantRoleRequest {
            user: name,
            role: "root".into(),
        };
        auth.user_grant_role(grant).await.map_err(said)?;
        auth.auth_enable(pb::AuthEnableRequest {})
            .await
            .map_err(said)?;
        Ok(())
    }

    /// Test-only: gives `user` a new `password`.
    #[cfg(test)]
    pub async fn change_password_for_tests(
        &self,
        user: &str,
        password: &str,
    ) -> anyhow::Result<()> {
        // As the user this connection is (root): the auth client carries no token itself.
        self.authenticate().await?.map_err(said)?;
        let mut change = tonic::Request::new(pb::AuthUserChangePasswordRequest {
            name: user.into(),
            password: password.into(),
        });
        let token = self
            .token
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(token) = token {
            change.metadata_mut().insert("token", token);
        }
        let mut auth = self.clients.load().auth.clone();
        auth.user_change_password(change).await.map_err(said)?;
        Ok(())
    }

    /// Test-only: adds `user` with `password` and a role of its own that may read and write
    /// the keys under `prefix` and nothing else. Before auth is enabled.
    #[cfg(test)]
    pub async fn add_prefix_user_for_tests(
        &self,
        user: &str,
        password: &str,
        prefix: &[u8],
    ) -> anyhow::Result<()> {
        let mut auth = self.clients.load().auth.clone();
        let add = pb::AuthUserAddRequest {
            name: user.into(),
            password: password.into(),
        };
        auth.user_add(add).await.map_err(said)?;
        let role = pb::AuthRoleAddRequest { name: user.into() };
        auth.role_add(role).await.map_err(said)?;
        let perm = pb::Permission {
            perm_type: pb::permission::Type::Readwrite.into(),
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
        };
        let grant = pb::AuthRoleGrantPermissionRequest {
            name: user.into(),
            perm: Some(perm),
        };
        auth.role_grant_permission(grant).await.map_err(said)?;
        let grant = pb::AuthUserGrantRoleRequest {
            user: user.into(),
            role: user.into(),
        };
        auth.user_grant_role(grant).await.map_err(said)?;
        Ok(())
    }

    /// Whether the last authentication took the password etcd last took rather than the one
    /// in `--etcd-password-file` (refused, or the file unreadable); `None` without a user.
    pub fn password_file_refused(&self) -> Option<bool> {
        let refused = self.file_refused.load(std::sync::atomic::Ordering::Relaxed);
        self.user.as_ref().map(|_| refused)
    }

    /// Takes a token for the user: with the password of its file, or, if etcd refuses that
    /// one or the file cannot be read (renewed in the file before in etcd, or being written),
    /// with the last password etcd took. A try that failed as a member lost makes a call fail
    /// (`passed_over`, `timed_out`) is the status, to be made again.
    async fn authenticate(&self) -> anyhow::Result<Result<(), tonic::Status>> {
        let Some(user) = &self.user else {
            return Ok(Ok(()));
        };
        let read = user.password.read(&user.user);
        let taken = lock(&self.taken).clone();
        let mut tries: Vec<&str> = read.iter().map(String::as_str).collect();
        tries.extend(taken.as_deref().filter(|t| read.as_deref().ok() != Some(t)));
        let mut refused = None;
        for password in tries {
            let request = pb::AuthenticateRequest {
                name: user.user.clone(),
                password: password.to_string(),
            };
            let mut auth = self.clients.load().auth.clone();
            let answer = match within(auth.authenticate(request)).await {
                Err(status) if passed_over(&status) || timed_out(&status) => {
                    return Ok(Err(status));
                }
                Err(status) => {
                    // Only a password refused is tried again with another; the first refusal
                    // (the file's) is the one told.
                    let wrong = status.message().contains("authentication failed");
                    refused.get_or_insert(status);
                    match wrong {
                        true => continue,
                        false => break,
                    }
                }
                Ok(answer) => answer,
            };
            let token = AsciiMetadataValue::try_from(answer.into_inner().token)
                .context("etcd gave a token that is not ASCII")?;
            *self.token.0.write().unwrap_or_else(PoisonError::into_inner) = Some(token);
            let fallback = read.as_deref().ok() != Some(password);
            (self.file_refused).store(fallback, std::sync::atomic::Ordering::Relaxed);
            if taken.as_deref() == Some(password) && fallback {
                let why = match &read {
                    Ok(_) => "etcd refuses the password in --etcd-password-file".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                tracing::warn!(user = %user.user, %why, "authenticated to etcd with the password it last took");
            }
            *lock(&self.taken) = Some(password.to_string());
            tracing::debug!(user = %user.user, "authenticated to etcd");
            return Ok(Ok(()));
        }
        // The file, if it cannot be read, is what to mend first.
        read?;
        let said = refused.as_ref().map_or("", |status| status.message());
        Err(anyhow!(
            "etcd did not authenticate user {:?}: {said} (check --etcd-user and the password in --etcd-password-file)",
            user.user,
        ))
    }

    /// One Range call, as [`Etcd::call`] makes it.
    fn range(
        &self,
        request: pb::RangeRequest,
    ) -> impl Future<Output = Result<tonic::Response<pb::RangeResponse>, tonic::Status>> + use<>
    {
        let mut kv = self.clients.load().kv.clone();
        async move { kv.range(request).await }
    }

    /// The key `key` (under no prefix: as [`Etcd::key`] gave it), if it exists.
    pub async fn get(&self, key: Vec<u8>) -> anyhow::Result<Option<pb::KeyValue>> {
        let request = pb::RangeRequest {
            key,
            ..Default::default()
        };
        let response = self.call(|| self.range(request.clone())).await?;
        Ok(response.kvs.into_iter().next())
    }

    /// Every key that starts with `prefix`, from `from` on (inclusive), in key order.
    pub async fn list(&self, prefix: Vec<u8>, from: Vec<u8>) -> anyhow::Result<Vec<pb::KeyValue>> {
        let end = prefix_end(&prefix);
        let mut start = if from.is_empty() { prefix } else { from };
        let mut out = Vec::new();
        loop {
            let request = pb::RangeRequest {
                key: start.clone(),
                range_end: end.clone(),
                limit: PAGE,
                ..Default::default()
            };
            let page = self.call(|| self.range(request.clone())).await?;
            let more = page.more;
            out.extend(page.kvs);
            match out.last() {
                Some(last) if more => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    pub async fn txn(&self, request: pb::TxnRequest) -> anyhow::Result<pb::TxnResponse> {
        self.call(|| {
            let (mut kv, request) = (self.clients.load().kv.clone(), request.clone());
            async move { kv.txn(request).await }
        })
        .await
    }

    /// A new lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> anyhow::Result<i64> {
        let request = pb::LeaseGrantRequest {
            ttl: i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX),
            id: 0,
        };
        let granted = self
            .call(|| {
                let (mut lease, request) = (self.clients.load().lease.clone(), request);
                async move { lease.lease_grant(request).await }
            })
            .await?;
        if !granted.error.is_empty() {
            return Err(anyhow!("etcd granted no lease: {}", granted.error));
        }
        Ok(granted.id)
    }

    /// Revokes lease `id`; one gone already (revoked by a try whose answer was lost, or run
    /// out) is what was wanted.
    pub async fn revoke(&self, id: i64) -> anyhow::Result<()> {
        let request = pb::LeaseRevokeRequest { id };
        let revoked = self
            .call(|| {
                let (mut lease, request) = (self.clients.load().lease.clone(), request);
                async move { lease.lease_revoke(request).await }
            })
            .await;
        match revoked {
            Err(e) if format!("{e:#}").contains("requested lease not found") => Ok(()),
            revoked => revoked.map(drop),
        }
    }

    /// Renews lease `id` once; the seconds it has left (0: it had expired).
    pub async fn renew(&self, id: i64) -> anyhow::Result<i64> {
        // One keep-alive on a stream of its own: its first answer, as a call's.
        let answer = self
            .call(|| {
                let mut lease = self.clients.load().lease.clone();
                async move {
                    let request = tokio_stream::once(pb::LeaseKeepAliveRequest { id });
                    let answers = lease.lease_keep_alive(request).await?;
                    let first = answers.into_inner().message().await?;
                    Ok(tonic::Response::new(first))
                }
            })
            .await?;
        match answer {
            Some(answer) => Ok(answer.ttl),
            None => Err(anyhow!(
                "etcd closed the keep-alive stream without an answer"
            )),
        }
    }
}

/// The endpoints `options` name, TLS set up for `https://` ones: every flag and file is
/// checked here, before anything connects.
pub fn endpoints(options: &EtcdOptions) -> anyhow::Result<Vec<Endpoint>> {
    if options.endpoints.is_empty() {
        return Err(anyhow!("--etcd names no endpoint: give http://HOST:PORT"));
    }
    anyhow::ensure!(
        !options.prefix.is_empty(),
        "--etcd-prefix is empty: the controller's keys would be among every other key in etcd \
         (and an import would find them all); give the fleet a prefix of its own, such as /fleet/"
    );
    let mut endpoints = Vec::new();
    for url in &options.endpoints {
        connect::http_url(url, &ETCD_URL)?;
        let mut endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("--etcd {url:?} is not a URL: write http://HOST:PORT"))?
            .connect_timeout(TRY_TIMEOUT)
            .timeout(TRY_TIMEOUT)
            .http2_keep_alive_interval(fleet_proto::connect::KEEPALIVE)
            .keep_alive_timeout(fleet_proto::connect::KEEPALIVE);
        if endpoint.uri().scheme_str() == Some("https") {
            let config = connect::tls_config(&options.tls, &TLS_FLAGS)?;
            endpoint = (endpoint.tls_config(config))
                .with_context(|| format!("setting up TLS for --etcd {url}"))?;
        } else if options.tls.is_set() {
            anyhow::bail!(
                "--etcd-ca, --etcd-cert and --etcd-key are for TLS, but --etcd {url:?} is not \
                 https://: write it as https://…"
            );
        }
        endpoints.push(endpoint);
    }
    Ok(endpoints)
}

/// How [`endpoints`] names an `--etcd` URL in its errors.
const ETCD_URL: connect::UrlOf = connect::UrlOf {
    given_as: "--etcd",
    server: "an etcd member",
    port: 2379,
    needs_port: true,
};

/// The end of the range of every key that starts with `prefix` (etcd's `range_end`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the key space.
    vec![0]
}

/// Whether etcd refused a call for its token: none given (authentication is on), or one it no
/// longer takes (expired, or etcd restarted). Any UNAUTHENTICATED counts: a new token is taken
/// and the call made once more, no more.
fn wants_token(status: &tonic::Status) -> bool {
    let message = status.message();
    status.code() == tonic::Code::Unauthenticated
        || [
            "user name is empty",
            "invalid auth token",
            "revision of auth store is old",
        ]
        .iter()
        .any(|said| message.contains(said))
}

/// Whether a try failed the way a member lost makes it fail: its connection refused, reset
/// or closed (a member down), or etcd saying it has no leader or changed it, dropped the
/// proposal as its leader handed over, or has too many requests.
fn passed_over(status: &tonic::Status) -> bool {
    let message = status.message();
    let cut = std::error::Error::source(status).is_some_and(connect::passing);
    cut || [
        "etcdserver: leader changed",
        "etcdserver: no leader",
        "raft proposal dropped",
        "etcdserver: too many requests",
        "etcdserver: server stopped",
    ]
    .iter()
    .any(|said| message.contains(said))
}

/// Looks at `options`' TLS files every [`crate::tls::RELOAD_EVERY`] (as they were at
/// `seen`), and when they change, puts clients of a new channel in `clients`' place: calls made from then on
/// use the new certificate (calls under way finish on the old channel). New files are used
/// once etcd takes them (a call answered), or once the old ones do not work either; until
/// then, and while they cannot be read or the key is not the certificate's, the last good ones
/// stay in use. A problem is logged once it is seen on two looks (one file written before the
/// other is not one). Ends once the connection is gone.
async fn watch_files(
    options: EtcdOptions,
    token: Token,
    clients: std::sync::Weak<ArcSwap<Clients>>,
    mut seen: Vec<crate::tls::Stamp>,
) {
    let files = tls_files(&options);
    let mut problem: Option<(String, bool)> = None;
    let mut every = tokio::time::interval(crate::tls::RELOAD_EVERY);
    loop {
        every.tick().await;
        let Some(clients) = clients.upgrade() else {
            return;
        };
        let now = crate::tls::stamps(&files);
        if now == seen {
            continue;
        }
        let handle = tokio::runtime::Handle::current();
        let tried = match endpoints(&options).map(|e| Clients::of(e, &token, &handle)) {
            Err(e) => Err(format!("{e:#}")),
            Ok(new) => match answers(&new, &options).await {
                Ok(()) => Ok(new),
                // Refused with the new files and not with the old: keep the old.
                Err(e) if answers(&clients.load_full(), &options).await.is_ok() => Err(format!(
                    "etcd does not take them ({}); the last good ones stay in use",
                    said(e)
                )),
                Err(_) => Ok(new),
            },
        };
        match tried {
            Ok(new) => {
                clients.store(Arc::new(new));
                seen = now;
                problem = None;
                tracing::info!(files = ?files, "etcd TLS files read again; new calls use them");
            }
            Err(e) => match &mut problem {
                Some((seen_before, told)) if *seen_before == e => {
                    if !*told {
                        tracing::error!(error = %e, "etcd TLS files changed but do not work; the last good ones stay in use");
                        *told = true;
                    }
                }
                _ => problem = Some((e, false)),
            },
        }
    }
}

/// The TLS files `options` give.
fn tls_files(options: &EtcdOptions) -> Vec<std::path::PathBuf> {
    [&options.tls.ca, &options.tls.cert, &options.tls.key]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
}

/// Whether etcd answers a call made with `clients` within a try's time (any answer of its
/// own, a refusal included: the connection, and so the certificate, was taken).
async fn answers(clients: &Clients, options: &EtcdOptions) -> Result<(), tonic::Status> {
    let request = pb::RangeRequest {
        key: format!("{}{}", options.prefix, crate::leader::KEY).into_bytes(),
        ..Default::default()
    };
    let mut kv = clients.kv.clone();
    match within(kv.range(request)).await {
        Ok(_) => Ok(()),
        Err(status) if std::error::Error::source(&status).is_none() && !timed_out(&status) => {
            Ok(())
        }
        Err(status) => Err(status),
    }
}

/// `call`, or once it has taken [`TRY_TIMEOUT`], the status that says so ([`timed_out`]).
async fn within<T>(
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(TRY_TIMEOUT, call).await {
        Ok(answer) => answer,
        Err(_) => Err(tonic::Status::cancelled(
            tonic::TimeoutExpired(()).to_string(),
        )),
    }
}

/// Whether a try went unanswered for [`TRY_TIMEOUT`].
fn timed_out(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled
        && status.message() == tonic::TimeoutExpired(()).to_string()
}

/// An etcd call's failure, said once.
fn said(status: tonic::Status) -> anyhow::Error {
    let message = format!("etcd: {}", status.message());
    anyhow!(fleet_proto::connect::said_once(
        message,
        std::error::Error::source(&status)
    ))
}

/// A compare that holds while `key` was created at `revision` (still the same key).
pub fn created_at(key: Vec<u8>, revision: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal.into(),
        target: pb::compare::CompareTarget::Create.into(),
        key,
        target_union: Some(pb::compare::TargetUnion::CreateRevision(revision)),
        range_end: vec![],
    }
}

/// A compare that holds while `key` was last changed at `revision` (0: it does not exist).
pub fn modified_at(key: Vec<u8>, revision: i64) -> pb::Compare {
    pb::Compare {
        target: pb::compare::CompareTarget::Mod.into(),
        target_union: Some(pb::compare::TargetUnion::ModRevision(revision)),
        ..created_at(key, revision)
    }
}

/// A compare that holds while no key starts with `prefix`.
pub fn none_under(prefix: Vec<u8>) -> pb::Compare {
    pb::Compare {
        range_end: prefix_end(&prefix),
        ..created_at(prefix, 0)
    }
}

/// Operations a transaction takes: under etcd's default limit of 128 (`--max-txn-ops`).
pub const OPS_A_TRANSACTION: usize = 100;
/// Bytes of keys and values a transaction takes: under etcd's default request limit of
/// 1.5 MiB (`--max-request-bytes`).
pub const BYTES_A_TRANSACTION: usize = 1 << 20;

/// `items` in transactions, in order, each under both limits (`size` tells an item's bytes)
/// and with at least one item: one larger than the byte limit goes alone.
pub fn in_transactions<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        match out.last_mut() {
            Some(last) if last.len() < OPS_A_TRANSACTION && bytes + n <= BYTES_A_TRANSACTION => {
                bytes += n;
                last.push(item);
            }
            _ => {
                bytes = n;
                out.push(vec![item]);
            }
        }
    }
    out
}

/// The bytes of the key and value `op` puts or deletes.
pub fn op_size(op: &pb::RequestOp) -> usize {
    use pb::request_op::Request;
    match &op.request {
        Some(Request::RequestPut(put)) => put.key.len() + put.value.len(),
        Some(Request::RequestDeleteRange(delete)) => delete.key.len() + delete.range_end.len(),
        Some(Request::RequestRange(range)) => range.key.len(),
        None => 0,
    }
}

pub fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key,
            value,
            lease,
        })),
    }
}

/// Deletes `key`, or with `range_end` every key from it up to that.
pub fn delete(key: Vec<u8>, range_end: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest { key, range_end },
        )),
    }
}

pub fn range(key: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// The key a transaction that failed read back with its failure branch's [`range`], if it
/// exists.
pub fn read_back(answer: pb::TxnResponse) -> Option<pb::KeyValue> {
    answer.responses.into_iter().find_map(|r| match r.response {
        Some(pb::response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(endpoints: &[&str], prefix: &str) -> EtcdOptions {
        EtcdOptions {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            prefix: prefix.into(),
            tls: ClientTls::default(),
            user: None,
        }
    }

    #[test]
    fn etcd_is_named_by_http_urls_and_its_keys_by_a_prefix() {
        let endpoints = ["http://127.0.0.1:2379", "https://etcd-0.etcd:2379"];
        assert_eq!(
            super::endpoints(&options(&endpoints, "/f/")).unwrap().len(),
            2
        );
        for (url, said) in [
            ("ftp://127.0.0.1:2379", "is not an http:// or https:// URL"),
            ("127.0.0.1:2379", "is not an http:// or https:// URL"),
            ("etcd:2379", "is not an http:// or https:// URL"),
            (
                "http://127.0.0.1:0",
                "has no port an etcd member could listen on",
            ),
            ("http://etcd.fleet-system.svc", "names no port"),
        ] {
            let e = super::endpoints(&options(&[url], "/f/")).unwrap_err();
            let e = e.to_string();
            assert!(e.starts_with(&format!("--etcd \"{url}\" {said}")), "{e}");
            assert!(e.contains(":2379"), "the fix: {e}");
        }
        let e = super::endpoints(&options(&endpoints, "")).unwrap_err();
        assert!(e.to_string().starts_with("--etcd-prefix is empty"), "{e}");
    }

    #[test]
    fn a_prefix_ends_where_its_last_byte_below_ff_goes_up_by_one() {
        assert_eq!(prefix_end(b"/fleet/"), b"/fleet0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
