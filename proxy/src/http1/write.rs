//! Writing a message body (respond -> **encode**, forward -> **encode**): the body's frames in
//! the framing the head announced, gathered so that what is ready goes out in one `writev`.
//! The HTTP/1 server writes responses with it and the client requests.

use std::future::Future;
use std::io;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use smallvec::SmallVec;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::codec::{self, OutgoingFraming};
use crate::body::{BodyError, ProxyBody};

/// Body bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// Why writing a body stopped early.
#[derive(Debug, thiserror::Error)]
pub(super) enum BodyWriteError {
    /// The body being passed on failed.
    #[error(transparent)]
    Body(BodyError),
    #[error("body longer or shorter than its announced length")]
    Length,
    #[error(transparent)]
    Io(io::Error),
}

/// A body in its framing: the head is queued first, then frames as the body yields them.
pub(super) struct BodyWriter {
    pub out: WriteQueue,
    /// With `Length`, the bytes still owed.
    framing: OutgoingFraming,
    /// For chunked framing: the last chunk (with any trailers) is queued.
    last_chunk_queued: bool,
    /// Something has been written (for a request: the upstream may have seen it).
    pub wrote: bool,
}

impl BodyWriter {
    /// `head_size`: about how long the head queued first will be. Room for it and for a body
    /// short enough to be copied behind it is allocated once, up front.
    pub fn new(framing: OutgoingFraming, head_size: usize) -> Self {
        let copied_body = match framing {
            OutgoingFraming::Length(length) => usize::try_from(length).ok().filter(|&length| length < COPY_BELOW).unwrap_or(0),
            _ => 0,
        };
        let out = WriteQueue { segments: Vec::new(), copied: Vec::with_capacity(head_size + copied_body) };
        Self { out, framing, last_chunk_queued: false, wrote: false }
    }

    /// Writes what is queued and then `body`, each batch of frames that are ready in one write.
    /// `Ok(false)`: `interrupt` resolved first (and the rest of the body was not written).
    pub async fn write_body<W, I>(&mut self, body: &mut ProxyBody, write: &mut W, mut interrupt: std::pin::Pin<&mut I>) -> Result<bool, BodyWriteError>
    where
        W: AsyncWrite + Unpin,
        I: Future<Output = ()>,
    {
        let mut ended = matches!(self.framing, OutgoingFraming::NoBody);
        let mut pending = None;
        while !ended {
            let frame = match pending.take() {
                Some(frame) => frame,
                None => tokio::select! {
                    biased;
                    frame = body.frame() => frame,
                    () = interrupt.as_mut() => return Ok(false),
                },
            };
            ended = match frame {
                None => true,
                Some(frame) => self.push(frame.map_err(BodyWriteError::Body)?)? || body.is_end_stream(),
            };
            if ended {
                break;
            }
            // Add whatever else is ready now, then write.
            if self.out.len() < WRITE_BATCH {
                if let Some(ready) = futures_util::FutureExt::now_or_never(body.frame()) {
                    pending = Some(ready);
                    continue;
                }
            }
            if !self.flush(write, interrupt.as_mut()).await? {
                return Ok(false);
            }
        }
        if self.framing == OutgoingFraming::Chunked && !self.last_chunk_queued {
            codec::encode_last_chunk(&mut self.out.copied, None);
        }
        if !self.flush(write, interrupt).await? {
            return Ok(false);
        }
        if matches!(self.framing, OutgoingFraming::Length(left) if left > 0) {
            return Err(BodyWriteError::Length);
        }
        Ok(true)
    }

    /// Writes what is queued; `Ok(false)` when `interrupt` resolved first.
    async fn flush<W, I>(&mut self, write: &mut W, interrupt: std::pin::Pin<&mut I>) -> Result<bool, BodyWriteError>
    where
        W: AsyncWrite + Unpin,
        I: Future<Output = ()>,
    {
        tokio::select! {
            biased;
            written = self.out.write_to(write) => written.map_err(BodyWriteError::Io)?,
            () = interrupt => return Ok(false),
        }
        self.wrote = true;
        Ok(true)
    }

