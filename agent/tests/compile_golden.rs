//! Golden tests of `compile` (pure): example manifests in, tables and views out, compared with
//! `tests/golden/<scenario>.txt`. `SLUICE_UPDATE_GOLDEN=1 cargo test -p sluice-agent --test
//! compile_golden` rewrites the files; review the diff before committing it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sluice_agent::compile::bpf::{self, BpfCompiled};
use sluice_agent::compile::{self, Compiled, DatapathMode};
use sluice_agent::kernel_view::policy_entry_text;
use sluice_agent::demo::scheduler::{self, Addresses};
use sluice_agent::identity::Identities;
use sluice_agent::store::{Parsed, Store};
use sluice_envoy_config::{parse_file, Model, Object, ObjectKey};

const NODE: &str = "node-a";

fn demo_manifest(name: &str) -> Result<String> {
    let path = corpus_dir()?.join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Files as a config dir would hold them: workloads go through the demo's scheduler so pods
/// have addresses; everything else is used as written.
struct Scenario {
    files: Vec<(String, String)>,
    addresses: Addresses,
}

impl Scenario {
    fn new() -> Self {
        Self { files: Vec::new(), addresses: Addresses::default() }
    }

    fn running(mut self, name: &str, text: &str) -> Result<Self> {
        let scheduled = scheduler::schedule(name, text, NODE, &mut self.addresses)?;
        self.files.push((format!("running-{name}"), scheduled.text));
        Ok(self)
    }

    fn applied(mut self, name: &str, text: &str) -> Self {
        self.files.push((name.to_string(), text.to_string()));
        self
    }

    fn compile(&self) -> (Compiled, Vec<String>) {
        let (model, identities, errors) = self.model();
        (compile::compile(&model, &identities, NODE, 1), errors)
    }

    /// `--datapath ebpf`: the proxy tables with the transparent listener and the kernel state,
    /// every local pod behind interface 100 + its index.
    fn compile_kernel(&self) -> (Compiled, BpfCompiled, Vec<String>) {
        let (model, identities, errors) = self.model();
        let compiled = compile::compile_for(&model, &identities, NODE, 1, DatapathMode::Kernel { proxy_port: PROXY_PORT });
        let interfaces = bpf::local_pods(&model, NODE).keys().zip(100..).map(|(ip, ifindex)| (*ip, ifindex)).collect();
        let kernel =
            bpf::compile_bpf(&model, &compiled.tables, &compiled.l7_service_ports, NODE, &interfaces, PROXY_PORT);
        (compiled, kernel, errors)
    }

    fn model(&self) -> (Model, Identities, Vec<String>) {
        let mut store: Store<ObjectKey, Object> = Store::new();
        for (name, text) in &self.files {
            let docs = parse_file(name, text)
                .into_iter()
                .map(|r| match r {
                    Ok(object) => Parsed::Object { key: object.key(), object },
                    Err(e) => Parsed::Error { key: e.object.clone(), message: e.to_string() },
                })
                .collect();
            store.set_file(name, docs);
        }
        let merged = store.merged();
        let model: Model = merged.objects.values().map(|(_, o)| (*o).clone()).collect();
        let mut identities = Identities::in_memory();
        for pod in model.pods().filter(|p| !p.pod_ips.is_empty()) {
            identities.allocate(&compile::pod_labels(&model, pod));
        }
        (model, identities, merged.errors)
    }
}

const PROXY_PORT: u16 = 15001;

fn render(compiled: &Compiled, config_errors: &[String]) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "## config errors")?;
    for e in config_errors {
        writeln!(out, "{e}")?;
    }
    writeln!(out, "\n## compile errors")?;
    for e in &compiled.errors {
        writeln!(out, "{e}")?;
    }
    writeln!(out, "\n## warnings")?;
    for w in &compiled.warnings {
        writeln!(out, "{w}")?;
    }
    writeln!(out, "\n## identities\n{}", serde_json::to_string_pretty(&compiled.identities)?)?;
    writeln!(out, "\n## endpoints\n{}", serde_json::to_string_pretty(&compiled.endpoints)?)?;
    writeln!(out, "\n## policies\n{}", serde_json::to_string_pretty(&compiled.policies)?)?;
    writeln!(out, "\n## services\n{}", serde_json::to_string_pretty(&compiled.services)?)?;
    let tables = &compiled.tables;
    writeln!(out, "\n## tables.peers\n{:#?}", tables.peers)?;
    writeln!(out, "\n## tables.policies\n{:#?}", tables.policies)?;
    writeln!(out, "\n## tables.listeners\n{:#?}", tables.listeners)?;
    writeln!(out, "\n## tables.clusters\n{:#?}", tables.clusters)?;
    Ok(out)
}

