//! Listeners (**accept** -> identify -> ...): bound sockets, accept loops, and per client either
//! sluice's HTTP/1 server or hyper's HTTP/2 one, by the client's first bytes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use socket2::{Domain, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::body::{BodyError, DownstreamBody, ProxyBody};
use crate::downstream_socket::DownstreamSocket;
use crate::http1::{self, PrefixedStream};
use crate::server::{self, ConnContext, Shared};
use crate::stats::bump;
use crate::tables::Bind;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// A bound listening socket, kept across table swaps while its `(name, bind)` stays.
#[derive(Debug)]
pub(crate) struct SocketEntry {
    pub name: String,
    pub bind: Bind,
    pub addr: SocketAddr,
    /// Stops the accept loop and drains the listener's connections.
    pub stop: CancellationToken,
}

/// A bound listening socket on the worker runtime's I/O driver. What it accepts is not
/// registered with the driver (`DownstreamSocket`).
#[derive(Debug)]
pub(crate) struct Listening(AsyncFd<mio::net::TcpListener>);

impl Listening {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }

    /// The next connection, non-blocking (`accept4` with `SOCK_NONBLOCK`: no `fcntl` each).
    async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        let (stream, peer) = self.0.async_io(Interest::READABLE, |listener| listener.accept()).await?;
        Ok((stream.into(), peer))
    }
}

/// Binds a listening socket without serving it yet (so a failed apply can drop it unused).
pub(crate) fn bind(bind: &Bind) -> io::Result<Listening> {
    let addr = bind.socket_addr();
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(socket2::Protocol::TCP))?;
    // A restarted agent must be able to rebind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if matches!(bind, Bind::Transparent { .. }) {
        // Before bind: bpf_sk_assign only hands foreign-destination packets to a listener
        // that has it, and only then does accept() report the original destination.
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it: no setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    set_defer_accept(&socket)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    let listener = mio::net::TcpListener::from_std(socket.into());
    // SAFETY: the mio listener owns its descriptor for as long as the `AsyncFd` holds it.
    Ok(Listening(unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }?))
}

/// How long the kernel holds a connection whose client has sent nothing yet before handing it
/// to `accept` anyway (`TCP_DEFER_ACCEPT`, in seconds).
const DEFER_ACCEPT_SECONDS: libc::c_int = 1;

/// Every listener serves a protocol whose client speaks first (HTTP/1 or HTTP/2), so the kernel
/// may hold a connection until its first bytes arrive: the worker then wakes once per new
/// connection, with the request already readable, instead of once for the handshake and again
/// for the request (new-conn in benches/README.md). socket2 has no setter for it.
fn set_defer_accept(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds = DEFER_ACCEPT_SECONDS;
    // SAFETY: the option value is a c_int that lives across the call, passed with its size.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast(),
            std::mem::size_of_val(&seconds) as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) async fn accept_loop(listener: Listening, slot: usize, shared: Arc<Shared>, stop: CancellationToken) {
    // Every connection's local address is the listener's own unless the listener is bound to
    // a wildcard or is transparent (then it is the client's original destination): only then
    // is it asked of the kernel per connection.
    let transparent = socket2::SockRef::from(listener.0.get_ref()).ip_transparent_v4().unwrap_or(true);
    let fixed_local = listener.local_addr().ok().filter(|addr| !addr.ip().is_unspecified() && !transparent);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let stream = DownstreamSocket::new(stream);
                let local = match fixed_local.map_or_else(|| stream.local_addr(), Ok) {
                    Ok(local) => local,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "accepted socket has no local address");
                        continue;
                    }
                };
                tokio::spawn(serve_connection(stream, peer, local, slot, Arc::clone(&shared), stop.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

async fn serve_connection(
    mut stream: DownstreamSocket,
    peer: SocketAddr,
    local: SocketAddr,
    slot: usize,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let _active = ActiveConnection::new(&shared);
    let (http1, http2, dispatch) = {
        let snapshot = shared.snapshot.load();
        let dispatch = snapshot.dispatch(slot, local);
        let Some(entry) = snapshot.listener(dispatch.slot) else { return };
        (entry.http1, Arc::clone(&entry.http2), dispatch)
    };
    let ctx = Arc::new(ConnContext {
        shared,
        slot,
        peer,
        local,
        original_destination: dispatch.original_destination,
    });
    let mut first_bytes = BytesMut::new();
    // One idle timer per connection, from accept through its requests.
    let mut idle = http1::IdleTimer::new(http1.idle_timeout);
    match sniff(&mut stream, &mut first_bytes, &mut idle, &stop).await {
        Some(ClientProtocol::Http1) => http1::serve(stream, first_bytes, idle, ctx, http1, stop).await,
        Some(ClientProtocol::Http2) => {
            let stream = match stream.into_stream() {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%peer, %error, "registering an HTTP/2 client's socket failed");
                    return;
                }
            };
            let io = PrefixedStream::new(first_bytes.freeze(), stream);
            // Boxed: hyper's HTTP/2 connection state would otherwise size every HTTP/1 task too.
            Box::pin(serve_http2(io, ctx, &http2.builder, http1.idle_timeout, http2.stream_idle, stop)).await;
        }
        None => {}
    }
}

