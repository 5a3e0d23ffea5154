//! Route decisions (authorize -> **route** -> split -> forward): virtual host, route, weighted cluster, rewrites.

use crate::request::RequestHead;
use crate::tables::{
    HeaderMatchRule, HeaderMatcher, PathMatch, PathRewrite, QueryParameterMatcher, RedirectAction, Route, RouteConfig,
    RouteMatch, StringMatcher, VirtualHost, WeightedCluster,
};

/// The virtual host and route a request matched.
#[derive(Debug, Clone, Copy)]
pub struct RouteSelection<'a> {
    pub virtual_host: &'a VirtualHost,
    pub route: &'a Route,
}

/// Envoy's lookup: the virtual host by `:authority`, then the first route of it that matches.
/// `None` means 404 (`no_route`), whether no virtual host or no route matched.
pub fn select_route<'a>(config: &'a RouteConfig, request: &RequestHead) -> Option<RouteSelection<'a>> {
    let virtual_host = select_virtual_host(&config.virtual_hosts, &request.authority)?;
    let route = virtual_host.routes.iter().find(|route| route_matches(&route.matcher, request))?;
    Some(RouteSelection { virtual_host, route })
}

/// How well a domain matched, ordered worst to best: `*`, then prefix wildcards, then suffix
/// wildcards (longer literal part wins within each), then exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum DomainMatch {
    Any,
    Prefix(usize),
    Suffix(usize),
    Exact,
}

fn domain_match(domain: &str, host: &str) -> Option<DomainMatch> {
    if domain == "*" {
        return Some(DomainMatch::Any);
    }
    // A wildcard never matches the empty string, hence the strict length comparisons.
    if let Some(suffix) = domain.strip_prefix('*') {
        let matched = host.len() > suffix.len() && ends_with_ignore_case(host, suffix);
        return matched.then_some(DomainMatch::Suffix(suffix.len()));
    }
    if let Some(prefix) = domain.strip_suffix('*') {
        let matched = host.len() > prefix.len() && starts_with_ignore_case(host, prefix);
        return matched.then_some(DomainMatch::Prefix(prefix.len()));
    }
    domain.eq_ignore_ascii_case(host).then_some(DomainMatch::Exact)
}

/// The port stays part of the host: `foo.com:8080` matches only domains that carry the port,
/// or wildcards, as in Envoy without `ignore_port_in_host_matching`.
fn select_virtual_host<'a>(virtual_hosts: &'a [VirtualHost], host: &str) -> Option<&'a VirtualHost> {
    let mut best: Option<(DomainMatch, &VirtualHost)> = None;
    for virtual_host in virtual_hosts {
        for domain in &virtual_host.domains {
            let Some(quality) = domain_match(domain, host) else { continue };
            if quality == DomainMatch::Exact {
                return Some(virtual_host);
            }
            if best.is_none_or(|(best_quality, _)| quality > best_quality) {
                best = Some((quality, virtual_host));
            }
        }
    }
    best.map(|(_, virtual_host)| virtual_host)
}