/// The kernel state in words, and what the proxy gets on top of its gateway tables.
fn render_kernel(compiled: &Compiled, kernel: &BpfCompiled, config_errors: &[String]) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "## config errors")?;
    for e in config_errors.iter().chain(&compiled.errors) {
        writeln!(out, "{e}")?;
    }
    writeln!(out, "\n## kernel warnings")?;
    for w in &kernel.warnings {
        writeln!(out, "{w}")?;
    }
    writeln!(out, "\n## kernel endpoints")?;
    for e in &kernel.state.endpoints {
        writeln!(
            out,
            "{} identity {} ifindex {} ingress {} egress {}",
            e.ip,
            e.identity,
            e.ifindex,
            if e.enforce_ingress { "enforced" } else { "open" },
            if e.enforce_egress { "enforced" } else { "open" }
        )?;
        for entry in &e.policy {
            writeln!(out, "  {}", policy_entry_text(entry))?;
        }
    }
    writeln!(out, "\n## kernel ipcache")?;
    for entry in &kernel.state.ipcache {
        writeln!(out, "{} -> {}", entry.cidr, entry.identity)?;
    }
    writeln!(out, "\n## kernel services")?;
    for (service, name) in kernel.state.services.iter().zip(&kernel.service_names) {
        let target = match service.l7_proxy_port {
            Some(port) => format!("VIP kept, proxy port {port}"),
            None => format!("{:?}", service.backends),
        };
        writeln!(out, "{name} {}:{} {:?} -> {target}", service.vip, service.port, service.protocol)?;
    }
    let tables = &compiled.tables;
    writeln!(out, "\n## proxy listeners")?;
    for listener in &tables.listeners {
        writeln!(out, "{} {:?}", listener.name, listener.bind)?;
    }
    writeln!(out, "\n## proxy frontends")?;
    for (destination, listener) in &tables.frontends {
        writeln!(out, "{destination} -> {listener}")?;
    }
    writeln!(out, "\n## proxy upstream\nsource {:?}, marked {}", tables.upstream_source, tables.mark_upstream)?;
    writeln!(
        out,
        "{:#?}",
        tables.clusters.get(bpf::ORIGINAL_DESTINATION_CLUSTER).map(|c| (c.lb_policy, c.endpoints.len()))
    )?;
    Ok(out)
}

fn check_golden(name: &str, scenario: &Scenario) -> Result<()> {
    let (compiled, errors) = scenario.compile();
    compare_golden(name, &render(&compiled, &errors)?)
}

fn check_kernel_golden(name: &str, scenario: &Scenario) -> Result<()> {
    let (compiled, kernel, errors) = scenario.compile_kernel();
    compare_golden(name, &render_kernel(&compiled, &kernel, &errors)?)
}

fn compare_golden(name: &str, actual: &str) -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.txt"));
    if std::env::var_os("SLUICE_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().context("golden dir")?)?;
        std::fs::write(&path, actual)?;
        return Ok(());
    }
    let expected = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (set SLUICE_UPDATE_GOLDEN=1 to create it)", path.display()))?;
    if expected != actual {
        let first_diff = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        bail!(
            "{} differs from the compiled output at line {}:\n  expected: {:?}\n  actual:   {:?}\n(SLUICE_UPDATE_GOLDEN=1 rewrites it)",
            path.display(),
            first_diff + 1,
            expected.lines().nth(first_diff),
            actual.lines().nth(first_diff)
        );
    }
    Ok(())
}

#[test]
fn star_wars_without_policy() -> Result<()> {
    let scenario = Scenario::new().running("http-sw-app.yaml", &demo_manifest("http-sw-app.yaml")?)?;
    check_golden("star-wars-no-policy", &scenario)
}

