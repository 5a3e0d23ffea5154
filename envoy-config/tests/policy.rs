//! Cilium policy semantics: namespace injection, label sources, ports, HTTP rules.

mod common;

use anyhow::{bail, Result};
use common::{example, one};
use sluice_envoy_config::labels::{LabelSet, Operator, Requirement};
use sluice_envoy_config::policy::{
    AuthenticationMode, Entity, FqdnSelector, HeaderRequirement, HttpRule, L7Rules, MismatchAction,
    NetworkPolicy, PeerRule, Port, PortProtocol, Protocol, Subject,
};
use sluice_envoy_config::{LabelKey, Object, Selector};

fn policy(object: Object) -> Result<NetworkPolicy> {
    match object {
        Object::NetworkPolicy(policy) => Ok(policy),
        other => bail!("expected a policy, got {}", other.key()),
    }
}

fn subject(policy: &NetworkPolicy, rule: usize) -> Result<&Selector> {
    match &policy.rules[rule].subject {
        Subject::Endpoints(selector) => Ok(selector),
        Subject::Nodes(_) => bail!("node subject"),
    }
}

fn pod(namespace: &str, labels: &[(&str, &str)]) -> LabelSet {
    let mut set = LabelSet::new();
    for (key, value) in labels {
        set.insert("k8s", key, value);
    }
    set.insert("k8s", "io.kubernetes.pod.namespace", namespace);
    set
}

fn http_rules(rule: &PeerRule) -> Result<&[HttpRule]> {
    match &rule.to_ports[0].rules {
        Some(L7Rules::Http(rules)) => Ok(rules),
        other => bail!("expected http rules, got {other:?}"),
    }
}

fn in_(source: &str, key: &str, value: &str) -> Requirement {
    Requirement {
        key: LabelKey::new(source, key),
        operator: Operator::In(vec![value.to_string()]),
    }
}

#[test]
fn cnp_subject_and_peers_are_pinned_to_the_policy_namespace() -> Result<()> {
    let rule1 = policy(example("sw_l3_l4_l7_policy.yaml")?.remove(0))?;
    assert_eq!(rule1.namespace.as_deref(), Some("default"));
    let selector = subject(&rule1, 0)?;
    assert_eq!(
        selector.requirements,
        vec![
            in_("k8s", "io.kubernetes.pod.namespace", "default"),
            in_("any", "class", "deathstar"),
            in_("any", "org", "empire"),
        ]
    );
    assert!(selector.matches(&pod(
        "default",
        &[("org", "empire"), ("class", "deathstar")]
    )));
    assert!(!selector.matches(&pod("other", &[("org", "empire"), ("class", "deathstar")])));

    let peer = &rule1.rules[0].ingress[0].endpoints[0];
    assert_eq!(
        peer.requirements,
        vec![
            in_("any", "org", "empire"),
            in_("k8s", "io.kubernetes.pod.namespace", "default")
        ]
    );
    assert!(peer.matches(&pod("default", &[("org", "empire")])));
    assert!(!peer.matches(&pod("kube-system", &[("org", "empire")])));
    Ok(())
}

#[test]
fn cnp_subject_namespace_overrides_a_user_namespace_label() -> Result<()> {
    let policy = policy(one(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: team-a}\n\
         spec:\n  endpointSelector:\n    matchLabels:\n      k8s:io.kubernetes.pod.namespace: team-b\n      app: web\n",
    )?)?;
    let selector = subject(&policy, 0)?;
    assert!(selector.matches(&pod("team-a", &[("app", "web")])));
    assert!(!selector.matches(&pod("team-b", &[("app", "web")])));
    Ok(())
}

