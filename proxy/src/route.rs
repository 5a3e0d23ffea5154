//! Route decisions (authorize -> **route** -> split -> forward): virtual host, route, weighted cluster, rewrites.

use crate::request::RequestHead;
use crate::tables::{PathRewrite, RedirectAction, Route, RouteConfig, VirtualHost, WeightedCluster};

/// The virtual host and route a request matched.
#[derive(Debug, Clone, Copy)]
pub struct RouteSelection<'a> {
    pub virtual_host: &'a VirtualHost,
    pub route: &'a Route,
}

pub fn select_route<'a>(config: &'a RouteConfig, request: &RequestHead) -> Option<RouteSelection<'a>> {
    let _ = (config, request);
    None
}

pub fn pick_weighted_cluster(clusters: &[WeightedCluster], random: u64) -> Option<&WeightedCluster> {
    let _ = random;
    clusters.iter().find(|c| c.weight > 0)
}

/// New path_and_query after a route's rewrite (query preserved per Envoy).
pub fn rewrite_path(route: &Route, rewrite: &PathRewrite, path_and_query: &str) -> String {
    let _ = (route, rewrite);
    path_and_query.to_owned()
}

/// `route` is needed because a redirect's `prefix_rewrite` swaps the prefix that route matched.
pub fn redirect_location(route: &Route, redirect: &RedirectAction, request: &RequestHead, scheme: &str) -> String {
    let _ = (route, redirect);
    format!("{scheme}://{}{}", request.authority, request.path_and_query)
}
