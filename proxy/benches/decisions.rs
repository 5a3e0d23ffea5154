//! Benchmarks of the per-request decisions (authorize, route) at 10, 1k and 10k rules.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use regex::Regex;
use sluice_proxy::authorize::{CompiledPolicy, Decision};
use sluice_proxy::request::RequestHead;
use sluice_proxy::route::select_route;
use sluice_proxy::tables::{
    AllowRule, DirectionPolicy, FieldPattern, FullMatch, HttpRule, L4Match, PathMatch, PortRange, Protocol, Remotes, Route, RouteAction,
    RouteConfig, RouteMatch, VirtualHost,
};

const SIZES: [usize; 3] = [10, 1_000, 10_000];
/// Rules per remote identity, spread over this many ports.
const RULES_PER_IDENTITY: usize = 10;
const FIRST_IDENTITY: u32 = 1_000;
const FIRST_PORT: u16 = 8_000;

fn anchored(pattern: &str) -> FieldPattern {
    FieldPattern::Regex(FullMatch::new(Regex::new(&format!("^(?:{pattern})$")).expect("benchmark regex")))
}

/// A plain string, as the agent hands over policy fields without regex syntax.
fn literal(text: &str) -> FieldPattern {
    FieldPattern::Literal(text.to_owned())
}

fn request(method: &str, path_and_query: &str) -> RequestHead {
    RequestHead {
        method: method.parse().expect("benchmark method"),
        path_and_query: path_and_query.to_owned(),
        authority: "backend.default.svc.cluster.local".to_owned(),
        headers: http::HeaderMap::new(),
        version: http::Version::HTTP_11,
    }
}

/// `rules` L7 allow rules, ten per remote identity on ten ports, each with two HTTP rules.
fn policy(rules: usize) -> DirectionPolicy {
    let allow = (0..rules)
        .map(|index| {
            let identity = FIRST_IDENTITY + u32::try_from(index / RULES_PER_IDENTITY).expect("small");
            let port = FIRST_PORT + u16::try_from(index % RULES_PER_IDENTITY).expect("small");
            let origin: Arc<str> = Arc::from(format!("CiliumNetworkPolicy default/rule{index} spec.ingress[0]"));
            AllowRule {
                l4: L4Match {
                    remotes: Remotes::Only(BTreeSet::from([identity])),
                    ports: vec![PortRange { protocol: Protocol::Tcp, start: port, end: port }],
                    origin: origin.clone(),
                },
                http: Some(vec![
                    HttpRule { method: Some(literal("GET")), path: Some(anchored(&format!("/api/v{index}/.*"))), ..HttpRule::default() },
                    HttpRule { method: Some(literal("POST")), path: Some(literal("/submit")), ..HttpRule::default() },
                ]),
                auth_required: false,
                origin,
            }
        })
        .collect();
    DirectionPolicy { default_deny: true, deny: Vec::new(), allow }
}

fn bench_authorize(c: &mut Criterion) {
    let mut group = c.benchmark_group("authorize");
    for rules in SIZES {
        let compiled = CompiledPolicy::new(&policy(rules));
        let target = rules / 2;
        let identity = FIRST_IDENTITY + u32::try_from(target / RULES_PER_IDENTITY).expect("small");
        let port = FIRST_PORT + u16::try_from(target % RULES_PER_IDENTITY).expect("small");
        let allowed = request("GET", &format!("/api/v{target}/items?page=2"));
        let denied = request("DELETE", &format!("/api/v{target}/items"));
        assert!(matches!(compiled.authorize(identity, Protocol::Tcp, port, &allowed), Decision::Allow { .. }));
        assert!(matches!(compiled.authorize(identity, Protocol::Tcp, port, &denied), Decision::Deny { .. }));
        group.bench_with_input(BenchmarkId::new("l7_allowed", rules), &allowed, |b, request| {
            b.iter(|| compiled.authorize(black_box(identity), Protocol::Tcp, black_box(port), black_box(request)))
        });
        group.bench_with_input(BenchmarkId::new("l7_denied", rules), &denied, |b, request| {
            b.iter(|| compiled.authorize(black_box(identity), Protocol::Tcp, black_box(port), black_box(request)))
        });
    }
    group.finish();
}

/// One virtual host with `routes` prefix routes; Envoy's first-match order makes the last
/// route the worst case.
fn route_config(routes: usize) -> RouteConfig {
    let routes = (0..routes)
        .map(|index| Route {
            name: format!("route{index}"),
            matcher: RouteMatch {
                path: PathMatch::Prefix(format!("/svc{index}/")),
                case_sensitive: true,
                headers: Vec::new(),
                query_parameters: Vec::new(),
            },
            action: RouteAction::DirectResponse { status: 200, body: bytes::Bytes::new() },
        })
        .collect();
    RouteConfig {
        name: "bench".to_owned(),
        virtual_hosts: vec![
            VirtualHost {
                name: "other".to_owned(),
                domains: vec!["other.example".to_owned(), "*.other.example".to_owned()],
                routes: Vec::new(),
                retry_policy: None,
                request_body_buffer_limit: 1 << 20,
                include_request_attempt_count: false,
            },
            VirtualHost {
                name: "backend".to_owned(),
                domains: vec!["*.svc.cluster.local".to_owned(), "*".to_owned()],
                routes,
                retry_policy: None,
                request_body_buffer_limit: 1 << 20,
                include_request_attempt_count: false,
            },
        ],
        request_headers_to_add: Vec::new(),
        request_headers_to_remove: Vec::new(),
        response_headers_to_add: Vec::new(),
        response_headers_to_remove: Vec::new(),
    }
}

fn bench_select_route(c: &mut Criterion) {
    let mut group = c.benchmark_group("select_route");
    for routes in SIZES {
        let config = route_config(routes);
        for (name, index) in [("first", 0), ("middle", routes / 2), ("last", routes - 1)] {
            let request = request("GET", &format!("/svc{index}/items?page=2"));
            let expected = format!("route{index}");
            assert_eq!(select_route(&config, &request).map(|selection| selection.route.name.as_str()), Some(expected.as_str()));
            group.bench_with_input(BenchmarkId::new(name, routes), &request, |b, request| {
                b.iter(|| select_route(black_box(&config), black_box(request)).is_some())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_authorize, bench_select_route);
criterion_main!(benches);
