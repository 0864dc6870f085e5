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
//!
//! Below its floor a stream may always hand over its next chunk, and one
//! chunk is one whole message, so a stalled stream can still hold one
//! large event (up to the 4 MiB a client accepts). While the total is over
//! its budget, a stream that has held bytes without any of them being
//! written for the stall timeout is reset: HTTP/2 drops what it buffered
//! for it, and its client resumes from the last sequence it read.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
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

/// The shortest stall timeout.
const MIN_STALL: Duration = Duration::from_secs(1);

/// The layer: wraps every response body of the service.
#[derive(Debug, Clone)]
pub struct SendBudgetLayer {
    total: Arc<AtomicUsize>,
    stall: Duration,
}

impl SendBudgetLayer {
    /// `stall`: how long a stream may hold bytes that are not being
    /// written while the total is over its budget, before it is reset.
    pub fn new(stall: Duration) -> Self {
        SendBudgetLayer {
            total: Arc::default(),
            // Each waiting stream looks again every `stall`: not too often.
            stall: stall.max(MIN_STALL),
        }
    }

    /// The response bytes handed to HTTP/2 and not yet written, over all
    /// streams.
    pub fn held_bytes(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl<S> tower_layer::Layer<S> for SendBudgetLayer {
    type Service = SendBudget<S>;

    fn layer(&self, inner: S) -> SendBudget<S> {
        SendBudget {
            inner,
            total: Arc::clone(&self.total),
            stall: self.stall,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SendBudget<S> {
    inner: S,
    total: Arc<AtomicUsize>,
    stall: Duration,
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
        let stall = self.stall;
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(Metered {
                    inner: Box::pin(body),
                    gauge: Arc::new(Gauge {
                        held: AtomicUsize::new(0),
                        total,
                        written: AtomicU64::new(0),
                        waker: AtomicWaker::new(),
                    }),
                    stall,
                    timer: None,
                    written: 0,
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
    /// Chunks let go of so far: it moves while the client reads.
    written: AtomicU64,
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
        self.written.fetch_add(1, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Whether all streams together hold more than their budget.
    fn over_total(&self) -> bool {
        self.total.load(Ordering::Acquire) > TOTAL_BYTES
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

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a stalled stream was reset; its source is the HTTP/2 reason the
/// reset carries.
#[derive(Debug, thiserror::Error)]
#[error("the client read none of this stream for {}", humantime::format_duration(*.stall))]
struct StalledStream {
    stall: Duration,
    #[source]
    reason: h2::Error,
}

/// A response body that waits for its budget before each chunk.
struct Metered<B> {
    inner: Pin<Box<B>>,
    gauge: Arc<Gauge>,
    stall: Duration,
    /// While waiting: when to look again whether the stream is stalled.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The gauge's `written` when the timer was set.
    written: u64,
}

impl<B> Metered<B> {
    /// Waits for this stream's bytes to drain. Every stall timeout it
    /// looks: a stream none of whose bytes were written meanwhile, while
    /// the total is over its budget, ends with an error, and HTTP/2
    /// resets it and drops what it holds.
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<BoxError> {
        loop {
            let written = self.gauge.written.load(Ordering::Acquire);
            let timer = match &mut self.timer {
                Some(timer) if written == self.written => timer,
                _ => {
                    self.written = written;
                    self.timer.insert(Box::pin(tokio::time::sleep(self.stall)))
                }
            };
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.timer = None;
            if self.gauge.written.load(Ordering::Acquire) == self.written && self.gauge.over_total()
            {
                // Reset with REFUSED_STREAM: clients see UNAVAILABLE, as
                // at shutdown, and resume from their last sequence.
                return Poll::Ready(Box::new(StalledStream {
                    stall: self.stall,
                    reason: h2::Error::from(h2::Reason::REFUSED_STREAM),
                }));
            }
        }
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.gauge.may_send() {
            // Registered before checking again, so a release in between
            // is not missed. Only this stream's own releases wake it (it
            // holds at least the floor, so one is to come while its client
            // reads), and its stall timer.
            self.gauge.waker.register(cx.waker());
            if !self.gauge.may_send() {
                return match self.poll_stalled(cx) {
                    Poll::Ready(e) => {
                        tracing::info!(error = %e, "resetting a stalled stream");
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
        }
        self.timer = None;
        let polled = self.inner.as_mut().poll_frame(cx);
        let gauge = &self.gauge;
        polled.map(|frame| {
            frame.map(|frame| {
                frame.map_err(Into::into).map(|frame| {
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
            written: AtomicU64::new(0),
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