#[test]
fn cnp_peers_with_explicit_namespace_reserved_or_namespace_labels_are_untouched() -> Result<()> {
    let policy = policy(one(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: team-a}\n\
         spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints:\n\
         \x20   - matchLabels: {k8s:io.kubernetes.pod.namespace: team-b, app: api}\n\
         \x20   - matchLabels: {reserved:host: ''}\n\
         \x20   - matchLabels: {io.cilium.k8s.namespace.labels.team: blue}\n",
    )?)?;
    let peers = &policy.rules[0].ingress[0].endpoints;
    assert_eq!(
        peers[0].requirements,
        vec![
            in_("any", "app", "api"),
            in_("k8s", "io.kubernetes.pod.namespace", "team-b")
        ]
    );
    assert_eq!(peers[1].requirements, vec![in_("reserved", "host", "")]);
    assert_eq!(
        peers[2].requirements,
        vec![in_("any", "io.cilium.k8s.namespace.labels.team", "blue")]
    );
    assert!(peers[0].matches(&pod("team-b", &[("app", "api")])));
    assert!(!peers[0].matches(&pod("team-a", &[("app", "api")])));
    Ok(())
}

#[test]
fn ccnp_peers_require_some_namespace_and_subject_has_none() -> Result<()> {
    let policy = policy(example("from_world_deny.yaml")?.remove(0))?;
    assert!(policy.is_clusterwide());
    assert_eq!(subject(&policy, 0)?.requirements, vec![]);
    assert_eq!(
        policy.rules[0].ingress_deny[0].entities,
        vec![Entity::World]
    );
    assert_eq!(policy.rules[0].ingress[0].entities, vec![Entity::All]);

    let policy = policy_from(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\n\
         spec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{}]\n",
    )?;
    let peer = &policy.rules[0].ingress[0].endpoints[0];
    assert_eq!(
        peer.requirements,
        vec![Requirement {
            key: LabelKey::new("k8s", "io.kubernetes.pod.namespace"),
            operator: Operator::Exists
        }]
    );
    assert!(peer.matches(&pod("anything", &[])));
    let mut host = LabelSet::new();
    host.insert("reserved", "host", "");
    assert!(
        !peer.matches(&host),
        "an empty CCNP peer must not select non-pod identities"
    );
    Ok(())
}

fn policy_from(text: &str) -> Result<NetworkPolicy> {
    policy(one(text)?)
}

#[test]
fn label_sources_any_matches_every_source_and_k8s_only_k8s() -> Result<()> {
    let policy = policy(example("client-egress-l7-http.yaml")?.remove(0))?;
    let peer = &policy.rules[0].egress[0].endpoints[0];
    assert_eq!(peer.requirements[0], in_("k8s", "kind", "echo"));
    let mut from_container = LabelSet::new();
    from_container.insert("container", "kind", "echo");
    from_container.insert("k8s", "io.kubernetes.pod.namespace", "default");
    assert!(
        !peer.matches(&from_container),
        "k8s:kind must not match a container-sourced label"
    );
    assert!(peer.matches(&pod("default", &[("kind", "echo")])));

    let subject = subject(&policy, 0)?;
    let mut any_source = LabelSet::new();
    any_source.insert("container", "other", "client");
    any_source.insert("k8s", "io.kubernetes.pod.namespace", "default");
    assert!(
        subject.matches(&any_source),
        "a bare key matches a label of any source"
    );
    Ok(())
}

#[test]
fn match_expressions_follow_kubernetes_semantics() -> Result<()> {
    let policy = policy(example("es-sw-policy.yaml")?.remove(0))?;
    assert_eq!(policy.rules.len(), 2);
    assert_eq!(policy.rules[1].path, "specs[1]");
    let peer = &policy.rules[1].egress[0].endpoints[0];
    assert_eq!(
        peer.requirements,
        vec![Requirement {
            key: LabelKey::new("k8s", "io.kubernetes.pod.namespace"),
            operator: Operator::Exists
        }]
    );
    assert_eq!(
        policy.rules[1].egress[1].entities,
        vec![Entity::Cluster, Entity::Host]
    );
    let selector = Selector {
        requirements: vec![
            Requirement {
                key: LabelKey::parse("env"),
                operator: Operator::NotIn(vec!["prod".into()]),
            },
            Requirement {
                key: LabelKey::parse("k8s:tier"),
                operator: Operator::DoesNotExist,
            },
        ],
    };
    assert!(selector.matches(&pod("x", &[("env", "dev")])));
    assert!(selector.matches(&pod("x", &[])));
    assert!(!selector.matches(&pod("x", &[("env", "prod")])));
    assert!(!selector.matches(&pod("x", &[("tier", "web")])));
    Ok(())
}

