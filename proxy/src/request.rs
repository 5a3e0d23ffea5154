//! The canonical request head (accept -> **normalize** -> authorize -> route): what policy, routing and the backend all see.

/// A downstream request head after normalization. `path_and_query` and `authority` are the
/// canonical forms; the same values are written back into the forwarded request.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: http::Method,
    /// Canonical path plus `?query` (never a fragment); `*` only for `OPTIONS *`, the
    /// authority form for CONNECT.
    pub path_and_query: String,
    /// Lower-cased host with any trailing dot removed; the port is kept when one was sent.
    pub authority: String,
    pub headers: http::HeaderMap,
    pub version: http::Version,
}

impl RequestHead {
    /// The path without its query.
    pub fn path(&self) -> &str {
        match self.path_and_query.split_once('?') {
            Some((path, _)) => path,
            None => &self.path_and_query,
        }
    }

    /// The query without its `?`, if the target had one.
    pub fn query(&self) -> Option<&str> {
        self.path_and_query.split_once('?').map(|(_, query)| query)
    }
}
