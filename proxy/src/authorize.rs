//! L7 policy (normalize -> **authorize** -> route): Cilium's allow/deny precedence per endpoint and direction.

use std::sync::Arc;

use foldhash::HashMap;
use smallvec::SmallVec;

use crate::flow::DropReason;
use crate::request::RequestHead;
use crate::tables::{DirectionPolicy, FieldPattern, HttpRule, Identity, L4Match, MismatchAction, PortRange, Protocol, Remotes};

/// A header change that a matching `headerMatches` rule asks for because the request's header
/// did not match. The forwarder applies it to the request before routing:
/// `Log` changes nothing (record it), `Add` appends `value`, `Delete` removes every value of
/// `name`, `Replace` sets `name` to `value` alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEdit {
    pub name: String,
    pub action: MismatchAction,
    pub value: Option<String>,
}

/// The verdict of one direction's policy for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `origin` is the rule that allowed, `None` when the direction has no applicable policy.
    Allow { origin: Option<Arc<str>>, header_edits: Vec<HeaderEdit> },
    /// `PolicyDenied` / `PolicyDeny` are L3/L4 verdicts: close the connection without a
    /// response. `L7PolicyDenied` is answered `403 Access denied\r\n`. `AuthRequired` is an
    /// L3/L4 verdict too (Cilium drops the packets).
    Deny { reason: DropReason, origin: Option<Arc<str>> },
}

/// The ORed HTTP rules of one allow rule, indexed by literal path: a request is checked only
/// against the rules naming its exact path and the rules whose path is a regex or absent, in
/// policy order, so the first matching rule (whose header edits apply) is the same one a scan
/// of every rule would find. Plain strings (`GET`, `/public`) arrive as `Literal` (the agent
/// decides, from the policy text) and compare as strings: a request does not run one regex
/// per rule, and the regexes' per-thread search caches are never built (with 1k rules that was
/// most of the CPU per request and tens of MiB of RSS).
#[derive(Debug, Clone, Default)]
struct HttpRules {
    rules: Vec<HttpRule>,
    by_literal_path: HashMap<String, Vec<usize>>,
    /// Positions of the rules not in `by_literal_path`, ascending.
    unindexed: Vec<usize>,
}

impl HttpRules {
    fn new(rules: &[HttpRule]) -> Self {
        let mut compiled = HttpRules::default();
        for (position, rule) in rules.iter().enumerate() {
            match &rule.path {
                Some(FieldPattern::Literal(path)) => compiled.by_literal_path.entry(path.clone()).or_default().push(position),
                _ => compiled.unindexed.push(position),
            }
        }
        compiled.rules = rules.to_vec();
        compiled
    }

    fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule matches; the header edits of the first matching rule go to `edits`.
    fn any_matches(&self, request: &RequestHead, edits: &mut Vec<HeaderEdit>) -> bool {
        let same_path = self.by_literal_path.get(request.path_and_query.as_str()).map_or(&[][..], Vec::as_slice);
        let (mut literal, mut other) = (same_path.iter().peekable(), self.unindexed.iter().peekable());
        loop {
            let next = match (literal.peek(), other.peek()) {
                (Some(a), Some(b)) if a < b => literal.next(),
                (Some(_), None) => literal.next(),
                (_, Some(_)) => other.next(),
                (None, None) => return false,
            };
            if next.is_some_and(|&position| http_rule_matches(&self.rules[position], request, edits)) {
                return true;
            }
        }
    }
}

#[derive(Debug, Clone)]
struct CompiledAllowRule {
    origin: Arc<str>,
    auth_required: bool,
    /// `None`: allowed at L4. An empty list allows every request (L7 visibility only).
    http: Option<HttpRules>,
}

/// Port ranges cover at most 65536 ports; "no ports at all" must rank below "port 0".
const WIDTH_ALL_PORTS: u32 = 1 << 16;
const WIDTH_NO_PORTS: u32 = WIDTH_ALL_PORTS + 1;

/// Rules by the ports they name, so a lookup touches only rules that can apply.
#[derive(Debug, Clone, Default)]
struct PortIndex {
    exact: HashMap<u16, Vec<(Protocol, usize)>>,
    ranges: Vec<(PortRange, usize)>,
    all_ports: Vec<(Protocol, usize)>,
    no_ports: Vec<usize>,
}