#[test]
fn label_keys_split_source_prefixes() {
    assert_eq!(LabelKey::parse("k8s:app"), LabelKey::new("k8s", "app"));
    assert_eq!(LabelKey::parse("app"), LabelKey::new("any", "app"));
    assert_eq!(
        LabelKey::parse("reserved:host"),
        LabelKey::new("reserved", "host")
    );
    assert_eq!(LabelKey::parse("$host"), LabelKey::new("reserved", "host"));
    assert_eq!(
        LabelKey::parse("app.kubernetes.io/name"),
        LabelKey::new("any", "app.kubernetes.io/name")
    );
}

#[test]
fn ports_keep_numbers_names_ranges_and_protocols() -> Result<()> {
    let range =
        policy(example("client-egress-l7-http-matchheader-secret-port-range.yaml")?.remove(0))?;
    assert_eq!(
        range.rules[0].egress[0].to_ports[0].ports,
        vec![PortProtocol {
            port: Port::Number(4096),
            end_port: Some(8191),
            protocol: Protocol::Tcp
        }]
    );
    let named = policy(example("client-egress-l7-http-named-port.yaml")?.remove(0))?;
    assert_eq!(
        named.rules[0].egress[0].to_ports[0].ports[0].port,
        Port::Name("http-8080".into())
    );
    let dns = policy(example("l7-visibility-tls.yaml")?.remove(0))?;
    let dns_port = &dns.rules[0].egress[1].to_ports[0];
    assert_eq!(
        dns_port.ports[0],
        PortProtocol {
            port: Port::Number(53),
            end_port: None,
            protocol: Protocol::Any
        }
    );
    assert_eq!(
        dns_port.rules,
        Some(L7Rules::Dns(vec![FqdnSelector::Pattern("*".into())]))
    );
    let absent = policy_from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n\
         spec:\n  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: '0'}, {port: HTTP}]}]\n",
    )?;
    assert_eq!(
        absent.rules[0].egress[0].to_ports[0].ports,
        vec![
            PortProtocol {
                port: Port::Number(0),
                end_port: None,
                protocol: Protocol::Any
            },
            PortProtocol {
                port: Port::Name("http".into()),
                end_port: None,
                protocol: Protocol::Any
            },
        ]
    );
    Ok(())
}

#[test]
fn http_rules_are_anchored_full_matches() -> Result<()> {
    let policy = policy(example("sw_l3_l4_l7_policy.yaml")?.remove(0))?;
    let rules = http_rules(&policy.rules[0].ingress[0])?;
    let path = rules[0].path.as_ref().expect("path");
    let method = rules[0].method.as_ref().expect("method");
    assert_eq!(path.source, "/v1/request-landing");
    assert!(path.is_match("/v1/request-landing"));
    assert!(!path.is_match("/v1/request-landing/x"));
    assert!(!path.is_match("/x/v1/request-landing"));
    assert!(
        !path.is_match("/v1/request-landing?x=1"),
        "the query is part of :path"
    );
    assert!(method.is_match("POST"));
    assert!(!method.is_match("POSTX"));
    assert!(!method.is_match("PUT"));

    let es = policy_of("es-sw-policy.yaml")?;
    let es_rules = http_rules(&es.rules[0].ingress[1])?;
    let es_path = es_rules[0].path.as_ref().expect("path");
    assert!(es_path.is_match("/spaceship_diagnostics/_search/?q=x"));
    assert!(es_rules[0]
        .method
        .as_ref()
        .is_some_and(|m| m.is_match("GET") && !m.is_match("GETS")));
    Ok(())
}

fn policy_of(file: &str) -> Result<NetworkPolicy> {
    policy(example(file)?.remove(0))
}

