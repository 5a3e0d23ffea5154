//! Request normalization (accept -> **normalize** -> authorize -> route): one canonical head for policy, routing and the backend.
//!
//! The rules and the reasons for them are in proxy/NORMALIZATION.md.

use std::borrow::Cow;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{Method, StatusCode, Uri, Version};
use smallvec::SmallVec;

use crate::http1::codec::connection_tokens;
use crate::request::RequestHead;
use crate::tables::{EscapedSlashesAction, HttpConnectionManager};

/// Why a request head was refused before policy or routing saw it. The one non-error status
/// is 307 for `UNESCAPE_AND_REDIRECT`: then `parts.uri` already holds the canonical path and
/// query, which is the `location` to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl Rejection {
    fn bad_request(reason: &'static str) -> Self {
        Self { status: StatusCode::BAD_REQUEST, reason }
    }
}

/// Headers that only sluice (or the Envoy it replaces) may set. Every downstream is untrusted,
/// so they are removed from every request (CVE-2023-27487, CVE-2024-45806).
const PROXY_OWNED_PREFIX: &str = "x-envoy-";
const PROXY_OWNED: [&str; 1] = ["x-forwarded-client-cert"];
/// Hop-by-hop headers that carry no meaning past this hop and are not needed by forwarding
/// (`connection`, `te`, `upgrade` and the framing headers are left to the forwarder).
const HOP_BY_HOP: [&str; 2] = ["keep-alive", "proxy-connection"];
/// Names a `Connection` header may list without getting them removed: removing framing or
/// routing headers on a client's say-so is a smuggling tool.
const NOT_NOMINATABLE: [&str; 6] = ["host", "content-length", "transfer-encoding", "connection", "upgrade", "te"];

/// Validates and canonicalizes the downstream request head, so the request forwarded is exactly
/// what policy and routing see. Afterwards `parts.uri` is the origin-form canonical path and
/// query (`*` for `OPTIONS *`), and the headers have moved to the returned head (`parts.headers`
/// is left empty, nothing is copied) with exactly one `host` (the canonical authority), and
/// without proxy-owned headers (`x-envoy-*`, `x-forwarded-client-cert`), `keep-alive`,
/// `proxy-connection` or the headers a `Connection` header nominated.
pub fn normalize_request(
    parts: &mut http::request::Parts,
    hcm: &HttpConnectionManager,
) -> Result<RequestHead, Rejection> {
    if parts.method == Method::CONNECT && parts.uri.path().is_empty() {
        return Err(Rejection {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: "CONNECT tunnels are not proxied on HTTP listeners",
        });
    }
    check_header_limits(parts, hcm)?;
    request_body_framing(parts.version, &parts.headers)?;
    let authority = canonical_request_authority(parts)?;
    let (path_and_query, unescaped_slash) = canonical_target(&parts.method, &parts.uri, hcm)?;

    // Most targets already are their canonical origin form: then there is nothing to re-parse.
    // An HTTP/2 request's (and an absolute-form one's) usually differs only by its scheme and
    // authority: then the received path and query are kept as they are, without a copy.
    let received = parts.uri.path_and_query().filter(|received| received.as_str() == path_and_query);
    let origin_form = parts.uri.scheme().is_none() && parts.uri.authority().is_none();
    match received {
        Some(_) if origin_form => {}
        Some(received) => parts.uri = Uri::from(received.clone()),
        None => {
            parts.uri =
                Uri::try_from(path_and_query.as_str()).map_err(|_| Rejection::bad_request("invalid request target"))?;
        }
    }
    if unescaped_slash && hcm.escaped_slashes == EscapedSlashesAction::UnescapeAndRedirect {
        return Err(Rejection {
            status: StatusCode::TEMPORARY_REDIRECT,
            reason: "escaped slashes: redirected to the unescaped path",
        });
    }
    // At most one `host` is left (more are rejected above); it is rewritten only when it differs.
    if parts.headers.get(HOST).map(HeaderValue::as_bytes) != Some(authority.as_bytes()) {
        let host = HeaderValue::try_from(authority.as_str()).map_err(|_| Rejection::bad_request("invalid host"))?;
        parts.headers.insert(HOST, host);
    }
    strip_untrusted_headers(&mut parts.headers);

    Ok(RequestHead {
        method: parts.method.clone(),
        path_and_query,
        authority,
        headers: std::mem::take(&mut parts.headers),
        version: parts.version,
    })
}

