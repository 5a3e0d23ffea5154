//! Errors at the proxy's API boundary (agent -> **Handle**): starting the proxy and applying tables.

use std::net::SocketAddr;

/// `Handle::start` failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot start the proxy runtime")]
    Runtime(#[source] std::io::Error),
}

/// `Handle::apply` failed; the previous tables and listeners stay in place.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("listener {listener}: cannot bind {addr}")]
    Bind {
        listener: String,
        /// The address asked for (`127.0.0.1:0` for an automatic port).
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("frontend {destination}: no listener named {listener}")]
    UnknownFrontendListener { destination: SocketAddr, listener: String },
    #[error("the proxy has been shut down")]
    Stopped,
}
