//! The HTTP/1.1 upstream client (forward -> **upstream** -> respond): one pooled connection driven by the
//! request's own task, so an exchange costs no channel and no second task.
//!
//! The request (head and body) is written first, then the response head is read; an upstream
//! that answers (or closes) while the body is still being written stops the rest of it, as an
//! early 413 or 503 must. The response body reads the connection itself while the downstream
//! writer polls it, and hands the connection back for the pool when it ends cleanly.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;

use super::codec::{self, BodyDecoder};
use super::conn::{poll_body_frame, BodyReadError, PrefixedStream};
use super::write::BodyWriter;
use crate::body::ProxyBody;
use crate::upstream::ConnectionGuard;

/// Bytes asked of the socket per read of a response head (with the start of its body) and per
/// read of a body of unknown length.
const READ_SIZE: usize = 16 * 1024;
/// The most asked per read of a body of known length: the rest of it, up to this. One read per
/// 16 KiB response instead of three; each read's bytes become one data frame, which is one
/// HTTP/2 DATA write downstream.
const MAX_BODY_READ: usize = 256 * 1024;
/// The largest upstream response head (Envoy's default header limit, plus the status line).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// An open connection to one upstream host, counted under the cluster's `max_connections`
/// until it is dropped.
#[derive(Debug)]
pub(crate) struct ClientConn {
    io: TcpStream,
    buf: BytesMut,
    /// What the first read of a response asks for: grows while reads fill it, so a response
    /// head and its body usually arrive in one read.
    head_read_size: usize,
    _guard: ConnectionGuard,
}

/// Why an exchange failed; `request_sent` as in `AttemptOutcome::Reset`.
#[derive(Debug, thiserror::Error)]
#[error("upstream HTTP/1.1 exchange failed (request sent: {request_sent}): {reason}")]
pub(crate) struct ExchangeError {
    pub request_sent: bool,
    reason: String,
}

impl ExchangeError {
    fn new(request_sent: bool, reason: impl ToString) -> Self {
        Self { request_sent, reason: reason.to_string() }
    }
}

impl ClientConn {
    /// Boxed: a connection moves between the pool, the exchange and the response body.
    pub fn new(io: TcpStream, guard: ConnectionGuard) -> Box<Self> {
        Box::new(Self { io, buf: BytesMut::new(), head_read_size: READ_SIZE, _guard: guard })
    }

    /// Whether a pooled connection can take another request: the upstream has neither closed
    /// it nor sent anything unasked. Readiness is what the I/O driver last saw, so an idle
    /// connection costs no system call here.
    pub fn is_reusable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: EOF or stray bytes, unless the readiness was stale.
            Poll::Ready(Ok(())) => matches!(self.io.try_read(&mut [0u8; 1]), Err(error) if error.kind() == io::ErrorKind::WouldBlock),
        }
    }

    /// Sends `request` and reads the response head.
    pub async fn send(mut self: Box<Self>, request: Request<ProxyBody>) -> Result<Response<ResponseBody>, ExchangeError> {
        let (parts, mut body) = request.into_parts();
        let framing = codec::request_framing(&parts.method, body.size_hint().exact(), body.is_end_stream());
        let target_size = parts.uri.path_and_query().map_or(1, |target| target.as_str().len());
        let mut writer = BodyWriter::new(framing, codec::head_size(&parts.headers) + target_size);
        codec::encode_request_head(&mut writer.out.copied, &parts.method, &parts.uri, &parts.headers, framing);
        let whole = self.send_body(&mut body, &mut writer).await?;
        drop(body);
        let head = self.read_response_head().await?;
        let (decoder, reusable) = codec::response_body(&parts.method, &head, MAX_RESPONSE_HEAD).map_err(|error| ExchangeError::new(true, error))?;
        let upgrading = head.status == StatusCode::SWITCHING_PROTOCOLS;
        // An answer before the whole request leaves the connection mid-request: never reused.
        let reusable = reusable && whole && !upgrading;
        Ok(Response::from_parts(head, ResponseBody { conn: Some(self), decoder, reusable, upgrading }))
    }

    /// Writes the head queued in `writer` and then the body. Returns `false` when the upstream
    /// answered (or closed) before the whole body was written: then the rest is not sent, and
    /// what it sent is in `buf` for the response.
    async fn send_body(&mut self, body: &mut ProxyBody, writer: &mut BodyWriter) -> Result<bool, ExchangeError> {
        let (read, mut write) = self.io.split();
        let mut answer = None;
        let answered = async {
            answer = Some(answered_early(&read, &mut self.buf).await);
        };
        let written = writer.write_body(body, &mut write, std::pin::pin!(answered)).await;
        match (written, answer) {
            (_, Some(answered)) => answered.map(|()| false),
            (Ok(whole), None) => Ok(whole),
            // Whether any of the request went out decides how a retry may treat it.
            (Err(error), None) => Err(ExchangeError::new(writer.wrote, error)),
        }
    }

    /// Reads until a final response head (1xx other than 101 are skipped) is buffered.
    async fn read_response_head(&mut self) -> Result<http::response::Parts, ExchangeError> {
        loop {
            if let Some(parts) = codec::parse_response_head(&mut self.buf, MAX_RESPONSE_HEAD).map_err(|error| ExchangeError::new(true, error))? {
                if parts.status.is_informational() && parts.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                return Ok(parts);
            }
            let wanted = self.head_read_size;
            self.buf.reserve(wanted);
            let read = std::future::poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)).await;
            match read {
                Ok(0) => return Err(ExchangeError::new(true, "connection closed before the response head")),
                // Filled: this upstream's answers are larger; read more at once next time.
                Ok(read) if read >= wanted => self.head_read_size = (wanted * 2).min(MAX_BODY_READ),
                Ok(_) => {}
                Err(error) => return Err(ExchangeError::new(true, error)),
            }
        }
    }
}