/// Envoy counts every header line and the bytes of names and values; the request target is
/// part of the header block too.
fn check_header_limits(parts: &http::request::Parts, hcm: &HttpConnectionManager) -> Result<(), Rejection> {
    let too_large = Rejection { status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, reason: "" };
    if parts.headers.len() > hcm.max_headers_count {
        return Err(Rejection { reason: "too many request headers", ..too_large });
    }
    let bytes: usize = parts.headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum::<usize>()
        + parts.uri.path_and_query().map_or(0, |target| target.as_str().len())
        + parts.method.as_str().len();
    if bytes > hcm.max_request_headers_bytes {
        return Err(Rejection { reason: "request headers too large", ..too_large });
    }
    Ok(())
}

/// How a request's body is delimited on the wire (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// Neither `content-length` nor `transfer-encoding`: no body.
    Empty,
    Length(u64),
    Chunked,
}

/// Request smuggling defences: one unambiguous body length, chunked only on HTTP/1.1. The
/// HTTP/1 server reads bodies by this very decision, so what policy accepted is what is read.
pub fn request_body_framing(version: Version, headers: &http::HeaderMap) -> Result<BodyFraming, Rejection> {
    let mut transfer_encodings = headers.get_all(TRANSFER_ENCODING).iter();
    if let Some(first) = transfer_encodings.next() {
        if version != Version::HTTP_11 {
            return Err(Rejection::bad_request("transfer-encoding is only valid on HTTP/1.1"));
        }
        if transfer_encodings.next().is_some() || !first.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err(Rejection::bad_request("transfer-encoding other than chunked"));
        }
        if headers.contains_key(CONTENT_LENGTH) {
            return Err(Rejection::bad_request("both transfer-encoding and content-length"));
        }
        return Ok(BodyFraming::Chunked);
    }
    let mut lengths = headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
        .map(<[u8]>::trim_ascii);
    let Some(first) = lengths.next() else { return Ok(BodyFraming::Empty) };
    let invalid = || Rejection::bad_request("invalid or conflicting content-length");
    if first.is_empty() || !first.iter().all(u8::is_ascii_digit) || lengths.any(|other| other != first) {
        return Err(invalid());
    }
    // All ASCII digits, so UTF-8; too many of them for a u64 is invalid too.
    let length = std::str::from_utf8(first).ok().and_then(|digits| digits.parse().ok()).ok_or_else(invalid)?;
    Ok(BodyFraming::Length(length))
}

/// The authority of the request: from an absolute-form target or `:authority` when present,
/// else from the single `Host` header. Both present and different after canonicalization is
/// ambiguous (which one would the backend use?) and rejected.
fn canonical_request_authority(parts: &http::request::Parts) -> Result<String, Rejection> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Rejection::bad_request("more than one host header"));
    }
    let host = host
        .map(|value| value.to_str().map_err(|_| Rejection::bad_request("invalid host")).and_then(canonical_authority))
        .transpose()?;
    let target = parts.uri.authority().map(|authority| canonical_authority(authority.as_str())).transpose()?;
    match (target, host) {
        (Some(target), Some(host)) if target != host => Err(Rejection::bad_request("host conflicts with the request target")),
        // RFC 9112 §3.2: an HTTP/1.1 request without Host is invalid even in absolute form.
        (_, None) if parts.version == Version::HTTP_11 => Err(Rejection::bad_request("missing host header")),
        (Some(authority), _) | (None, Some(authority)) => Ok(authority),
        (None, None) => Err(Rejection::bad_request("missing authority")),
    }
}

/// Lower-cased host without a trailing dot, plus the port as a plain number when one was given.
/// Anything outside the characters of DNS names and IP literals (userinfo, `%`, spaces, commas
/// of a joined list) is rejected, so every component compares hosts the same way.
fn canonical_authority(raw: &str) -> Result<String, Rejection> {
    let invalid = || Rejection::bad_request("invalid host");
    let (host, port) = if raw.starts_with('[') {
        let close = raw.find(']').ok_or_else(invalid)?;
        let literal = &raw[1..close];
        if literal.is_empty() || !literal.bytes().all(|byte| byte.is_ascii_hexdigit() || byte == b':' || byte == b'.') {
            return Err(invalid());
        }
        let port = match &raw[close + 1..] {
            "" => None,
            rest => Some(rest.strip_prefix(':').ok_or_else(invalid)?),
        };
        (&raw[..=close], port)
    } else {
        match raw.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (raw, None),
        }
    };
    // Room for the port too: a canonical port is never longer than the one received.
    let mut canonical = String::with_capacity(raw.len());
    canonical.push_str(host);
    canonical.make_ascii_lowercase();
    if !canonical.starts_with('[') {
        if canonical.ends_with('.') {
            canonical.pop();
        }
        if !is_host_name(&canonical) {
            return Err(invalid());
        }
    }
    match port {
        None | Some("") => {}
        Some(port) if port.bytes().all(|byte| byte.is_ascii_digit()) => {
            let number: u16 = port.parse().map_err(|_| invalid())?;
            canonical.push(':');
            canonical.push_str(itoa::Buffer::new().format(number));
        }
        Some(_) => return Err(invalid()),
    }
    Ok(canonical)
}

