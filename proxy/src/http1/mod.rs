//! The HTTP/1.1 downstream server (**accept** -> parse -> handle -> respond), sluice's own so that idle
//! keep-alive connections hold no buffers; HTTP/2 stays with hyper.

pub(crate) mod codec;
pub(crate) mod conn;

pub(crate) use conn::{serve, until_readable, DownstreamUpgrade, IdleTimer, Http1Settings, PrefixedStream, RequestBody, RequestBodyError};
