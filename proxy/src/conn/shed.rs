//! Load shedding as a tower layer: at most `max` requests in flight across the proxy (from
//! the call to its response headers); one more is refused at once with tower's
//! [`Overloaded`] rather than queued.
//!
//! tower's `GlobalConcurrencyLimit` under `LoadShed` does the same with a semaphore whose
//! release takes a lock on every request. Nothing ever waits for a slot here, so a counter
//! does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll, ready};

use tower::load_shed::error::Overloaded;
use tower::{Layer, Service};

use crate::body::BoxError;

/// The proxy-wide count of requests in flight, and its limit.
#[derive(Debug)]
pub struct Admissions {
    in_flight: AtomicUsize,
    max: usize,
}

impl Admissions {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Admissions {
            in_flight: AtomicUsize::new(0),
            max,
        })
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// A slot, if one is free; it is given back when the permit drops.
    fn admit(self: &Arc<Self>) -> Option<Permit> {
        if self.in_flight.fetch_add(1, Relaxed) >= self.max {
            self.in_flight.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Permit(self.clone()))
    }
}

struct Permit(Arc<Admissions>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Wraps a service in [`Shed`].
#[derive(Clone)]
pub struct ShedLayer(Arc<Admissions>);

impl ShedLayer {
    pub fn new(admissions: Arc<Admissions>) -> Self {
        ShedLayer(admissions)
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            admissions: self.0.clone(),
        }
    }
}

/// Calls the inner service while the proxy is under its limit; refuses with [`Overloaded`]
/// over it.
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    admissions: Arc<Admissions>,
}

impl<S, R> Service<R> for Shed<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        match self.admissions.admit() {
            Some(permit) => ResponseFuture::Admitted {
                future: self.inner.call(req),
                permit: Some(permit),
            },
            None => ResponseFuture::Shed,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's response, holding its slot until it is ready.
    #[project = Projected]
    pub enum ResponseFuture<F> {
        Admitted { #[pin] future: F, permit: Option<Permit> },
        Shed,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Admitted { future, permit } => {
                let output = ready!(future.poll(cx));
                // The slot is free once the response headers are out of the service.
                permit.take();
                Poll::Ready(output.map_err(Into::into))
            }
            Projected::Shed => Poll::Ready(Err(Overloaded::new().into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::pending;
    use std::task::Waker;

    use tower::{ServiceExt, service_fn};

    use super::*;

    #[tokio::test]
    async fn over_the_limit_a_call_is_refused_at_once_and_a_slot_frees_when_its_response_is_ready()
    {
        let admissions = Admissions::new(2);
        let svc = ShedLayer::new(admissions.clone()).layer(service_fn(|wait: bool| async move {
            if wait {
                pending::<()>().await;
            }
            Ok::<_, BoxError>("done")
        }));
        let waiting = [svc.clone().oneshot(true), svc.clone().oneshot(true)];
        let mut waiting = waiting.map(Box::pin);
        for w in &mut waiting {
            // Called, not ready: each holds a slot.
            let mut cx = Context::from_waker(Waker::noop());
            assert!(w.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(admissions.in_flight(), 2);
        let refused = svc.clone().oneshot(false).await.unwrap_err();
        assert!(refused.is::<Overloaded>());
        assert_eq!(admissions.in_flight(), 2, "a refused call takes no slot");
        drop(waiting);
        assert_eq!(
            admissions.in_flight(),
            0,
            "a dropped call gives its slot back"
        );
        assert_eq!(svc.oneshot(false).await.unwrap(), "done");
        assert_eq!(
            admissions.in_flight(),
            0,
            "a ready response gives its slot back"
        );
    }
}
