//! One HTTP/1.1 downstream connection (**accept** -> parse -> handle -> **respond**): requests one at a
//! time, pipelined bytes kept for the next, and no buffer held while the connection waits.
//!
//! Between requests a keep-alive connection owns only its socket: the read buffer is released
//! once it is empty and the response head is built in a buffer that lives as long as the write.
//! (hyper keeps an 8 KiB read and an 8 KiB write buffer for the life of every connection.)

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderValue, EXPECT};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::codec::{self, BodyDecodeError, BodyDecoder, ConnectionHeader, Decoded, OutgoingFraming};
use super::write::{BodyWriteError, BodyWriter};
use crate::body::{DownstreamBody, ProxyBody};
use crate::downstream_socket::DownstreamSocket;
use crate::normalize::{request_body_framing, BodyFraming};
use crate::server::{self, ConnContext};

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 8192;

/// The listener's HTTP/1 limits and timers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Http1Settings {
    /// The most bytes a request head (or trailer section) may take on the wire.
    pub max_head_bytes: usize,
    /// The most header lines a head may have before it is refused without further parsing.
    pub max_headers: usize,
    /// From a head's first byte to its end (`request_headers_timeout`).
    pub headers_timeout: Option<Duration>,
    /// Between requests (`idle_timeout`).
    pub idle_timeout: Option<Duration>,
}

/// The read side of the connection. A request body borrows it while it streams and sends it
/// back when it ends (or is dropped).
#[derive(Debug)]
pub(crate) struct Reader {
    io: DownstreamSocket,
    buf: BytesMut,
}