/// Resolves when the upstream sends something (or closes) while the request is still being
/// written, with those bytes in `buf`: an early answer such as a 413 or a 503.
async fn answered_early(read: &ReadHalf<'_>, buf: &mut BytesMut) -> Result<(), ExchangeError> {
    loop {
        read.readable().await.map_err(|error| ExchangeError::new(true, error))?;
        buf.reserve(READ_SIZE);
        match read.try_read_buf(buf) {
            // Bytes or the end of the stream: either way the request is over.
            Ok(_) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(ExchangeError::new(true, error)),
        }
    }
}

/// How much to ask of the socket for the rest of a body.
fn body_read_size(decoder: &BodyDecoder) -> usize {
    match decoder {
        BodyDecoder::Length { remaining } => usize::try_from(*remaining).unwrap_or(usize::MAX).clamp(READ_SIZE, MAX_BODY_READ),
        _ => READ_SIZE,
    }
}

/// An upstream response body read from its connection.
#[derive(Debug)]
pub struct ResponseBody {
    /// Kept after a clean end when the connection may be pooled again; dropped (closed) otherwise.
    conn: Option<Box<ClientConn>>,
    decoder: BodyDecoder,
    reusable: bool,
    upgrading: bool,
}

impl ResponseBody {
    /// The connection to pool again, when the body was read to its end and nothing about the
    /// exchange rules reuse out.
    pub fn take_finished(&mut self) -> Option<Box<ClientConn>> {
        if !self.decoder.is_done() || self.upgrading {
            return None;
        }
        // Also for a body that was empty from the start (HEAD, 204, 304, length 0): writers
        // never poll those.
        self.end();
        self.conn.take()
    }

    /// The connection of a `101` exchange, with whatever the upstream sent after the head.
    pub fn into_upgraded(mut self) -> Option<PrefixedStream> {
        let conn = self.conn.take().filter(|_| self.upgrading)?;
        Some(PrefixedStream::new(conn.buf.freeze(), conn.io))
    }

    /// The body ended cleanly: keep the connection only if it can be pooled again.
    fn end(&mut self) {
        self.decoder = BodyDecoder::Done;
        match self.conn.as_mut() {
            // A pooled connection holds no buffer.
            Some(conn) if self.reusable && conn.buf.is_empty() => conn.buf = BytesMut::new(),
            _ => self.conn = None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        let this = self.get_mut();
        if this.upgrading {
            return Poll::Ready(None);
        }
        let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
        let read_size = body_read_size(&this.decoder);
        let step = std::task::ready!(poll_body_frame(&mut this.decoder, &mut conn.buf, Pin::new(&mut conn.io), read_size, cx));
        match &step {
            Ok(Some(_)) if !this.decoder.is_done() => {}
            Ok(_) => this.end(),
            Err(_) => this.conn = None,
        }
        Poll::Ready(step.transpose())
    }

    fn is_end_stream(&self) -> bool {
        self.upgrading || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}
