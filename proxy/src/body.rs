//! Message bodies on both legs (forward -> **body** -> respond): one enum instead of a boxed body per request.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::http1::{BodyReadError, RequestBody, ResponseBody};
use crate::stats::{bump, ClusterCounters};
use crate::upstream::Lease;

/// Why a body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Http1(#[from] BodyReadError),
    /// The attempt this request body belonged to was given up for a retry; failing the body
    /// aborts that upstream exchange instead of ending its request early but cleanly.
    #[error("request body abandoned: the attempt was superseded by a retry")]
    Superseded,
}

/// Every body the proxy sends, downstream or upstream.
///
/// `Upstream` carries the [`Lease`] of the attempt that produced it, so the upstream connection
/// goes back to its pool and the active-request counters drop only when the body is finished
/// (or abandoned by the client).
#[derive(Debug)]
pub enum ProxyBody {
    /// Locally generated replies and request bodies kept for replay (`Bytes` clones are cheap).
    Full(Option<Bytes>),
    /// A request body that did not fit the replay buffer: the part already read, then the rest.
    Streamed { prefix: Option<Bytes>, rest: DownstreamBody },
    /// A request body passed through as it arrives (no replay).
    Downstream(DownstreamBody),
    /// An upstream response passed through as it arrives.
    Upstream { body: UpstreamBody, lease: Option<Lease> },
    /// One attempt's view of a request body that is streamed and copied for retries.
    Replay(ReplayReader),
}

impl ProxyBody {
    pub fn empty() -> Self {
        Self::Full(None)
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self::Full((!bytes.is_empty()).then_some(bytes))
    }

}

/// A message body read by sluice's own HTTP/1.1 code or by hyper's HTTP/2.
#[derive(Debug)]
pub enum ByVersion<H1> {
    Http1(H1),
    Http2(Incoming),
}

/// A downstream request's body, which can tell a listener's `request_timeout` that it has all
/// arrived (see `forward::RequestTimer`).
#[derive(Debug)]
pub struct DownstreamBody {
    body: ByVersion<RequestBody>,
    /// Set once the last frame has been read; only requests with a request timer have one.
    received: Option<Arc<AtomicBool>>,
}

impl DownstreamBody {
    pub fn http1(body: RequestBody) -> Self {
        Self { body: ByVersion::Http1(body), received: None }
    }

    pub fn http2(body: Incoming) -> Self {
        Self { body: ByVersion::Http2(body), received: None }
    }

