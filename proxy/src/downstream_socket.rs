//! Accepted client sockets (**accept** -> identify -> ...), registered with the worker's I/O
//! driver only once an operation on them would block.
//!
//! A listener holds a connection until its client has spoken (`TCP_DEFER_ACCEPT`), so a
//! short-lived connection's request is readable at accept and its response fits the send
//! buffer: read, answer and close never block. tokio's `TcpStream` registers every socket with
//! epoll when it is made and removes it before `close`: two `epoll_ctl` calls (5% of the proxy's
//! samples in benches/README.md's new-conn row) and an epoll round trip before the first read
//! can start. This socket tries each operation first and registers only
//! when one reports `WouldBlock`; from then on it waits on readiness like tokio's own types.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// An accepted, non-blocking TCP socket. Clones are the connection's read and write halves:
/// they share the one socket and its registration.
#[derive(Debug, Clone)]
pub(crate) struct DownstreamSocket {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Declared before `socket`: a registration is removed before its socket closes.
    registration: OnceLock<io::Result<AsyncFd<SocketFd>>>,
    socket: StdTcpStream,
}

/// The socket's descriptor as the I/O driver sees it; `Shared::socket` owns it.
#[derive(Debug)]
struct SocketFd(RawFd);

impl AsRawFd for SocketFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl DownstreamSocket {
    /// Wraps a socket that is already non-blocking (the listener accepts with `SOCK_NONBLOCK`).
    pub fn new(socket: StdTcpStream) -> Self {
        Self { shared: Arc::new(Shared { registration: OnceLock::new(), socket }) }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.socket.local_addr()
    }

    /// The registration, made on first use. A failed one fails every later wait the same way.
    fn registration(&self) -> io::Result<&AsyncFd<SocketFd>> {
        let fd = self.shared.socket.as_raw_fd();
        let register = || {
            // SAFETY: `Shared::socket` owns the descriptor, is never replaced, and is dropped
            // (or moved out, in `into_stream`) only after the registration is.
            unsafe { AsyncFd::register_with_interest(SocketFd(fd), Interest::READABLE | Interest::WRITABLE) }.map_err(io::Error::from)
        };
        match self.shared.registration.get_or_init(register) {
            Ok(registration) => Ok(registration),
            Err(error) => Err(io::Error::new(error.kind(), error.to_string())),
        }
    }

    /// Runs `operation` (which moves at most `requested` bytes) now if the socket is not
    /// registered yet: nothing is known about its readiness, so trying is the cheapest way to
    /// find out. Otherwise, or once it would block, waits for `interest` and retries.
    fn poll_io(&self, cx: &mut Context<'_>, interest: Interest, requested: usize, mut operation: impl FnMut(&StdTcpStream) -> io::Result<usize>) -> Poll<io::Result<usize>> {
        if self.shared.registration.get().is_none() {
            match operation(&self.shared.socket) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
        let registration = self.registration()?;
        loop {
            let mut ready = if interest.is_readable() {
                ready!(registration.poll_read_ready(cx))?
            } else {
                ready!(registration.poll_write_ready(cx))?
            };
            match operation(&self.shared.socket) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                // As tokio's own streams do: a short read (write) emptied (filled) the socket's
                // buffer, so the readiness is spent. Kept, it would end the next wait at once.
                Ok(moved) if moved > 0 && moved < requested => {
                    ready.clear_ready();
                    return Poll::Ready(Ok(moved));
                }
                done => return Poll::Ready(done),
            }
        }
    }

    /// Resolves once the socket is readable (or closed), registering it to find out.
    pub async fn readable(&self) -> io::Result<()> {
        // The guard is dropped without clearing: the read that follows decides.
        self.registration()?.readable().await.map(drop)
    }

    /// Both halves back as one tokio stream, for protocols served by other code (upgraded
    /// connections). Fails when they are not the two halves of one socket.
    pub fn reunite(self, other: Self) -> io::Result<TcpStream> {
        if !Arc::ptr_eq(&self.shared, &other.shared) {
            return Err(io::Error::other("not two halves of one socket"));
        }
        drop(other);
        self.into_stream()
    }

    /// This socket as a tokio stream (HTTP/2 is served by hyper). Fails while another half
    /// still holds it.
    pub fn into_stream(self) -> io::Result<TcpStream> {
        let Shared { registration, socket } =
            Arc::try_unwrap(self.shared).map_err(|_| io::Error::other("another half still holds the socket"))?;
        // Removed from epoll before tokio adds the socket again under its own registration.
        drop(registration);
        TcpStream::from_std(socket)
    }

    #[cfg(test)]
    fn is_registered(&self) -> bool {
        self.shared.registration.get().is_some()
    }
}