#[test]
fn star_wars_l3_l4_policy() -> Result<()> {
    let scenario = Scenario::new()
        .running("http-sw-app.yaml", &demo_manifest("http-sw-app.yaml")?)?
        .applied("sw_l3_l4_policy.yaml", &demo_manifest("sw_l3_l4_policy.yaml")?);
    check_golden("star-wars-l3-l4", &scenario)
}

/// A small node: the Star Wars app with addresses in namespaces, its Node object.
fn star_wars_node(policy: Option<&str>) -> Result<Scenario> {
    let mut scenario = Scenario { files: Vec::new(), addresses: Addresses::for_namespaces() }
        .running("http-sw-app.yaml", &demo_manifest("http-sw-app.yaml")?)?
        .applied(
            "node.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 198.18.255.1}]\n",
        );
    if let Some(policy) = policy {
        scenario = scenario.applied(policy, &demo_manifest(policy)?);
    }
    Ok(scenario)
}

#[test]
fn kernel_star_wars_l3_l4_policy() -> Result<()> {
    check_kernel_golden("kernel-star-wars-l3-l4", &star_wars_node(Some("sw_l3_l4_policy.yaml"))?)
}

#[test]
fn kernel_star_wars_l7_policy_redirects_port_80_to_the_proxy() -> Result<()> {
    check_kernel_golden("kernel-star-wars-l7", &star_wars_node(Some("sw_l3_l4_l7_policy.yaml"))?)
}

#[test]
fn kernel_helloworld_canary_keeps_the_cec_service_vip() -> Result<()> {
    let scenario = Scenario { files: Vec::new(), addresses: Addresses::for_namespaces() }
        .running("client-helloworld.yaml", &demo_manifest("client-helloworld.yaml")?)?
        .running("helloworld-service-v1-v2.yaml", &demo_manifest("helloworld-service-v1-v2.yaml")?)?
        .applied("envoy-helloworld-v1-90-v2-10.yaml", &demo_manifest("envoy-helloworld-v1-90-v2-10.yaml")?);
    check_kernel_golden("kernel-helloworld-canary", &scenario)
}

#[test]
fn star_wars_l7_policy() -> Result<()> {
    let scenario = Scenario::new()
        .running("http-sw-app.yaml", &demo_manifest("http-sw-app.yaml")?)?
        .applied("sw_l3_l4_l7_policy.yaml", &demo_manifest("sw_l3_l4_l7_policy.yaml")?);
    check_golden("star-wars-l7", &scenario)
}

#[test]
fn helloworld_canary() -> Result<()> {
    let scenario = Scenario::new()
        .running("client-helloworld.yaml", &demo_manifest("client-helloworld.yaml")?)?
        .running("helloworld-service-v1-v2.yaml", &demo_manifest("helloworld-service-v1-v2.yaml")?)?
        .applied("envoy-helloworld-v1-90-v2-10.yaml", &demo_manifest("envoy-helloworld-v1-90-v2-10.yaml")?);
    check_golden("helloworld-canary", &scenario)
}

/// Cilium's example corpus, vendored unchanged in `conformance/cilium-examples`.
fn corpus_dir() -> Result<PathBuf> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/cilium-examples");
    if corpus.is_dir() {
        return Ok(corpus);
    }
    bail!("the Cilium example corpus is expected at {}", corpus.display())
}

/// Every example file together: workloads scheduled, policies and Envoy configs applied.
/// Workload files are the ones whose documents are all core Kubernetes kinds.
#[test]
fn whole_example_corpus() -> Result<()> {
    let dir = corpus_dir()?;
    let mut names: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    let mut scenario = Scenario::new();
    for name in names {
        let text = std::fs::read_to_string(dir.join(&name))?;
        let is_cilium = text.contains("cilium.io/v2");
        scenario = if is_cilium { scenario.applied(&name, &text) } else { scenario.running(&name, &text)? };
    }
    check_golden("example-corpus", &scenario)?;
    // The same objects for the kernel: deny rules, entities, CIDRs, port ranges, ANY.
    check_kernel_golden("kernel-example-corpus", &scenario)
}
