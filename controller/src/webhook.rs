//! Calls the webhooks the engine asks for, and reports their outcome back to it.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use fleet_engine::{Command, Event};

use crate::runtime::Controller;

static CLIENT: LazyLock<reqwest::Client> = LazyLock::new(|| {
    // reqwest is built without a default TLS provider; use ring, as the proxy does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
});

/// Posts the hook in the background; a hook the engine waits for reports back as
/// `Event::WebhookDone`. A non-2xx answer or a timeout is a failure.
pub fn spawn(controller: Arc<Controller>, release: String, hook: Command) {
    let Command::CallWebhook {
        id,
        on,
        url,
        timeout_ms,
        region,
        wait,
    } = hook
    else {
        return;
    };
    tokio::spawn(async move {
        let body = serde_json::json!({ "release": release, "event": on, "region": region });
        let result = CLIENT
            .post(&url)
            .timeout(Duration::from_millis(timeout_ms))
            .json(&body)
            .send()
            .await;
        let (ok, detail) = match result {
            Ok(r) if r.status().is_success() => (true, format!("{url}: {}", r.status())),
            Ok(r) => (false, format!("{url} answered {}", r.status())),
            Err(e) if e.is_timeout() => (
                false,
                format!("{url} did not answer within {timeout_ms} ms"),
            ),
            Err(e) => (false, format!("{url}: {e}")),
        };
        tracing::info!(%release, %url, ok, "webhook called");
        if wait && let Err(e) = controller.handle(&release, Event::WebhookDone { id, ok, detail }) {
            tracing::error!(%release, error = %e, "cannot persist a webhook outcome");
        }
    });
}
