//! HTTP/1.1 wire format (accept -> **parse** -> normalize ... forward -> **encode**/**parse** ->
//! respond -> **encode**): for the downstream server, request heads and bodies in, response
//! heads and bodies out; for the upstream client, the reverse. Pure: bytes in, values out; the
//! connection loops in `conn.rs` and `client.rs` do the I/O.
//!
//! Heads are tokenized by `httparse`; what is hand-written here is framing (RFC 9112 §6-7) and
//! the response head, kept strict because a lenient parser in front of a stricter backend is
//! how requests get smuggled: bare LF line ends, chunk sizes with signs or whitespace inside, and
//! trailers past the header limit are all refused.

use std::io::Write as _;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use smallvec::SmallVec;

/// Header slots on the stack; a listener allowing more parses into a heap array instead.
const HEADER_SLOTS: usize = 128;
/// The longest chunk-size line accepted (size, extensions and CRLF).
const MAX_CHUNK_LINE: usize = 4096;

/// Why a request head could not be read; the connection answers and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeadError {
    #[error("request head too large")]
    TooLarge,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
}

impl HeadError {
    pub fn status(self) -> StatusCode {
        match self {
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Takes one request head off the front of `buf`: `None` (and `buf` untouched) when more bytes
/// are needed. `max_bytes` bounds the head while it is incomplete; more than `max_headers`
/// header lines make it too large. The target and header values are slices of the head's
/// bytes, not copies.
pub(crate) fn parse_request_head(buf: &mut BytesMut, max_bytes: usize, max_headers: usize) -> Result<Option<http::request::Parts>, HeadError> {
    let layout = if max_headers <= HEADER_SLOTS {
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        request_layout(buf, max_bytes, &mut slots[..max_headers])?
    } else {
        request_layout(buf, max_bytes, &mut vec![httparse::EMPTY_HEADER; max_headers])?
    };
    let Some(layout) = layout else { return Ok(None) };
    let head = buf.split_to(layout.consumed).freeze();
    let uri = Uri::from_maybe_shared(head.slice(layout.target)).map_err(|_| HeadError::Malformed("invalid request target"))?;
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = layout.method;
    parts.uri = uri;
    parts.version = layout.version;
    parts.headers = header_map(&head, &layout.headers)?;
    Ok(Some(parts))
}

/// Where a header line's name and value lie in the head.
struct HeaderSpan {
    name: Range<usize>,
    value: Range<usize>,
}

/// Header lines kept on the stack while a head is split off its buffer.
type HeaderSpans = SmallVec<[HeaderSpan; 16]>;

/// A request head found at the start of a buffer, as positions in it.
struct RequestLayout {
    consumed: usize,
    method: Method,
    target: Range<usize>,
    version: Version,
    headers: HeaderSpans,
}

/// The position of `part`, a slice `httparse` returned, within `buf`.
fn span(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

fn header_spans(buf: &[u8], parsed: &[httparse::Header<'_>]) -> HeaderSpans {
    parsed.iter().map(|header| HeaderSpan { name: span(buf, header.name.as_bytes()), value: span(buf, header.value) }).collect()
}

fn request_layout<'b>(buf: &'b [u8], max_bytes: usize, slots: &mut [httparse::Header<'b>]) -> Result<Option<RequestLayout>, HeadError> {
    let mut parsed = httparse::Request::new(slots);
    let consumed = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) if buf.len() > max_bytes => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Malformed("unsupported HTTP version")),
        Err(_) => return Err(HeadError::Malformed("invalid request line or header")),
    };
    if consumed > max_bytes {
        return Err(HeadError::TooLarge);
    }
    let method = parsed.method.map(str::as_bytes).map(Method::from_bytes).and_then(Result::ok);
    let method = method.ok_or(HeadError::Malformed("invalid method"))?;
    let target = parsed.path.ok_or(HeadError::Malformed("missing request target"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    Ok(Some(RequestLayout { consumed, method, target: span(buf, target.as_bytes()), version, headers: header_spans(buf, parsed.headers) }))
}

/// The header lines of `head`; each value shares `head`'s bytes.
fn header_map(head: &Bytes, spans: &[HeaderSpan]) -> Result<HeaderMap, HeadError> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for span in spans {
        let name = HeaderName::from_bytes(&head[span.name.clone()]).map_err(|_| HeadError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(span.value.clone())).map_err(|_| HeadError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The tokens every `Connection` header lists (RFC 9110 §7.6.1), trimmed, empty ones skipped:
/// the options of this hop and the names of the headers that belong to it alone.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(CONNECTION)
        .into_iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// Whether a `Connection` header lists `token`.
fn connection_lists(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|listed| listed.eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether the client asked to keep the connection open after this request (RFC 9112 §9.3).
pub(crate) fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    if version == Version::HTTP_10 { connection_lists(headers, "keep-alive") } else { !connection_lists(headers, "close") }
}

/// The `Upgrade` value of an HTTP/1.1 request that asks to switch protocols.
pub(crate) fn requested_upgrade(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(http::header::UPGRADE)?;
    (version == Version::HTTP_11 && connection_lists(headers, "upgrade")).then(|| upgrade.clone())
}

/// Whether the client sent `Expect: 100-continue` and waits for a go-ahead before its body.
pub(crate) fn expects_continue(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.get(http::header::EXPECT).is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// One step of a request body.
#[derive(Debug, PartialEq)]
pub(crate) enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is complete; bytes after it belong to the next request.
    End,
    /// `buf` holds no complete step: read more.
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyDecodeError {
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    #[error("invalid or oversized trailers")]
    Trailers,
}

/// Reads a message body out of the connection's buffer: `Content-Length`, chunked, or (upstream
/// responses only) everything until the connection closes.
#[derive(Debug)]
pub(crate) enum BodyDecoder {
    Length { remaining: u64 },
    Chunked { state: ChunkState, max_trailer_bytes: usize },
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkState {
    Size,
    Data { remaining: u64 },
    DataEnd,
    Trailers,
}

impl BodyDecoder {
    pub fn length(length: u64) -> Self {
        if length == 0 { BodyDecoder::Done } else { BodyDecoder::Length { remaining: length } }
    }

    pub fn chunked(max_trailer_bytes: usize) -> Self {
        BodyDecoder::Chunked { state: ChunkState::Size, max_trailer_bytes }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, BodyDecoder::Done)
    }

    /// What is known of the rest of the body's length.
    pub fn size_hint(&self) -> http_body::SizeHint {
        match self {
            BodyDecoder::Length { remaining } => http_body::SizeHint::with_exact(*remaining),
            BodyDecoder::Done => http_body::SizeHint::with_exact(0),
            BodyDecoder::Chunked { .. } | BodyDecoder::UntilClose => http_body::SizeHint::default(),
        }
    }

    /// Takes the next step of the body from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyDecodeError> {
        match self {
            BodyDecoder::Done => Ok(Decoded::End),
            BodyDecoder::UntilClose if buf.is_empty() => Ok(Decoded::NeedMore),
            BodyDecoder::UntilClose => Ok(Decoded::Data(buf.split().freeze())),
            BodyDecoder::Length { remaining } => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(buf.len());
                *remaining -= take as u64;
                let data = buf.split_to(take).freeze();
                if *remaining == 0 {
                    *self = BodyDecoder::Done;
                }
                Ok(Decoded::Data(data))
            }
            BodyDecoder::Chunked { state, max_trailer_bytes } => loop {
                match *state {
                    ChunkState::Size => {
                        let Some(line_end) = find_crlf(buf, MAX_CHUNK_LINE)? else { return Ok(Decoded::NeedMore) };
                        let size = chunk_size(&buf[..line_end])?;
                        buf.advance(line_end + 2);
                        *state = if size == 0 { ChunkState::Trailers } else { ChunkState::Data { remaining: size } };
                    }
                    ChunkState::Data { remaining } => {
                        if buf.is_empty() {
                            return Ok(Decoded::NeedMore);
                        }
                        let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(buf.len());
                        let left = remaining - take as u64;
                        *state = if left == 0 { ChunkState::DataEnd } else { ChunkState::Data { remaining: left } };
                        return Ok(Decoded::Data(buf.split_to(take).freeze()));
                    }
                    ChunkState::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Decoded::NeedMore);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(BodyDecodeError::ChunkEnd);
                        }
                        buf.advance(2);
                        *state = ChunkState::Size;
                    }
                    ChunkState::Trailers => {
                        let limit = *max_trailer_bytes;
                        let decoded = trailers(buf, limit)?;
                        if decoded != Decoded::NeedMore {
                            *self = BodyDecoder::Done;
                        }
                        return Ok(decoded);
                    }
                }
            },
        }
    }
}

/// Position of the first CRLF; a bare LF or a line longer than `max` is an error.
fn find_crlf(buf: &[u8], max: usize) -> Result<Option<usize>, BodyDecodeError> {
    match buf.iter().take(max).position(|&byte| byte == b'\n') {
        Some(0) => Err(BodyDecodeError::ChunkSize),
        Some(lf) if buf[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err(BodyDecodeError::ChunkSize),
        None if buf.len() >= max => Err(BodyDecodeError::ChunkSize),
        None => Ok(None),
    }
}

/// `1*HEXDIG [ BWS ";" extensions ]`; extensions are ignored but may not hold control bytes.
fn chunk_size(line: &[u8]) -> Result<u64, BodyDecodeError> {
    let digits = line.iter().take_while(|byte| byte.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(BodyDecodeError::ChunkSize);
    }
    let rest = line[digits..].trim_ascii_start();
    let extension_ok = rest.is_empty() || (rest[0] == b';' && rest.iter().all(|&byte| byte == b'\t' || (b' '..0x7f).contains(&byte) || byte >= 0x80));
    if !extension_ok {
        return Err(BodyDecodeError::ChunkSize);
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| BodyDecodeError::ChunkSize)?;
    u64::from_str_radix(text, 16).map_err(|_| BodyDecodeError::ChunkSize)
}

/// The trailer section after the last chunk, up to and including its empty line.
fn trailers(buf: &mut BytesMut, limit: usize) -> Result<Decoded, BodyDecodeError> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Decoded::End);
    }
    let (consumed, spans) = {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        match httparse::parse_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete((consumed, parsed))) if consumed <= limit => (consumed, header_spans(buf, parsed)),
            Ok(httparse::Status::Partial) if buf.len() <= limit => return Ok(Decoded::NeedMore),
            _ => return Err(BodyDecodeError::Trailers),
        }
    };
    let section = buf.split_to(consumed).freeze();
    header_map(&section, &spans).map(Decoded::Trailers).map_err(|_| BodyDecodeError::Trailers)
}

