//! The store between sources and model: per config file, its last parse, with last-good fallback.
//!
//! A file's documents become objects keyed by their object key. When a document turns bad, the
//! object it described keeps its last good version (so a typo never opens or closes traffic);
//! its error is reported. Files are merged in path order, so when two files define the same
//! object the first path wins, deterministically, and the clash is reported naming both.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One document of a file, as the parser left it.
#[derive(Debug, Clone)]
pub enum Parsed<K, O> {
    Object { key: K, object: O },
    /// `key` is the object the document describes when the parser got that far.
    Error { key: Option<K>, message: String },
}

#[derive(Debug, Clone)]
struct FileState<K, O> {
    /// In document order: what this file currently contributes (good or kept last-good).
    objects: Vec<(K, O)>,
    errors: Vec<String>,
    /// How many of `objects` are last-good versions standing in for a bad document.
    kept_last_good: usize,
}

impl<K, O> Default for FileState<K, O> {
    fn default() -> Self {
        Self { objects: Vec::new(), errors: Vec::new(), kept_last_good: 0 }
    }
}

/// What changed in one file, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileUpdate {
    /// Objects that stay at their last good version because their document is now bad.
    pub kept_last_good: Vec<String>,
    pub errors: usize,
}

#[derive(Debug, Clone)]
pub struct Store<K, O> {
    files: BTreeMap<String, FileState<K, O>>,
}

impl<K, O> Default for Store<K, O> {
    fn default() -> Self {
        Self { files: BTreeMap::new() }
    }
}

/// The merged view over all files.
#[derive(Debug)]
pub struct Merged<'a, K, O> {
    /// Each object once, with the file it comes from.
    pub objects: BTreeMap<K, (&'a str, &'a O)>,
    /// Parse errors of every file and duplicate-key clashes, in file order.
    pub errors: Vec<String>,
    /// Every file, in path order, with what it contributes to `objects` and its errors.
    pub files: Vec<FileSummary<'a>>,
}

/// One file's share of the merged view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSummary<'a> {
    pub file: &'a str,
    /// Objects taken from this file (a duplicate of an earlier file's object is not).
    pub objects: usize,
    /// Of those, objects at their last good version because their document is now bad.
    pub kept_last_good: usize,
    /// Its parse errors and the duplicates it clashes on.
    pub errors: Vec<String>,
}