fn starts_with_ignore_case(value: &str, prefix: &str) -> bool {
    value.as_bytes().get(..prefix.len()).is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

fn ends_with_ignore_case(value: &str, suffix: &str) -> bool {
    value.len() >= suffix.len()
        && value.as_bytes()[value.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

fn starts_with_cased(value: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        value.starts_with(prefix)
    } else {
        starts_with_ignore_case(value, prefix)
    }
}

fn path_matches(matcher: &RouteMatch, request: &RequestHead) -> bool {
    let case_sensitive = matcher.case_sensitive;
    match &matcher.path {
        PathMatch::Prefix(prefix) => starts_with_cased(&request.path_and_query, prefix, case_sensitive),
        PathMatch::Exact(path) if case_sensitive => request.path() == path,
        PathMatch::Exact(path) => request.path().eq_ignore_ascii_case(path),
        PathMatch::Regex(regex) => regex.is_match(request.path()),
        PathMatch::PathSeparatedPrefix(prefix) => {
            let path_and_query = &request.path_and_query;
            starts_with_cased(path_and_query, prefix, case_sensitive)
                && matches!(path_and_query.as_bytes().get(prefix.len()), None | Some(b'/') | Some(b'?'))
        }
    }
}

fn route_matches(matcher: &RouteMatch, request: &RequestHead) -> bool {
    path_matches(matcher, request)
        && matcher.headers.iter().all(|header| header_matches(header, request))
        && matcher.query_parameters.iter().all(|parameter| query_parameter_matches(parameter, request.query()))
}

/// Envoy's HeaderMatcher: on a missing header only a presence rule can match (unless
/// `treat_missing_as_empty`); `invert` flips the result of a header that was looked at.
pub(crate) fn header_matches(matcher: &HeaderMatcher, request: &RequestHead) -> bool {
    let value = request.header_value(&matcher.name);
    let value = match value {
        Some(value) => Some(value),
        None if matcher.treat_missing_as_empty => Some("".into()),
        None => None,
    };
    let raw = match (&matcher.rule, value) {
        (HeaderMatchRule::Present(present), value) => value.is_some() == *present,
        (_, None) => return false,
        (HeaderMatchRule::String(string), Some(value)) => string_matches(string, &value),
        (HeaderMatchRule::Range { start, end }, Some(value)) => {
            value.parse::<i64>().is_ok_and(|number| (*start..*end).contains(&number))
        }
    };
    raw != matcher.invert
}

pub(crate) fn string_matches(matcher: &StringMatcher, value: &str) -> bool {
    match matcher {
        StringMatcher::Exact { value: expected, ignore_case: false } => value == expected,
        StringMatcher::Exact { value: expected, ignore_case: true } => value.eq_ignore_ascii_case(expected),
        StringMatcher::Prefix { value: prefix, ignore_case } => starts_with_cased(value, prefix, !ignore_case),
        StringMatcher::Suffix { value: suffix, ignore_case: false } => value.ends_with(suffix.as_str()),
        StringMatcher::Suffix { value: suffix, ignore_case: true } => ends_with_ignore_case(value, suffix),
        StringMatcher::Contains { value: needle, ignore_case: false } => value.contains(needle.as_str()),
        StringMatcher::Contains { value: needle, ignore_case: true } => {
            value.to_ascii_lowercase().contains(&needle.to_ascii_lowercase())
        }
        StringMatcher::Regex(regex) => regex.is_match(value),
    }
}

/// Only the first occurrence of a key counts; `k` without `=` has the empty value. Keys and
/// values are percent-decoded before matching, as Envoy's `parseAndDecodeQueryString` does.
fn query_parameter_matches(matcher: &QueryParameterMatcher, query: Option<&str>) -> bool {
    let first_value = query.into_iter().flat_map(|query| query.split('&')).find_map(|item| {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        (percent_decode(key) == matcher.name).then(|| percent_decode(value))
    });
    match (first_value, &matcher.value) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(value), Some(string)) => string_matches(string, &value),
    }
}

fn percent_decode(text: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy()
}