#[test]
fn header_strings_split_on_first_space() -> Result<()> {
    let policy = policy_of("http.yaml")?;
    let rules = http_rules(&policy.rules[0].ingress[0])?;
    assert!(policy.rules[0].ingress[0].has_no_peers());
    assert_eq!(
        rules[1].headers,
        vec![HeaderRequirement {
            name: "X-My-Header".into(),
            value: Some("true".into())
        }]
    );
    let custom = policy_from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n\
         \x20 ingress:\n  - toPorts:\n    - rules:\n        http:\n        - headers: ['X-Present', 'X-Two: a b', 'X-Raw:v']\n",
    )?;
    let rules = http_rules(&custom.rules[0].ingress[0])?;
    assert_eq!(
        rules[0].headers,
        vec![
            HeaderRequirement {
                name: "X-Present".into(),
                value: None
            },
            HeaderRequirement {
                name: "X-Two".into(),
                value: Some("a b".into())
            },
            HeaderRequirement {
                name: "X-Raw:v".into(),
                value: None
            },
        ]
    );
    Ok(())
}

#[test]
fn header_matches_keep_secret_and_mismatch_action() -> Result<()> {
    let policy = policy_of("client-egress-l7-http-matchheader-secret.yaml")?;
    let rules = http_rules(&policy.rules[0].egress[0])?;
    let header = &rules[0].header_matches[0];
    assert_eq!(header.name, "Authorization");
    assert_eq!(header.mismatch, Some(MismatchAction::Replace));
    let secret = header.secret.as_ref().expect("secret");
    assert_eq!(
        (secret.namespace.as_deref(), secret.name.as_str()),
        (Some("cilium-test-1"), "header-match")
    );
    let peer = &policy.rules[0].egress[0].endpoints[0];
    assert!(peer.requirements.contains(&Requirement {
        key: LabelKey::new("any", "io.cilium.k8s.policy.cluster"),
        operator: Operator::In(vec!["kind-kind".into(), "kind-remote".into()]),
    }));
    Ok(())
}

#[test]
fn authentication_tls_fqdns_cidrs_and_default_deny_are_kept() -> Result<()> {
    let auth = policy_of("cnp-with-mutual-auth.yaml")?;
    assert_eq!(
        auth.rules[0].ingress[0].authentication,
        Some(AuthenticationMode::Required)
    );
    let tls = policy_of("l7-visibility-tls.yaml")?;
    let port = &tls.rules[0].egress[0].to_ports[0];
    assert_eq!(
        port.terminating_tls
            .as_ref()
            .and_then(|t| t.secret.as_ref())
            .map(|s| s.name.as_str()),
        Some("artii-tls-data")
    );
    assert_eq!(
        tls.rules[0].egress[0].fqdns,
        vec![FqdnSelector::Name("artii.herokuapp.com".into())]
    );
    assert_eq!(http_rules(&tls.rules[0].egress[0])?.len(), 1);
    let cidr = policy_of("cidr.yaml")?;
    let egress = &cidr.rules[0].egress;
    assert_eq!(egress[0].cidrs[0].cidr, Some("20.1.1.1/32".parse()?));
    assert_eq!(egress[1].cidrs[0].except, vec!["10.96.0.0/12".parse()?]);
    let deny = policy_of("sw_deny_policy.yaml")?;
    assert_eq!(deny.rules[0].ingress.len(), 1);
    assert!(
        deny.rules[0].ingress[0].has_no_peers() && deny.rules[0].ingress[0].to_ports.is_empty()
    );
    let old = policy_of("sw_l3_l4_policy.yaml")?;
    assert_eq!(
        old.description.as_deref(),
        Some("L3-L4 policy to restrict deathstar access to empire ships only")
    );
    let explicit = policy_from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n\
         \x20 enableDefaultDeny: {ingress: false}\n  ingress: [{fromEntities: [world]}]\n",
    )?;
    assert_eq!(explicit.rules[0].enable_default_deny.ingress, Some(false));
    assert_eq!(explicit.rules[0].enable_default_deny.egress, None);
    Ok(())
}

#[test]
fn ccnp_node_selector_rule_is_a_host_policy() -> Result<()> {
    let policy = policy_from(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: host}\n\
         spec:\n  nodeSelector: {matchLabels: {role: worker}}\n  ingress: [{fromEntities: [cluster]}]\n",
    )?;
    let Subject::Nodes(nodes) = &policy.rules[0].subject else {
        bail!("expected nodes")
    };
    assert_eq!(nodes.requirements, vec![in_("any", "role", "worker")]);
    Ok(())
}