/// Reads the client's first bytes until they tell HTTP/1 from HTTP/2 prior knowledge; `None`
/// when the connection closes (or idles, or the listener stops) first.
async fn sniff(stream: &mut DownstreamSocket, first_bytes: &mut BytesMut, idle: &mut http1::IdleTimer, stop: &CancellationToken) -> Option<ClientProtocol> {
    loop {
        if let Some(protocol) = client_protocol(first_bytes) {
            return Some(protocol);
        }
        // The listener hands over connections whose client has spoken, so this read usually
        // finds a whole request head at once, without registering the socket or arming a timer.
        first_bytes.reserve(FIRST_READ);
        let read = http1::unless_idle(tokio::io::AsyncReadExt::read_buf(stream, first_bytes), idle, stop).await;
        if !matches!(read, Some(Ok(1..))) {
            return None;
        }
    }
}

/// Serves an HTTP/2 client until either side closes. The connection drains (GOAWAY, in-flight
/// streams finish) on `stop` or after `idle_timeout` without a byte either way; it is closed at
/// once when streams are open but no byte has moved for `stream_idle`: a client that stopped
/// reading, or withholds flow-control window from every stream it has open, does not hold
/// them for good (hyper polls no response body then, so the body's own timers cannot fire).
async fn serve_http2(
    io: PrefixedStream,
    ctx: Arc<ConnContext>,
    builder: &http2::Builder<TokioExecutor>,
    idle_timeout: Option<Duration>,
    stream_idle: Option<Duration>,
    stop: CancellationToken,
) {
    let counts = Arc::new(Http2Counts::default());
    let io = TokioIo::new(ActivityIo::new(io, Arc::clone(&counts)));
    let peer = ctx.peer;
    let streams = Arc::clone(&counts);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let open = OpenStream::new(&streams);
        let ctx = Arc::clone(&ctx);
        // Boxed: hyper keeps room for one in-flight request future per connection for the
        // connection's whole life; boxed it is a pointer and the state lives only while a
        // request does.
        Box::pin(async move {
            let response = server::handle(ctx, request.map(DownstreamBody::http2), None).await?;
            Ok::<_, server::DroppedByPolicy>(response.map(|body| CountedBody { body, _open: open }))
        })
    });
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    // Each check compares the bytes moved with those at its last firing.
    // An unset timeout's check is never polled; its sleep only needs a valid deadline.
    let period = |timeout: Option<Duration>| timeout.unwrap_or(Duration::from_secs(365 * 86_400));
    let idle_check = tokio::time::sleep(period(idle_timeout));
    let stall_check = tokio::time::sleep(period(stream_idle));
    tokio::pin!(idle_check, stall_check);
    let (mut seen_by_idle_check, mut seen_by_stall_check) = (0, 0);
    let mut draining = false;
    loop {
        tokio::select! {
            result = std::future::poll_fn(|cx| {
                counts.task_polls.fetch_add(1, Ordering::Relaxed);
                std::future::Future::poll(connection.as_mut(), cx)
            }) => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "downstream connection ended with an error");
                }
                break;
            }
            () = stop.cancelled(), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            () = &mut idle_check, if idle_timeout.is_some() && !draining => {
                // Idle = no bytes either way for a whole period (so between one and two
                // periods after the last byte); in-flight requests still finish.
                let now = counts.io_operations.load(Ordering::Relaxed);
                if now == seen_by_idle_check {
                    connection.as_mut().graceful_shutdown();
                    draining = true;
                }
                seen_by_idle_check = now;
                idle_check.as_mut().reset(tokio::time::Instant::now() + period(idle_timeout));
            }
            () = &mut stall_check, if stream_idle.is_some() => {
                let now = counts.io_operations.load(Ordering::Relaxed);
                if now == seen_by_stall_check && counts.open_streams.load(Ordering::Relaxed) > 0 {
                    tracing::debug!(%peer, "closing an HTTP/2 connection whose open streams moved no byte for the stream idle timeout");
                    break;
                }
                seen_by_stall_check = now;
                stall_check.as_mut().reset(tokio::time::Instant::now() + period(stream_idle));
            }
        }
    }
}

