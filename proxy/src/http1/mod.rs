//! sluice's own HTTP/1.1 (**accept** -> parse ... forward -> **upstream**): the downstream server, so that idle
//! keep-alive connections hold no buffers, and the upstream client, driven by the request's own
//! task. HTTP/2 stays with hyper on both sides.

pub(crate) mod client;
pub(crate) mod codec;
pub(crate) mod conn;
mod write;

pub(crate) use client::{ClientConn, ResponseBody};
pub(crate) use conn::{serve, unless_idle, DownstreamUpgrade, IdleTimer, Http1Settings, PrefixedStream, RequestBody, BodyReadError};