/// Dot-separated labels of letters, digits, `-` and `_`, none of them empty.
fn is_host_name(name: &str) -> bool {
    let mut label_length = 0usize;
    for byte in name.bytes() {
        match byte {
            b'.' if label_length == 0 => return false,
            b'.' => label_length = 0,
            b'-' | b'_' => label_length += 1,
            _ if byte.is_ascii_alphanumeric() => label_length += 1,
            _ => return false,
        }
    }
    label_length > 0
}

/// The canonical origin-form target (canonical path plus the query exactly as received), and
/// whether an escaped slash was turned into a separator.
fn canonical_target(method: &Method, uri: &Uri, hcm: &HttpConnectionManager) -> Result<(String, bool), Rejection> {
    let path = uri.path();
    if path == "*" {
        return if method == Method::OPTIONS {
            Ok(("*".to_owned(), false))
        } else {
            Err(Rejection::bad_request("`*` target without OPTIONS"))
        };
    }
    let CanonicalPath { path, unescaped_slash } = canonical_path(path, hcm)?;
    let path_and_query = match uri.query() {
        Some(query) => {
            let mut target = String::with_capacity(path.len() + 1 + query.len());
            target.push_str(&path);
            target.push('?');
            target.push_str(query);
            target
        }
        None => path.into_owned(),
    };
    Ok((path_and_query, unescaped_slash))
}

struct CanonicalPath<'a> {
    /// Borrowed when the path already was canonical.
    path: Cow<'a, str>,
    /// A `%2F`/`%5C` was turned into a separator.
    unescaped_slash: bool,
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(byte: u8) -> Option<u8> {
    char::from(byte).to_digit(16).and_then(|digit| u8::try_from(digit).ok())
}

fn push_encoded(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0x0f)]));
}

/// Canonical path, in Envoy's order: percent-encoding (unreserved decoded, the rest upper-case
/// hex, escaped slashes per the listener), backslash as a separator, dot segments, then
/// `merge_slashes`.
fn canonical_path<'a>(raw: &'a str, hcm: &HttpConnectionManager) -> Result<CanonicalPath<'a>, Rejection> {
    if !raw.starts_with('/') {
        return Err(Rejection::bad_request("path does not start with /"));
    }
    if is_canonical_path(raw, hcm.merge_slashes) {
        return Ok(CanonicalPath { path: Cow::Borrowed(raw), unescaped_slash: false });
    }
    rewrite_path(raw, hcm)
}

/// `canonical_path` for a path that may change: decoded, resolved and merged step by step.
fn rewrite_path(raw: &str, hcm: &HttpConnectionManager) -> Result<CanonicalPath<'static>, Rejection> {
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut unescaped_slash = false;
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        index += 1;
        match byte {
            b'%' => {
                let high = bytes.get(index).copied().and_then(hex_value);
                let low = bytes.get(index + 1).copied().and_then(hex_value);
                let (Some(high), Some(low)) = (high, low) else {
                    return Err(Rejection::bad_request("invalid percent-encoding in path"));
                };
                index += 2;
                match high << 4 | low {
                    0 => return Err(Rejection::bad_request("encoded NUL in path")),
                    slash @ (b'/' | b'\\') => match hcm.escaped_slashes {
                        EscapedSlashesAction::ImplementationSpecificDefault | EscapedSlashesAction::RejectRequest => {
                            return Err(Rejection::bad_request("escaped slash in path"));
                        }
                        EscapedSlashesAction::KeepUnchanged => push_encoded(&mut decoded, slash),
                        EscapedSlashesAction::UnescapeAndForward | EscapedSlashesAction::UnescapeAndRedirect => {
                            unescaped_slash = true;
                            decoded.push('/');
                        }
                    },
                    value if is_unreserved(value) => decoded.push(char::from(value)),
                    value => push_encoded(&mut decoded, value),
                }
            }
            b'\\' => decoded.push('/'),
            byte if byte.is_ascii() => decoded.push(char::from(byte)),
            byte => push_encoded(&mut decoded, byte),
        }
    }
    let mut path = remove_dot_segments(&decoded, hcm.normalize_path)?;
    if hcm.merge_slashes {
        path = merge_slashes(&path);
    }
    Ok(CanonicalPath { path: Cow::Owned(path), unescaped_slash })
}