/// Envoy's weighted pick: `random mod sum(weights)` falls into one interval, in list order;
/// weight-0 entries have an empty interval and are never picked.
pub fn pick_weighted_cluster(clusters: &[WeightedCluster], random: u64) -> Option<&WeightedCluster> {
    let total: u64 = clusters.iter().map(|cluster| u64::from(cluster.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = random % total;
    for cluster in clusters {
        let weight = u64::from(cluster.weight);
        if point < weight {
            return Some(cluster);
        }
        point -= weight;
    }
    None
}

/// How many leading bytes of `path_and_query` the route's path matcher consumed: the prefix
/// for prefix matchers, the whole path (query excluded) for exact and regex matchers.
fn matched_len(route: &Route, path_and_query: &str) -> usize {
    let path_len = path_and_query.find('?').unwrap_or(path_and_query.len());
    match &route.matcher.path {
        PathMatch::Prefix(prefix) | PathMatch::PathSeparatedPrefix(prefix) => prefix.len().min(path_and_query.len()),
        PathMatch::Exact(_) | PathMatch::Regex(_) => path_len,
    }
}

/// Swaps the part of `path_and_query` the route matched for `replacement`; the rest (and the
/// query) is kept, so `prefix "/prefix"` + `"/"` turns `/prefix/etc` into `//etc` as in Envoy.
fn swap_matched(route: &Route, replacement: &str, path_and_query: &str) -> String {
    let matched = matched_len(route, path_and_query);
    let rest = path_and_query.get(matched..).unwrap_or_default();
    let rewritten = format!("{replacement}{rest}");
    if rewritten.is_empty() || rewritten.starts_with('?') {
        // An empty request target is invalid on the wire; Envoy's upstream codec sends `/`.
        format!("/{rewritten}")
    } else {
        rewritten
    }
}

/// New path_and_query after a route's rewrite (query preserved per Envoy). `route` must be the
/// route that matched `path_and_query`. Regex substitutions use RE2 syntax (`\1`), as in
/// Envoy's `regex_rewrite.substitution`.
pub fn rewrite_path(route: &Route, rewrite: &PathRewrite, path_and_query: &str) -> String {
    match rewrite {
        PathRewrite::Prefix(replacement) => swap_matched(route, replacement, path_and_query),
        PathRewrite::Regex { pattern, substitution } => {
            let (path, query) = match path_and_query.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (path_and_query, None),
            };
            let mut rewritten = replace_all_re2(pattern, path, substitution);
            if let Some(query) = query {
                rewritten.push('?');
                rewritten.push_str(query);
            }
            rewritten
        }
    }
}

/// RE2's `GlobalReplace`: `\0`..`\9` insert capture groups, `\\` a backslash; everything else
/// (including `$`) is literal.
fn replace_all_re2(pattern: &regex::Regex, text: &str, substitution: &str) -> String {
    let mut out = String::with_capacity(text.len() + substitution.len());
    let mut last = 0;
    for captures in pattern.captures_iter(text) {
        let Some(whole) = captures.get(0) else { continue };
        out.push_str(&text[last..whole.start()]);
        let mut chars = substitution.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some(digit @ '0'..='9') => {
                    let group = digit as usize - '0' as usize;
                    out.push_str(captures.get(group).map_or("", |m| m.as_str()));
                }
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        }
        last = whole.end();
    }
    out.push_str(&text[last..]);
    out
}

fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    // `[v6]:port` keeps its brackets; a bare colon-less host has no port.
    match authority.rfind(':') {
        Some(colon) if !authority[colon..].contains(']') => (&authority[..colon], Some(&authority[colon + 1..])),
        _ => (authority, None),
    }
}

/// The `location` of a redirect route. `scheme` is the request's scheme (`http` on sluice's
/// plaintext listeners). `route` is needed because `prefix_rewrite` swaps the prefix that route
/// matched. A default port for the final scheme is left out, as Envoy does.
pub fn redirect_location(route: &Route, redirect: &RedirectAction, request: &RequestHead, scheme: &str) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(scheme);
    let (request_host, request_port) = split_host_port(&request.authority);
    let (host, port) = match &redirect.host {
        Some(host) => (host.as_str(), None),
        None => (request_host, request_port),
    };
    let port = redirect.port.map(|port| port.to_string()).or(port.map(str::to_owned));
    let default_port = match scheme {
        "http" => Some("80"),
        "https" => Some("443"),
        _ => None,
    };
    let port = port.filter(|port| Some(port.as_str()) != default_port);

    let mut path_and_query = match (&redirect.path, &redirect.prefix_rewrite) {
        // A `path_redirect` with its own query replaces the request's query too.
        (Some(path), _) if path.contains('?') => path.clone(),
        (Some(path), _) => match request.query() {
            Some(query) => format!("{path}?{query}"),
            None => path.clone(),
        },
        (None, Some(prefix)) => swap_matched(route, prefix, &request.path_and_query),
        (None, None) => request.path_and_query.clone(),
    };
    if redirect.strip_query {
        if let Some(question) = path_and_query.find('?') {
            path_and_query.truncate(question);
        }
    }
    match port {
        Some(port) => format!("{scheme}://{host}:{port}{path_and_query}"),
        None => format!("{scheme}://{host}{path_and_query}"),
    }
}