/// An HTTP/2 stream in flight, from its request until its response body is dropped.
struct OpenStream(Arc<Http2Counts>);

impl OpenStream {
    fn new(counts: &Arc<Http2Counts>) -> Self {
        counts.open_streams.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(counts))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its stream counted as open.
struct CountedBody {
    body: ProxyBody,
    _open: OpenStream,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BodyError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

struct ActiveConnection(Arc<Shared>);

impl ActiveConnection {
    fn new(shared: &Arc<Shared>) -> Self {
        bump(&shared.counters.downstream_cx_active);
        bump(&shared.counters.downstream_cx_total);
        Self(Arc::clone(shared))
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.counters.downstream_cx_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the first read of a connection asks for.
const FIRST_READ: usize = 4096;

/// The HTTP/2 connection preface's first bytes: a client that starts with them speaks HTTP/2.
const HTTP2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// What the connection's first bytes say.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ClientProtocol {
    Http1,
    /// The bytes start with the HTTP/2 connection preface (prior knowledge, as h2c clients do).
    Http2,
}

/// `None` while the bytes so far are a prefix of the HTTP/2 preface.
fn client_protocol(first_bytes: &[u8]) -> Option<ClientProtocol> {
    let compared = first_bytes.len().min(HTTP2_PREFACE_START.len());
    if first_bytes[..compared] != HTTP2_PREFACE_START[..compared] {
        Some(ClientProtocol::Http1)
    } else if compared == HTTP2_PREFACE_START.len() {
        Some(ClientProtocol::Http2)
    } else {
        None
    }
}

/// What one connection may stage before it writes even within the poll that staged it.
const STAGED_WRITE_LIMIT: usize = 64 * 1024;

/// Write coalescing for HTTP/2 downstream connections. h2 writes a DATA frame of 256 bytes or
/// more from where it is and queues nothing behind it until that write is done, so with four
/// streams per connection every 16 KiB response was a `writev` of its own (h2-16k: 1.00 per
/// request; Envoy 0.25). The connection's stream copies what h2 writes into one buffer and
/// reports it flushed; the buffer goes out when the connection task is polled again, after the
/// other tasks that were ready (streams whose responses arrived in the same I/O batch) added
/// their frames, so one write carries them all.
#[derive(Default)]
struct StagedWrites {
    /// Empty, and without capacity, between batches: an idle connection holds no write buffer.
    bytes: BytesMut,
    /// The connection task's poll (`Http2Counts::task_polls`) in which `bytes` began.
    staged_in: u64,
}

impl StagedWrites {
    fn stage(&mut self, bufs: &[io::IoSlice<'_>], poll: u64) -> usize {
        let incoming: usize = bufs.iter().map(|buf| buf.len()).sum();
        if self.bytes.is_empty() {
            self.staged_in = poll;
            // Room for the whole batch at once: grown write by write, the buffer was copied
            // again at each doubling, about as many bytes as the batch itself (h2-16k).
            self.bytes.reserve(STAGED_WRITE_LIMIT + incoming);
        }
        for buf in bufs {
            self.bytes.extend_from_slice(buf);
        }
        incoming
    }

    /// Whether a flush should leave the bytes staged: the poll that staged them still runs.
    fn waits(&self, poll: u64) -> bool {
        !self.bytes.is_empty() && poll == self.staged_in
    }
}

/// What `serve_http2` and its connection's stream (`ActivityIo`) count together.
#[derive(Default)]
struct Http2Counts {
    /// Reads and writes that completed: the connection idle timeout looks for none in a period.
    io_operations: AtomicU64,
    /// Polls of the connection task: `StagedWrites` writes once the poll that staged ends.
    task_polls: AtomicU64,
    /// Streams from request to the drop of their response body (`OpenStream`).
    open_streams: AtomicU64,
}

/// An HTTP/2 client's stream that counts I/O operations, for the connection idle timeout, and
/// coalesces writes (`StagedWrites`).
struct ActivityIo<T = PrefixedStream> {
    inner: T,
    counts: Arc<Http2Counts>,
    staged: StagedWrites,
}

impl<T> ActivityIo<T> {
    fn new(inner: T, counts: Arc<Http2Counts>) -> Self {
        Self { inner, counts, staged: StagedWrites::default() }
    }

