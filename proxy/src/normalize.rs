//! Request normalization (accept -> **normalize** -> authorize -> route): one canonical head for policy, routing and the backend.

use crate::request::RequestHead;
use crate::tables::HttpConnectionManager;

/// Why a request head was refused before policy or routing saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: http::StatusCode,
    pub reason: &'static str,
}

/// Validates and canonicalizes the downstream request head in place, so the request forwarded
/// is exactly what policy and routing see; strips proxy-owned headers from the request.
pub fn normalize_request(
    parts: &mut http::request::Parts,
    hcm: &HttpConnectionManager,
) -> Result<RequestHead, Rejection> {
    let _ = (parts, hcm);
    Err(Rejection { status: http::StatusCode::BAD_REQUEST, reason: "normalization not implemented yet" })
}