#[cfg(test)]
mod tests {
    use regex::Regex;

    use super::*;
    use crate::request::test_head as head;
    use crate::tables::RouteAction;

    fn route(name: &str, path: PathMatch) -> Route {
        Route {
            name: name.to_owned(),
            matcher: RouteMatch { path, case_sensitive: true, headers: Vec::new(), query_parameters: Vec::new() },
            action: RouteAction::DirectResponse { status: 200, body: bytes::Bytes::new() },
        }
    }

    fn prefix(name: &str, value: &str) -> Route {
        route(name, PathMatch::Prefix(value.to_owned()))
    }

    fn virtual_host(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
        VirtualHost {
            name: name.to_owned(),
            domains: domains.iter().map(|domain| (*domain).to_owned()).collect(),
            routes,
            retry_policy: None,
            request_body_buffer_limit: 1 << 20,
            include_request_attempt_count: false,
        }
    }

    fn config(virtual_hosts: Vec<VirtualHost>) -> RouteConfig {
        RouteConfig {
            name: "rc".to_owned(),
            virtual_hosts,
            request_headers_to_add: Vec::new(),
            request_headers_to_remove: Vec::new(),
            response_headers_to_add: Vec::new(),
            response_headers_to_remove: Vec::new(),
        }
    }

    /// Virtual hosts that each route everything; the name of the chosen one identifies it.
    fn hosts(domains: &[(&str, &[&str])]) -> RouteConfig {
        config(domains.iter().map(|(name, domains)| virtual_host(name, domains, vec![prefix(name, "/")])).collect())
    }

    fn vhost_for(config: &RouteConfig, authority: &str) -> Option<String> {
        select_route(config, &head("GET", "/", authority, &[])).map(|selection| selection.virtual_host.name.clone())
    }

    /// The name of the route chosen within a single catch-all virtual host.
    fn route_for(routes: Vec<Route>, request: &RequestHead) -> Option<String> {
        let config = config(vec![virtual_host("vh", &["*"], routes)]);
        select_route(&config, request).map(|selection| selection.route.name.clone())
    }

    fn get(path_and_query: &str) -> RequestHead {
        head("GET", path_and_query, "h", &[])
    }

    #[test]
    fn exact_domain_beats_wildcards_and_hosts_compare_case_insensitively() {
        let config = hosts(&[("a", &["foo.com"]), ("b", &["*.foo.com"]), ("c", &["*"])]);
        assert_eq!(vhost_for(&config, "FOO.com").as_deref(), Some("a"));
        assert_eq!(vhost_for(&config, "x.foo.com").as_deref(), Some("b"));
        assert_eq!(vhost_for(&config, ".foo.com").as_deref(), Some("c"), "a wildcard never matches empty");
        // select_route does not strip the dot; normalize_request does, before routing.
        assert_eq!(vhost_for(&config, "foo.com.").as_deref(), Some("c"));
    }

    #[test]
    fn longest_suffix_wildcard_wins() {
        let config = hosts(&[("short", &["*.foo.com"]), ("long", &["*-bar.foo.com"])]);
        assert_eq!(vhost_for(&config, "baz-bar.foo.com").as_deref(), Some("long"));
        assert_eq!(vhost_for(&config, "-bar.foo.com").as_deref(), Some("short"));
    }

    #[test]
    fn suffix_wildcard_beats_prefix_wildcard_beats_any() {
        let config = hosts(&[("any", &["*"]), ("prefix", &["foo.*"]), ("suffix", &["*.example"])]);
        assert_eq!(vhost_for(&config, "foo.example").as_deref(), Some("suffix"));
        assert_eq!(vhost_for(&config, "foo.other").as_deref(), Some("prefix"));
        assert_eq!(vhost_for(&config, "bar.other").as_deref(), Some("any"));
        let longer_prefix = hosts(&[("short", &["foo.*"]), ("long", &["foo.bar.*"])]);
        assert_eq!(vhost_for(&longer_prefix, "foo.bar.baz").as_deref(), Some("long"));
    }