/// Takes an upstream response head off the front of `buf`, like `parse_request_head`.
pub(crate) fn parse_response_head(buf: &mut BytesMut, max_bytes: usize) -> Result<Option<http::response::Parts>, HeadError> {
    let (consumed, status, version, spans) = {
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        let mut parsed = httparse::Response::new(&mut slots);
        let consumed = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(consumed)) if consumed <= max_bytes => consumed,
            Ok(httparse::Status::Partial) if buf.len() <= max_bytes => return Ok(None),
            Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed("invalid status line or header")),
        };
        let status = parsed.code.and_then(|code| StatusCode::from_u16(code).ok()).ok_or(HeadError::Malformed("invalid status"))?;
        let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        (consumed, status, version, header_spans(buf, parsed.headers))
    };
    let head = buf.split_to(consumed).freeze();
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = header_map(&head, &spans)?;
    Ok(Some(parts))
}

/// How an upstream response body ends (RFC 9112 §6.3) and whether the connection can carry
/// another request after it.
pub(crate) fn response_body(request_method: &Method, parts: &http::response::Parts, max_trailer_bytes: usize) -> Result<(BodyDecoder, bool), HeadError> {
    let keep_alive = wants_keep_alive(parts.version, &parts.headers);
    if bodiless_response(request_method, parts.status) {
        return Ok((BodyDecoder::Done, keep_alive));
    }
    if let Some(last) = parts.headers.get_all(TRANSFER_ENCODING).iter().next_back() {
        let chunked = last.as_bytes().rsplit(|&byte| byte == b',').next().is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        // With a content-length beside it, the message was framed by a sender not to be trusted
        // with the next one either (RFC 9112 §6.3 item 3).
        let reusable = keep_alive && chunked && !parts.headers.contains_key(CONTENT_LENGTH);
        let decoder = if chunked { BodyDecoder::chunked(max_trailer_bytes) } else { BodyDecoder::UntilClose };
        return Ok((decoder, reusable));
    }
    match crate::normalize::request_body_framing(parts.version, &parts.headers) {
        Ok(crate::normalize::BodyFraming::Length(length)) => Ok((BodyDecoder::length(length), keep_alive)),
        Ok(_) => Ok((BodyDecoder::UntilClose, false)),
        Err(_) => Err(HeadError::Malformed("invalid content-length")),
    }
}