impl PortIndex {
    fn insert(&mut self, ports: &[PortRange], rule: usize) {
        if ports.is_empty() {
            self.no_ports.push(rule);
        }
        for range in ports {
            match range {
                PortRange { start: 0, protocol, .. } => self.all_ports.push((*protocol, rule)),
                PortRange { start, end, protocol } if end <= start => {
                    self.exact.entry(*start).or_default().push((*protocol, rule));
                }
                range => self.ranges.push((*range, rule)),
            }
        }
    }

    /// Calls `visit(width, rule)` for every rule covering `protocol`/`port`, where `width` is how
    /// many ports the covering entry spans (smaller is more specific).
    fn visit(&self, protocol: Protocol, port: u16, visit: &mut impl FnMut(u32, usize)) {
        let covers = |rule_protocol: Protocol| rule_protocol == Protocol::Any || rule_protocol == protocol;
        for (rule_protocol, rule) in self.exact.get(&port).into_iter().flatten() {
            if covers(*rule_protocol) {
                visit(1, *rule);
            }
        }
        for (range, rule) in &self.ranges {
            if covers(range.protocol) && (range.start..=range.end).contains(&port) {
                visit(u32::from(range.end - range.start) + 1, *rule);
            }
        }
        for (rule_protocol, rule) in &self.all_ports {
            if covers(*rule_protocol) {
                visit(WIDTH_ALL_PORTS, *rule);
            }
        }
        for rule in &self.no_ports {
            visit(WIDTH_NO_PORTS, *rule);
        }
    }
}

/// Rules by remote identity, then by port.
#[derive(Debug, Clone, Default)]
struct RuleIndex {
    by_identity: HashMap<Identity, PortIndex>,
    any_remote: PortIndex,
}

impl RuleIndex {
    fn insert(&mut self, l4: &L4Match, rule: usize) {
        match &l4.remotes {
            Remotes::Any => self.any_remote.insert(&l4.ports, rule),
            Remotes::Only(identities) => {
                for identity in identities {
                    self.by_identity.entry(*identity).or_default().insert(&l4.ports, rule);
                }
            }
        }
    }

    fn visit(&self, remote: Identity, protocol: Protocol, port: u16, mut visit: impl FnMut(u32, usize)) {
        if let Some(ports) = self.by_identity.get(&remote) {
            ports.visit(protocol, port, &mut visit);
        }
        self.any_remote.visit(protocol, port, &mut visit);
    }
}

/// One direction's policy, indexed by remote identity and port so a decision stays cheap with
/// thousands of rules. Built once per table apply.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    default_deny: bool,
    deny: RuleIndex,
    /// `origin` of each deny rule, by its index in `deny`.
    deny_origins: Vec<Arc<str>>,
    allow: RuleIndex,
    rules: Vec<CompiledAllowRule>,
}

impl CompiledPolicy {
    pub fn new(policy: &DirectionPolicy) -> Self {
        let mut deny = RuleIndex::default();
        for (index, l4) in policy.deny.iter().enumerate() {
            deny.insert(l4, index);
        }
        let mut allow = RuleIndex::default();
        let mut rules = Vec::with_capacity(policy.allow.len());
        for (index, rule) in policy.allow.iter().enumerate() {
            allow.insert(&rule.l4, index);
            rules.push(CompiledAllowRule {
                origin: rule.origin.clone(),
                auth_required: rule.auth_required,
                http: rule.http.as_deref().map(HttpRules::new),
            });
        }
        let deny_origins = policy.deny.iter().map(|l4| l4.origin.clone()).collect();
        Self { default_deny: policy.default_deny, deny, deny_origins, allow, rules }
    }

