//! Bounds the response bytes the server holds for clients that do not
//! read. HTTP/2 lets a client open its flow-control windows wide and then
//! stop reading its socket; the HTTP/2 layer would then buffer up to
//! 400 KiB per stream. Here each response body hands its next chunk to
//! HTTP/2 only while the bytes it handed over and that have not yet been
//! written to the connection stay under a per-stream budget, and the
//! process-wide total under a budget of its own. A chunk counts until
//! HTTP/2 lets go of it (written, or dropped with its stream), so the
//! count is exact. A stream whose client stops reading stops pulling
//! events; its subscription falls behind the live feed and later catches
//! up from the log, holding nothing meanwhile.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::{BoxFuture, Service, http};

/// What one stream may have handed to HTTP/2 and not yet written.
pub(crate) const STREAM_BYTES: usize = 32 * 1024;
/// Below this a stream may always send, whatever the total: a reader
/// that keeps up is never held back by readers that do not.
pub(crate) const STREAM_FLOOR_BYTES: usize = 8 * 1024;
/// What all streams together may have handed over and not yet written,
/// beyond their floors.
pub(crate) const TOTAL_BYTES: usize = 32 * 1024 * 1024;

/// The layer: wraps every response body of the service.
#[derive(Debug, Clone, Default)]
pub struct SendBudgetLayer {
    total: Arc<AtomicUsize>,
}

impl SendBudgetLayer {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> tower_layer::Layer<S> for SendBudgetLayer {
    type Service = SendBudget<S>;

    fn layer(&self, inner: S) -> SendBudget<S> {
        SendBudget {
            inner,
            total: Arc::clone(&self.total),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SendBudget<S> {
    inner: S,
    total: Arc<AtomicUsize>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for SendBudget<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let total = Arc::clone(&self.total);
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(Metered {
                    inner: Box::pin(body),
                    gauge: Arc::new(Gauge {
                        held: AtomicUsize::new(0),
                        total,
                        waker: AtomicWaker::new(),
                    }),
                })
            }))
        })
    }
}

/// One stream's bytes handed to HTTP/2 and not yet let go of.
#[derive(Debug)]
struct Gauge {
    held: AtomicUsize,
    total: Arc<AtomicUsize>,
    /// The stream waiting for its bytes to drain.
    waker: AtomicWaker,
}

impl Gauge {
    fn may_send(&self) -> bool {
        let held = self.held.load(Ordering::Acquire);
        held < STREAM_FLOOR_BYTES
            || (held < STREAM_BYTES && self.total.load(Ordering::Acquire) < TOTAL_BYTES)
    }

    fn take(&self, n: usize) {
        self.held.fetch_add(n, Ordering::AcqRel);
        self.total.fetch_add(n, Ordering::AcqRel);
    }

    fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
        self.total.fetch_sub(n, Ordering::AcqRel);
        self.waker.wake();
    }
}

/// A chunk handed to HTTP/2; releases its bytes when dropped.
struct Held {
    bytes: Bytes,
    gauge: Arc<Gauge>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.release(self.bytes.len());
    }
}

/// A response body that waits for its budget before each chunk.
struct Metered<B> {
    inner: Pin<Box<B>>,
    gauge: Arc<Gauge>,
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if !self.gauge.may_send() {
            // Registered before checking again, so a release in between
            // is not missed. Only this stream's own releases wake it: it
            // holds at least the floor, so one is always to come.
            self.gauge.waker.register(cx.waker());
            if !self.gauge.may_send() {
                return Poll::Pending;
            }
        }
        let polled = self.inner.as_mut().poll_frame(cx);
        let gauge = &self.gauge;
        polled.map(|frame| {
            frame.map(|frame| {
                frame.map(|frame| {
                    frame.map_data(|bytes| {
                        gauge.take(bytes.len());
                        Bytes::from_owner(Held {
                            bytes,
                            gauge: Arc::clone(gauge),
                        })
                    })
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_waits_for_its_own_bytes_and_the_total_only_above_its_floor() {
        let total = Arc::new(AtomicUsize::new(0));
        let gauge = Arc::new(Gauge {
            held: AtomicUsize::new(0),
            total: Arc::clone(&total),
            waker: AtomicWaker::new(),
        });
        assert!(gauge.may_send());
        let chunk = Bytes::from_owner(Held {
            bytes: Bytes::from(vec![0; STREAM_BYTES]),
            gauge: Arc::clone(&gauge),
        });
        gauge.take(STREAM_BYTES);
        assert!(!gauge.may_send(), "over its own budget");
        let part = chunk.slice(..10);
        drop(chunk);
        assert!(!gauge.may_send(), "a slice still holds the chunk");
        drop(part);
        assert!(gauge.may_send());
        assert_eq!(total.load(Ordering::Acquire), 0);

        // Others hold the whole total: this stream still sends up to its floor.
        total.store(TOTAL_BYTES, Ordering::Release);
        gauge.take(STREAM_FLOOR_BYTES - 1);
        assert!(gauge.may_send());
        gauge.take(1);
        assert!(!gauge.may_send());
    }
}
