//! Message bodies on both legs (forward -> **body** -> respond): one enum instead of a boxed body per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::Lease;

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
    Streamed { prefix: Option<Bytes>, rest: Incoming },
    /// A body passed through as it arrives (requests without replay, upstream responses).
    Incoming { body: Incoming, lease: Option<Lease> },
}

impl ProxyBody {
    pub fn empty() -> Self {
        Self::Full(None)
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self::Full((!bytes.is_empty()).then_some(bytes))
    }

    pub fn incoming(body: Incoming) -> Self {
        Self::Incoming { body, lease: None }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Every variant is Unpin (Incoming is), so plain `&mut` access is fine.
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Streamed { prefix, rest } => match prefix.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => Pin::new(rest).poll_frame(cx),
            },
            Self::Incoming { body, lease } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                // Finished cleanly: the connection may be reused. hyper stops polling once
                // `is_end_stream` holds, so the end is checked after every frame too.
                let ended = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    _ => false,
                };
                if ended {
                    if let Some(lease) = lease.as_mut() {
                        lease.finished();
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
            Self::Incoming { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Streamed { prefix, rest } => {
                let prefix_len = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let rest_hint = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest_hint.lower() + prefix_len);
                if let Some(upper) = rest_hint.upper() {
                    hint.set_upper(upper + prefix_len);
                }
                hint
            }
            Self::Incoming { body, .. } => body.size_hint(),
        }
    }
}
