//! The canonical request head (accept -> **normalize** -> authorize -> route): what policy, routing and the backend all see.

use std::borrow::Cow;

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
    /// Moved here from the request by normalization. Routing and policy read them; the first
    /// upstream attempt takes them when no retry can follow it (`retry::may_follow`).
    pub headers: http::HeaderMap,
    pub version: http::Version,
}

/// sluice listeners speak plaintext HTTP in this issue, so `:scheme` matchers see `http` for
/// every request, whatever scheme an absolute-form target claimed.
const SCHEME: &str = "http";

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

    /// The value a header matcher sees: every value of `name` joined with `,` (Envoy's rule, so
    /// a repeated header cannot hide a value from a matcher), or the pseudo-headers
    /// `:authority`, `:method`, `:path` (query included) and `:scheme`. `name` is lower-case.
    /// Bytes that are not UTF-8 become U+FFFD, which no ASCII pattern matches.
    pub fn header_value(&self, name: &str) -> Option<Cow<'_, str>> {
        match name {
            ":authority" | "host" => Some(Cow::Borrowed(&self.authority)),
            ":method" => Some(Cow::Borrowed(self.method.as_str())),
            ":path" => Some(Cow::Borrowed(&self.path_and_query)),
            ":scheme" => Some(Cow::Borrowed(SCHEME)),
            _ => {
                let mut values = self.headers.get_all(name).iter();
                let first = String::from_utf8_lossy(values.next()?.as_bytes());
                let mut joined = first;
                for value in values {
                    let joined = joined.to_mut();
                    joined.push(',');
                    joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
                }
                Some(joined)
            }
        }
    }
}

/// A request head as `normalize_request` would produce it, for unit tests of the decisions.
#[cfg(test)]
pub(crate) fn test_head(method: &str, path_and_query: &str, authority: &str, headers: &[(&str, &str)]) -> RequestHead {
    let mut map = http::HeaderMap::new();
    for (name, value) in headers {
        map.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    RequestHead {
        method: http::Method::from_bytes(method.as_bytes()).unwrap(),
        path_and_query: path_and_query.to_owned(),
        authority: authority.to_owned(),
        headers: map,
        version: http::Version::HTTP_11,
    }
}

#[cfg(test)]
mod tests {
    use crate::request::test_head as head;

    #[test]
    fn path_and_query_split_at_the_first_question_mark() {
        let request = head("GET", "/a/b?x=1?y", "h", &[]);
        assert_eq!(request.path(), "/a/b");
        assert_eq!(request.query(), Some("x=1?y"));
        let request = head("GET", "/a", "h", &[]);
        assert_eq!((request.path(), request.query()), ("/a", None));
    }

    #[test]
    fn repeated_headers_are_joined_with_commas() {
        let request = head("GET", "/", "h", &[("x-role", "user"), ("x-role", "admin"), ("y", "1")]);
        assert_eq!(request.header_value("x-role").as_deref(), Some("user,admin"));
        assert_eq!(request.header_value("y").as_deref(), Some("1"));
        assert_eq!(request.header_value("z"), None);
        assert_eq!(request.header_value(":path").as_deref(), Some("/"));
        assert_eq!(request.header_value(":authority").as_deref(), Some("h"));
        assert_eq!(request.header_value(":method").as_deref(), Some("GET"));
    }
}