impl Reader {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// A reader coming home from a request body: `complete` when the body was read to its end, so
/// the next bytes are the next request.
#[derive(Debug)]
struct Returned {
    reader: Reader,
    complete: bool,
}

/// Why a message body read from a connection (a request downstream, a response upstream)
/// stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    #[error(transparent)]
    Framing(#[from] BodyDecodeError),
    #[error("the peer closed the connection inside the body")]
    Truncated,
    #[error("reading the body: {0}")]
    Io(#[from] io::Error),
}

/// The next step of a body read from `io` through `buf`: a frame, or `None` at its end. More is
/// read (`read_size` at a time) only when the buffer holds no complete step.
pub(super) fn poll_body_frame(
    decoder: &mut BodyDecoder,
    buf: &mut BytesMut,
    mut io: Pin<&mut impl AsyncRead>,
    read_size: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Frame<Bytes>>, BodyReadError>> {
    loop {
        match decoder.decode(buf)? {
            Decoded::Data(data) => return Poll::Ready(Ok(Some(Frame::data(data)))),
            Decoded::Trailers(trailers) => return Poll::Ready(Ok(Some(Frame::trailers(trailers)))),
            Decoded::End => return Poll::Ready(Ok(None)),
            Decoded::NeedMore => {
                buf.reserve(read_size);
                match std::task::ready!(tokio_util::io::poll_read_buf(io.as_mut(), cx, buf)) {
                    Ok(0) if matches!(decoder, BodyDecoder::UntilClose) => {
                        *decoder = BodyDecoder::Done;
                        return Poll::Ready(Ok(None));
                    }
                    Ok(0) => return Poll::Ready(Err(BodyReadError::Truncated)),
                    Ok(_) => {}
                    Err(error) => return Poll::Ready(Err(error.into())),
                }
            }
        }
    }
}

/// An HTTP/1.1 request body read straight from the connection.
#[derive(Debug)]
pub struct RequestBody {
    reader: Option<Reader>,
    decoder: BodyDecoder,
    home: Option<oneshot::Sender<Returned>>,
}

impl RequestBody {
    pub(crate) fn empty() -> Self {
        Self { reader: None, decoder: BodyDecoder::Done, home: None }
    }

    fn send_home(&mut self) {
        if let (Some(reader), Some(home)) = (self.reader.take(), self.home.take()) {
            let _ = home.send(Returned { reader, complete: self.decoder.is_done() });
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.send_home();
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        let this = self.get_mut();
        let Some(reader) = this.reader.as_mut() else { return Poll::Ready(None) };
        let step = std::task::ready!(poll_body_frame(&mut this.decoder, &mut reader.buf, Pin::new(&mut reader.io), READ_SIZE, cx));
        // At the end (or a failure) the connection gets its read side back: the next bytes are
        // the next request's, or the connection is closed.
        if !matches!(step, Ok(Some(_))) || this.decoder.is_done() {
            this.send_home();
        }
        Poll::Ready(step.transpose())
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

/// Attached to an upgrade request: its protocol and the client's connection once the `101`
/// has gone out.
#[derive(Debug)]
pub(crate) struct DownstreamUpgrade {
    pub kind: HeaderValue,
    switched: oneshot::Receiver<PrefixedStream>,
}

impl Future for DownstreamUpgrade {
    type Output = io::Result<PrefixedStream>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<PrefixedStream>> {
        Pin::new(&mut self.get_mut().switched)
            .poll(cx)
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionAborted, "the client connection did not switch protocols"))
    }
}

/// A TCP stream with bytes already read from it in front: the client's first bytes handed to
/// the HTTP/2 server, or what followed a `101` on an upgraded connection.
#[derive(Debug)]
pub(crate) struct PrefixedStream {
    prefix: Bytes,
    io: TcpStream,
}

impl PrefixedStream {
    pub fn new(prefix: Bytes, io: TcpStream) -> Self {
        Self { prefix, io }
    }
}

impl AsyncRead for PrefixedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let take = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..take]);
            this.prefix.advance(take);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PrefixedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What the response needs to know about its request.
struct Exchange {
    method: Method,
    version: Version,
    keep_alive: bool,
    /// `request_body_framing` refused the head: nobody knows where the next request starts.
    framing_refused: bool,
    upgrade: Option<oneshot::Sender<PrefixedStream>>,
}

/// Serves requests on `stream` until either side closes, `stop` fires between requests, or
/// the connection idles past its timeout. `first_bytes` were read, and `idle` started, while
/// detecting the protocol.
pub(crate) async fn serve(stream: DownstreamSocket, first_bytes: BytesMut, idle: IdleTimer, ctx: Arc<ConnContext>, settings: Http1Settings, stop: CancellationToken) {
    let mut write = stream.clone();
    let reader = Reader { io: stream, buf: first_bytes };
    // Without an upgrade the halves are dropped: closing the socket sends the FIN (a shutdown
    // first would be one more system call).
    if let Some((upgrade, reader)) = serve_requests(reader, &mut write, idle, ctx, settings, stop).await {
        match reader.io.reunite(write) {
            Ok(stream) => {
                let _ = upgrade.send(PrefixedStream::new(reader.buf.freeze(), stream));
            }
            Err(error) => tracing::debug!(%error, "an upgraded client connection could not be handed over"),
        }
    }
}

/// The request loop of `serve`: returns the upgrade to complete when a `101` went out.
async fn serve_requests(
    mut reader: Reader,
    write: &mut DownstreamSocket,
    mut idle: IdleTimer,
    ctx: Arc<ConnContext>,
    settings: Http1Settings,
    stop: CancellationToken,
) -> Option<(oneshot::Sender<PrefixedStream>, Reader)> {
    loop {
        if reader.buf.is_empty() {
            // Nothing pipelined: give the buffer back and wait for the next request. The read
            // is inside the idle wait: a readiness that turns out stale must not leave the
            // connection waiting with no timer.
            reader.buf = BytesMut::new();
            let next_bytes = async {
                reader.io.readable().await?;
                reader.fill().await
            };
            match unless_idle(next_bytes, &mut idle, &stop).await {
                Some(Ok(read)) if read > 0 => {}
                _ => return None,
            }
        }
        let mut parts = match read_head(&mut reader, &settings).await {
            Ok(Some(parts)) => parts,
            Ok(None) => return None,
            Err(error) => {
                tracing::debug!(peer = %ctx.peer, %error, "refused a request head");
                let _ = write_local_error(write, error.status()).await;
                return None;
            }
        };
        let framing = request_body_framing(parts.version, &parts.headers);
        let mut exchange = Exchange {
            method: parts.method.clone(),
            version: parts.version,
            keep_alive: codec::wants_keep_alive(parts.version, &parts.headers),
            framing_refused: framing.is_err(),
            upgrade: None,
        };
        let upgrade = codec::requested_upgrade(parts.version, &parts.headers).map(|kind| {
            let (sender, switched) = oneshot::channel();
            exchange.upgrade = Some(sender);
            DownstreamUpgrade { kind, switched }
        });
        let has_body = matches!(framing, Ok(BodyFraming::Length(1..) | BodyFraming::Chunked));
        if has_body && codec::expects_continue(parts.version, &parts.headers) {
            // Envoy's default: answer the expectation here and do not pass it on.
            parts.headers.remove(EXPECT);
            if write.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                return None;
            }
        }
        let (body, reader_at) = match framing {
            Ok(BodyFraming::Length(length)) if length > 0 => lend(reader, BodyDecoder::length(length)),
            Ok(BodyFraming::Chunked) => lend(reader, BodyDecoder::chunked(settings.max_head_bytes)),
            _ => (RequestBody::empty(), ReaderAt::Home(reader)),
        };
        let request = Request::from_parts(parts, DownstreamBody::http1(body));
        // Boxed: inline, the request's state machine (~4 KiB) would be part of every idle
        // connection's task for the connection's whole life.
        let Ok(response) = Box::pin(server::handle(Arc::clone(&ctx), request, upgrade)).await else {
            // Dropped by L3/L4 policy: no response at all.
            return None;
        };
        // A body not read to its end by now leaves the connection's position unknown.
        let complete = match reader_at {
            ReaderAt::Home(reader) => Some(reader),
            ReaderAt::Lent(mut returning) => match returning.try_recv() {
                Ok(returned) if returned.complete => Some(returned.reader),
                _ => None,
            },
        };
        let Some(home) = complete else {
            let _ = Box::pin(write_response(write, response, &exchange, true)).await;
            return None;
        };
        reader = home;
        let close = !exchange.keep_alive || exchange.framing_refused || stop.is_cancelled();
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        match Box::pin(write_response(write, response, &exchange, close)).await {
            Ok(Outcome::KeepAlive) if !switching => {}
            Ok(Outcome::KeepAlive) => return exchange.upgrade.map(|upgrade| (upgrade, reader)),
            Ok(Outcome::Close) | Err(_) => return None,
        }
    }
}

/// Where the read side is while a request is handled.
enum ReaderAt {
    Home(Reader),
    /// Lent to the request body; comes back through this channel.
    Lent(oneshot::Receiver<Returned>),
}

fn lend(reader: Reader, decoder: BodyDecoder) -> (RequestBody, ReaderAt) {
    let (home, returning) = oneshot::channel();
    (RequestBody { reader: Some(reader), decoder, home: Some(home) }, ReaderAt::Lent(returning))
}

/// Runs `wait` (for the client's next bytes) unless `stop` fires or nothing comes for the idle
/// timeout first: then `None`, and the connection should close.
pub(crate) async fn unless_idle<T>(wait: impl Future<Output = T>, idle: &mut IdleTimer, stop: &CancellationToken) -> Option<T> {
    tokio::select! {
        // `wait` first: when the bytes are already there, the timer and the token are not touched.
        biased;
        done = wait => Some(done),
        () = stop.cancelled() => None,
        () = idle.expired() => None,
    }
}

/// A connection's idle timer (`idle_timeout`), armed once per connection: a wait moves its
/// deadline only when it fires early, so keep-alive requests register no timer each.
pub(crate) struct IdleTimer {
    timeout: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleTimer {
    pub fn new(timeout: Option<Duration>) -> Self {
        Self { timeout, sleep: timeout.map(|timeout| Box::pin(tokio::time::sleep(timeout))) }
    }

    /// Resolves once `timeout` has passed since it is first polled; never without a timeout.
    async fn expired(&mut self) {
        let (Some(timeout), Some(sleep)) = (self.timeout, self.sleep.as_mut()) else {
            return std::future::pending().await;
        };
        let since = Instant::now();
        loop {
            sleep.as_mut().await;
            let due = since + timeout;
            if Instant::now() >= due {
                return;
            }
            sleep.as_mut().reset(due);
        }
    }
}

/// Reads until a whole request head is buffered. `None`: the client closed (or went silent
/// past `request_headers_timeout`) before sending one.
async fn read_head(reader: &mut Reader, settings: &Http1Settings) -> Result<Option<http::request::Parts>, codec::HeadError> {
    let deadline = settings.headers_timeout.map(|timeout| Instant::now() + timeout);
    loop {
        if !reader.buf.is_empty() {
            if let Some(parts) = codec::parse_request_head(&mut reader.buf, settings.max_head_bytes, settings.max_headers)? {
                return Ok(Some(parts));
            }
        }
        let read = match deadline {
            Some(at) => match tokio::time::timeout_at(at, reader.fill()).await {
                Ok(read) => read,
                Err(_) => return Ok(None),
            },
            None => reader.fill().await,
        };
        match read {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// A head the server refused before any request existed: status only, then close.
async fn write_local_error(write: &mut DownstreamSocket, status: StatusCode) -> io::Result<()> {
    let mut out = Vec::with_capacity(160);
    let date = codec::http_date();
    codec::encode_response_head(&mut out, status, &HeaderMap::new(), OutgoingFraming::Length(0), ConnectionHeader::Close, &date);
    write.write_all(&out).await
}

/// Whether the connection may carry another request after a response.
enum Outcome {
    KeepAlive,
    Close,
}

/// Writes the head and streams the body. Frames already available go out with the head in
/// one write; afterwards each batch of ready frames is one write.
async fn write_response(write: &mut DownstreamSocket, response: Response<ProxyBody>, exchange: &Exchange, close: bool) -> io::Result<Outcome> {
    let (parts, mut body) = response.into_parts();
    // An upstream response's body carries its route's stream idle timeout; a local reply is
    // short enough to go out whole. Made here rather than by the caller: the connection's own
    // task, which every idle keep-alive connection keeps, would grow past an allocator size
    // class (+5.5 MiB at 10k idle connections).
    let write = &mut StallBounded::new(write, body.stream_idle());
    let framing = codec::response_framing(&exchange.method, exchange.version, parts.status, body.size_hint().exact());
    let close = close || framing == OutgoingFraming::UntilClose || codec::response_closes(&parts.headers);
    let connection = if parts.status == StatusCode::SWITCHING_PROTOCOLS && exchange.upgrade.is_some() {
        ConnectionHeader::Upgrade
    } else if close {
        ConnectionHeader::Close
    } else if exchange.version == Version::HTTP_10 {
        ConnectionHeader::KeepAlive
    } else {
        ConnectionHeader::Default
    };
    let mut writer = BodyWriter::new(framing, codec::head_size(&parts.headers));
    codec::encode_response_head(&mut writer.out.copied, parts.status, &parts.headers, framing, connection, &codec::http_date());
    let outcome = if close { Outcome::Close } else { Outcome::KeepAlive };
    if framing == OutgoingFraming::NoBody {
        // An upstream response without a body ends on its first poll, which hands the upstream
        // connection back to its pool.
        let _ = futures_util::FutureExt::now_or_never(body.frame());
    }
    match writer.write_body(&mut body, write, std::pin::pin!(std::future::pending())).await {
        Ok(_) => Ok(outcome),
        Err(BodyWriteError::Body(error)) => {
            // Already-sent bytes cannot be taken back: cut the connection so the client sees an
            // incomplete response, not a short one that looks whole.
            let _ = writer.out.write_to(write).await;
            Err(io::Error::other(error))
        }
        Err(BodyWriteError::Io(error)) => Err(error),
        Err(error) => Err(io::Error::other(error)),
    }
}

/// The client's half of the connection while a response is written to it: a write that can
/// make no progress for the stream idle timeout fails, as Envoy's idle timer ends a stream
/// whose client stopped reading. The timer is made only when a write first has to wait.
struct StallBounded<'a> {
    io: &'a mut DownstreamSocket,
    timeout: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A write is waiting and `timer` runs for it.
    stalled: bool,
}

impl<'a> StallBounded<'a> {
    fn new(io: &'a mut DownstreamSocket, timeout: Option<Duration>) -> Self {
        Self { io, timeout, timer: None, stalled: false }
    }

    fn bound<T>(&mut self, polled: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        let Some(timeout) = self.timeout else { return Poll::Pending };
        let timer = match self.timer.as_mut() {
            Some(timer) if self.stalled => timer,
            Some(timer) => {
                timer.as_mut().reset(Instant::now() + timeout);
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(timeout))),
        };
        self.stalled = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client read nothing for the stream idle timeout"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for StallBounded<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_write(cx, bytes);
        this.bound(polled, cx)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_write_vectored(cx, bufs);
        this.bound(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}
