//! Deterministic mutation fuzzing of the corpus: parse_file must never panic.
//! (cargo-fuzz needs nightly; this runs on stable in the normal test suite.)

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::{Context, Result};
use common::corpus;
use sluice_envoy_config::parse_file;

/// xorshift64*: a fixed, dependency-free generator so every run mutates identically.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING_BYTES: &[u8] = b":- \n\t{}[]\"'*&!#%|>0129aZ/.,@$\\";

fn flip_bytes(text: &str, rng: &mut Rng) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.below(bytes.len());
        bytes[at] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn truncate(text: &str, rng: &mut Rng) -> String {
    let bytes = text.as_bytes();
    String::from_utf8_lossy(&bytes[..rng.below(bytes.len() + 1)]).into_owned()
}

fn shuffle_lines(text: &str, rng: &mut Rng) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    if lines.len() < 2 {
        return text.to_string();
    }
    match rng.below(4) {
        0 => {
            let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
            lines.swap(a, b);
        }
        1 => {
            lines.remove(rng.below(lines.len()));
        }
        2 => {
            let at = rng.below(lines.len());
            let copy = lines[rng.below(lines.len())];
            lines.insert(at, copy);
        }
        _ => {
            let at = rng.below(lines.len());
            let trimmed = lines[at].trim_start();
            let owned = format!("{}{trimmed}", " ".repeat(rng.below(8)));
            return lines[..at]
                .iter()
                .copied()
                .chain(std::iter::once(owned.as_str()))
                .chain(lines[at + 1..].iter().copied())
                .collect::<Vec<_>>()
                .join("\n");
        }
    }
    lines.join("\n")
}

/// Replacement values of every JSON type, including ones the schema never expects.
fn odd_value(rng: &mut Rng) -> serde_json::Value {
    match rng.below(12) {
        10 => serde_json::json!("18446744073709551615s"),
        11 => serde_json::json!(1e300),
        0 => serde_json::Value::Null,
        1 => serde_json::json!(-1),
        2 => serde_json::json!(4_294_967_296u64),
        3 => serde_json::json!(""),
        4 => serde_json::json!("*"),
        5 => serde_json::json!([]),
        6 => serde_json::json!({}),
        7 => serde_json::json!(true),
        8 => serde_json::json!("0.5s"),
        _ => serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster"}),
    }
}

/// Applies `mutate` to the `n`-th node of a pre-order walk; returns whether it was reached.
fn visit_nth(
    value: &mut serde_json::Value,
    n: &mut usize,
    mutate: &mut dyn FnMut(&mut serde_json::Value),
) -> bool {
    if *n == 0 {
        mutate(value);
        return true;
    }
    *n -= 1;
    match value {
        serde_json::Value::Object(map) => map.values_mut().any(|v| visit_nth(v, n, mutate)),
        serde_json::Value::Array(items) => items.iter_mut().any(|v| visit_nth(v, n, mutate)),
        _ => false,
    }
}

fn node_count(value: &serde_json::Value) -> usize {
    1 + match value {
        serde_json::Value::Object(map) => map.values().map(node_count).sum(),
        serde_json::Value::Array(items) => items.iter().map(node_count).sum(),
        _ => 0,
    }
}

/// Replaces, transplants, swaps or renames at one random node of the tree.
fn mutate_tree(value: &mut serde_json::Value, rng: &mut Rng, donor: &serde_json::Value) {
    let mut index = rng.below(node_count(value));
    let choice = rng.below(4);
    let replacement = odd_value(rng);
    let (pick_a, pick_b) = (rng.next() as usize, rng.next() as usize);
    visit_nth(value, &mut index, &mut |node| match choice {
        0 => *node = replacement.clone(),
        1 => *node = donor.clone(),
        2 => {
            if let serde_json::Value::Object(map) = node {
                let keys: Vec<String> = map.keys().cloned().collect();
                if keys.len() >= 2 {
                    let (a, b) = (&keys[pick_a % keys.len()], &keys[pick_b % keys.len()]);
                    if let (Some(va), Some(vb)) = (map.get(a).cloned(), map.get(b).cloned()) {
                        map.insert(a.clone(), vb);
                        map.insert(b.clone(), va);
                    }
                }
            }
        }
        _ => {
            if let serde_json::Value::Object(map) = node {
                if let Some(key) = map.keys().nth(pick_a % map.len().max(1)).cloned() {
                    if let Some(moved) = map.remove(&key) {
                        map.insert(format!("{key}X"), moved);
                    }
                }
            }
        }
    });
}

fn check(name: &str, text: &str) -> Result<()> {
    catch_unwind(AssertUnwindSafe(|| parse_file(name, text)))
        .map(drop)
        .map_err(|_| {
            anyhow::anyhow!("parse_file panicked on a mutation of {name}:\n-----\n{text}\n-----")
        })
}

#[test]
fn mutated_corpus_never_panics() -> Result<()> {
    let files = corpus()?;
    let documents: Vec<serde_json::Value> = files
        .iter()
        .flat_map(|(name, text)| {
            serde_yaml::Deserializer::from_str(text)
                .filter_map(|doc| serde::Deserialize::deserialize(doc).ok())
                .filter(|v: &serde_json::Value| !v.is_null())
                .map(move |v| (name.clone(), v))
        })
        .map(|(_, v)| v)
        .collect();
    assert!(documents.len() >= 50);
    let mut rng = Rng(0x5EED_0F5A_1CE5);
    let mut runs = 0;
    for round in 0..40 {
        for (name, text) in &files {
            let mutated = match round % 3 {
                0 => flip_bytes(text, &mut rng),
                1 => truncate(text, &mut rng),
                _ => shuffle_lines(text, &mut rng),
            };
            check(name, &mutated)?;
            runs += 1;
        }
    }
    for _ in 0..4000 {
        let mut document = documents[rng.below(documents.len())].clone();
        let donor = documents[rng.below(documents.len())].clone();
        for _ in 0..1 + rng.below(3) {
            mutate_tree(&mut document, &mut rng, &donor);
        }
        let json = serde_json::to_string(&document).context("json")?;
        check("mutated.json", &json)?;
        let yaml = serde_yaml::to_string(&document).context("yaml")?;
        check("mutated.yaml", &yaml)?;
        runs += 2;
    }
    assert!(runs > 9000, "{runs} runs");
    Ok(())
}
