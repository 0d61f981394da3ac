//! The plain HTTP admin listener the controller and the agent share: each gives the answer
//! for a path, this serves it (HTTP/1.1 or h2c) with Prometheus text helpers.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Serves `answer(path)` for every request on `listener` until `shutdown` resolves.
pub async fn serve<A>(
    listener: TcpListener,
    answer: A,
    shutdown: impl std::future::Future<Output = ()>,
) where
    A: Fn(&str) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let response = match *req.method() {
                    hyper::Method::GET | hyper::Method::HEAD => answer(req.uri().path()),
                    _ => not_read(),
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The answer to a method other than GET and HEAD: every endpoint is only read.
fn not_read() -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "the admin endpoints are only read: GET or HEAD\n".into(),
    );
    let allow = hyper::header::HeaderValue::from_static("GET, HEAD");
    response.headers_mut().insert(hyper::header::ALLOW, allow);
    response
}

/// A text answer (Prometheus' text format's content type, which plain text also reads as).
pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// A label value as the Prometheus text format writes it.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_endpoints_are_read_with_get_or_head_and_any_other_method_is_405() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = |path: &str| text(StatusCode::OK, format!("{path}\n"));
        let server = tokio::spawn(serve(listener, answer, std::future::pending()));
        let ask = |method: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "{method} /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        assert!(ask("GET").await.starts_with("HTTP/1.1 200 OK"));
        assert!(ask("HEAD").await.starts_with("HTTP/1.1 200 OK"));
        for method in ["POST", "PUT", "DELETE"] {
            let answer = ask(method).await.to_lowercase();
            assert!(
                answer.starts_with("http/1.1 405 method not allowed"),
                "{method}: {answer}"
            );
            assert!(answer.contains("allow: get, head"), "{method}: {answer}");
        }
        server.abort();
    }

    #[test]
    fn label_values_are_escaped_as_the_text_format_says() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}