    /// A flag that turns true once the whole body has been read.
    pub fn watch_received(&mut self) -> Arc<AtomicBool> {
        Arc::clone(self.received.get_or_insert_with(Arc::default))
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Some(received) = &this.received {
            if ended(&polled, &this.body) {
                received.store(true, Ordering::Release);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Whether `body` has ended with the frame just `polled`. Writers stop polling once
/// `is_end_stream` holds, so the end is checked after every frame too.
fn ended(polled: &Poll<Option<Result<Frame<Bytes>, BodyError>>>, body: &impl Body) -> bool {
    match polled {
        Poll::Ready(None) => true,
        Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
        _ => false,
    }
}

/// An upstream response's body.
pub type UpstreamBody = ByVersion<ResponseBody>;

impl<H1> Body for ByVersion<H1>
where
    H1: Body<Data = Bytes> + Unpin,
    BodyError: From<H1::Error>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Http1(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
            Self::Http2(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::Hyper),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http1(body) => body.is_end_stream(),
            Self::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Http1(body) => body.size_hint(),
            Self::Http2(body) => body.size_hint(),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        // Every variant is Unpin (the bodies inside are), so plain `&mut` access is fine.
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Streamed { prefix, rest } => match prefix.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => Pin::new(rest).poll_frame(cx),
            },
            Self::Downstream(body) => Pin::new(body).poll_frame(cx),
            Self::Replay(reader) => reader.poll_frame(cx),
            Self::Upstream { body, lease } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                // Finished cleanly: the connection may be reused.
                if ended(&polled, &*body) {
                    if let Some(lease) = lease.as_mut() {
                        lease.finished(body);
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Streamed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Self::Downstream(body) => body.is_end_stream(),
            Self::Upstream { body, .. } => body.is_end_stream(),
            Self::Replay(reader) => reader.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Streamed { prefix, rest } => plus(rest.size_hint(), prefix.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Downstream(body) => body.size_hint(),
            Self::Upstream { body, .. } => body.size_hint(),
            Self::Replay(reader) => reader.size_hint(),
        }
    }
}

/// A request body streamed to the current attempt while a copy is kept for retries, as
/// Envoy's router does: the copy grows up to `limit` bytes; past that it is dropped and no
/// further attempt is possible (`retry_or_shadow_abandoned`). Only the current attempt reads
/// the downstream body, except during a retry's back-off, when `fill` reads it into the copy.
#[derive(Debug)]
pub(crate) struct ReplayBuffer {
    state: Mutex<ReplayState>,
}

#[derive(Debug)]
struct ReplayState {
    /// What is left of the downstream body; `None` once it ended or failed.
    source: Option<DownstreamBody>,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    buffered: usize,
    limit: usize,
    overflowed: bool,
    failed: bool,
    /// Number of the attempt allowed to read; readers of older attempts fail.
    attempt: u32,
    counters: Arc<ClusterCounters>,
}

impl ReplayState {
    /// Keeps a copy of `frame` while it fits.
    fn keep(&mut self, frame: &Frame<Bytes>) {
        if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(trailers.clone());
            return;
        }
        let Some(data) = frame.data_ref() else { return };
        if self.overflowed {
            return;
        }
        self.buffered += data.len();
        if self.buffered > self.limit {
            self.overflowed = true;
            self.chunks = Vec::new();
            bump(&self.counters.retry_or_shadow_abandoned);
        } else {
            self.chunks.push(data.clone());
        }
    }
}

/// Why reading the downstream body during a back-off stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FillError {
    /// The body no longer fits the buffer (Envoy's 507).
    Overflow,
    /// The downstream body failed (client reset or malformed framing).
    Downstream,
}

impl ReplayBuffer {
    pub fn new(source: DownstreamBody, limit: usize, counters: Arc<ClusterCounters>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ReplayState {
                source: Some(source),
                chunks: Vec::new(),
                trailers: None,
                buffered: 0,
                limit,
                overflowed: false,
                failed: false,
                attempt: 0,
                counters,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, ReplayState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether another attempt can get the whole body.
    pub fn can_replay(&self) -> bool {
        let state = self.state();
        !state.overflowed && !state.failed
    }

    /// The current attempt is given up: its reader fails from now on.
    pub fn supersede(&self) {
        self.state().attempt += 1;
    }

    /// A body for the current attempt: the copy, then the rest of the downstream body.
    pub fn reader(self: &Arc<Self>) -> ReplayReader {
        let attempt = self.state().attempt;
        ReplayReader { buffer: Arc::clone(self), attempt, position: 0, trailers_sent: false }
    }

    /// Reads the downstream body into the copy until it ends; used while no attempt runs.
    pub async fn fill(&self) -> Result<(), FillError> {
        poll_fn(|cx| {
            let mut state = self.state();
            loop {
                if state.overflowed {
                    return Poll::Ready(Err(FillError::Overflow));
                }
                let Some(source) = state.source.as_mut() else { return Poll::Ready(Ok(())) };
                match Pin::new(source).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => state.keep(&frame),
                    Poll::Ready(None) => state.source = None,
                    Poll::Ready(Some(Err(_))) => {
                        state.source = None;
                        state.failed = true;
                        return Poll::Ready(Err(FillError::Downstream));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }
}

/// One attempt's position in a [`ReplayBuffer`].
#[derive(Debug)]
pub struct ReplayReader {
    buffer: Arc<ReplayBuffer>,
    attempt: u32,
    /// Chunks of the copy already sent.
    position: usize,
    trailers_sent: bool,
}

impl ReplayReader {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut state = self.buffer.state();
        if state.attempt != self.attempt {
            return Poll::Ready(Some(Err(BodyError::Superseded)));
        }
        if let Some(chunk) = state.chunks.get(self.position) {
            self.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        let Some(source) = state.source.as_mut() else {
            if self.trailers_sent {
                return Poll::Ready(None);
            }
            self.trailers_sent = true;
            return Poll::Ready(state.trailers.clone().map(|trailers| Ok(Frame::trailers(trailers))));
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                state.keep(&frame);
                // What this attempt sends now is in the copy too (or the copy is gone).
                self.position = state.chunks.len();
                self.trailers_sent |= frame.is_trailers();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                state.source = None;
                self.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                state.source = None;
                state.failed = true;
                Poll::Ready(Some(Err(error)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = self.buffer.state();
        state.attempt == self.attempt
            && state.source.is_none()
            && self.position >= state.chunks.len()
            && (self.trailers_sent || state.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let state = self.buffer.state();
        let unsent: u64 = state.chunks.iter().skip(self.position).map(|chunk| chunk.len() as u64).sum();
        match &state.source {
            None => SizeHint::with_exact(unsent),
            Some(source) => plus(source.size_hint(), unsent),
        }
    }
}

/// `hint` grown by `bytes` known to come first.
fn plus(hint: SizeHint, bytes: u64) -> SizeHint {
    let mut grown = SizeHint::new();
    grown.set_lower(hint.lower() + bytes);
    if let Some(upper) = hint.upper() {
        grown.set_upper(upper + bytes);
    }
    grown
}