    fn touch(&self) {
        self.counts.io_operations.fetch_add(1, Ordering::Relaxed);
    }

    fn task_poll(&self) -> u64 {
        self.counts.task_polls.load(Ordering::Relaxed)
    }
}

impl<T: AsyncWrite + Unpin> ActivityIo<T> {
    fn poll_write_staged(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.staged.bytes.is_empty() {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.staged.bytes))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.touch();
            bytes::Buf::advance(&mut self.staged.bytes, written);
        }
        self.staged.bytes = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    fn stage(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if self.staged.bytes.len() >= STAGED_WRITE_LIMIT {
            ready!(self.poll_write_staged(cx))?;
        }
        let poll = self.task_poll();
        Poll::Ready(Ok(self.staged.stage(bufs, poll)))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if polled.is_ready() {
            this.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().stage(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        self.get_mut().stage(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.staged.waits(this.task_poll()) {
            // Reported flushed: this wake-up polls the connection again after the other
            // ready tasks ran, and its flush writes everything staged by then.
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_staged(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_staged(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn a_connection_is_accepted_once_its_client_has_spoken() -> anyhow::Result<()> {
        let listener = bind(&Bind::LoopbackAuto)?;
        let mut client = TcpStream::connect(listener.local_addr()?).await?;
        let silent = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(silent.is_err(), "a connection that sent nothing was handed to accept");
        client.write_all(b"GET / HTTP/1.1\r\n").await?;
        let (accepted, _) = tokio::time::timeout(Duration::from_secs(2), listener.accept()).await??;
        let mut accepted = DownstreamSocket::new(accepted);
        let mut request = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_millis(100), accepted.read(&mut request)).await??;
        assert_eq!(&request[..read], b"GET / HTTP/1.1\r\n");
        Ok(())
    }

    #[tokio::test]
    async fn accepted_connections_have_nagle_off_without_a_setsockopt_each() -> anyhow::Result<()> {
        let listener = bind(&Bind::LoopbackAuto)?;
        let mut client = TcpStream::connect(listener.local_addr()?).await?;
        client.write_all(b"GET").await?;
        let (accepted, _) = listener.accept().await?;
        assert!(accepted.nodelay()?);
        Ok(())
    }

    #[test]
    fn the_http2_preface_decides_the_protocol_even_in_pieces() {
        assert_eq!(client_protocol(b""), None);
        assert_eq!(client_protocol(b"PRI"), None);
        assert_eq!(client_protocol(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(ClientProtocol::Http2));
        assert_eq!(client_protocol(b"P"), None);
        assert_eq!(client_protocol(b"POST / HTTP/1.1\r\n"), Some(ClientProtocol::Http1));
        assert_eq!(client_protocol(b"GET"), Some(ClientProtocol::Http1));
    }

    /// Records every write it is given; takes at most `max_write` bytes per call.
    struct RecordingWriter {
        writes: Vec<Vec<u8>>,
        max_write: usize,
        shut_down: bool,
    }

    impl AsyncWrite for RecordingWriter {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let taken = buf.len().min(this.max_write);
            this.writes.push(buf[..taken].to_vec());
            Poll::Ready(Ok(taken))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut_down = true;
            Poll::Ready(Ok(()))
        }
    }

    fn recording_io(max_write: usize) -> (ActivityIo<RecordingWriter>, Arc<Http2Counts>) {
        let counts = Arc::new(Http2Counts { task_polls: AtomicU64::new(1), ..Http2Counts::default() });
        let writer = RecordingWriter { writes: Vec::new(), max_write, shut_down: false };
        (ActivityIo::new(writer, Arc::clone(&counts)), counts)
    }

    #[test]
    fn http2_frames_written_in_one_poll_leave_in_one_write_on_the_next() {
        let (mut io, counts) = recording_io(usize::MAX);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // h2 with two large DATA frames ready: each is written and flushed before the next.
        let first = [io::IoSlice::new(b"head-1"), io::IoSlice::new(b"data-1")];
        assert!(matches!(Pin::new(&mut io).poll_write_vectored(&mut cx, &first), Poll::Ready(Ok(12))));
        assert!(matches!(Pin::new(&mut io).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, b"frame-2"), Poll::Ready(Ok(7))));
        assert!(matches!(Pin::new(&mut io).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert!(io.inner.writes.is_empty(), "nothing leaves during the poll that staged it");
        assert!(io.staged.bytes.capacity() >= STAGED_WRITE_LIMIT, "the batch's room is reserved when it begins");
        counts.task_polls.fetch_add(1, Ordering::Relaxed);
        assert!(matches!(Pin::new(&mut io).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(io.inner.writes, vec![b"head-1data-1frame-2".to_vec()]);
        assert_eq!(io.staged.bytes.capacity(), 0, "no buffer kept between batches");
        assert!(matches!(Pin::new(&mut io).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(io.inner.writes.len(), 1, "an empty flush writes nothing");
    }

    #[test]
    fn http2_frames_are_staged_up_to_the_limit_without_moving_the_buffer() {
        let (mut io, _counts) = recording_io(usize::MAX);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let head = [0u8; 9];
        let data = vec![1u8; 16 * 1024];
        let frame = [io::IoSlice::new(&head), io::IoSlice::new(&data)];
        assert!(matches!(Pin::new(&mut io).poll_write_vectored(&mut cx, &frame), Poll::Ready(Ok(_))));
        let batch_start = io.staged.bytes.as_ptr();
        while io.staged.bytes.len() < STAGED_WRITE_LIMIT {
            assert!(matches!(Pin::new(&mut io).poll_write_vectored(&mut cx, &frame), Poll::Ready(Ok(_))));
            assert_eq!(io.staged.bytes.as_ptr(), batch_start, "staged bytes were copied to a grown buffer");
        }
        assert!(io.inner.writes.is_empty());
    }

    #[test]
    fn http2_staged_frames_all_leave_before_shutdown_and_past_the_limit() {
        let (mut io, _counts) = recording_io(5);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let large = vec![7u8; STAGED_WRITE_LIMIT];
        assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, &large), Poll::Ready(Ok(n)) if n == large.len()));
        assert!(io.inner.writes.is_empty());
        // Past the limit the next write sends what is staged first, even within the same poll.
        assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, b"tail"), Poll::Ready(Ok(4))));
        assert_eq!(io.inner.writes.concat(), large);
        assert!(matches!(Pin::new(&mut io).poll_shutdown(&mut cx), Poll::Ready(Ok(()))));
        assert!(io.inner.shut_down);
        assert_eq!(io.inner.writes.concat()[large.len()..], *b"tail");
    }
}