/// Whether `canonical_path` would return `raw` as it is: ASCII without `%` or `\`, no `.` or
/// `..` segment (with or without path parameters), and no `//` when slashes are merged. Most
/// requests take this path, which copies nothing.
fn is_canonical_path(raw: &str, merge_slashes: bool) -> bool {
    let mut has_dot = false;
    let mut previous = 0u8;
    for byte in raw.bytes() {
        if !byte.is_ascii() || byte == b'%' || byte == b'\\' || (merge_slashes && previous == b'/' && byte == b'/') {
            return false;
        }
        has_dot |= byte == b'.';
        previous = byte;
    }
    // Every dot segment has a dot, so a path without one needs no look at its segments.
    !(has_dot && raw.split('/').any(|segment| dot_segment(segment).is_some()))
}

/// RFC 3986 §5.2.4 over `/`-separated segments. Without `normalize_path` a path that would
/// change is rejected instead: forwarding it unresolved would let the backend resolve it to a
/// path policy never saw. `..;x` (Tomcat's path parameters) is rejected either way.
/// A `.` or `..` path segment, and whether path parameters (`;x`) followed it.
struct DotSegment<'a> {
    dots: &'a str,
    parameters: bool,
}

/// The one definition of a dot segment, for the rewrite and for the shortcut that skips it: if
/// they disagreed, a path the shortcut passes as canonical could still resolve elsewhere.
fn dot_segment(segment: &str) -> Option<DotSegment<'_>> {
    let (dots, parameters) = segment.split_once(';').map_or((segment, false), |(dots, _)| (dots, true));
    matches!(dots, "." | "..").then_some(DotSegment { dots, parameters })
}

fn remove_dot_segments(path: &str, normalize: bool) -> Result<String, Rejection> {
    let mut output: Vec<&str> = Vec::new();
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let is_last = segments.peek().is_none();
        let Some(DotSegment { dots, parameters }) = dot_segment(segment) else {
            output.push(segment);
            continue;
        };
        if parameters {
            return Err(Rejection::bad_request("dot segment with path parameters"));
        }
        if !normalize {
            return Err(Rejection::bad_request("dot segment in path (normalize_path is off)"));
        }
        if dots == ".." {
            output.pop();
        }
        if is_last {
            output.push("");
        }
    }
    Ok(format!("/{}", output.join("/")))
}

fn merge_slashes(path: &str) -> String {
    let mut merged = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && merged.ends_with('/')) {
            merged.push(c);
        }
    }
    merged
}

