//! Message bodies on both legs (forward -> **body** -> respond): one enum instead of a boxed body per request.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

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
    /// The route timeout ended while the response body was still coming (Envoy resets the
    /// stream then: its headers have gone out).
    #[error("the route timeout ended inside the response body")]
    RouteTimeout,
    /// No frame of the response body came within the stream idle timeout.
    #[error("the stream idle timeout ended inside the response body")]
    StreamIdle,
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
    Upstream { body: UpstreamBody, lease: Option<Lease>, timer: ResponseTimer },
    /// One attempt's view of a request body that is streamed and copied for retries.
    Replay(ReplayReader),
}

impl ProxyBody {
    /// The stream idle timeout an upstream response runs under (its route's, else the
    /// listener's); `None` for other bodies and where it is off.
    pub(crate) fn stream_idle(&self) -> Option<Duration> {
        match self {
            Self::Upstream { timer, .. } => timer.idle,
            _ => None,
        }
    }

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

/// A downstream request's body, which can report how far it has got to the timers that run on
/// it (see [`BodyProgress`]).
#[derive(Debug)]
pub struct DownstreamBody {
    body: ByVersion<RequestBody>,
    /// Only a body still arriving after its head has one.
    progress: Option<Arc<BodyProgress>>,
}

impl DownstreamBody {
    pub fn http1(body: RequestBody) -> Self {
        Self { body: ByVersion::Http1(body), progress: None }
    }

    pub fn http2(body: Incoming) -> Self {
        Self { body: ByVersion::Http2(body), progress: None }
    }

    /// From now on the body reports its frames and its end; `head_at` counts as its first
    /// activity.
    pub(crate) fn watch(&mut self, head_at: Instant) -> Arc<BodyProgress> {
        Arc::clone(self.progress.get_or_insert_with(|| Arc::new(BodyProgress::new(head_at))))
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Some(progress) = &this.progress {
            if matches!(polled, Poll::Ready(Some(Ok(_)) | None)) {
                progress.advanced(ended(&polled, &this.body));
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

/// How far a request body still arriving has got, for the timers Envoy runs on it: the
/// listener's `request_timeout` ends with the body, the stream idle timeout restarts with each
/// frame, and the route and per-try timeouts start only at its end.
#[derive(Debug)]
pub(crate) struct BodyProgress {
    state: Mutex<Progressed>,
    /// Woken at the end, for a timer waiting for the route timeout to start.
    end: Notify,
}

/// A snapshot of [`BodyProgress`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Progressed {
    /// When the last frame (at first: the head) arrived.
    pub last_frame: Instant,
    /// When the body ended; `None` while it still arrives.
    pub ended: Option<Instant>,
}

impl BodyProgress {
    fn new(head_at: Instant) -> Self {
        Self { state: Mutex::new(Progressed { last_frame: head_at, ended: None }), end: Notify::new() }
    }

    pub fn get(&self) -> Progressed {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn advanced(&self, ended: bool) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.last_frame = now;
        if ended && state.ended.is_none() {
            state.ended = Some(now);
            drop(state);
            self.end.notify_one();
        }
    }

    /// Resolves once the body has ended (at once if it has).
    pub async fn ended(&self) {
        // A permit stored by `notify_one` covers an end between the check and the wait.
        while self.get().ended.is_none() {
            self.end.notified().await;
        }
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
            Self::Upstream { body, lease, timer } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if polled.is_pending() {
                    if let Err(expired) = timer.poll_expired(cx) {
                        if let (BodyError::RouteTimeout, Some(lease)) = (&expired, lease.as_ref()) {
                            lease.timed_out();
                        }
                        // The lease goes unfinished: the upstream connection is closed.
                        *lease = None;
                        return Poll::Ready(Some(Err(expired)));
                    }
                    return Poll::Pending;
                }
                timer.frame();
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

/// The timeouts that still run once a response's headers have been passed on, as Envoy runs
/// them: the route timeout until the end of the body, the stream idle timeout between its
/// frames. Nothing is armed while every frame is ready when asked for, which is how most
/// responses arrive.
#[derive(Debug)]
pub(crate) struct ResponseTimer {
    route_at: Option<Instant>,
    idle: Option<Duration>,
    /// Armed at the first frame that was not ready.
    armed: Option<Pin<Box<ArmedTimer>>>,
}

pin_project_lite::pin_project! {
    #[derive(Debug)]
    struct ArmedTimer {
        #[pin]
        sleep: Sleep,
        // Moved by each frame; the sleep is moved only when it fires early.
        last_frame: Instant,
    }
}

impl ResponseTimer {
    pub fn new(route_at: Option<Instant>, idle: Option<Duration>) -> Self {
        Self { route_at, idle, armed: None }
    }

    fn frame(&mut self) {
        if let Some(armed) = self.armed.as_mut() {
            *armed.as_mut().project().last_frame = Instant::now();
        }
    }

    /// While the next frame is not ready: `Err` once a timeout has ended the response.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Result<(), BodyError> {
        let (route_at, idle) = (self.route_at, self.idle);
        let due = |last_frame: Instant| earliest(route_at, idle.map(|idle| last_frame + idle));
        let armed = match self.armed.as_mut() {
            Some(armed) => armed,
            None => {
                let now = Instant::now();
                let Some(at) = due(now) else { return Ok(()) };
                self.armed.insert(Box::pin(ArmedTimer { sleep: tokio::time::sleep_until(at), last_frame: now }))
            }
        };
        loop {
            let mut timer = armed.as_mut().project();
            if timer.sleep.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            let now = Instant::now();
            if route_at.is_some_and(|at| at <= now) {
                return Err(BodyError::RouteTimeout);
            }
            match due(*timer.last_frame) {
                Some(at) if at <= now => return Err(BodyError::StreamIdle),
                // A frame came since the sleep was set: wait from that frame.
                Some(at) => timer.sleep.reset(at),
                None => return Ok(()),
            }
        }
    }
}

pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
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