    /// Cilium's verdict for a request from (ingress) or to (egress) `remote` on `port`:
    /// a covering deny rule denies; otherwise the allow rules with the narrowest port entry
    /// covering `port` decide together (an exact port beats a range covering it, which beats
    /// port 0, which beats a rule without ports), whatever their remote selectors.
    pub fn authorize(&self, remote: Identity, protocol: Protocol, port: u16, request: &RequestHead) -> Decision {
        // The first deny rule written is the one reported.
        let mut denied_by: Option<usize> = None;
        self.deny.visit(remote, protocol, port, |_, rule| denied_by = Some(denied_by.map_or(rule, |d| d.min(rule))));
        if let Some(rule) = denied_by {
            return Decision::Deny { reason: DropReason::PolicyDeny, origin: self.deny_origins.get(rule).cloned() };
        }

        let mut narrowest = u32::MAX;
        // On the stack: a port is rarely selected by more than a few rules.
        let mut deciding: SmallVec<[usize; 8]> = SmallVec::new();
        let mut needs_auth: Option<usize> = None;
        self.allow.visit(remote, protocol, port, |width, rule| {
            if self.rules[rule].auth_required && needs_auth.is_none() {
                needs_auth = Some(rule);
            }
            if width < narrowest {
                narrowest = width;
                deciding.clear();
            }
            if width == narrowest {
                deciding.push(rule);
            }
        });
        // Policy order, not index order: the first rule written is the one reported.
        deciding.sort_unstable();
        deciding.dedup();

        let Some(&first) = deciding.first() else {
            return if self.default_deny {
                Decision::Deny { reason: DropReason::PolicyDenied, origin: None }
            } else {
                Decision::Allow { origin: None, header_edits: Vec::new() }
            };
        };
        // Cilium marks the policy-map entry, and the narrower entries it covers, as requiring
        // authentication when any selecting rule does; until mTLS exists nobody is
        // authenticated, so such a flow is refused whatever else allows it.
        if let Some(rule) = needs_auth {
            return Decision::Deny { reason: DropReason::AuthRequired, origin: Some(self.rules[rule].origin.clone()) };
        }
        if let Some(&l4_only) = deciding.iter().find(|rule| self.rules[**rule].http.is_none()) {
            return Decision::Allow { origin: Some(self.rules[l4_only].origin.clone()), header_edits: Vec::new() };
        }
        self.authorize_http(&deciding, request)
            .unwrap_or_else(|| Decision::Deny { reason: DropReason::L7PolicyDenied, origin: Some(self.rules[first].origin.clone()) })
    }

    /// HTTP rules of the deciding group, ORed. Every rule is evaluated (not just up to the first
    /// match) so that the mismatch actions of every matching rule are collected, as Cilium does.
    fn authorize_http(&self, deciding: &[usize], request: &RequestHead) -> Option<Decision> {
        let mut allowed_by: Option<Arc<str>> = None;
        let mut header_edits = Vec::new();
        for &index in deciding {
            let rule = &self.rules[index];
            let matched = rule.http.as_ref().is_none_or(|http| http.is_empty() || http.any_matches(request, &mut header_edits));
            if matched && allowed_by.is_none() {
                allowed_by = Some(rule.origin.clone());
            }
        }
        allowed_by.map(|origin| Decision::Allow { origin: Some(origin), header_edits })
    }
}

fn field_matches(pattern: Option<&FieldPattern>, value: &str) -> bool {
    pattern.is_none_or(|pattern| pattern.is_match(value))
}

