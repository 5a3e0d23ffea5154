//! Listeners (**accept** -> identify -> ...): bound sockets, accept loops, and one hyper connection per client.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

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

/// Binds a listening socket without serving it yet (so a failed apply can drop it unused).
pub(crate) fn bind(bind: &Bind) -> io::Result<TcpListener> {
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
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

pub(crate) async fn accept_loop(listener: TcpListener, slot: usize, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let local = match stream.local_addr() {
                    Ok(local) => local,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "accepted socket has no local address");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
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
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    slot: usize,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let _active = ActiveConnection::new(&shared);
    let (builder, idle_timeout, dispatch) = {
        let snapshot = shared.snapshot.load();
        let dispatch = snapshot.dispatch(slot, local);
        let Some(entry) = snapshot.listener(dispatch.slot) else { return };
        (Arc::clone(&entry.builder), entry.http.idle_timeout.filter(|t| !t.is_zero()), dispatch)
    };
    let activity = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(ActivityIo { inner: stream, activity: Arc::clone(&activity), writes: WriteBatching::default() });
    let ctx = Arc::new(ConnContext {
        shared,
        slot,
        peer,
        local,
        original_destination: dispatch.original_destination,
    });
    // Boxed: hyper keeps room for one in-flight request future per connection for the
    // connection's whole life; unboxed that is the full request state machine (~4 KiB) on
    // every idle keep-alive connection, boxed it is a pointer and the state lives only
    // while a request does (10k idle connections: 225 -> 197 MiB RSS).
    let service = hyper::service::service_fn(move |request| Box::pin(server::handle(Arc::clone(&ctx), request)));
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let mut seen_activity = 0;
    let mut draining = false;
    loop {
        let idle_check = async {
            match idle_timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "downstream connection ended with an error");
                }
                break;
            }
            () = stop.cancelled(), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            () = idle_check, if !draining => {
                // Idle = no bytes either way for a whole period (so between one and two
                // periods after the last byte); in-flight requests still finish.
                let now = activity.load(Ordering::Relaxed);
                if now == seen_activity {
                    connection.as_mut().graceful_shutdown();
                    draining = true;
                }
                seen_activity = now;
            }
        }
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

/// The HTTP/2 connection preface's first bytes: a client that starts with them speaks HTTP/2.
const HTTP2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// Write batching for HTTP/2 downstream connections. Each stream's response wakes the
/// connection task, which writes whatever frames are ready: with several streams per
/// connection that was a `writev` per response (h2load, 4 streams per connection: 1.85 `writev`
/// per request, one of them upstream). Deferring the first write of a batch by one scheduler
/// pass lets the other streams that are ready add their frames first, so one `writev` carries
/// them all (1.14 per request). HTTP/1 connections carry one response at a time and are never
/// deferred.
#[derive(Default)]
struct WriteBatching {
    protocol: ClientProtocol,
    /// A write was deferred and its retry is due.
    deferred: bool,
}

/// What the connection's first bytes say.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ClientProtocol {
    /// This many bytes of the HTTP/2 preface matched so far.
    Undecided(usize),
    Http1,
    Http2,
}

impl Default for ClientProtocol {
    fn default() -> Self {
        ClientProtocol::Undecided(0)
    }
}

impl WriteBatching {
    fn on_read(&mut self, filled: &[u8]) {
        let ClientProtocol::Undecided(matched) = self.protocol else { return };
        let expected = &HTTP2_PREFACE_START[matched..];
        let compared = filled.len().min(expected.len());
        self.protocol = if filled[..compared] != expected[..compared] {
            ClientProtocol::Http1
        } else if compared == expected.len() {
            ClientProtocol::Http2
        } else {
            ClientProtocol::Undecided(matched + compared)
        };
    }

    /// `true`: return `Pending` now (the task was woken to retry after the others ran).
    fn defer(&mut self, cx: &Context<'_>) -> bool {
        if self.protocol != ClientProtocol::Http2 || std::mem::take(&mut self.deferred) {
            return false;
        }
        self.deferred = true;
        cx.waker().wake_by_ref();
        true
    }
}

/// A TCP stream that counts I/O operations, for the connection idle timeout, and batches
/// HTTP/2 writes (`WriteBatching`).
struct ActivityIo {
    inner: TcpStream,
    activity: Arc<AtomicU64>,
    writes: WriteBatching,
}

impl ActivityIo {
    fn touch(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }
}

impl AsyncRead for ActivityIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if polled.is_ready() {
            this.touch();
            this.writes.on_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.writes.defer(cx) {
            return Poll::Pending;
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if polled.is_ready() {
            this.touch();
        }
        polled
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.writes.defer(cx) {
            return Poll::Pending;
        }
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if polled.is_ready() {
            this.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    #[test]
    fn http2_connections_defer_the_first_write_of_each_batch_once() {
        let mut batching = WriteBatching::default();
        batching.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let cx = context();
        assert!(batching.defer(&cx), "first write of a batch waits one pass");
        assert!(!batching.defer(&cx), "its retry goes out");
        assert!(batching.defer(&cx), "the next batch waits again");
    }

    #[test]
    fn http1_connections_never_defer() {
        let mut batching = WriteBatching::default();
        batching.on_read(b"GET / HTTP/1.1\r\n");
        // Later bytes (a body that happens to start like the preface) change nothing.
        batching.on_read(b"PRI * HTTP/2.0");
        let cx = context();
        assert!(!batching.defer(&cx) && !batching.defer(&cx));
    }

    #[test]
    fn the_preface_may_arrive_in_pieces_and_a_lookalike_start_is_http1() {
        let mut http2 = WriteBatching::default();
        http2.on_read(b"PRI");
        assert!(!http2.defer(&context()), "undecided: not deferred");
        http2.on_read(b" * HTTP/2.0\r\n");
        assert!(http2.defer(&context()));
        let mut post = WriteBatching::default();
        post.on_read(b"P");
        post.on_read(b"OST / HTTP/1.1\r\n");
        assert!(!post.defer(&context()) && !post.defer(&context()));
    }
}