impl<K: Ord + Clone + fmt::Display, O: Clone> Store<K, O> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces what `file` contributes with its new parse, keeping the last good version of
    /// every object whose document is now an error.
    ///
    /// An error that names no object (e.g. broken YAML syntax) could concern any object of the
    /// file, so every previous object of the file that is not otherwise accounted for is kept.
    pub fn set_file(&mut self, file: &str, docs: Vec<Parsed<K, O>>) -> FileUpdate {
        let previous = self.files.remove(file).unwrap_or_default();
        let mut previous_by_key: BTreeMap<K, O> = previous.objects.into_iter().collect();
        let mut next = FileState::default();
        let mut seen: BTreeSet<K> = BTreeSet::new();
        let mut unattributed_error = false;
        let mut update = FileUpdate::default();
        for doc in docs {
            match doc {
                Parsed::Object { key, object } => {
                    seen.insert(key.clone());
                    next.objects.push((key, object));
                }
                Parsed::Error { key, message } => {
                    next.errors.push(message);
                    match key {
                        Some(key) => {
                            if let Some(old) = previous_by_key.remove(&key) {
                                update.kept_last_good.push(key.to_string());
                                seen.insert(key.clone());
                                next.objects.push((key, old));
                            }
                        }
                        None => unattributed_error = true,
                    }
                }
            }
        }
        if unattributed_error {
            for (key, old) in previous_by_key {
                if !seen.contains(&key) {
                    update.kept_last_good.push(key.to_string());
                    next.objects.push((key, old));
                }
            }
        }
        update.errors = next.errors.len();
        next.kept_last_good = update.kept_last_good.len();
        self.files.insert(file.to_string(), next);
        update
    }

    /// The file could not be read at all: keep everything it contributed, report why.
    pub fn set_unreadable(&mut self, file: &str, message: String) {
        let state = self.files.entry(file.to_string()).or_default();
        state.errors = vec![message];
        state.kept_last_good = state.objects.len();
    }

    /// The file is gone: its objects are gone.
    pub fn remove_file(&mut self, file: &str) -> bool {
        self.files.remove(file).is_some()
    }

    pub fn merged(&self) -> Merged<'_, K, O> {
        let mut objects: BTreeMap<K, (&str, &O)> = BTreeMap::new();
        let mut errors = Vec::new();
        let mut files = Vec::with_capacity(self.files.len());
        for (file, state) in &self.files {
            let mut summary = FileSummary {
                file: file.as_str(),
                objects: 0,
                kept_last_good: state.kept_last_good,
                errors: state.errors.clone(),
            };
            for (key, object) in &state.objects {
                match objects.get(key) {
                    Some((first, _)) => summary.errors.push(format!(
                        "{file}: duplicate {key}: already defined in {first}; the definition in {first} is used"
                    )),
                    None => {
                        objects.insert(key.clone(), (file.as_str(), object));
                        summary.objects += 1;
                    }
                }
            }
            errors.extend(summary.errors.iter().cloned());
            files.push(summary);
        }
        Merged { objects, errors, files }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, value: &str) -> Parsed<String, String> {
        Parsed::Object { key: key.into(), object: value.into() }
    }

    fn err(key: Option<&str>, message: &str) -> Parsed<String, String> {
        Parsed::Error { key: key.map(Into::into), message: message.into() }
    }

    fn contents(store: &Store<String, String>) -> Vec<(String, String, String)> {
        store
            .merged()
            .objects
            .into_iter()
            .map(|(k, (f, o))| (k, f.to_string(), o.clone()))
            .collect()
    }

    #[test]
    fn bad_document_keeps_last_good_object_and_reports_error() {
        let mut store = Store::new();
        store.set_file("a.yaml", vec![obj("Pod default/x", "v1"), obj("Pod default/y", "v1")]);
        let update = store.set_file(
            "a.yaml",
            vec![err(Some("Pod default/x"), "a.yaml: document 0 (Pod default/x): spec: bad"), obj("Pod default/y", "v2")],
        );
        assert_eq!(update.kept_last_good, vec!["Pod default/x".to_string()]);
        assert_eq!(
            contents(&store),
            vec![
                ("Pod default/x".into(), "a.yaml".into(), "v1".into()),
                ("Pod default/y".into(), "a.yaml".into(), "v2".into()),
            ]
        );
        assert_eq!(store.merged().errors, vec!["a.yaml: document 0 (Pod default/x): spec: bad".to_string()]);
    }

    #[test]
    fn error_without_key_keeps_all_previous_objects_of_the_file() {
        let mut store = Store::new();
        store.set_file("a.yaml", vec![obj("Pod default/x", "v1"), obj("Pod default/y", "v1")]);
        store.set_file("a.yaml", vec![err(None, "a.yaml: document 0: yaml syntax")]);
        assert_eq!(contents(&store).len(), 2);
        assert_eq!(store.merged().errors, vec!["a.yaml: document 0: yaml syntax".to_string()]);
    }

    #[test]
    fn bad_new_object_is_not_invented() {
        let mut store: Store<String, String> = Store::new();
        store.set_file("a.yaml", vec![err(Some("Pod default/x"), "bad")]);
        assert!(contents(&store).is_empty());
        assert_eq!(store.merged().errors, vec!["bad".to_string()]);
    }

    #[test]
    fn fixed_document_clears_error_and_removed_document_removes_object() {
        let mut store = Store::new();
        store.set_file("a.yaml", vec![obj("Pod default/x", "v1"), obj("Pod default/y", "v1")]);
        store.set_file("a.yaml", vec![err(Some("Pod default/x"), "bad")]);
        store.set_file("a.yaml", vec![obj("Pod default/x", "v3")]);
        assert_eq!(contents(&store), vec![("Pod default/x".into(), "a.yaml".into(), "v3".into())]);
        assert!(store.merged().errors.is_empty());
    }

    #[test]
    fn removed_file_removes_its_objects() {
        let mut store = Store::new();
        store.set_file("a.yaml", vec![obj("Pod default/x", "v1")]);
        store.set_file("b.yaml", vec![obj("Pod default/y", "v1")]);
        assert!(store.remove_file("a.yaml"));
        assert_eq!(contents(&store), vec![("Pod default/y".into(), "b.yaml".into(), "v1".into())]);
    }

    #[test]
    fn duplicate_key_first_file_wins_and_error_names_both() {
        let mut store = Store::new();
        store.set_file("z.yaml", vec![obj("Service default/s", "from z")]);
        store.set_file("a.yaml", vec![obj("Service default/s", "from a")]);
        assert_eq!(contents(&store), vec![("Service default/s".into(), "a.yaml".into(), "from a".into())]);
        assert_eq!(
            store.merged().errors,
            vec!["z.yaml: duplicate Service default/s: already defined in a.yaml; the definition in a.yaml is used"
                .to_string()]
        );
    }

    #[test]
    fn file_summaries_count_what_each_file_contributes_and_its_errors() {
        let mut store = Store::new();
        store.set_file("a.yaml", vec![obj("Pod default/x", "v1"), obj("Service default/s", "v1")]);
        store.set_file("b.yaml", vec![obj("Pod default/y", "v1"), obj("Pod default/z", "v1")]);
        store.set_file("b.yaml", vec![err(Some("Pod default/y"), "b.yaml: document 0: bad"), obj("Pod default/z", "v2")]);
        store.set_file("c.yaml", vec![obj("Service default/s", "from c")]);
        let summaries = store.merged().files;
        assert_eq!(
            summaries,
            vec![
                FileSummary { file: "a.yaml", objects: 2, kept_last_good: 0, errors: vec![] },
                FileSummary {
                    file: "b.yaml",
                    objects: 2,
                    kept_last_good: 1,
                    errors: vec!["b.yaml: document 0: bad".to_string()]
                },
                FileSummary {
                    file: "c.yaml",
                    objects: 0,
                    kept_last_good: 0,
                    errors: vec![
                        "c.yaml: duplicate Service default/s: already defined in a.yaml; the definition in a.yaml is used"
                            .to_string()
                    ]
                },
            ]
        );
        store.set_unreadable("a.yaml", "a.yaml: cannot read".into());
        let merged = store.merged();
        assert_eq!(merged.files[0].kept_last_good, 2);
        assert_eq!(merged.files[0].errors, vec!["a.yaml: cannot read".to_string()]);
    }

    #[test]
    fn unreadable_file_keeps_objects() {
        let mut store = Store::new();
        store.set_file("a.yaml", vec![obj("Pod default/x", "v1")]);
        store.set_unreadable("a.yaml", "a.yaml: not UTF-8".into());
        assert_eq!(contents(&store).len(), 1);
        assert_eq!(store.merged().errors, vec!["a.yaml: not UTF-8".to_string()]);
    }
}