    #[test]
    fn the_port_is_part_of_the_host() {
        let config = hosts(&[("a", &["foo.com"])]);
        assert_eq!(vhost_for(&config, "foo.com:8080"), None);
        let with_port = hosts(&[("a", &["foo.com"]), ("p", &["foo.com:8080"])]);
        assert_eq!(vhost_for(&with_port, "foo.com:8080").as_deref(), Some("p"));
    }

    #[test]
    fn prefix_covers_the_query_and_routes_go_in_order() {
        let routes = || vec![prefix("api", "/api"), prefix("rest", "/")];
        assert_eq!(route_for(routes(), &get("/apis")).as_deref(), Some("api"));
        assert_eq!(route_for(routes(), &get("/api?x=1")).as_deref(), Some("api"));
        assert_eq!(route_for(routes(), &get("/other")).as_deref(), Some("rest"));
        assert_eq!(route_for(vec![prefix("q", "/foo?x")], &get("/foo?x=1")).as_deref(), Some("q"));
        let first_wins = vec![prefix("root", "/"), prefix("admin", "/admin")];
        assert_eq!(route_for(first_wins, &get("/admin")).as_deref(), Some("root"));
    }

    #[test]
    fn path_separated_prefix_needs_a_separator() {
        let routes = || vec![route("sep", PathMatch::PathSeparatedPrefix("/api".to_owned()))];
        for hit in ["/api", "/api/", "/api/v1", "/api?x"] {
            assert_eq!(route_for(routes(), &get(hit)).as_deref(), Some("sep"), "{hit}");
        }
        assert_eq!(route_for(routes(), &get("/apis")), None);
    }

    #[test]
    fn exact_path_ignores_the_query_and_honours_case_sensitivity() {
        let exact = || route("exact", PathMatch::Exact("/foo".to_owned()));
        assert_eq!(route_for(vec![exact()], &get("/foo?bar=1")).as_deref(), Some("exact"));
        assert_eq!(route_for(vec![exact()], &get("/foo/")), None);
        assert_eq!(route_for(vec![exact()], &get("/FOO")), None);
        let mut insensitive = exact();
        insensitive.matcher.case_sensitive = false;
        assert_eq!(route_for(vec![insensitive], &get("/FOO")).as_deref(), Some("exact"));
        let mut insensitive_prefix = prefix("p", "/Api");
        insensitive_prefix.matcher.case_sensitive = false;
        assert_eq!(route_for(vec![insensitive_prefix], &get("/aPi/x")).as_deref(), Some("p"));
    }

    #[test]
    fn regex_is_a_full_match_on_the_path_without_query() {
        let routes = || vec![route("re", PathMatch::Regex(Regex::new("^(?:/v[0-9]+/items)$").unwrap()))];
        assert_eq!(route_for(routes(), &get("/v2/items")).as_deref(), Some("re"));
        assert_eq!(route_for(routes(), &get("/v2/items/3")), None);
        assert_eq!(route_for(routes(), &get("/v2/items?q=1")).as_deref(), Some("re"));
    }

    fn header(name: &str, rule: HeaderMatchRule, invert: bool, treat_missing_as_empty: bool) -> HeaderMatcher {
        HeaderMatcher { name: name.to_owned(), rule, invert, treat_missing_as_empty }
    }

    fn exact(value: &str, ignore_case: bool) -> HeaderMatchRule {
        HeaderMatchRule::String(StringMatcher::Exact { value: value.to_owned(), ignore_case })
    }

    fn matches_with(matcher: HeaderMatcher, headers: &[(&str, &str)]) -> bool {
        header_matches(&matcher, &head("GET", "/", "h", headers))
    }

    #[test]
    fn repeated_headers_are_matched_joined() {
        let env = || header("x-env", exact("prod", false), false, false);
        assert!(!matches_with(env(), &[("x-env", "prod"), ("x-env", "dev")]));
        assert!(matches_with(env(), &[("x-env", "prod")]));
    }

