//! Records each request once, when it is really over: after the last byte of the
//! response body, or when the client goes away first (flag DC). The recorder
//! travels inside the response body, so cancelled requests are counted too.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::body::{BoxError, ProxyBody};
use crate::drain::InFlight;
use crate::flags::ResponseFlags;
use crate::request_info::RequestInfo;
use crate::snapshot::EndpointState;
use crate::state::Shared;

/// Owns a request's [`RequestInfo`] until the request ends, then writes the
/// metrics and the access-log line.
#[derive(Debug)]
pub struct Recorder {
    shared: Arc<Shared>,
    pub info: RequestInfo,
    started: Instant,
    /// Request body bytes seen so far; `None` until a body needs counting
    /// (a request without a body allocates no counter).
    received: Option<Arc<AtomicU64>>,
    /// The endpoint whose in-flight count this request holds.
    active: Option<Arc<EndpointState>>,
    done: bool,
    _in_flight: InFlight,
}

impl Recorder {
    /// Starts recording a request that arrived at `started`.
    pub fn new(shared: Arc<Shared>, info: RequestInfo, started: Instant) -> Recorder {
        let in_flight = shared.drain.enter();
        Recorder { shared, info, started, received: None, active: None, done: false, _in_flight: in_flight }
    }

    /// The counter of request body bytes, for a [`CountingBody`].
    pub fn received_counter(&mut self) -> Arc<AtomicU64> {
        self.received.get_or_insert_with(|| Arc::new(AtomicU64::new(0))).clone()
    }

    /// The sidecar's shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Counts this request as active on `endpoint` (LEAST_REQUEST, `/clusters`)
    /// until it ends; releases any previous endpoint.
    pub fn set_active(&mut self, endpoint: Arc<EndpointState>) {
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        endpoint.total.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = self.active.replace(endpoint) {
            old.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Writes metrics and the access log (once).
    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let Some(ep) = self.active.take() {
            ep.active.fetch_sub(1, Ordering::Relaxed);
        }
        self.info.duration = self.started.elapsed();
        self.info.bytes_received = self.received.as_ref().map_or(0, |r| r.load(Ordering::Relaxed));
        self.shared.metrics.record_request(&self.shared.local, &self.info);
        self.shared.access_log.log(&self.info);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.done {
            // Dropped before the response was complete: the client went away.
            self.info.flags.insert(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
            self.finish();
        }
    }
}

/// A response body that counts what it sends, reads the gRPC status from the
/// trailers and finishes the [`Recorder`] at its end. Generic over the body it
/// wraps, so that an upstream body is not boxed twice.
pub struct ObservedBody<B = ProxyBody> {
    inner: B,
    recorder: Option<Recorder>,
    /// The route timeout's deadline: past it, the body ends with an error (UT).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> std::fmt::Debug for ObservedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedBody").finish_non_exhaustive()
    }
}

impl<B: Body> ObservedBody<B> {
    /// Wraps `inner`; the recorder finishes when the body ends.
    pub fn new(inner: B, recorder: Recorder) -> ObservedBody<B> {
        let mut body = ObservedBody { inner, recorder: Some(recorder), deadline: None };
        if body.inner.is_end_stream() {
            body.end(None);
        }
        body
    }

    /// Ends the body with an error if it is still streaming at `deadline`
    /// (Envoy's route timeout covers the whole response).
    pub fn with_deadline(mut self, deadline: Option<tokio::time::Instant>) -> ObservedBody<B> {
        if self.recorder.is_some() {
            self.deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        }
        self
    }

    fn end(&mut self, flag: Option<ResponseFlags>) {
        if let Some(mut rec) = self.recorder.take() {
            if let Some(flag) = flag {
                rec.info.flags.insert(flag);
            }
            rec.finish();
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.deadline = None;
            if self.recorder.is_some() {
                self.end(Some(ResponseFlags::UPSTREAM_TIMEOUT));
                return Poll::Ready(Some(Err("upstream request timeout".into())));
            }
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(rec) = self.recorder.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        rec.info.bytes_sent += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref()
                        && let Some(status) = grpc_status(trailers)
                    {
                        rec.info.grpc_status = Some(status);
                    }
                }
                if self.inner.is_end_stream() {
                    self.end(None);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(Some(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION)),
            Poll::Ready(None) => self.end(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that counts the bytes it passes on.
pub struct CountingBody<B> {
    inner: B,
    count: Option<Arc<AtomicU64>>,
}

impl<B> CountingBody<B> {
    /// Wraps `inner`, adding its data bytes to `count` (`None`: a body known to
    /// be empty, nothing to count).
    pub fn new(inner: B, count: Option<Arc<AtomicU64>>) -> Self {
        CountingBody { inner, count }
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Some(count) = &self.count
        {
            count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The `grpc-status` of a header or trailer block.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    // A `HeaderName`, not a `&str`: a string key is parsed and validated per lookup,
    // and every response is looked up (retries on gRPC `unavailable` are Istio's default).
    headers.get(&GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}