/// All present fields must match. Header requirements with a mismatch action do not decide;
/// their edits are appended to `edits` only when the rest of the rule matched.
fn http_rule_matches(rule: &HttpRule, request: &RequestHead, edits: &mut Vec<HeaderEdit>) -> bool {
    let fields_match = field_matches(rule.method.as_ref(), request.method.as_str())
        && field_matches(rule.path.as_ref(), &request.path_and_query)
        && field_matches(rule.host.as_ref(), &request.authority);
    if !fields_match {
        return false;
    }
    let mut rule_edits = Vec::new();
    for header in &rule.headers {
        let value = request.header_value(&header.name);
        let satisfied = match (&header.value, value) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(expected), Some(actual)) => *expected == actual,
        };
        match header.mismatch {
            _ if satisfied => {}
            None => return false,
            Some(action) => rule_edits.push(HeaderEdit { name: header.name.clone(), action, value: header.value.clone() }),
        }
    }
    edits.append(&mut rule_edits);
    true
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use regex::Regex;

    use super::*;
    use crate::request::test_head as head;
    use crate::tables::{AllowRule, FullMatch, HttpHeaderRule};

    const FRONTEND: Identity = 1000;
    const OTHER: Identity = 1001;

    fn remotes(identities: &[Identity]) -> Remotes {
        Remotes::Only(identities.iter().copied().collect::<BTreeSet<_>>())
    }

    fn tcp(start: u16, end: u16) -> PortRange {
        PortRange { protocol: Protocol::Tcp, start, end }
    }

    fn anchored(pattern: &str) -> FieldPattern {
        FieldPattern::Regex(FullMatch::new(Regex::new(&format!("^(?:{pattern})$")).unwrap()))
    }

    fn http(method: &str, path: &str) -> HttpRule {
        HttpRule { method: Some(anchored(method)), path: Some(anchored(path)), ..HttpRule::default() }
    }

    /// A plain string field, as the agent hands over policy text without regex syntax.
    fn literal(text: &str) -> FieldPattern {
        FieldPattern::Literal(text.to_owned())
    }

    fn allow(origin: &str, remotes: Remotes, ports: Vec<PortRange>, http: Option<Vec<HttpRule>>) -> AllowRule {
        let origin: Arc<str> = Arc::from(origin);
        AllowRule { l4: L4Match { remotes, ports, origin: origin.clone() }, http, auth_required: false, origin }
    }

    fn policy(allow: Vec<AllowRule>) -> CompiledPolicy {
        CompiledPolicy::new(&DirectionPolicy { default_deny: true, deny: Vec::new(), allow })
    }

    fn get(path: &str) -> RequestHead {
        head("GET", path, "backend", &[])
    }

    /// `Ok(origin)` for an allow, `Err(reason)` for a deny.
    fn verdict(policy: &CompiledPolicy, remote: Identity, port: u16, request: &RequestHead) -> Result<Option<String>, DropReason> {
        match policy.authorize(remote, Protocol::Tcp, port, request) {
            Decision::Allow { origin, .. } => Ok(origin.map(|origin| origin.to_string())),
            Decision::Deny { reason, .. } => Err(reason),
        }
    }

    fn allowed(origin: &str) -> Result<Option<String>, DropReason> {
        Ok(Some(origin.to_owned()))
    }

    #[test]
    fn no_policy_and_default_deny() {
        let open = CompiledPolicy::new(&DirectionPolicy::default());
        assert_eq!(verdict(&open, OTHER, 80, &get("/")), Ok(None));
        let closed = policy(Vec::new());
        assert_eq!(verdict(&closed, OTHER, 80, &get("/")), Err(DropReason::PolicyDenied));
        let only_frontend = policy(vec![allow("l4", remotes(&[FRONTEND]), vec![tcp(80, 80)], None)]);
        assert_eq!(verdict(&only_frontend, FRONTEND, 80, &get("/")), allowed("l4"));
        assert_eq!(verdict(&only_frontend, OTHER, 80, &get("/")), Err(DropReason::PolicyDenied));
        assert_eq!(verdict(&only_frontend, FRONTEND, 81, &get("/")), Err(DropReason::PolicyDenied));
        let udp = only_frontend.authorize(FRONTEND, Protocol::Udp, 80, &get("/"));
        assert_eq!(udp, Decision::Deny { reason: DropReason::PolicyDenied, origin: None });
    }

    #[test]
    fn deny_beats_every_allow() {
        let compiled = CompiledPolicy::new(&DirectionPolicy {
            default_deny: false,
            deny: vec![
                L4Match { remotes: remotes(&[OTHER]), ports: vec![tcp(80, 80)], origin: Arc::from("deny port 80") },
                L4Match { remotes: remotes(&[OTHER]), ports: Vec::new(), origin: Arc::from("deny all ports") },
            ],
            allow: vec![allow("exact", remotes(&[OTHER]), vec![tcp(80, 80)], None)],
        });
        assert_eq!(verdict(&compiled, OTHER, 80, &get("/")), Err(DropReason::PolicyDeny));
        assert_eq!(verdict(&compiled, FRONTEND, 80, &get("/")), Ok(None));
        let origin_of = |port| match compiled.authorize(OTHER, Protocol::Tcp, port, &get("/")) {
            Decision::Deny { origin, .. } => origin.map(|o| o.to_string()),
            Decision::Allow { .. } => None,
        };
        assert_eq!(origin_of(80).as_deref(), Some("deny port 80"), "the first deny rule written is reported");
        assert_eq!(origin_of(81).as_deref(), Some("deny all ports"));
    }

    #[test]
    fn l7_rules_are_ored_with_anchored_fields_anded() {
        let compiled = policy(vec![allow(
            "l7",
            remotes(&[FRONTEND]),
            vec![tcp(80, 80)],
            Some(vec![http("GET", "/public/.*"), http("POST", "/v1/request-landing")]),
        )]);
        let check = |method: &str, path: &str| verdict(&compiled, FRONTEND, 80, &head(method, path, "h", &[]));
        assert_eq!(check("GET", "/public/x"), allowed("l7"));
        assert_eq!(check("POST", "/v1/request-landing"), allowed("l7"));
        assert_eq!(check("GET", "/v1/request-landing"), Err(DropReason::L7PolicyDenied), "fields are ANDed");
        assert_eq!(check("POST", "/v1/request-landing?x=1"), Err(DropReason::L7PolicyDenied), "path includes the query");
        assert_eq!(check("POST", "/v1/request-landing/x"), Err(DropReason::L7PolicyDenied), "full match");
        assert_eq!(check("GET", "/admin/public/x"), Err(DropReason::L7PolicyDenied), "anchored at the start");
        assert_eq!(check("get", "/public/x"), Err(DropReason::L7PolicyDenied), "methods are case-sensitive");
        assert_eq!(check("XGET", "/public/x"), Err(DropReason::L7PolicyDenied));
    }

    #[test]
    fn unanchored_regexes_are_anchored_by_their_table_type() {
        let unanchored = HttpRule { path: Some(FieldPattern::Regex(FullMatch::new(Regex::new("/public").unwrap()))), ..HttpRule::default() };
        let compiled = policy(vec![allow("l7", Remotes::Any, vec![tcp(80, 80)], Some(vec![unanchored]))]);
        assert_eq!(verdict(&compiled, FRONTEND, 80, &get("/public")), allowed("l7"));
        assert_eq!(verdict(&compiled, FRONTEND, 80, &get("/admin?/public")), Err(DropReason::L7PolicyDenied));
    }

    #[test]
    fn host_and_header_requirements() {
        let rule = HttpRule {
            host: Some(anchored("api\\.example\\.com")),
            headers: vec![
                HttpHeaderRule { name: "x-token".to_owned(), value: Some("abc".to_owned()), mismatch: None },
                HttpHeaderRule { name: "x-present".to_owned(), value: None, mismatch: None },
            ],
            ..HttpRule::default()
        };
        let compiled = policy(vec![allow("hdr", Remotes::Any, vec![tcp(80, 80)], Some(vec![rule]))]);
        let check = |authority: &str, headers: &[(&str, &str)]| verdict(&compiled, OTHER, 80, &head("GET", "/", authority, headers));
        let good = [("x-token", "abc"), ("x-present", "")];
        assert_eq!(check("api.example.com", &good), allowed("hdr"));
        assert_eq!(check("api.example.com:8080", &good), Err(DropReason::L7PolicyDenied), ":authority carries the port");
        assert_eq!(check("apixexample.com", &good), Err(DropReason::L7PolicyDenied));
        assert_eq!(check("api.example.com", &[("x-token", "abc")]), Err(DropReason::L7PolicyDenied));
        assert_eq!(check("api.example.com", &[("x-token", "abcd"), ("x-present", "1")]), Err(DropReason::L7PolicyDenied));
        // CVE-2021-32777: a second value cannot hide behind the first.
        let repeated = [("x-token", "abc"), ("x-token", "evil"), ("x-present", "1")];
        assert_eq!(check("api.example.com", &repeated), Err(DropReason::L7PolicyDenied));
    }

    #[test]
    fn header_mismatch_actions_still_match_and_produce_edits() {
        let mismatch = |name: &str, value: &str, action| HttpHeaderRule {
            name: name.to_owned(),
            value: Some(value.to_owned()),
            mismatch: Some(action),
        };
        let rule = HttpRule {
            path: Some(anchored("/api/.*")),
            headers: vec![
                mismatch("x-log", "1", MismatchAction::Log),
                mismatch("x-add", "a", MismatchAction::Add),
                mismatch("x-del", "d", MismatchAction::Delete),
                mismatch("x-rep", "r", MismatchAction::Replace),
            ],
            ..HttpRule::default()
        };
        let compiled = policy(vec![allow("edits", Remotes::Any, Vec::new(), Some(vec![rule]))]);
        let request = head("GET", "/api/x", "h", &[("x-add", "a"), ("x-del", "other"), ("x-rep", "old")]);
        let decision = compiled.authorize(OTHER, Protocol::Tcp, 80, &request);
        let edit = |name: &str, action, value: &str| HeaderEdit { name: name.to_owned(), action, value: Some(value.to_owned()) };
        assert_eq!(
            decision,
            Decision::Allow {
                origin: Some(Arc::from("edits")),
                header_edits: vec![
                    edit("x-log", MismatchAction::Log, "1"),
                    edit("x-del", MismatchAction::Delete, "d"),
                    edit("x-rep", MismatchAction::Replace, "r"),
                ],
            }
        );
        let elsewhere = compiled.authorize(OTHER, Protocol::Tcp, 80, &get("/other"));
        assert_eq!(elsewhere, Decision::Deny { reason: DropReason::L7PolicyDenied, origin: Some(Arc::from("edits")) });
    }

    #[test]
    fn l4_only_beats_l7_in_the_same_level_whatever_the_selector() {
        let compiled = policy(vec![
            allow("l7", remotes(&[FRONTEND]), vec![tcp(80, 80)], Some(vec![http("GET", "/metrics")])),
            allow("l4", Remotes::Any, vec![tcp(80, 80)], None),
        ]);
        assert_eq!(verdict(&compiled, FRONTEND, 80, &get("/anything")), allowed("l4"));
    }

    #[test]
    fn the_most_specific_port_level_decides() {
        let compiled = policy(vec![
            allow("no-ports", Remotes::Any, Vec::new(), None),
            allow("all-ports", remotes(&[FRONTEND]), vec![tcp(0, 0)], Some(vec![http("GET", "/all")])),
            allow("port", remotes(&[FRONTEND]), vec![tcp(8080, 8080)], Some(vec![http("GET", "/port")])),
        ]);
        assert_eq!(verdict(&compiled, FRONTEND, 8080, &get("/port")), allowed("port"));
        assert_eq!(verdict(&compiled, FRONTEND, 8080, &get("/all")), Err(DropReason::L7PolicyDenied));
        assert_eq!(verdict(&compiled, FRONTEND, 9090, &get("/all")), allowed("all-ports"));
        assert_eq!(verdict(&compiled, FRONTEND, 9090, &get("/port")), Err(DropReason::L7PolicyDenied));
        assert_eq!(verdict(&compiled, OTHER, 9090, &get("/x")), allowed("no-ports"));
    }

    /// CVE-2024-52529: an L7 rule on one port inside an L3/L4 range allow must still be enforced.
    #[test]
    fn l7_on_a_port_wins_over_a_range_covering_it() {
        let compiled = policy(vec![
            allow("range", remotes(&[FRONTEND]), vec![tcp(8000, 8100)], None),
            allow("l7", remotes(&[FRONTEND]), vec![tcp(8080, 8080)], Some(vec![http("GET", "/ok")])),
        ]);
        assert_eq!(verdict(&compiled, FRONTEND, 8080, &get("/ok")), allowed("l7"));
        assert_eq!(verdict(&compiled, FRONTEND, 8080, &get("/admin")), Err(DropReason::L7PolicyDenied));
        assert_eq!(verdict(&compiled, FRONTEND, 8081, &get("/admin")), allowed("range"));
        let narrower = policy(vec![
            allow("wide", Remotes::Any, vec![tcp(1, 65535)], None),
            allow("narrow", Remotes::Any, vec![tcp(8000, 8100)], Some(vec![http("GET", "/ok")])),
        ]);
        assert_eq!(verdict(&narrower, OTHER, 8050, &get("/admin")), Err(DropReason::L7PolicyDenied));
        assert_eq!(verdict(&narrower, OTHER, 9000, &get("/admin")), allowed("wide"));
    }

    /// CVE-2023-30851: one selector's allow-all must not widen another selector's HTTP rules.
    #[test]
    fn one_selector_never_widens_another() {
        let compiled = policy(vec![
            allow("both", remotes(&[FRONTEND, OTHER]), vec![tcp(80, 80)], Some(vec![http("GET", "/public")])),
            allow("frontend-all", remotes(&[FRONTEND]), vec![tcp(80, 80)], Some(vec![HttpRule::default()])),
        ]);
        assert_eq!(verdict(&compiled, FRONTEND, 80, &get("/admin")), allowed("frontend-all"));
        assert_eq!(verdict(&compiled, OTHER, 80, &get("/public")), allowed("both"));
        assert_eq!(verdict(&compiled, OTHER, 80, &get("/admin")), Err(DropReason::L7PolicyDenied));
        let empty_list = policy(vec![allow("visibility", Remotes::Any, vec![tcp(80, 80)], Some(Vec::new()))]);
        assert_eq!(verdict(&empty_list, OTHER, 80, &get("/anything")), allowed("visibility"));
    }

    #[test]
    fn auth_required_rules_deny_until_mtls_exists() {
        let mut required = allow("auth", remotes(&[FRONTEND]), vec![tcp(80, 80)], None);
        required.auth_required = true;
        let compiled = policy(vec![required.clone()]);
        assert_eq!(verdict(&compiled, FRONTEND, 80, &get("/")), Err(DropReason::AuthRequired));
        assert_eq!(verdict(&compiled, OTHER, 80, &get("/")), Err(DropReason::PolicyDenied));
        // Another rule allowing the same flow does not lift the requirement (Cilium's policy
        // map carries the auth requirement on the entry, and down to narrower entries).
        let with_plain = policy(vec![allow("plain", Remotes::Any, vec![tcp(80, 80)], None), required.clone()]);
        assert_eq!(verdict(&with_plain, FRONTEND, 80, &get("/")), Err(DropReason::AuthRequired));
        let mut broad = required;
        broad.l4.ports = Vec::new();
        let narrower_plain = policy(vec![allow("plain", remotes(&[FRONTEND]), vec![tcp(80, 80)], None), broad]);
        assert_eq!(verdict(&narrower_plain, FRONTEND, 80, &get("/")), Err(DropReason::AuthRequired));
    }

    #[test]
    fn index_covers_protocol_any_and_ranges() {
        let any_protocol = PortRange { protocol: Protocol::Any, start: 53, end: 53 };
        let compiled = policy(vec![allow("dns", Remotes::Any, vec![any_protocol], None)]);
        assert_eq!(compiled.authorize(OTHER, Protocol::Udp, 53, &get("/")), Decision::Allow { origin: Some(Arc::from("dns")), header_edits: Vec::new() });
        let range = policy(vec![allow("range", remotes(&[OTHER]), vec![tcp(1000, 2000)], None)]);
        for (port, expected) in [(999, Err(DropReason::PolicyDenied)), (1000, allowed("range")), (2000, allowed("range")), (2001, Err(DropReason::PolicyDenied))] {
            assert_eq!(verdict(&range, OTHER, port, &get("/")), expected, "{port}");
        }
    }

    #[test]
    fn many_literal_paths_decide_like_a_scan_of_every_rule() {
        let mut rules: Vec<HttpRule> = (0..1000)
            .map(|i| HttpRule { method: Some(literal("GET")), path: Some(literal(&format!("/items/{i}"))), ..HttpRule::default() })
            .collect();
        rules.push(http("GET|HEAD", "/items/7.*"));
        rules.push(HttpRule { method: Some(literal("DELETE")), ..HttpRule::default() });
        let compiled = policy(vec![allow("many", Remotes::Any, vec![tcp(80, 80)], Some(rules))]);
        let check = |method: &str, path: &str| verdict(&compiled, OTHER, 80, &head(method, path, "h", &[]));
        assert_eq!(check("GET", "/items/999"), allowed("many"));
        assert_eq!(check("POST", "/items/999"), Err(DropReason::L7PolicyDenied));
        assert_eq!(check("GET", "/items/999?x=1"), Err(DropReason::L7PolicyDenied));
        assert_eq!(check("HEAD", "/items/7abc"), allowed("many"));
        assert_eq!(check("HEAD", "/items/8"), Err(DropReason::L7PolicyDenied));
        assert_eq!(check("DELETE", "/anything"), allowed("many"));
    }

    #[test]
    fn the_first_matching_rule_in_policy_order_gives_the_header_edits() {
        let with_edit = |path: FieldPattern, header: &str| HttpRule {
            path: Some(path),
            headers: vec![HttpHeaderRule { name: header.to_owned(), value: Some("1".to_owned()), mismatch: Some(MismatchAction::Add) }],
            ..HttpRule::default()
        };
        let edits_for = |rules: Vec<HttpRule>| match policy(vec![allow("p", Remotes::Any, Vec::new(), Some(rules))]).authorize(OTHER, Protocol::Tcp, 80, &get("/a")) {
            Decision::Allow { header_edits, .. } => header_edits.into_iter().map(|e| e.name).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        // A regex rule written before a literal one for the same path wins, and vice versa.
        assert_eq!(edits_for(vec![with_edit(anchored("/.*"), "x-regex"), with_edit(literal("/a"), "x-literal")]), ["x-regex"]);
        assert_eq!(edits_for(vec![with_edit(literal("/a"), "x-literal"), with_edit(anchored("/.*"), "x-regex")]), ["x-literal"]);
    }
}