    /// Queues one frame; `true` when it was the last (trailers end a body).
    fn push(&mut self, frame: Frame<Bytes>) -> Result<bool, BodyWriteError> {
        let trailers = match frame.into_data() {
            Ok(data) => {
                self.push_data(data)?;
                return Ok(false);
            }
            Err(frame) => frame.into_trailers(),
        };
        // Trailers only travel in chunked framing; with a length they are dropped.
        if let (Ok(trailers), OutgoingFraming::Chunked) = (trailers, self.framing) {
            codec::encode_last_chunk(&mut self.out.copied, Some(&trailers));
            self.last_chunk_queued = true;
        }
        Ok(true)
    }

    fn push_data(&mut self, data: Bytes) -> Result<(), BodyWriteError> {
        if data.is_empty() {
            return Ok(());
        }
        if let OutgoingFraming::Length(left) = &mut self.framing {
            *left = left.checked_sub(data.len() as u64).ok_or(BodyWriteError::Length)?;
        }
        if self.framing == OutgoingFraming::Chunked {
            codec::encode_chunk_header(&mut self.out.copied, data.len());
            self.out.put(data);
            self.out.copied.extend_from_slice(b"\r\n");
        } else {
            self.out.put(data);
        }
        Ok(())
    }
}

/// Data frames at least this long are written from where they are instead of being copied
/// next to the head (a 16 KiB body costs a copy otherwise).
const COPY_BELOW: usize = 2048;

/// Response bytes waiting for one `writev`: the head, framing and small frames copied
/// together; large frames queued as they came.
#[derive(Default)]
pub(super) struct WriteQueue {
    /// What goes out first, in order.
    segments: Vec<Bytes>,
    /// What follows the last segment.
    pub copied: Vec<u8>,
}

impl WriteQueue {
    pub fn put(&mut self, data: Bytes) {
        if data.len() < COPY_BELOW {
            self.copied.extend_from_slice(&data);
            return;
        }
        if !self.copied.is_empty() {
            self.segments.push(Bytes::from(std::mem::take(&mut self.copied)));
        }
        self.segments.push(data);
    }

    pub fn len(&self) -> usize {
        self.segments.iter().map(Bytes::len).sum::<usize>() + self.copied.len()
    }

    /// Writes everything queued, in order, and empties the queue.
    pub async fn write_to(&mut self, write: &mut (impl AsyncWrite + Unpin)) -> io::Result<()> {
        if self.segments.is_empty() {
            write.write_all(&self.copied).await?;
            self.copied.clear();
            return Ok(());
        }
        // On the stack for the usual few segments: no allocation per response.
        let mut slices: SmallVec<[io::IoSlice<'_>; 8]> = self.segments.iter().map(|segment| io::IoSlice::new(segment)).collect();
        if !self.copied.is_empty() {
            slices.push(io::IoSlice::new(&self.copied));
        }
        let mut unwritten = &mut slices[..];
        while !unwritten.is_empty() {
            let written = write.write_vectored(unwritten).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            io::IoSlice::advance_slices(&mut unwritten, written);
        }
        drop(slices);
        self.segments.clear();
        self.copied.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn queued_pieces_go_out_in_order_whatever_their_size() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        let (_read, mut write) = client.into_split();
        let pieces: Vec<Vec<u8>> = vec![b"head".to_vec(), vec![b'a'; 4096], b"small".to_vec(), vec![b'b'; 70_000], b"tail".to_vec()];
        let mut queue = WriteQueue::default();
        queue.copied.extend_from_slice(&pieces[0]);
        for piece in &pieces[1..] {
            queue.put(Bytes::from(piece.clone()));
        }
        assert_eq!(queue.len(), pieces.iter().map(Vec::len).sum::<usize>());
        assert_eq!(queue.segments.len(), 4, "head, 4 KiB frame, `small`, 70 KB frame (`tail` stays copied)");
        queue.write_to(&mut write).await.expect("written");
        assert_eq!(queue.len(), 0);
        drop(write);
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.expect("read");
        assert_eq!(received, pieces.concat());
    }
}