    #[test]
    fn missing_headers_follow_envoy_rules() {
        assert!(matches_with(header("x-a", HeaderMatchRule::Present(false), false, false), &[]));
        assert!(!matches_with(header("x-a", HeaderMatchRule::Present(true), false, false), &[]));
        assert!(matches_with(header("x-a", HeaderMatchRule::Present(true), true, false), &[]));
        assert!(!matches_with(header("x-a", exact("v", false), true, false), &[]), "inverted non-presence on missing");
        assert!(matches_with(header("x-a", exact("v", false), true, true), &[]), "missing as empty, inverted");
        assert!(matches_with(header("x-a", exact("", false), false, true), &[]));
        assert!(matches_with(header("x-a", exact("v", false), true, false), &[("x-a", "w")]));
    }

    #[test]
    fn string_and_range_matchers() {
        assert!(matches_with(header("x-a", exact("ABC", true), false, false), &[("x-a", "abc")]));
        assert!(!matches_with(header("x-a", exact("ABC", false), false, false), &[("x-a", "abc")]));
        let range = || header("x-n", HeaderMatchRule::Range { start: -10, end: 0 }, false, false);
        assert!(matches_with(range(), &[("x-n", "-1")]));
        for miss in ["0", "10.9", "-1abc", ""] {
            assert!(!matches_with(range(), &[("x-n", miss)]), "{miss:?}");
        }
        let string = |matcher: StringMatcher, value: &str| string_matches(&matcher, value);
        assert!(string(StringMatcher::Suffix { value: "BAR".into(), ignore_case: true }, "foobar"));
        assert!(string(StringMatcher::Contains { value: "OB".into(), ignore_case: true }, "foobar"));
        assert!(!string(StringMatcher::Contains { value: "OB".into(), ignore_case: false }, "foobar"));
        assert!(string(StringMatcher::Prefix { value: "foo".into(), ignore_case: false }, "foobar"));
        assert!(!string(StringMatcher::Regex(Regex::new("^(?:fo+)$").unwrap()), "foobar"));
    }

    #[test]
    fn pseudo_header_matchers_see_the_canonical_head() {
        let path = header(":path", exact("/public", false), false, false);
        assert!(!header_matches(&path, &head("GET", "/public?x=1", "h", &[])), ":path includes the query");
        let method = header(":method", exact("POST", false), false, false);
        assert!(header_matches(&method, &head("POST", "/", "h", &[])));
    }

    #[test]
    fn query_parameters_use_the_first_value() {
        let debug = |query: &str| {
            let mut matched = prefix("q", "/");
            matched.matcher.query_parameters = vec![QueryParameterMatcher {
                name: "debug".to_owned(),
                value: Some(StringMatcher::Exact { value: "1".to_owned(), ignore_case: false }),
            }];
            route_for(vec![matched], &get(query)).is_some()
        };
        assert!(debug("/?debug=1&debug=2"));
        assert!(!debug("/?debug=2&debug=1"));
        assert!(!debug("/"));
        assert!(debug("/?a=b&%64ebug=%31"), "keys and values are percent-decoded");
        let mut present = prefix("q", "/");
        present.matcher.query_parameters = vec![QueryParameterMatcher { name: "q".to_owned(), value: None }];
        assert!(route_for(vec![present.clone()], &get("/?q")).is_some());
        assert!(route_for(vec![present], &get("/?qq=1")).is_none());
    }

    fn weighted(weights: &[(&str, u32)]) -> Vec<WeightedCluster> {
        weights.iter().map(|(name, weight)| WeightedCluster { name: (*name).to_owned(), weight: *weight }).collect()
    }

    #[test]
    fn weighted_pick_walks_intervals_in_list_order() {
        let zero_first = weighted(&[("a", 0), ("b", 100)]);
        for random in [0, 1, 99, 100, u64::MAX] {
            assert_eq!(pick_weighted_cluster(&zero_first, random).map(|c| c.name.as_str()), Some("b"));
        }
        let split = weighted(&[("a", 1), ("b", 3)]);
        for random in 0..16u64 {
            let expected = if random % 4 == 0 { "a" } else { "b" };
            assert_eq!(pick_weighted_cluster(&split, random).map(|c| c.name.as_str()), Some(expected));
        }
        assert!(pick_weighted_cluster(&weighted(&[("a", 0)]), 7).is_none());
        assert!(pick_weighted_cluster(&[], 7).is_none());
        let huge = weighted(&[("a", u32::MAX), ("b", u32::MAX)]);
        assert_eq!(pick_weighted_cluster(&huge, u64::from(u32::MAX)).map(|c| c.name.as_str()), Some("b"));
    }

