//! CLI output: API views and flow records -> the aligned tables and Hubble-style lines `sluice` prints (pure).

use std::fmt::Write as _;
use std::io::Write as _;

use chrono::DateTime;

use crate::flows::{reserved_identity_name, FlowEndpoint, FlowRecord};
use crate::view::{
    EndpointView, IdentityView, KernelEndpointView, KernelServiceView, PolicyView, ServiceView, StatusView,
};

/// Gap between columns, as cilium-dbg's tab writer uses.
const COLUMN_GAP: usize = 3;

/// Aligns cells into columns, cilium-dbg style, without trailing blanks.
fn align(lines: &[Vec<&str>]) -> String {
    let mut writer = tabwriter::TabWriter::new(Vec::new()).padding(COLUMN_GAP);
    for cells in lines {
        // Writing to a Vec cannot fail.
        let _ = writeln!(writer, "{}", cells.join("\t"));
    }
    let bytes = writer.into_inner().unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .fold(String::new(), |mut out, line| {
            out.push_str(line.trim_end());
            out.push('\n');
            out
        })
}

/// A header and rows. A cell may span several lines (one label per line, as cilium-dbg prints
/// them); the other cells of that row stay blank on the extra lines.
fn table(header: &[&str], rows: &[Vec<Vec<String>>]) -> String {
    let mut lines = vec![header.to_vec()];
    for row in rows {
        let height = row.iter().map(Vec::len).max().unwrap_or(0).max(1);
        for line in 0..height {
            lines.push(
                row.iter()
                    .map(|cell| cell.get(line).map_or("", String::as_str))
                    .collect(),
            );
        }
    }
    align(&lines)
}

fn cell(value: impl ToString) -> Vec<String> {
    vec![value.to_string()]
}

fn lines_or_dash(values: &[String]) -> Vec<String> {
    if values.is_empty() {
        cell("-")
    } else {
        values.to_vec()
    }
}

fn enabled(enforced: bool) -> &'static str {
    if enforced {
        "Enabled"
    } else {
        "Disabled"
    }
}

