//! The route phase end to end: no route, direct responses, redirects, unknown clusters,
//! rewrites, header mutations and the HCM's header limits; plus shutdown.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use sluice_proxy::flow::DropReason;
use sluice_proxy::tables::{PathRewrite, RedirectAction, Route, RouteAction, RouteConfig};
use sluice_proxy::ApplyError;

fn local_route(prefix: &str, action: RouteAction) -> Route {
    Route { action, ..prefix_route(prefix, to_cluster("unused")) }
}

#[tokio::test]
async fn local_replies_for_no_route_direct_response_redirect_and_unknown_cluster() {
    let mut proxy = Proxy::start();
    let mut missing_404 = to_cluster("missing");
    missing_404.cluster_not_found_status = 404;
    let redirect = RedirectAction { scheme: None, host: Some("b.test".into()), port: None, path: None, prefix_rewrite: None, status: 301, strip_query: false };
    let addr = proxy.apply(tables(
        1,
        hcm(vec![
            local_route("/teapot", RouteAction::DirectResponse { status: 418, body: Bytes::from_static(b"short and stout") }),
            local_route("/moved", RouteAction::Redirect(redirect)),
            prefix_route("/missing-404", missing_404),
            prefix_route("/missing", to_cluster("missing")),
        ]),
        vec![],
    ));

    let teapot = get(addr, "/teapot").await;
    assert_eq!((teapot.status.as_u16(), teapot.body.as_str()), (418, "short and stout"));
    let moved = get(addr, "/moved/page?q=1").await;
    assert_eq!(moved.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(moved.headers["location"], "http://b.test/moved/page?q=1");
    assert_eq!(get(addr, "/missing").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get(addr, "/missing-404").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(addr, "/nothing-here").await.status, StatusCode::NOT_FOUND);

    let reasons: Vec<Option<DropReason>> = proxy.drain_flows().iter().map(|f| f.drop_reason).collect();
    assert_eq!(
        reasons,
        vec![None, None, Some(DropReason::NoHealthyUpstream), Some(DropReason::NoHealthyUpstream), Some(DropReason::NoRoute)]
    );
}

#[tokio::test]
async fn rewrites_reach_the_backend_with_the_original_path_recorded() {
    let backend = Backend::echo("backend").await;
    let proxy = Proxy::start();
    let mut action = to_cluster("svc");
    action.rewrite = Some(PathRewrite::Prefix("/".into()));
    action.host_rewrite_literal = Some("new.host".into());
    let addr = proxy.apply(tables(
        1,
        hcm(vec![prefix_route("/prefix/", action), prefix_route("/", to_cluster("svc"))]),
        vec![cluster("svc", &[backend.addr])],
    ));
    assert_eq!(get(addr, "/prefix/etc?x=1").await.status, StatusCode::OK);
    // A client cannot plant its own original path.
    let mut sender = http1_connect([127, 0, 0, 1].into(), addr).await;
    let planted = http::Request::get("/plain").header("host", "app.test").header("x-envoy-original-path", "/admin").body(Full::new(Bytes::new())).unwrap();
    assert_eq!(send(&mut sender, planted).await.unwrap().status, StatusCode::OK);

    let seen = backend.seen();
    assert_eq!(seen[0].path, "/etc?x=1");
    assert_eq!(seen[0].headers["x-envoy-original-path"], "/prefix/etc?x=1");
    assert_eq!(seen[0].headers["host"], "new.host");
    assert_eq!(seen[1].path, "/plain");
    assert!(!seen[1].headers.contains_key("x-envoy-original-path"));
}

#[tokio::test]
async fn route_config_header_mutations_and_forwarded_for() {
    let backend = Backend::echo("backend").await;
    let proxy = Proxy::start();
    let mut http = hcm(vec![prefix_route("/", to_cluster("svc"))]);
    http.use_remote_address = true;
    http.route_config = Arc::new(RouteConfig {
        request_headers_to_add: vec![("x-added".into(), "yes".into())],
        request_headers_to_remove: vec!["x-secret".into()],
        response_headers_to_add: vec![("x-served-by".into(), "sluice".into())],
        response_headers_to_remove: vec!["x-backend".into()],
        ..(*http.route_config).clone()
    });
    let addr = proxy.apply(tables(1, http, vec![cluster("svc", &[backend.addr])]));
    let mut sender = http1_connect([127, 0, 0, 7].into(), addr).await;
    let request = http::Request::get("/").header("host", "app.test").header("x-secret", "s3cret").body(Full::new(Bytes::new())).unwrap();
    let got = send(&mut sender, request).await.unwrap();
    assert_eq!(got.headers["x-served-by"], "sluice");
    assert!(!got.headers.contains_key("x-backend"));
    let seen = &backend.seen()[0];
    assert_eq!(seen.headers["x-added"], "yes");
    assert!(!seen.headers.contains_key("x-secret"));
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.7");
}

#[tokio::test]
async fn oversized_or_too_many_request_headers_get_431() {
    let backend = Backend::echo("backend").await;
    let proxy = Proxy::start();
    let mut http = hcm(vec![prefix_route("/", to_cluster("svc"))]);
    http.max_request_headers_bytes = 2048;
    http.max_headers_count = 10;
    let addr = proxy.apply(tables(1, http, vec![cluster("svc", &[backend.addr])]));

    let mut sender = http1_connect([127, 0, 0, 1].into(), addr).await;
    let large = http::Request::get("/").header("host", "a").header("x-big", "v".repeat(4096)).body(Full::new(Bytes::new())).unwrap();
    assert_eq!(send(&mut sender, large).await.unwrap().status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let mut sender = http1_connect([127, 0, 0, 1].into(), addr).await;
    let mut many = http::Request::get("/").header("host", "a");
    for i in 0..20 {
        many = many.header(format!("x-h{i}"), "v");
    }
    let status = send(&mut sender, many.body(Full::new(Bytes::new())).unwrap()).await.unwrap().status;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(backend.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_refuses_further_applies() {
    // Several workers share a work-stealing runtime; one runs a single-threaded runtime on a
    // thread of its own: both serve, and both stop.
    for workers in [2, 1] {
        let backend = Backend::echo("backend").await;
        let proxy = Proxy::start_with_workers(workers);
        let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("svc"))]), vec![cluster("svc", &[backend.addr])]));
        for _ in 0..20 {
            assert_eq!(get(addr, "/").await.status, StatusCode::OK, "{workers} workers");
        }
        let handle = proxy.handle.clone();
        tokio::task::spawn_blocking(move || handle.shutdown()).await.unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after shutdown ({workers} workers)");
        assert!(matches!(proxy.handle.apply(tables(2, hcm(vec![]), vec![])), Err(ApplyError::Stopped)));
    }
}
