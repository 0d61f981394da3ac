//! Calls that bear with a controller away for a moment: one restarting, starting over from its
//! store, or handing its lead to another. Such a call is made again, on a new connection,
//! until it is answered or `--retry-for` runs out. A change is made again with the same
//! `request_id`, which the controller answers with its first answer if it made it already:
//! a call cut after the controller made the change is not made twice.
//!
//! A refusal (no such release, a manifest that does not validate, a certificate refused) is
//! not tried again: another try would only repeat it.

use std::future::Future;
use std::time::{Duration, Instant};

use fleet_proto::connect::{ClientTls, call_passing, dial};
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use tonic::transport::Channel;

use crate::release::status;

/// `caller.call(…)` of `method` of the release service with `request`, the same request
/// each try.
macro_rules! call {
    ($caller:expr, $method:ident, $request:expr) => {{
        let request = $request;
        $caller
            .call(|mut client| {
                let request = request.clone();
                async move { client.$method(request).await }
            })
            .await
    }};
}
pub(crate) use call;

/// A call given up on because the controller stayed away (or kept cutting the call) longer
/// than the command bears with it: nothing refused it, and the same command may well
/// succeed once the controller is back. fleetctl exits [`NotReached::EXIT_CODE`] for it, so
/// that a pipeline can tell it from a refusal (exit 2).
#[derive(Debug)]
pub struct NotReached(pub anyhow::Error);

impl NotReached {
    pub const EXIT_CODE: u8 = 3;
}

impl std::fmt::Display for NotReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for NotReached {}

/// How long a call bears with a controller that is away, unless told.
pub const RETRY_FOR: Duration = Duration::from_secs(30);

/// A controller's client that makes each call again while the controller is away.
#[derive(Clone)]
pub struct Caller {
    url: String,
    tls: ClientTls,
    retry_for: Duration,
    /// The flag that set `retry_for`, for messages.
    flag: &'static str,
    client: Option<ReleaseServiceClient<Channel>>,
    /// The request id of the change the calls make, if they make one: told when they give
    /// up, as the change may have been made.
    change: Option<String>,
}

impl Caller {
    /// Calls the controller at `url`, bearing with it for `retry_for` (zero: not at all).
    pub fn new(url: &str, tls: ClientTls, retry_for: Duration) -> Caller {
        Caller {
            url: url.to_owned(),
            tls,
            retry_for,
            flag: "--retry-for",
            client: None,
            change: None,
        }
    }

    /// This caller, bearing with the controller for `retry_for` instead.
    pub fn retrying_for(mut self, retry_for: Duration) -> Caller {
        self.retry_for = retry_for;
        self
    }

    /// This caller, bearing with the controller for `retry_for` as `flag` (`--reconnect-for`)
    /// set it, which its messages name.
    pub fn bearing_with(mut self, retry_for: Duration, flag: &'static str) -> Caller {
        self.flag = flag;
        self.retrying_for(retry_for)
    }

    /// This caller, for calls that make the change `request_id` names.
    pub fn changing(mut self, request_id: &str) -> Caller {
        self.change = Some(request_id.to_owned());
        self
    }

    /// Makes `call` until it is answered, or refused, or `retry_for` has passed since the
    /// first try (a try under way then is finished). `call` is given a client connected to
    /// the controller each time, and must make the same request each time (with the same
    /// `request_id`).
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> anyhow::Result<T>
    where
        F: FnMut(ReleaseServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut away = Away::new();
        // Whether any try reached the controller with the request: until one did, a change
        // given up on was certainly not made.
        let mut sent = false;
        loop {
            let failed = match self.dialled().await {
                Ok(client) => {
                    sent = true;
                    match call(client).await {
                        Ok(answer) => return Ok(answer.into_inner()),
                        Err(s) if call_passing(&s) => {
                            // A new connection for the next try: this one may be to a
                            // controller that has stopped serving.
                            self.client = None;
                            status(s)
                        }
                        Err(s) => return Err(status(s)),
                    }
                }
                Err(e) if e.passing => anyhow::Error::from(e),
                Err(e) => return Err(e.into()),
            };
            let (tries, wait) = away.failed();
            if away.since.elapsed() + wait > self.retry_for {
                let failed = match tries {
                    1 => failed,
                    _ => failed.context(format!(
                        "gave up after {tries} tries in {:.1}s ({} {})",
                        away.since.elapsed().as_secs_f64(),
                        self.flag,
                        humantime::format_duration(self.retry_for)
                    )),
                };
                return Err(NotReached(match &self.change {
                    Some(_) if !sent => failed.context(format!(
                        "the change was not made: the controller was not reached (make it \
                         again once it is back, or bear with it longer with {})",
                        self.flag
                    )),
                    Some(id) => failed.context(format!(
                        "the change may or may not have been made: make it again with \
                         --request-id {id}, which the controller answers as it answered the \
                         first if it made it (for a day), or look first (`fleetctl release list`)"
                    )),
                    None => failed,
                })
                .into());
            }
            // Told once a try again has failed too: a connection cut once, and made again at
            // once, is not worth a word (nor is a cut that the next try shows was a refusal).
            if tries == 2 {
                eprintln!(
                    "fleetctl: {failed:#}; trying again for up to {} ({})",
                    humantime::format_duration(self.retry_for),
                    self.flag
                );
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// A client connected to the controller, dialled again while it is away, as
    /// [`Caller::call`] does: for a stream to follow.
    pub async fn client(&mut self) -> anyhow::Result<ReleaseServiceClient<Channel>> {
        self.call(|client| async { Ok(tonic::Response::new(client)) })
            .await
    }

    /// The client of the connection made last, or of a new one.
    async fn dialled(
        &mut self,
    ) -> Result<ReleaseServiceClient<Channel>, fleet_proto::connect::Unreached> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let client = ReleaseServiceClient::new(dial(&self.url, &self.tls).await?);
        self.client = Some(client.clone());
        Ok(client)
    }
}

/// Since when the controller has been away, and how long to wait before dialling it again.
pub(crate) struct Away {
    pub(crate) since: Instant,
    wait: Duration,
    /// The tries that have failed.
    pub(crate) tries: u32,
}

impl Away {
    pub(crate) fn new() -> Away {
        Away {
            since: Instant::now(),
            wait: Duration::from_millis(250),
            tries: 0,
        }
    }

    /// A try failed: how many have, and the wait before the next (doubled each time, up to
    /// 5 s).
    pub(crate) fn failed(&mut self) -> (u32, Duration) {
        let wait = self.wait;
        self.wait = (wait * 2).min(Duration::from_secs(5));
        self.tries += 1;
        (self.tries, wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_between_tries_doubles_up_to_five_seconds() {
        let mut away = Away::new();
        let waits: Vec<u64> = (0..7).map(|_| away.failed().1.as_millis() as u64).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 4000, 5000, 5000]);
    }
}