fn strip_untrusted_headers(headers: &mut http::HeaderMap) {
    let nominated: SmallVec<[&[u8]; 4]> = connection_tokens(headers).collect();
    // One pass over the names present, compared with the nominated tokens, rather than a
    // parse and a lookup per name that might be there (`connection: close` names nothing).
    let untrusted: SmallVec<[HeaderName; 2]> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name.starts_with(PROXY_OWNED_PREFIX)
                || PROXY_OWNED.contains(&name)
                || HOP_BY_HOP.contains(&name)
                || (!NOT_NOMINATABLE.contains(&name) && nominated.iter().any(|token| token.eq_ignore_ascii_case(name.as_bytes())))
        })
        .cloned()
        .collect();
    drop(nominated);
    for name in untrusted {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::tables::RouteConfig;

    fn hcm(normalize_path: bool, merge_slashes: bool, escaped_slashes: EscapedSlashesAction) -> HttpConnectionManager {
        HttpConnectionManager {
            stat_prefix: "test".to_owned(),
            route_config: Arc::new(RouteConfig {
                name: "rc".to_owned(),
                virtual_hosts: Vec::new(),
                request_headers_to_add: Vec::new(),
                request_headers_to_remove: Vec::new(),
                response_headers_to_add: Vec::new(),
                response_headers_to_remove: Vec::new(),
            }),
            normalize_path,
            merge_slashes,
            escaped_slashes,
            stream_idle_timeout: None,
            request_timeout: None,
            request_headers_timeout: None,
            max_request_headers_bytes: 60 * 1024,
            max_headers_count: 100,
            idle_timeout: None,
            use_remote_address: false,
            skip_xff_append: false,
            upgrades: Vec::new(),
        }
    }

    /// The configuration sluice recommends: resolve dot segments, merge slashes, default
    /// escaped-slash handling (reject).
    fn strict() -> HttpConnectionManager {
        hcm(true, true, EscapedSlashesAction::ImplementationSpecificDefault)
    }

    fn parts(version: Version, method: &str, target: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = http::Request::builder().method(method).uri(target).version(version);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn h1(target: &str) -> http::request::Parts {
        parts(Version::HTTP_11, "GET", target, &[("host", "example.com")])
    }

    /// The canonical path_and_query, or the rejection status.
    fn outcome(mut request: http::request::Parts, hcm: &HttpConnectionManager) -> Result<String, u16> {
        normalize_request(&mut request, hcm).map(|head| head.path_and_query).map_err(|rejection| rejection.status.as_u16())
    }

    fn path_outcome(target: &str, hcm: &HttpConnectionManager) -> Result<String, u16> {
        outcome(h1(target), hcm)
    }

    #[test]
    fn path_bypass_vectors_under_the_strict_configuration() {
        let vectors: &[(&str, Result<&str, u16>)] = &[
            ("/public/../admin", Ok("/admin")),
            ("/public/%2e%2e/admin", Ok("/admin")),
            ("/public/%2E./admin", Ok("/admin")),
            ("/public/.%2e/admin", Ok("/admin")),
            ("/a/b/./c", Ok("/a/b/c")),
            ("/./admin", Ok("/admin")),
            ("/a/b/../../../../c", Ok("/c")),
            ("/../a/b", Ok("/a/b")),
            ("/a/..\\c", Ok("/c")),
            ("/public\\..\\admin", Ok("/admin")),
            ("/a/b/..", Ok("/a/")),
            ("/a/b/.", Ok("/a/b/")),
            ("//admin///x", Ok("/admin/x")),
            ("/public//../admin", Ok("/public/admin")),
            ("/admin%2Fsecret", Err(400)),
            ("/admin%2fsecret", Err(400)),
            ("/admin%5Csecret", Err(400)),
            ("/admin%2F", Err(400)),
            ("/xyz/.%00../abc", Err(400)),
            ("/xyz/%00.%00./abc", Err(400)),
            ("/xyz/AAAAA%%0000/abc", Err(400)),
            ("/a%zz", Err(400)),
            ("/a%4", Err(400)),
            ("/xyz/..;foo=bar/abc", Err(400)),
            ("/xyz/.;/abc", Err(400)),
            ("/%41dmin", Ok("/Admin")),
            ("/%61dmin", Ok("/admin")),
            ("/%7euser", Ok("/~user")),
            ("/a%3fb", Ok("/a%3Fb")),
            ("/a%23b", Ok("/a%23b")),
            ("/a%252e%252e/b", Ok("/a%252e%252e/b")),
            ("/%c0%af", Ok("/%C0%AF")),
            ("/caf\u{e9}", Ok("/caf%C3%A9")),
            ("/a;b/c", Ok("/a;b/c")),
            ("/...", Ok("/...")),
            ("/public?x=/../admin", Ok("/public?x=/../admin")),
            ("/public/../admin?q=%2F", Ok("/admin?q=%2F")),
            ("/user/profile#section1", Ok("/user/profile")),
        ];
        let strict = strict();
        for (target, expected) in vectors {
            let expected = expected.map(str::to_owned);
            assert_eq!(path_outcome(target, &strict), expected, "{target}");
        }
    }

    #[test]
    fn a_path_taken_as_canonical_is_what_the_full_rewrite_gives() {
        let paths = [
            "/", "/a/b", "/a;b/c", "/...", "/a/.b/..c", "/a.", "/.well-known/x", "//admin", "/a//b", "/a/", "/~u/-_.",
            "/a/./b", "/a/../b", "/a/..;x", "/a/.;x/b", "/a/.", "/..", "/a\\b", "/a%41", "/caf\u{e9}", "/a b", "/a:b@c!$&'()*+,=",
        ];
        let mut taken = 0;
        for normalize_path in [true, false] {
            for merge_slashes in [true, false] {
                for escaped_slashes in [EscapedSlashesAction::KeepUnchanged, EscapedSlashesAction::ImplementationSpecificDefault] {
                    let hcm = hcm(normalize_path, merge_slashes, escaped_slashes);
                    for path in paths.iter().filter(|path| is_canonical_path(path, merge_slashes)) {
                        taken += 1;
                        let rewritten = rewrite_path(path, &hcm).map(|canonical| (canonical.path.into_owned(), canonical.unescaped_slash));
                        assert_eq!(rewritten, Ok((path.to_string(), false)), "{path} with {normalize_path}/{merge_slashes}/{escaped_slashes:?}");
                    }
                }
            }
        }
        assert!(taken > 40, "the shortcut was taken {taken} times");
        for path in ["/a/./b", "/a/../b", "/a/..;x", "/..", "/a\\b", "/a%41", "/caf\u{e9}"] {
            assert!(!is_canonical_path(path, false), "{path} needs the rewrite");
        }
        assert!(!is_canonical_path("//admin", true) && is_canonical_path("//admin", false));
    }

    #[test]
    fn without_normalize_path_dot_segments_are_rejected_not_forwarded() {
        let plain = hcm(false, false, EscapedSlashesAction::ImplementationSpecificDefault);
        assert_eq!(path_outcome("/public/../admin", &plain), Err(400));
        assert_eq!(path_outcome("/public/%2E%2E/admin", &plain), Err(400));
        assert_eq!(path_outcome("/./a", &plain), Err(400));
        assert_eq!(path_outcome("//admin", &plain), Ok("//admin".to_owned()), "slashes kept without merge_slashes");
        assert_eq!(path_outcome("/a/%7e", &plain), Ok("/a/~".to_owned()));
    }

    #[test]
    fn escaped_slash_actions() {
        let keep = hcm(true, false, EscapedSlashesAction::KeepUnchanged);
        assert_eq!(path_outcome("/a%2fb", &keep), Ok("/a%2Fb".to_owned()));
        assert_eq!(path_outcome("/a%2F..%2Fb", &keep), Ok("/a%2F..%2Fb".to_owned()), "one segment, not a dot segment");
        let reject = hcm(true, false, EscapedSlashesAction::RejectRequest);
        assert_eq!(path_outcome("/a%2Fb", &reject), Err(400));
        let forward = hcm(true, false, EscapedSlashesAction::UnescapeAndForward);
        assert_eq!(path_outcome("/a%2Fb", &forward), Ok("/a/b".to_owned()));
        assert_eq!(path_outcome("/public%2F..%2Fadmin", &forward), Ok("/admin".to_owned()));
        assert_eq!(path_outcome("/a%5Cb", &forward), Ok("/a/b".to_owned()));

        let redirect = hcm(true, true, EscapedSlashesAction::UnescapeAndRedirect);
        let mut request = h1("/a%2F%2Fb?x=1");
        let rejection = normalize_request(&mut request, &redirect).unwrap_err();
        assert_eq!(rejection.status, StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(request.uri, "/a/b?x=1", "the location to redirect to");
        assert_eq!(path_outcome("/a/b", &redirect), Ok("/a/b".to_owned()), "no redirect without escaped slashes");
    }

    #[test]
    fn the_forwarded_request_is_the_canonical_one() {
        let mut request = parts(
            Version::HTTP_11,
            "GET",
            "/public/../admin?x=1",
            &[("host", "Example.COM."), ("x-envoy-original-path", "/public"), ("x-keep", "1")],
        );
        let head = normalize_request(&mut request, &strict()).unwrap();
        assert_eq!(request.uri, "/admin?x=1");
        assert_eq!(head.path_and_query, "/admin?x=1");
        assert_eq!(head.path(), "/admin");
        assert_eq!(head.authority, "example.com");
        assert_eq!(head.headers.get_all(HOST).iter().collect::<Vec<_>>(), ["example.com"]);
        assert!(!head.headers.contains_key("x-envoy-original-path"));
        assert!(request.headers.is_empty(), "the headers moved to the head");
        assert_eq!(head.headers.get("x-keep").unwrap(), "1");
    }

    #[test]
    fn proxy_owned_and_nominated_hop_by_hop_headers_are_stripped() {
        let mut request = parts(
            Version::HTTP_11,
            "GET",
            "/",
            &[
                ("host", "h"),
                ("x-envoy-retry-on", "5xx"),
                ("x-envoy-max-retries", "5"),
                ("x-envoy-upstream-rq-timeout-ms", "1"),
                ("x-forwarded-client-cert", "By=spiffe://evil"),
                ("connection", "keep-alive, X-Secret , content-length, host, close"),
                ("x-secret", "s"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("x-user", "u"),
            ],
        );
        let head = normalize_request(&mut request, &strict()).unwrap();
        let mut names: Vec<&str> = head.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["connection", "host", "x-user"]);
    }

    #[test]
    fn host_vectors() {
        let strict = strict();
        let authority = |version: Version, target: &str, headers: &[(&str, &str)]| {
            let mut request = parts(version, "GET", target, headers);
            normalize_request(&mut request, &strict).map(|head| head.authority).map_err(|rejection| rejection.status.as_u16())
        };
        let ok = |value: &str| Ok(value.to_owned());
        let h11 = Version::HTTP_11;
        assert_eq!(authority(h11, "/", &[("host", "Secret.COM")]), ok("secret.com"));
        assert_eq!(authority(h11, "/", &[("host", "secret.com.:8080")]), ok("secret.com:8080"));
        assert_eq!(authority(h11, "/", &[("host", "secret.com:")]), ok("secret.com"));
        assert_eq!(authority(h11, "/", &[("host", "secret.com:008080")]), ok("secret.com:8080"));
        assert_eq!(authority(h11, "/", &[("host", "[::1]:80")]), ok("[::1]:80"));
        assert_eq!(authority(h11, "/", &[("host", "10.0.0.1")]), ok("10.0.0.1"));
        assert_eq!(authority(h11, "/", &[]), Err(400), "missing host on HTTP/1.1");
        assert_eq!(authority(Version::HTTP_10, "/", &[]), Err(400), "no authority at all");
        assert_eq!(authority(Version::HTTP_10, "/", &[("host", "a.com")]), ok("a.com"));
        assert_eq!(authority(h11, "/", &[("host", "a.com"), ("host", "a.com")]), Err(400), "duplicate host");
        assert_eq!(authority(h11, "/", &[("host", "a.com"), ("host", "b.com")]), Err(400));
        for invalid in ["a.com, b.com", "user@a.com", "a..com", ".a.com", "a.com:99999", "a.com:x", "a%2ecom", "a com", "[zz]", "[::1]x"] {
            assert_eq!(authority(h11, "/", &[("host", invalid)]), Err(400), "{invalid}");
        }
        // Absolute form: the target's authority decides; a different Host is a conflict.
        assert_eq!(authority(h11, "http://A.com/x", &[("host", "a.com")]), ok("a.com"));
        assert_eq!(authority(h11, "http://a.com/x", &[("host", "b.com")]), Err(400));
        assert_eq!(authority(h11, "http://a.com/x", &[]), Err(400));
        assert_eq!(authority(h11, "http://user@a.com/x", &[("host", "a.com")]), Err(400));
        // HTTP/2: :authority, and a Host header that disagrees with it is rejected.
        let h2 = Version::HTTP_2;
        assert_eq!(authority(h2, "http://a.com/x", &[]), ok("a.com"));
        assert_eq!(authority(h2, "http://a.com/x", &[("host", "A.com")]), ok("a.com"));
        assert_eq!(authority(h2, "http://a.com/x", &[("host", "b.com")]), Err(400));
        assert_eq!(authority(h2, "/x", &[("host", "b.com")]), ok("b.com"));
    }

    #[test]
    fn absolute_form_is_forwarded_in_origin_form() {
        let mut request = parts(Version::HTTP_11, "GET", "http://a.com/p/../q?x", &[("host", "a.com")]);
        let head = normalize_request(&mut request, &strict()).unwrap();
        assert_eq!(request.uri, "/q?x");
        assert_eq!(request.uri.authority(), None);
        assert_eq!(head.path_and_query, "/q?x");
        // Already canonical: only the scheme and authority go.
        let mut request = parts(Version::HTTP_2, "GET", "http://a.com/q?x", &[]);
        let head = normalize_request(&mut request, &strict()).unwrap();
        assert_eq!((request.uri.scheme(), request.uri.authority()), (None, None));
        assert_eq!((request.uri.to_string(), head.path_and_query, head.authority), ("/q?x".to_owned(), "/q?x".to_owned(), "a.com".to_owned()));
    }

    #[test]
    fn targets_that_are_not_paths() {
        let strict = strict();
        let host = [("host", "a.com")];
        assert_eq!(outcome(parts(Version::HTTP_11, "OPTIONS", "*", &host), &strict), Ok("*".to_owned()));
        assert_eq!(outcome(parts(Version::HTTP_11, "GET", "*", &host), &strict), Err(400));
        assert_eq!(outcome(parts(Version::HTTP_11, "CONNECT", "a.com:443", &host), &strict), Err(405));
        // An HTTP/2 `:path` that does not start with `/` parses as an authority, leaving no path.
        assert_eq!(outcome(parts(Version::HTTP_2, "GET", "foo", &[]), &strict), Err(400));
    }

    #[test]
    fn methods_stay_case_sensitive_tokens() {
        let mut request = parts(Version::HTTP_11, "get", "/", &[("host", "a.com")]);
        let head = normalize_request(&mut request, &strict()).unwrap();
        assert_eq!(head.method.as_str(), "get");
        assert_ne!(head.method, Method::GET, "`get` must not pass a `GET` rule");
    }

    #[test]
    fn framing_vectors() {
        let strict = strict();
        let framing = |version: Version, headers: &[(&str, &str)]| {
            let mut all = vec![("host", "a.com")];
            all.extend_from_slice(headers);
            outcome(parts(version, "POST", "/", &all), &strict).map(|_| ())
        };
        let h11 = Version::HTTP_11;
        assert_eq!(framing(h11, &[("transfer-encoding", "chunked")]), Ok(()));
        assert_eq!(framing(h11, &[("transfer-encoding", "Chunked ")]), Ok(()));
        assert_eq!(framing(h11, &[("content-length", "10")]), Ok(()));
        assert_eq!(framing(h11, &[("content-length", "10"), ("content-length", "10")]), Ok(()));
        assert_eq!(framing(h11, &[("transfer-encoding", "chunked"), ("content-length", "10")]), Err(400));
        assert_eq!(framing(h11, &[("transfer-encoding", "gzip")]), Err(400));
        assert_eq!(framing(h11, &[("transfer-encoding", "gzip, chunked")]), Err(400));
        assert_eq!(framing(h11, &[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")]), Err(400));
        assert_eq!(framing(h11, &[("content-length", "10"), ("content-length", "11")]), Err(400));
        assert_eq!(framing(h11, &[("content-length", "10, 11")]), Err(400));
        assert_eq!(framing(h11, &[("content-length", "-1")]), Err(400));
        assert_eq!(framing(h11, &[("content-length", "")]), Err(400));
        assert_eq!(framing(Version::HTTP_10, &[("transfer-encoding", "chunked")]), Err(400));
        assert_eq!(framing(Version::HTTP_2, &[("transfer-encoding", "chunked")]), Err(400));
        assert_eq!(framing(h11, &[("content-length", "18446744073709551616")]), Err(400), "past u64");
        let decided = |headers: &[(&str, &str)]| {
            let map = parts(h11, "POST", "/", headers).headers;
            request_body_framing(h11, &map).map_err(|rejection| rejection.status.as_u16())
        };
        assert_eq!(decided(&[]), Ok(BodyFraming::Empty));
        assert_eq!(decided(&[("content-length", "10, 10")]), Ok(BodyFraming::Length(10)));
        assert_eq!(decided(&[("transfer-encoding", "chunked")]), Ok(BodyFraming::Chunked));
    }

    /// NUL/CR/LF in header values (CVE-2019-9900) never reach normalize: hyper's parser and h2
    /// refuse them, and `HeaderValue` cannot hold them. This pins the guarantee sluice relies on.
    #[test]
    fn header_values_cannot_carry_control_bytes() {
        for raw in [&b"cluster\0"[..], b"a\rb", b"a\nb", b"a\r\nx-injected: 1"] {
            assert!(HeaderValue::from_bytes(raw).is_err(), "{raw:?}");
            assert!(HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(raw)).is_err(), "{raw:?}");
        }
        assert!(HeaderName::from_bytes(b"X-Upper Case").is_err());
    }

    #[test]
    fn header_limits_answer_431() {
        let mut limited = strict();
        limited.max_headers_count = 3;
        let headers: Vec<(String, String)> = (0..3).map(|i| (format!("x-{i}"), "v".to_owned())).collect();
        let borrowed: Vec<(&str, &str)> =
            std::iter::once(("host", "a.com")).chain(headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))).collect();
        assert_eq!(outcome(parts(Version::HTTP_11, "GET", "/", &borrowed), &limited), Err(431));
        assert_eq!(outcome(parts(Version::HTTP_11, "GET", "/", &borrowed[..3]), &limited), Ok("/".to_owned()));

        let mut small = strict();
        small.max_request_headers_bytes = 64;
        let big = "v".repeat(64);
        assert_eq!(outcome(parts(Version::HTTP_11, "GET", "/", &[("host", "a.com"), ("x-big", &big)]), &small), Err(431));
        assert_eq!(outcome(parts(Version::HTTP_11, "GET", "/", &[("host", "a.com")]), &small), Ok("/".to_owned()));
    }
}