impl AsyncRead for DownstreamSocket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let requested = buf.remaining();
        let read = ready!(self.poll_io(cx, Interest::READABLE, requested, |socket| {
            // SAFETY: `recv` only writes into the slice, and reports how many bytes it initialized.
            socket2::SockRef::from(socket).recv(unsafe { buf.unfilled_mut() })
        }))?;
        // SAFETY: `recv` initialized the first `read` unfilled bytes.
        unsafe { buf.assume_init(read) };
        buf.advance(read);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for DownstreamSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_io(cx, Interest::WRITABLE, bytes.len(), |mut socket| socket.write(bytes))
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let requested = bufs.iter().map(|buf| buf.len()).sum();
        self.poll_io(cx, Interest::WRITABLE, requested, |mut socket| socket.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.shared.socket.shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A connected pair: the client as a tokio stream, the server's end as a `DownstreamSocket`.
    async fn connected() -> anyhow::Result<(TcpStream, DownstreamSocket)> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept()?;
        server.set_nonblocking(true)?;
        Ok((client, DownstreamSocket::new(server)))
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn an_exchange_that_never_blocks_never_registers() -> anyhow::Result<()> {
        let (mut client, mut server) = connected().await?;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
        // The bytes are in flight on loopback for a moment.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut request = BytesMut::with_capacity(64);
        let read = tokio::time::timeout(WAIT, server.read_buf(&mut request)).await??;
        assert_eq!(&request[..read], b"GET / HTTP/1.1\r\n\r\n");
        let mut write = server.clone();
        write.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await?;
        assert!(!server.is_registered(), "a read and a write that found the socket ready registered it");
        drop((server, write));
        let mut response = Vec::new();
        tokio::time::timeout(WAIT, client.read_to_end(&mut response)).await??;
        assert_eq!(response, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", "closing both halves ends the response");
        Ok(())
    }

    #[tokio::test]
    async fn a_read_that_would_block_waits_for_the_peer() -> anyhow::Result<()> {
        let (mut client, mut server) = connected().await?;
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let read = server.read(&mut buf).await?;
            anyhow::Ok((buf[..read].to_vec(), server.is_registered()))
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reading.is_finished(), "the read returned before the client wrote");
        client.write_all(b"late").await?;
        let (read, registered) = tokio::time::timeout(WAIT, reading).await???;
        assert_eq!(read, b"late");
        assert!(registered);
        Ok(())
    }

    #[tokio::test]
    async fn bytes_sent_before_the_first_wait_are_not_missed() -> anyhow::Result<()> {
        let (mut client, mut server) = connected().await?;
        client.write_all(b"early").await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Registered only now, with the bytes already queued: the wait must still end.
        tokio::time::timeout(WAIT, server.readable()).await??;
        let mut buf = BytesMut::with_capacity(16);
        assert_eq!(tokio::time::timeout(WAIT, server.read_buf(&mut buf)).await??, 5);
        assert_eq!(&buf[..], b"early");
        Ok(())
    }

    #[tokio::test]
    async fn after_a_read_that_emptied_the_socket_the_next_wait_waits_for_new_bytes() -> anyhow::Result<()> {
        let (mut client, mut server) = connected().await?;
        let mut buf = [0u8; 64];
        let reading = tokio::spawn(async move {
            let read = server.read(&mut buf).await?;
            anyhow::Ok((server, read))
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"first").await?;
        let (server, read) = tokio::time::timeout(WAIT, reading).await???;
        assert_eq!(read, 5);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), server.readable()).await.is_err(),
            "the wait ended with nothing sent"
        );
        client.write_all(b"second").await?;
        tokio::time::timeout(WAIT, server.readable()).await??;
        Ok(())
    }

    #[tokio::test]
    async fn a_write_larger_than_the_send_buffer_waits_for_the_peer_to_read() -> anyhow::Result<()> {
        let (mut client, mut server) = connected().await?;
        let body: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = body.clone();
        let writing = tokio::spawn(async move {
            server.write_all(&sent).await?;
            anyhow::Ok(server.is_registered())
        });
        let mut received = Vec::with_capacity(body.len());
        tokio::time::timeout(WAIT, async {
            while received.len() < body.len() {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let mut chunk = [0u8; 65536];
                let read = client.read(&mut chunk).await?;
                anyhow::ensure!(read > 0, "closed after {} bytes", received.len());
                received.extend_from_slice(&chunk[..read]);
            }
            anyhow::Ok(())
        })
        .await??;
        assert!(received == body, "the bytes arrived changed or out of order");
        assert!(tokio::time::timeout(WAIT, writing).await???, "a write that blocked did not register");
        Ok(())
    }

    #[tokio::test]
    async fn two_halves_reunite_into_one_stream() -> anyhow::Result<()> {
        let (mut client, server) = connected().await?;
        let (_, other) = connected().await?;
        assert!(server.clone().reunite(other).is_err(), "halves of two sockets reunited");
        let mut stream = server.clone().reunite(server)?;
        client.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(WAIT, stream.read_exact(&mut buf)).await??;
        assert_eq!(&buf, b"ping");
        stream.write_all(b"pong").await?;
        tokio::time::timeout(WAIT, client.read_exact(&mut buf)).await??;
        assert_eq!(&buf, b"pong");
        Ok(())
    }
}