pub fn render_status(status: &StatusView) -> String {
    let datapath = match status.datapath.as_str() {
        "none" => "none (gateway mode)".to_owned(),
        other => other.to_owned(),
    };
    let applied = match DateTime::from_timestamp(
        i64::try_from(status.last_applied_unix).unwrap_or(i64::MAX),
        0,
    ) {
        Some(time) if status.last_applied_unix > 0 => {
            time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        }
        _ => "never".to_owned(),
    };
    let objects = if status.objects.is_empty() {
        "none".to_owned()
    } else {
        status
            .objects
            .iter()
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows = [
        ("Node:", status.node.clone()),
        ("Datapath:", datapath),
        ("Config dir:", status.config_dir.clone()),
        (
            "Proxy tables:",
            format!("generation {}, applied {applied}", status.generation),
        ),
        ("Files:", files_summary(status)),
        ("Objects:", objects),
        (
            "Proxy:",
            format!(
                "{} workers, {} listeners",
                status.proxy_workers, status.listeners
            ),
        ),
        (
            "Flows:",
            format!("{} seen, {} lost", status.flows_seen, status.flows_lost),
        ),
        ("Config errors:", status.errors.len().to_string()),
        ("Warnings:", status.warnings.len().to_string()),
    ];
    let kernel_rows = status.kernel.iter().flat_map(|kernel| {
        [
            ("Kernel pins:", kernel.pin_dir.clone()),
            ("Socket LB cgroup:", kernel.cgroup.clone()),
            ("Proxy redirect port:", format!("127.0.0.1:{}", kernel.proxy_port)),
            (
                "Kernel maps:",
                format!(
                    "{} endpoints on {} interfaces, {} policy entries, {} services",
                    kernel.endpoints,
                    kernel.interfaces.len(),
                    kernel.policy_entries,
                    kernel.services
                ),
            ),
            (
                "Last kernel apply:",
                if kernel.last_apply.is_empty() { "no change".to_owned() } else { kernel.last_apply.join(", ") },
            ),
        ]
    });
    let rows: Vec<(&str, String)> = rows.into_iter().chain(kernel_rows).collect();
    let lines: Vec<Vec<&str>> = rows
        .iter()
        .map(|(key, value)| vec![*key, value.as_str()])
        .collect();
    let mut out = align(&lines);
    if !status.files.is_empty() {
        let _ = writeln!(out, "\nFiles:");
        for line in render_files(status).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    for (title, items) in [
        (
            "Config errors (the objects keep their last good state):",
            &status.errors,
        ),
        ("Warnings:", &status.warnings),
    ] {
        if !items.is_empty() {
            let _ = writeln!(out, "\n{title}");
            for item in items {
                let _ = writeln!(out, "  - {item}");
            }
        }
    }
    out
}

fn files_summary(status: &StatusView) -> String {
    let with_errors = status.files.iter().filter(|file| !file.errors.is_empty()).count();
    match with_errors {
        0 => format!("{} loaded", status.files.len()),
        _ => format!("{} loaded, {with_errors} with errors", status.files.len()),
    }
}

fn count_or_dash(count: usize) -> String {
    if count == 0 {
        "-".to_owned()
    } else {
        count.to_string()
    }
}

/// Per file: what it contributes and whether it is in trouble.
fn render_files(status: &StatusView) -> String {
    let rows: Vec<_> = status
        .files
        .iter()
        .map(|file| {
            vec![
                cell(&file.file),
                cell(file.objects),
                cell(count_or_dash(file.errors.len())),
                cell(count_or_dash(file.kept_last_good)),
            ]
        })
        .collect();
    table(&["FILE", "OBJECTS", "ERRORS", "KEPT LAST GOOD"], &rows)
}

/// The kernel's side of a local endpoint: interface, map entry, policy entry count.
fn kernel_endpoint_lines(kernel: &KernelEndpointView) -> Vec<String> {
    let Some(entry) = &kernel.entry else {
        return vec!["not enforced (see status warnings)".to_owned()];
    };
    vec![
        format!("{} (ifindex {})", kernel.interface.as_deref().unwrap_or("?"), entry.ifindex),
        format!("identity {}", entry.identity),
        format!("ingress {}, egress {}", enabled(entry.ingress_enforced), enabled(entry.egress_enforced)),
        format!("{} policy entries", kernel.policy.len()),
    ]
}

pub fn render_endpoints(endpoints: &[EndpointView]) -> String {
    // The kernel column appears only where a kernel datapath runs.
    let with_kernel = endpoints.iter().any(|e| e.kernel.is_some());
    let rows: Vec<_> = endpoints
        .iter()
        .map(|endpoint| {
            let mut row = vec![
                cell(format!("{}/{}", endpoint.namespace, endpoint.name)),
                cell(endpoint.identity),
                cell(enabled(endpoint.ingress_enforced)),
                cell(enabled(endpoint.egress_enforced)),
                cell(endpoint.ip),
                cell(&endpoint.node),
                lines_or_dash(&endpoint.labels),
            ];
            if with_kernel {
                row.push(endpoint.kernel.as_ref().map_or_else(|| cell("-"), kernel_endpoint_lines));
            }
            row
        })
        .collect();
    let mut header = vec![
        "ENDPOINT",
        "IDENTITY",
        "POLICY (ingress) ENFORCEMENT",
        "POLICY (egress) ENFORCEMENT",
        "IP",
        "NODE",
        "LABELS",
    ];
    if with_kernel {
        header.push("KERNEL");
    }
    table(&header, &rows)
}

pub fn render_identities(identities: &[IdentityView]) -> String {
    let rows: Vec<_> = identities
        .iter()
        .map(|identity| {
            vec![
                cell(identity.id),
                lines_or_dash(&identity.labels),
                lines_or_dash(&identity.endpoints),
            ]
        })
        .collect();
    table(&["ID", "LABELS", "ENDPOINTS"], &rows)
}

pub fn render_policies(policies: &[PolicyView]) -> String {
    let with_kernel = policies.iter().any(|p| !p.kernel.is_empty());
    let rows: Vec<_> = policies
        .iter()
        .map(|policy| {
            let name = match &policy.namespace {
                Some(namespace) => format!("{namespace}/{}", policy.name),
                None => policy.name.clone(),
            };
            let mut row = vec![
                cell(name),
                cell(&policy.kind),
                cell(&policy.file),
                lines_or_dash(&policy.selects),
                lines_or_dash(&policy.rules),
            ];
            if with_kernel {
                let entries: Vec<String> = policy
                    .kernel
                    .iter()
                    .flat_map(|endpoint| {
                        std::iter::once(format!("{}:", endpoint.endpoint))
                            .chain(endpoint.entries.iter().map(|entry| format!("  {entry}")))
                    })
                    .collect();
                row.push(lines_or_dash(&entries));
            }
            row
        })
        .collect();
    let mut header = vec!["POLICY", "KIND", "FILE", "SELECTS", "RULES"];
    if with_kernel {
        header.push("KERNEL ENTRIES (local pods)");
    }
    table(&header, &rows)
}

/// The socket-LB entry of a Service port: VIP, then where connections go.
fn kernel_service_lines(kernel: &KernelServiceView) -> Vec<String> {
    let first = format!("{}/{}", kernel.vip, kernel.protocol);
    let rest: Vec<String> = match kernel.l7_proxy_port {
        Some(port) => vec![format!("VIP kept, redirected to proxy :{port}")],
        None if kernel.backends.is_empty() => vec!["no backends: refused".to_owned()],
        None => kernel.backends.iter().map(|b| format!("-> {b}")).collect(),
    };
    std::iter::once(first).chain(rest).collect()
}

pub fn render_services(services: &[ServiceView]) -> String {
    let with_kernel = services.iter().any(|s| s.kernel.is_some());
    let rows: Vec<_> = services
        .iter()
        .map(|service| {
            let backends: Vec<String> = service.backends.iter().map(ToString::to_string).collect();
            let mut row = vec![
                cell(&service.name),
                cell(&service.kind),
                cell(
                    service
                        .frontend
                        .map_or_else(|| "-".to_owned(), |frontend| frontend.to_string()),
                ),
                cell(&service.listener),
                cell(service.envoy_config.as_deref().unwrap_or("-")),
                lines_or_dash(&backends),
            ];
            if with_kernel {
                row.push(service.kernel.as_ref().map_or_else(|| cell("-"), kernel_service_lines));
            }
            row
        })
        .collect();
    let mut header = vec!["SERVICE", "KIND", "FRONTEND", "LISTENER", "ENVOY CONFIG", "BACKENDS"];
    if with_kernel {
        header.push("KERNEL (socket LB)");
    }
    table(&header, &rows)
}

/// `default/tiefighter:40000 (ID:257)`; the address when no pod is known; `(world)` for reserved identities.
fn flow_endpoint(endpoint: &FlowEndpoint) -> String {
    let place = match endpoint.qualified_name() {
        Some(name) => format!("{name}:{}", endpoint.port),
        None => std::net::SocketAddr::new(endpoint.ip, endpoint.port).to_string(),
    };
    match reserved_identity_name(endpoint.identity) {
        Some(reserved) => format!("{place} ({reserved})"),
        None => format!("{place} (ID:{})", endpoint.identity),
    }
}

/// Hubble's timestamp (`Nov 22 19:01:02.123`), in UTC so the output does not depend on the host.
fn flow_time(record: &FlowRecord) -> String {
    record.time.format("%b %e %H:%M:%S%.3f").to_string()
}

/// One line of `sluice observe` (Hubble's compact format).
pub fn render_flow_compact(record: &FlowRecord) -> String {
    format!(
        "{}: {} -> {} {}",
        flow_time(record),
        flow_endpoint(&record.source),
        flow_endpoint(&record.destination),
        record.summary
    )
}

pub fn render_flows_table(records: &[FlowRecord]) -> String {
    let rows: Vec<_> = records
        .iter()
        .map(|record| {
            let (kind, detail) = record.summary_parts();
            vec![
                cell(flow_time(record)),
                cell(flow_endpoint(&record.source)),
                cell(flow_endpoint(&record.destination)),
                cell(kind),
                cell(&record.verdict),
                cell(detail),
            ]
        })
        .collect();
    table(
        &[
            "TIMESTAMP",
            "SOURCE",
            "DESTINATION",
            "TYPE",
            "VERDICT",
            "SUMMARY",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::tests::{exhaust_denied, landing_ok, peer};
    use crate::view::{FileStatusView, RuleView};

    #[test]
    fn compact_flow_lines_read_like_hubble() {
        let denied = FlowRecord::from_event(&exhaust_denied());
        assert_eq!(
            render_flow_compact(&denied),
            "Nov 22 19:01:02.123: default/tiefighter:40000 (ID:257) -> default/deathstar-0:80 (ID:258) \
             http-request DROPPED (HTTP/1.1 PUT http://deathstar.default/v1/exhaust-port)"
        );
        let mut from_world = landing_ok();
        from_world.source = peer(None, 99, 50000, 2);
        assert_eq!(
            render_flow_compact(&FlowRecord::from_event(&from_world)),
            "Nov 22 19:01:02.123: 198.18.0.99:50000 (world) -> default/deathstar-0:80 (ID:258) \
             http-response FORWARDED (HTTP/1.1 200 3ms (POST http://deathstar.default/v1/request-landing))"
        );
    }

    #[test]
    fn flow_table_splits_type_and_summary() {
        let records = [
            FlowRecord::from_event(&landing_ok()),
            FlowRecord::from_event(&exhaust_denied()),
        ];
        assert_eq!(
            render_flows_table(&records),
            "\
TIMESTAMP             SOURCE                              DESTINATION                       TYPE            VERDICT     SUMMARY
Nov 22 19:01:02.123   default/tiefighter:40000 (ID:257)   default/deathstar-0:80 (ID:258)   http-response   FORWARDED   HTTP/1.1 200 3ms (POST http://deathstar.default/v1/request-landing)
Nov 22 19:01:02.123   default/tiefighter:40000 (ID:257)   default/deathstar-0:80 (ID:258)   http-request    DROPPED     HTTP/1.1 PUT http://deathstar.default/v1/exhaust-port
"
        );
    }

    fn deathstar(replica: u8) -> EndpointView {
        EndpointView {
            kernel: None,
            namespace: "default".to_owned(),
            name: format!("deathstar-{replica}"),
            ip: format!("198.18.0.2{replica}").parse().expect("ip"),
            node: "node-1".to_owned(),
            identity: 258,
            labels: vec![
                "k8s:class=deathstar".to_owned(),
                "k8s:org=empire".to_owned(),
            ],
            ingress_enforced: true,
            egress_enforced: false,
            ingress: vec![RuleView {
                action: "allow".to_owned(),
                remotes: vec![257],
                ports: vec!["80/TCP".to_owned()],
                http: Some(vec!["POST /v1/request-landing".to_owned()]),
                auth_required: false,
                origin: "CiliumNetworkPolicy default/rule1 spec.ingress[0]".to_owned(),
            }],
            egress: vec![],
        }
    }

    #[test]
    fn endpoint_table_puts_one_label_per_line() {
        assert_eq!(
            render_endpoints(&[deathstar(0), deathstar(1)]),
            "\
ENDPOINT              IDENTITY   POLICY (ingress) ENFORCEMENT   POLICY (egress) ENFORCEMENT   IP            NODE     LABELS
default/deathstar-0   258        Enabled                        Disabled                      198.18.0.20   node-1   k8s:class=deathstar
                                                                                                                     k8s:org=empire
default/deathstar-1   258        Enabled                        Disabled                      198.18.0.21   node-1   k8s:class=deathstar
                                                                                                                     k8s:org=empire
"
        );
    }

    #[test]
    fn identity_table_lists_labels_and_endpoints() {
        let identities = [
            IdentityView {
                id: 2,
                labels: vec!["reserved:world".to_owned()],
                endpoints: vec![],
            },
            IdentityView {
                id: 258,
                labels: vec![
                    "k8s:class=deathstar".to_owned(),
                    "k8s:org=empire".to_owned(),
                ],
                endpoints: vec![
                    "default/deathstar-0".to_owned(),
                    "default/deathstar-1".to_owned(),
                ],
            },
        ];
        assert_eq!(
            render_identities(&identities),
            "\
ID    LABELS                ENDPOINTS
2     reserved:world        -
258   k8s:class=deathstar   default/deathstar-0
      k8s:org=empire        default/deathstar-1
"
        );
    }

    #[test]
    fn policy_and_service_tables() {
        let policies = [PolicyView {
            kernel: Vec::new(),
            kind: "CiliumNetworkPolicy".to_owned(),
            namespace: Some("default".to_owned()),
            name: "rule1".to_owned(),
            file: "sw_l3_l4_l7_policy.yaml".to_owned(),
            rules: vec![
                "spec: ingress from org=empire to 80/TCP, HTTP POST /v1/request-landing".to_owned(),
            ],
            selects: vec![
                "default/deathstar-0".to_owned(),
                "default/deathstar-1".to_owned(),
            ],
        }];
        assert_eq!(
            render_policies(&policies),
            "\
POLICY          KIND                  FILE                      SELECTS               RULES
default/rule1   CiliumNetworkPolicy   sw_l3_l4_l7_policy.yaml   default/deathstar-0   spec: ingress from org=empire to 80/TCP, HTTP POST /v1/request-landing
                                                                default/deathstar-1
"
        );
        let services = [ServiceView {
            kernel: None,
            name: "default/deathstar:80".to_owned(),
            kind: "ClusterIP".to_owned(),
            frontend: None,
            listener: "default/deathstar:80".to_owned(),
            envoy_config: Some("default/envoy-lb".to_owned()),
            backends: vec!["198.18.0.20:80".parse().expect("addr")],
        }];
        assert_eq!(
            render_services(&services),
            "\
SERVICE                KIND        FRONTEND   LISTENER               ENVOY CONFIG       BACKENDS
default/deathstar:80   ClusterIP   -          default/deathstar:80   default/envoy-lb   198.18.0.20:80
"
        );
    }

    #[test]
    fn status_lists_errors_under_the_summary() {
        let status = StatusView {
            kernel: None,
            node: "node-1".to_owned(),
            datapath: "none".to_owned(),
            config_dir: "/etc/sluice".to_owned(),
            generation: 7,
            last_applied_unix: 1_732_302_062,
            objects: vec![("CiliumNetworkPolicy".to_owned(), 1), ("Pod".to_owned(), 4)],
            errors: vec!["policy.yaml: document 2 (CiliumNetworkPolicy default/rule1): spec.ingress[0].toPorts[0].ports[0].port: \"eighty\" is not a port".to_owned()],
            warnings: vec![],
            proxy_workers: 2,
            listeners: 3,
            flows_seen: 120,
            flows_lost: 0,
            files: vec![
                FileStatusView {
                    file: "app.yaml".to_owned(),
                    objects: 4,
                    kept_last_good: 0,
                    errors: vec![],
                },
                FileStatusView {
                    file: "policy.yaml".to_owned(),
                    objects: 1,
                    kept_last_good: 1,
                    errors: vec!["policy.yaml: document 2 (CiliumNetworkPolicy default/rule1): spec.ingress[0].toPorts[0].ports[0].port: \"eighty\" is not a port".to_owned()],
                },
            ],
        };
        assert_eq!(
            render_status(&status),
            "\
Node:            node-1
Datapath:        none (gateway mode)
Config dir:      /etc/sluice
Proxy tables:    generation 7, applied 2024-11-22T19:01:02Z
Files:           2 loaded, 1 with errors
Objects:         CiliumNetworkPolicy 1, Pod 4
Proxy:           2 workers, 3 listeners
Flows:           120 seen, 0 lost
Config errors:   1
Warnings:        0

Files:
  FILE          OBJECTS   ERRORS   KEPT LAST GOOD
  app.yaml      4         -        -
  policy.yaml   1         1        1

Config errors (the objects keep their last good state):
  - policy.yaml: document 2 (CiliumNetworkPolicy default/rule1): spec.ingress[0].toPorts[0].ports[0].port: \"eighty\" is not a port
"
        );
        let never = render_status(&StatusView::default());
        assert!(never.contains("generation 0, applied never"), "{never}");
        assert!(never.contains("Files:           0 loaded\n"), "{never}");
        assert!(!never.contains("FILE"), "{never}");
    }
}
