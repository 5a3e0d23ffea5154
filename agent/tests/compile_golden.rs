//! Golden tests of `compile` (pure): example manifests in, tables and views out, compared with
//! `tests/golden/<scenario>.txt`. `SLUICE_UPDATE_GOLDEN=1 cargo test -p sluice-agent --test
//! compile_golden` rewrites the files; review the diff before committing it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sluice_agent::compile::{self, Compiled};
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
        (compile::compile(&model, &identities, NODE, 1), merged.errors)
    }
}

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

fn check_golden(name: &str, scenario: &Scenario) -> Result<()> {
    let (compiled, errors) = scenario.compile();
    let actual = render(&compiled, &errors)?;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.txt"));
    if std::env::var_os("SLUICE_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().context("golden dir")?)?;
        std::fs::write(&path, &actual)?;
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
    check_golden("example-corpus", &scenario)
}