/// Writes an HTTP/1.1 request line and headers; the framing headers are this hop's own.
pub(crate) fn encode_request_head(out: &mut Vec<u8>, method: &Method, uri: &Uri, headers: &HeaderMap, framing: OutgoingFraming) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(uri.path_and_query().map_or("/", |target| target.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name != TRANSFER_ENCODING && name != CONTENT_LENGTH {
            header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    framing_header_line(out, framing);
    out.extend_from_slice(b"\r\n");
}

/// The framing of a request the proxy sends upstream: its body's exact length when known, else
/// chunked; no body at all when it is known empty and the method carries none by convention
/// (a `POST`, `PUT` or `PATCH` says `content-length: 0`).
pub(crate) fn request_framing(method: &Method, exact_length: Option<u64>, body_ended: bool) -> OutgoingFraming {
    match exact_length {
        Some(0) if body_ended && !matches!(*method, Method::POST | Method::PUT | Method::PATCH) => OutgoingFraming::NoBody,
        Some(length) => OutgoingFraming::Length(length),
        None => OutgoingFraming::Chunked,
    }
}

/// Responses that never have a body (RFC 9112 §6.3 items 1-2): to a `HEAD`, 1xx, 204 and 304.
fn bodiless_response(request_method: &Method, status: StatusCode) -> bool {
    request_method == Method::HEAD || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
}

/// This hop's own framing header.
fn framing_header_line(out: &mut Vec<u8>, framing: OutgoingFraming) {
    match framing {
        OutgoingFraming::Length(length) => content_length_line(out, length),
        OutgoingFraming::Chunked => header_line(out, b"transfer-encoding", b"chunked"),
        OutgoingFraming::NoBody | OutgoingFraming::UntilClose => {}
    }
}

/// How a body the proxy writes (a response downstream, a request upstream) is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutgoingFraming {
    /// No body bytes follow the head (HEAD, 1xx, 204, 304; a request without a body); a
    /// `content-length` the upstream sent for a HEAD or 304 is passed on.
    NoBody,
    Length(u64),
    Chunked,
    /// An HTTP/1.0 client and a body of unknown length: the end of the connection ends it.
    UntilClose,
}

/// Picks the framing: what the request and status allow, then the body's exact length if it
/// is known, else chunked for HTTP/1.1 clients.
pub(crate) fn response_framing(request_method: &Method, request_version: Version, status: StatusCode, exact_length: Option<u64>) -> OutgoingFraming {
    if bodiless_response(request_method, status) {
        return OutgoingFraming::NoBody;
    }
    match exact_length {
        Some(length) => OutgoingFraming::Length(length),
        None if request_version == Version::HTTP_11 => OutgoingFraming::Chunked,
        None => OutgoingFraming::UntilClose,
    }
}

/// What the connection says about itself in a response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectionHeader {
    /// HTTP/1.1 keep-alive: nothing to say.
    Default,
    /// HTTP/1.0 keep-alive must be confirmed.
    KeepAlive,
    Close,
    /// A 101: the response's own `connection` and `upgrade` headers go out as they are.
    Upgrade,
}

