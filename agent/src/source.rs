//! Source: the config directory (sources -> model). Reads every manifest under it and watches it.
//!
//! Changes are found by rescanning the whole directory after a quiet period and comparing file
//! contents with the last scan: editors write through temp files and renames, Kubernetes
//! ConfigMap mounts swap symlinked directories, and a rescan sees the end state of all of them
//! without interpreting individual notify events.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_mini::{new_debouncer, Debouncer};
use tokio::sync::mpsc;

/// Extensions of the files read; everything else in the directory is ignored.
const MANIFEST_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("config dir {dir}: {source}")]
    Scan { dir: PathBuf, source: walkdir::Error },
    #[error("cannot watch config dir {dir}: {source}")]
    Watch { dir: PathBuf, source: notify::Error },
}

/// A file's content, or why it could not be read.
pub type FileText = Result<String, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChange {
    /// New or changed; `file` is the path relative to the config dir, `/`-separated.
    Changed { file: String, text: FileText },
    Removed { file: String },
}

/// The config directory and what its last scan saw.
#[derive(Debug)]
pub struct ConfigDir {
    root: PathBuf,
    known: BTreeMap<String, FileText>,
}

impl ConfigDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), known: BTreeMap::new() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads the directory again and returns what differs from the previous scan (everything,
    /// the first time), in path order.
    pub fn rescan(&mut self) -> Result<Vec<FileChange>, SourceError> {
        let now = read_manifests(&self.root)?;
        let mut changes = Vec::new();
        for (file, text) in &now {
            if self.known.get(file) != Some(text) {
                changes.push(FileChange::Changed { file: file.clone(), text: text.clone() });
            }
        }
        for file in self.known.keys() {
            if !now.contains_key(file) {
                changes.push(FileChange::Removed { file: file.clone() });
            }
        }
        self.known = now;
        Ok(changes)
    }
}

fn is_manifest(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|ext| MANIFEST_EXTENSIONS.iter().any(|m| ext.eq_ignore_ascii_case(m)))
}

/// Hidden entries are editor swap/lock files or the `..data` indirection of ConfigMap mounts
/// (whose real files are reachable through the visible symlinks); reading them would load every
/// manifest twice.
fn is_hidden(entry: &walkdir::DirEntry) -> bool {
    entry.depth() > 0 && entry.file_name().to_str().is_some_and(|name| name.starts_with('.'))
}

fn read_manifests(root: &Path) -> Result<BTreeMap<String, FileText>, SourceError> {
    let mut files = BTreeMap::new();
    let walker = walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name().into_iter();
    for entry in walker.filter_entry(|e| !is_hidden(e)) {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.depth() == 0 => return Err(SourceError::Scan { dir: root.to_path_buf(), source: e }),
            // A file that vanished between listing and reading is simply not there any more.
            Err(e) if e.io_error().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "skipping unreadable entry in config dir");
                continue;
            }
        };
        if !entry.file_type().is_file() || !is_manifest(entry.path()) {
            continue;
        }
        let relative = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let name = relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
        let text = match std::fs::read(entry.path()) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|e| format!("{name}: not valid UTF-8: {e}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => Err(format!("{name}: cannot read: {e}")),
        };
        files.insert(name, text);
    }
    Ok(files)
}

/// Watches `root` recursively; every burst of file-system activity, once quiet for `debounce`,
/// yields one `()` on the returned channel. Keep the `Debouncer` alive for as long as watching.
pub fn watch(
    root: &Path,
    debounce: Duration,
) -> Result<(Debouncer<notify::RecommendedWatcher>, mpsc::UnboundedReceiver<()>), SourceError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut debouncer = new_debouncer(debounce, move |result: notify_debouncer_mini::DebounceEventResult| {
        match result {
            Ok(_) => {
                // The receiver is gone only while the agent shuts down.
                let _ = tx.send(());
            }
            Err(e) => tracing::warn!(error = %e, "config dir watch error; rescanning"),
        }
    })
    .map_err(|source| SourceError::Watch { dir: root.to_path_buf(), source })?;
    debouncer
        .watcher()
        .watch(root, RecursiveMode::Recursive)
        .map_err(|source| SourceError::Watch { dir: root.to_path_buf(), source })?;
    Ok((debouncer, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(file: &str, text: &str) -> FileChange {
        FileChange::Changed { file: file.into(), text: Ok(text.into()) }
    }

    #[test]
    fn rescan_reports_new_changed_and_removed_manifests_only() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("sub"))?;
        std::fs::create_dir_all(dir.path().join("..data"))?;
        std::fs::write(dir.path().join("a.yaml"), "a: 1")?;
        std::fs::write(dir.path().join("sub/b.json"), "{}")?;
        std::fs::write(dir.path().join("notes.txt"), "ignored")?;
        std::fs::write(dir.path().join(".a.yaml.swp"), "ignored")?;
        std::fs::write(dir.path().join("..data/c.yaml"), "ignored")?;
        let mut source = ConfigDir::new(dir.path());
        assert_eq!(source.rescan()?, vec![changed("a.yaml", "a: 1"), changed("sub/b.json", "{}")]);
        assert_eq!(source.rescan()?, vec![]);
        std::fs::write(dir.path().join("a.yaml"), "a: 2")?;
        std::fs::remove_file(dir.path().join("sub/b.json"))?;
        std::fs::write(dir.path().join("sub/c.YML"), "c: 1")?;
        assert_eq!(
            source.rescan()?,
            vec![changed("a.yaml", "a: 2"), changed("sub/c.YML", "c: 1"), FileChange::Removed { file: "sub/b.json".into() }]
        );
        Ok(())
    }

    #[test]
    fn invalid_utf8_is_reported_per_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("bad.yaml"), [0xff, 0xfe])?;
        let mut source = ConfigDir::new(dir.path());
        let changes = source.rescan()?;
        assert!(matches!(&changes[..], [FileChange::Changed { file, text: Err(e) }]
            if file == "bad.yaml" && e.starts_with("bad.yaml: not valid UTF-8")));
        Ok(())
    }

    #[test]
    fn missing_dir_is_an_error() {
        let mut source = ConfigDir::new("/nonexistent/sluice-config-dir");
        assert!(matches!(source.rescan(), Err(SourceError::Scan { .. })));
    }

    #[tokio::test]
    async fn watch_signals_after_a_write() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (_debouncer, mut rx) = watch(dir.path(), Duration::from_millis(50))?;
        std::fs::write(dir.path().join("a.yaml"), "a: 1")?;
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?;
        Ok(())
    }
}