    #[test]
    fn prefix_rewrite_swaps_the_matched_prefix_and_keeps_the_query() {
        let rewrite = PathRewrite::Prefix("/".to_owned());
        assert_eq!(rewrite_path(&prefix("p", "/prefix/"), &rewrite, "/prefix/etc?x=1"), "/etc?x=1");
        assert_eq!(rewrite_path(&prefix("p", "/prefix"), &rewrite, "/prefix/etc"), "//etc");
        let exact = route("e", PathMatch::Exact("/old".to_owned()));
        assert_eq!(rewrite_path(&exact, &PathRewrite::Prefix("/new".to_owned()), "/old?a=1"), "/new?a=1");
        let to_empty = PathRewrite::Prefix(String::new());
        assert_eq!(rewrite_path(&prefix("p", "/x"), &to_empty, "/x?q"), "/?q");
    }

    #[test]
    fn regex_rewrite_uses_re2_substitutions_on_the_path_only() {
        let service = PathRewrite::Regex {
            pattern: Regex::new("^/service/([^/]+)(/.*)$").unwrap(),
            substitution: r"\2/instance/\1".to_owned(),
        };
        let any = prefix("p", "/");
        assert_eq!(rewrite_path(&any, &service, "/service/foo/v1/api"), "/v1/api/instance/foo");
        assert_eq!(rewrite_path(&any, &service, "/service/foo/v1/api?service=1"), "/v1/api/instance/foo?service=1");
        let every = PathRewrite::Regex { pattern: Regex::new("one").unwrap(), substitution: "two$1".to_owned() };
        assert_eq!(rewrite_path(&any, &every, "/one/one?one"), "/two$1/two$1?one");
        let insensitive = PathRewrite::Regex { pattern: Regex::new("(?i)/xxx/").unwrap(), substitution: "/y/".to_owned() };
        assert_eq!(rewrite_path(&any, &insensitive, "/XxX/z"), "/y/z");
    }

    fn redirect(host: Option<&str>) -> RedirectAction {
        RedirectAction {
            scheme: None,
            host: host.map(str::to_owned),
            port: None,
            path: None,
            prefix_rewrite: None,
            status: 301,
            strip_query: false,
        }
    }

    #[test]
    fn redirect_keeps_path_and_query_unless_told_otherwise() {
        let any = prefix("p", "/");
        let request = head("GET", "/a/b?x=1", "old.com:8080", &[]);
        assert_eq!(redirect_location(&any, &redirect(Some("b.com")), &request, "http"), "http://b.com/a/b?x=1");
        let same_host = redirect(None);
        assert_eq!(redirect_location(&any, &same_host, &request, "http"), "http://old.com:8080/a/b?x=1");

        let mut https = redirect(None);
        https.scheme = Some("https".to_owned());
        https.port = Some(443);
        https.strip_query = true;
        assert_eq!(redirect_location(&any, &https, &request, "http"), "https://old.com/a/b");

        let mut path = redirect(None);
        path.path = Some("/new".to_owned());
        assert_eq!(redirect_location(&any, &path, &request, "http"), "http://old.com:8080/new?x=1");
        path.path = Some("/new?y=2".to_owned());
        assert_eq!(redirect_location(&any, &path, &request, "http"), "http://old.com:8080/new?y=2");

        let mut rewrite = redirect(None);
        rewrite.prefix_rewrite = Some("/b/".to_owned());
        assert_eq!(redirect_location(&prefix("p", "/a/"), &rewrite, &request, "http"), "http://old.com:8080/b/b?x=1");

        let v6 = head("GET", "/", "[::1]:80", &[]);
        assert_eq!(redirect_location(&any, &redirect(None), &v6, "http"), "http://[::1]/");
    }
}