/// Writes the status line and headers. Framing and connection headers are this hop's own:
/// the ones the response carries are replaced (except on a 101 and for HEAD/304 lengths).
pub(crate) fn encode_response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: OutgoingFraming,
    connection: ConnectionHeader,
    date: &[u8],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let keep_length = framing == OutgoingFraming::NoBody && !status.is_informational() && status != StatusCode::NO_CONTENT;
    let mut has_date = false;
    for (name, value) in headers {
        let own = name == TRANSFER_ENCODING
            || (name == CONTENT_LENGTH && !keep_length)
            || (name == CONNECTION && connection != ConnectionHeader::Upgrade)
            || name.as_str() == "keep-alive";
        if !own {
            header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
        has_date |= name == DATE;
    }
    if !has_date {
        header_line(out, b"date", date);
    }
    framing_header_line(out, framing);
    match connection {
        ConnectionHeader::Close => header_line(out, b"connection", b"close"),
        ConnectionHeader::KeepAlive => header_line(out, b"connection", b"keep-alive"),
        ConnectionHeader::Default | ConnectionHeader::Upgrade => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Room for a head's own lines (status or request line without its target, `date`,
/// framing, `connection`, the empty line).
const HEAD_OWN_LINES: usize = 160;

/// About how long the head encoding `headers` will be (plus the request target, for a request):
/// reserved up front so the head is not copied again while it grows.
pub(crate) fn head_size(headers: &HeaderMap) -> usize {
    HEAD_OWN_LINES + headers.iter().map(|(name, value)| name.as_str().len() + value.len() + b": \r\n".len()).sum::<usize>()
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The chunk header for `length` bytes of data.
pub(crate) fn encode_chunk_header(out: &mut Vec<u8>, length: usize) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{length:x}\r\n");
}

/// A `content-length` header line, formatted in place.
fn content_length_line(out: &mut Vec<u8>, length: u64) {
    header_line(out, b"content-length", itoa::Buffer::new().format(length).as_bytes());
}

/// The last chunk and the trailer section.
pub(crate) fn encode_last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether the response asks for the connection to close after it.
pub(crate) fn response_closes(headers: &HeaderMap) -> bool {
    connection_lists(headers, "close")
}

/// The `date` header value, formatted once per second per thread.
pub(crate) fn http_date() -> Bytes {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, Bytes)> = const { std::cell::RefCell::new((0, Bytes::new())) };
    }
    let now = std::time::SystemTime::now();
    let second = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second || cached.1.is_empty() {
            *cached = (second, Bytes::from(httpdate::fmt_http_date(now)));
        }
        cached.1.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens_come_from_every_connection_header_trimmed_and_byte_wise() {
        let mut headers = HeaderMap::new();
        headers.append(CONNECTION, HeaderValue::from_static(" Keep-Alive ,, x-trace"));
        // Not UTF-8: its ASCII tokens still count, so `close` is not missed.
        headers.append(CONNECTION, HeaderValue::from_bytes(b"close, x-\xff").unwrap());
        let tokens: Vec<&[u8]> = connection_tokens(&headers).collect();
        assert_eq!(tokens, [&b"Keep-Alive"[..], b"x-trace", b"close", b"x-\xff"]);
        assert!(response_closes(&headers) && !wants_keep_alive(Version::HTTP_11, &headers));
        assert!(connection_lists(&headers, "keep-alive"));
    }

    fn head(raw: &str) -> Result<Option<http::request::Parts>, HeadError> {
        parse_request_head(&mut BytesMut::from(raw), 1024, 101)
    }

    #[test]
    fn a_complete_head_becomes_parts_and_its_length() {
        let mut buf = BytesMut::from("GET /a?b=1 HTTP/1.1\r\nHost: x.com\r\nX-Two: 1\r\nx-two: 2\r\n\r\nNEXT");
        let wire = buf.as_ptr_range();
        let parts = parse_request_head(&mut buf, 1024, 101).unwrap().unwrap();
        let shares_the_wire = |bytes: &[u8]| wire.contains(&bytes.as_ptr());
        assert!(shares_the_wire(parts.headers["host"].as_bytes()), "header values are slices of the read buffer, not copies");
        assert!(shares_the_wire(parts.uri.path().as_bytes()), "so is the target");
        assert_eq!((parts.method, parts.version), (Method::GET, Version::HTTP_11));
        assert_eq!(parts.uri, "/a?b=1");
        assert_eq!(parts.headers["host"], "x.com");
        assert_eq!(parts.headers.get_all("x-two").iter().count(), 2);
        assert_eq!(&buf[..], b"NEXT", "the head is taken off the buffer, the next bytes stay");
        let parts = head("POST http://x.com/p HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!((parts.uri.host(), parts.version), (Some("x.com"), Version::HTTP_10));
    }

    #[test]
    fn heads_are_incomplete_until_the_empty_line_and_bounded_meanwhile() {
        assert!(matches!(head("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)));
        let long = format!("GET / HTTP/1.1\r\nx-big: {}", "v".repeat(2000));
        assert_eq!(head(&long).unwrap_err(), HeadError::TooLarge);
        let complete_but_long = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "v".repeat(2000));
        assert_eq!(head(&complete_but_long).unwrap_err(), HeadError::TooLarge);
        let many: String = (0..200).map(|i| format!("x-{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_request_head(&mut BytesMut::from(many.as_str()), 1 << 20, 101).unwrap_err(), HeadError::TooLarge);
        assert_eq!(parse_request_head(&mut BytesMut::from(many.as_str()), 1 << 20, 200).unwrap().unwrap().headers.len(), 200, "past the stack slots");
    }

    #[test]
    fn malformed_heads_are_refused() {
        // (A bare LF ending a head line is accepted, RFC 9112 §2.2; the head is re-serialized
        // with CRLF for the upstream, so no backend sees it.)
        for raw in [
            "GET / HTTP/2.0\r\n\r\n",                 // not HTTP/1.x
            "GET /a b HTTP/1.1\r\n\r\n",              // space in the target
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",     // space before the colon
            "GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n",   // obsolete line folding
            "GET / HTTP/1.1\r\nx: a\0b\r\n\r\n",      // NUL in a value
            "G\u{1}T / HTTP/1.1\r\n\r\n",             // control byte in the method
        ] {
            assert!(matches!(head(raw), Err(HeadError::Malformed(_))), "{raw:?}: {:?}", head(raw));
        }
    }

    #[test]
    fn keep_alive_follows_the_version_default_and_the_connection_header() {
        let headers = |value: &str| {
            let mut map = HeaderMap::new();
            map.insert(CONNECTION, HeaderValue::from_str(value).unwrap());
            map
        };
        assert!(wants_keep_alive(Version::HTTP_11, &HeaderMap::new()));
        assert!(!wants_keep_alive(Version::HTTP_11, &headers("foo, Close")));
        assert!(!wants_keep_alive(Version::HTTP_10, &HeaderMap::new()));
        assert!(wants_keep_alive(Version::HTTP_10, &headers("Keep-Alive")));
    }

    fn decode_all(decoder: &mut BodyDecoder, wire: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, BytesMut), BodyDecodeError> {
        let mut buf = BytesMut::from(wire);
        let (mut data, mut trailers) = (Vec::new(), None);
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                Decoded::Trailers(map) => trailers = Some(map),
                Decoded::End => return Ok((data, trailers, buf)),
                Decoded::NeedMore => panic!("incomplete: {buf:?}"),
            }
        }
    }

    #[test]
    fn content_length_bodies_stop_at_their_length() {
        let mut decoder = BodyDecoder::length(5);
        let (data, _, rest) = decode_all(&mut decoder, b"helloGET /next").unwrap();
        assert_eq!((&data[..], &rest[..]), (&b"hello"[..], &b"GET /next"[..]));
        assert!(BodyDecoder::length(0).is_done());
    }

    #[test]
    fn chunked_bodies_with_extensions_and_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n6 ; name\r\n world\r\n0\r\nx-sum: 1\r\n\r\nNEXT";
        let (data, trailers, rest) = decode_all(&mut BodyDecoder::chunked(1024), wire).unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.unwrap()["x-sum"], "1");
        assert_eq!(&rest[..], b"NEXT");
        let (data, trailers, _) = decode_all(&mut BodyDecoder::chunked(1024), b"A\r\n0123456789\r\n0\r\n\r\n").unwrap();
        assert_eq!((data.len(), trailers), (10, None));
    }

    #[test]
    fn chunked_bodies_arrive_in_pieces() {
        let wire = b"5\r\nhello\r\n0\r\n\r\n";
        let mut decoder = BodyDecoder::chunked(1024);
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for &byte in wire {
            buf.extend_from_slice(&[byte]);
            loop {
                match decoder.decode(&mut buf).unwrap() {
                    Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                    Decoded::NeedMore => break,
                    Decoded::End => break,
                    Decoded::Trailers(_) => unreachable!("no trailers sent"),
                }
            }
        }
        assert_eq!(data, b"hello");
        assert!(decoder.is_done());
    }

    #[test]
    fn malformed_chunked_framing_is_refused() {
        for wire in [
            &b"5\nhello\r\n0\r\n\r\n"[..],         // bare LF after the size
            b"+5\r\nhello\r\n0\r\n\r\n",           // sign
            b"5 5\r\nhello\r\n0\r\n\r\n",          // space inside the size
            b"0x5\r\nhello\r\n0\r\n\r\n",          // prefix
            b"11111111111111111\r\n",              // more than 64 bits
            b"5\r\nhelloXX0\r\n\r\n",              // data longer than its size
            b"\r\n",                                // no size at all
        ] {
            let mut buf = BytesMut::from(wire);
            let mut decoder = BodyDecoder::chunked(1024);
            let failed = loop {
                match decoder.decode(&mut buf) {
                    Err(_) => break true,
                    Ok(Decoded::End | Decoded::NeedMore) => break false,
                    Ok(_) => {}
                }
            };
            assert!(failed, "{:?}", String::from_utf8_lossy(wire));
        }
        let oversized = format!("0\r\nx-big: {}\r\n\r\n", "v".repeat(100));
        assert_eq!(decode_all(&mut BodyDecoder::chunked(64), oversized.as_bytes()).unwrap_err(), BodyDecodeError::Trailers);
    }

    #[test]
    fn upstream_response_bodies_end_by_length_chunks_or_close() {
        let parse = |raw: &str| parse_response_head(&mut BytesMut::from(raw), 4096).unwrap().unwrap();
        let body = |method: Method, raw: &str| {
            let (decoder, reusable) = response_body(&method, &parse(raw), 1024).unwrap();
            (format!("{decoder:?}"), reusable)
        };
        assert_eq!(body(Method::GET, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"), ("Length { remaining: 5 }".into(), true));
        assert!(body(Method::GET, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").1);
        assert_eq!(body(Method::GET, "HTTP/1.1 200 OK\r\n\r\n"), ("UntilClose".into(), false));
        assert_eq!(body(Method::GET, "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"), ("UntilClose".into(), false));
        assert!(!body(Method::GET, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n").1);
        assert!(!body(Method::GET, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n").1);
        assert!(!body(Method::GET, "HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n").1);
        assert_eq!(body(Method::HEAD, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"), ("Done".into(), true));
        assert_eq!(body(Method::GET, "HTTP/1.1 304 Not Modified\r\n\r\n"), ("Done".into(), true));
        assert!(response_body(&Method::GET, &parse("HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n"), 1024).is_err());
        let mut partial = BytesMut::from("HTTP/1.1 200 OK\r\n");
        assert!(matches!(parse_response_head(&mut partial, 4096), Ok(None)));
        assert_eq!(&partial[..], b"HTTP/1.1 200 OK\r\n", "an incomplete head stays in the buffer");
        assert!(parse_response_head(&mut BytesMut::from("HTTP/1.1 2000 OK\r\n\r\n"), 4096).is_err());
        let mut rest = BytesMut::from(&b"all of it"[..]);
        assert_eq!(BodyDecoder::UntilClose.decode(&mut rest).unwrap(), Decoded::Data(Bytes::from_static(b"all of it")));
    }

    #[test]
    fn request_heads_carry_this_hops_framing() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("a"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("3"));
        let mut out = Vec::new();
        encode_request_head(&mut out, &Method::POST, &Uri::from_static("/p?q=1"), &headers, OutgoingFraming::Chunked);
        assert_eq!(String::from_utf8(out).unwrap(), "POST /p?q=1 HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n");
    }

    #[test]
    fn response_framing_follows_method_status_and_length() {
        let get = |status: u16, length: Option<u64>, version: Version| {
            response_framing(&Method::GET, version, StatusCode::from_u16(status).unwrap(), length)
        };
        assert_eq!(get(200, Some(3), Version::HTTP_11), OutgoingFraming::Length(3));
        assert_eq!(get(200, None, Version::HTTP_11), OutgoingFraming::Chunked);
        assert_eq!(get(200, None, Version::HTTP_10), OutgoingFraming::UntilClose);
        assert_eq!(get(204, None, Version::HTTP_11), OutgoingFraming::NoBody);
        assert_eq!(get(304, Some(10), Version::HTTP_11), OutgoingFraming::NoBody);
        assert_eq!(response_framing(&Method::HEAD, Version::HTTP_11, StatusCode::OK, Some(10)), OutgoingFraming::NoBody);
    }

    #[test]
    fn request_framing_follows_the_body_and_the_method() {
        assert_eq!(request_framing(&Method::GET, Some(0), true), OutgoingFraming::NoBody);
        assert_eq!(request_framing(&Method::POST, Some(0), true), OutgoingFraming::Length(0), "POST says content-length: 0");
        assert_eq!(request_framing(&Method::GET, Some(0), false), OutgoingFraming::Length(0));
        assert_eq!(request_framing(&Method::PUT, Some(5), false), OutgoingFraming::Length(5));
        assert_eq!(request_framing(&Method::POST, None, false), OutgoingFraming::Chunked);
    }

    #[test]
    fn response_heads_carry_this_hops_framing_and_connection_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        let mut out = Vec::new();
        encode_response_head(&mut out, StatusCode::OK, &headers, OutgoingFraming::Length(2), ConnectionHeader::Close, b"D");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: D\r\ncontent-length: 2\r\nconnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_response_head(&mut out, StatusCode::OK, &headers, OutgoingFraming::NoBody, ConnectionHeader::Default, b"D");
        assert!(String::from_utf8(out).unwrap().contains("content-length: 999\r\n"), "HEAD keeps the length");
        let mut out = Vec::new();
        encode_last_chunk(&mut out, Some(&headers));
        assert!(out.starts_with(b"0\r\nx-a: 1\r\n") && out.ends_with(b"\r\n\r\n"));
        let mut header = Vec::new();
        encode_chunk_header(&mut header, 255);
        assert_eq!(header, b"ff\r\n");
    }
}
