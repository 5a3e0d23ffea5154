//! Source: the config directory (sources -> model). Reads every manifest under it and watches it.
//!
//! Changes are found by rescanning the whole directory after a quiet period and comparing file
//! contents with the last scan: editors write through temp files and renames, Kubernetes
//! ConfigMap mounts swap symlinked directories, and a rescan sees the end state of all of them
//! without interpreting individual notify events. A directory that is deleted, or replaced by
//! another one under the same name, is noticed by its identity (device and inode) and watched
//! afresh once it is back.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventHandler, RecommendedWatcher, RecursiveMode, Watcher};
use notify_debouncer_mini::{new_debouncer_opt, Config as DebounceConfig, Debouncer};
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

/// The platform watcher without access events. notify reports opens and closes of files that
/// were only read, and a rescan reads every manifest: left in, each rescan would signal the next
/// one, and an idle agent would re-read its config dir forever (about 20 times a second).
pub struct ChangeWatcher(RecommendedWatcher);

impl Watcher for ChangeWatcher {
    fn new<F: EventHandler>(mut handler: F, config: notify::Config) -> notify::Result<Self> {
        let changes_only = move |event: notify::Result<notify::Event>| {
            if !matches!(&event, Ok(e) if e.kind.is_access()) {
                handler.handle_event(event);
            }
        };
        RecommendedWatcher::new(changes_only, config).map(Self)
    }

    fn watch(&mut self, path: &Path, recursive_mode: RecursiveMode) -> notify::Result<()> {
        self.0.watch(path, recursive_mode)
    }

    fn unwatch(&mut self, path: &Path) -> notify::Result<()> {
        self.0.unwatch(path)
    }

    fn kind() -> notify::WatcherKind {
        RecommendedWatcher::kind()
    }
}

/// Watches `root` recursively; every burst of changes (not reads), once quiet for `debounce`,
/// sends one `()` on `signal`. Watching lasts as long as the returned `Debouncer`.
pub fn watch(
    root: &Path,
    debounce: Duration,
    signal: mpsc::UnboundedSender<()>,
) -> Result<Debouncer<ChangeWatcher>, SourceError> {
    let config = DebounceConfig::default().with_timeout(debounce);
    let mut debouncer = new_debouncer_opt(config, move |result: notify_debouncer_mini::DebounceEventResult| {
        match result {
            Ok(_) => {
                // The receiver is gone only while the agent shuts down.
                let _ = signal.send(());
            }
            Err(e) => tracing::warn!(error = %e, "config dir watch error; rescanning"),
        }
    })
    .map_err(|source| SourceError::Watch { dir: root.to_path_buf(), source })?;
    debouncer
        .watcher()
        .watch(root, RecursiveMode::Recursive)
        .map_err(|source| SourceError::Watch { dir: root.to_path_buf(), source })?;
    Ok(debouncer)
}

/// Which directory `root` names right now: (device, inode), `None` when it is not a directory.
fn directory_identity(root: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(root).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()))
}

/// What [`WatchedDir::sync`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// The directory was read; these files differ from the last read (possibly none).
    Changes(Vec<FileChange>),
    /// The directory is back or was replaced and is watched again; it is read on the next
    /// `sync`, a moment later, so a directory being refilled is not taken for an empty one.
    Settling,
    /// There is no directory at `root`; nothing was read.
    Missing,
}

/// The config dir and its watch, kept on the directory `root` names even when that directory is
/// deleted and created again.
pub struct WatchedDir {
    dir: ConfigDir,
    debounce: Duration,
    signal: mpsc::UnboundedSender<()>,
    watcher: Option<Debouncer<ChangeWatcher>>,
    /// The directory `watcher` watches (see `directory_identity`).
    watched: Option<(u64, u64)>,
    settling: bool,
}

impl WatchedDir {
    /// Watches `root` and reads it once; the receiver gets a signal after every burst of
    /// changes. Fails when `root` cannot be watched or read.
    pub fn start(
        root: impl Into<PathBuf>,
        debounce: Duration,
    ) -> Result<(Self, Vec<FileChange>, mpsc::UnboundedReceiver<()>), SourceError> {
        let (signal, signals) = mpsc::unbounded_channel();
        let mut dir = ConfigDir::new(root);
        let watched = directory_identity(dir.root());
        // Watch before the first scan, so a change during startup is not missed.
        let watcher = watch(dir.root(), debounce, signal.clone())?;
        let first = dir.rescan()?;
        let watched_dir = Self { dir, debounce, signal, watcher: Some(watcher), watched, settling: false };
        Ok((watched_dir, first, signals))
    }

    pub fn root(&self) -> &Path {
        self.dir.root()
    }

    /// Whether `sync` has something to do without a watch signal: the directory went away,
    /// came back or was replaced, or is settling. Cheap enough to ask every few hundred ms.
    pub fn needs_sync(&self) -> bool {
        self.settling || directory_identity(self.dir.root()) != self.watched
    }

    /// Follows the directory at `root`: re-arms the watch when it is a different directory than
    /// the one watched, otherwise reads it and returns what changed. While the directory is
    /// missing, the last read stays what later changes are compared with.
    pub fn sync(&mut self) -> Result<Synced, SourceError> {
        let now = directory_identity(self.dir.root());
        if now.is_none() {
            self.watcher = None;
            self.watched = None;
            self.settling = false;
            return Ok(Synced::Missing);
        }
        if now != self.watched {
            self.watcher = None;
            self.watcher = Some(watch(self.dir.root(), self.debounce, self.signal.clone())?);
            self.watched = now;
            self.settling = true;
            return Ok(Synced::Settling);
        }
        self.settling = false;
        Ok(Synced::Changes(self.dir.rescan()?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
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

    #[test]
    fn a_renamed_file_moves_its_objects_in_one_scan() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("a.yaml"), "a: 1")?;
        let mut source = ConfigDir::new(dir.path());
        source.rescan()?;
        std::fs::rename(dir.path().join("a.yaml"), dir.path().join("b.yaml"))?;
        assert_eq!(source.rescan()?, vec![changed("b.yaml", "a: 1"), FileChange::Removed { file: "a.yaml".into() }]);
        Ok(())
    }

    #[test]
    fn an_editors_temp_files_are_not_read_and_its_atomic_save_is_one_change() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("a.yaml"), "a: 1")?;
        let mut source = ConfigDir::new(dir.path());
        source.rescan()?;
        // What vim, emacs, JetBrains IDEs and atomic-write libraries leave while saving.
        for temp in [".a.yaml.swp", "a.yaml~", "#a.yaml#", "4913", ".a.yaml.tmp", "a.yaml___jb_tmp___"] {
            std::fs::write(dir.path().join(temp), "a: 2")?;
        }
        assert_eq!(source.rescan()?, vec![], "a scan in the middle of a save sees no change");
        std::fs::rename(dir.path().join(".a.yaml.tmp"), dir.path().join("a.yaml"))?;
        assert_eq!(source.rescan()?, vec![changed("a.yaml", "a: 2")]);
        assert_eq!(source.rescan()?, vec![]);
        Ok(())
    }

    /// Lays out a ConfigMap volume as the kubelet's atomic writer does: the data in a
    /// timestamped directory, `..data` pointing at it, and one visible symlink per key.
    pub(crate) fn configmap_generation(root: &Path, generation: &str, files: &[(&str, &str)]) -> anyhow::Result<()> {
        let data = root.join(generation);
        std::fs::create_dir(&data)?;
        for (name, text) in files {
            std::fs::write(data.join(name), text)?;
        }
        let temp_link = root.join("..data_tmp");
        std::os::unix::fs::symlink(generation, &temp_link)?;
        std::fs::rename(&temp_link, root.join("..data"))?;
        for (name, _) in files {
            let visible = root.join(name);
            if std::fs::symlink_metadata(&visible).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), visible)?;
            }
        }
        Ok(())
    }

    #[test]
    fn a_configmap_data_swap_is_read_through_the_visible_symlinks() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        configmap_generation(dir.path(), "..2024_01_01_00_00_00.1", &[("app.yaml", "a: 1"), ("old.yaml", "o: 1")])?;
        let mut source = ConfigDir::new(dir.path());
        assert_eq!(source.rescan()?, vec![changed("app.yaml", "a: 1"), changed("old.yaml", "o: 1")]);

        configmap_generation(dir.path(), "..2024_01_01_00_05_00.2", &[("app.yaml", "a: 2"), ("policy.yaml", "p: 1")])?;
        // Between the swap and the clean-up, a dropped key's symlink dangles: it is gone.
        assert_eq!(
            source.rescan()?,
            vec![changed("app.yaml", "a: 2"), changed("policy.yaml", "p: 1"), FileChange::Removed { file: "old.yaml".into() }]
        );
        std::fs::remove_file(dir.path().join("old.yaml"))?;
        std::fs::remove_dir_all(dir.path().join("..2024_01_01_00_00_00.1"))?;
        assert_eq!(source.rescan()?, vec![]);
        Ok(())
    }

    #[tokio::test]
    async fn a_deleted_and_recreated_dir_is_followed_and_watched_again() -> anyhow::Result<()> {
        let parent = tempfile::tempdir()?;
        let root = parent.path().join("config");
        std::fs::create_dir(&root)?;
        std::fs::write(root.join("a.yaml"), "a: 1")?;
        let (mut watched, first, mut signals) = WatchedDir::start(&root, Duration::from_millis(50))?;
        assert_eq!(first, vec![changed("a.yaml", "a: 1")]);
        assert!(!watched.needs_sync());

        std::fs::remove_dir_all(&root)?;
        assert!(watched.needs_sync());
        assert_eq!(watched.sync()?, Synced::Missing);
        assert_eq!(watched.sync()?, Synced::Missing);

        std::fs::create_dir(&root)?;
        std::fs::write(root.join("a.yaml"), "a: 1")?;
        std::fs::write(root.join("b.yaml"), "b: 1")?;
        assert!(watched.needs_sync());
        assert_eq!(watched.sync()?, Synced::Settling);
        assert!(watched.needs_sync(), "a settling dir is read on the next check");
        // Compared with the last read before it went away: only b.yaml is new.
        assert_eq!(watched.sync()?, Synced::Changes(vec![changed("b.yaml", "b: 1")]));
        assert!(!watched.needs_sync());

        // The new directory is watched: a write there signals.
        while signals.try_recv().is_ok() {}
        std::fs::write(root.join("c.yaml"), "c: 1")?;
        tokio::time::timeout(Duration::from_secs(10), signals.recv()).await?;
        assert_eq!(watched.sync()?, Synced::Changes(vec![changed("c.yaml", "c: 1")]));
        Ok(())
    }

    #[test]
    fn a_dir_replaced_under_the_same_name_is_watched_afresh() -> anyhow::Result<()> {
        let parent = tempfile::tempdir()?;
        let root = parent.path().join("config");
        std::fs::create_dir(&root)?;
        std::fs::write(root.join("a.yaml"), "a: 1")?;
        let (mut watched, _, _signals) = WatchedDir::start(&root, Duration::from_millis(50))?;
        let next = parent.path().join("config.new");
        std::fs::create_dir(&next)?;
        std::fs::write(next.join("a.yaml"), "a: 2")?;
        std::fs::rename(&root, parent.path().join("config.old"))?;
        std::fs::rename(&next, &root)?;
        assert!(watched.needs_sync());
        assert_eq!(watched.sync()?, Synced::Settling);
        assert_eq!(watched.sync()?, Synced::Changes(vec![changed("a.yaml", "a: 2")]));
        Ok(())
    }

    /// The agent reads the dir on every signal; reading must not signal again, or an idle
    /// agent re-reads its config forever.
    #[tokio::test]
    async fn reading_the_dir_does_not_signal_a_change() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("a.yaml"), "a: 1")?;
        let (mut watched, _, mut signals) = WatchedDir::start(dir.path(), Duration::from_millis(20))?;
        let mut rereads = 0;
        let quiet_until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(())) = tokio::time::timeout_at(quiet_until, signals.recv()).await {
            assert_eq!(watched.sync()?, Synced::Changes(vec![]));
            rereads += 1;
        }
        assert_eq!(rereads, 0, "reads of an unchanged dir were signalled as changes");

        std::fs::write(dir.path().join("a.yaml"), "a: 2")?;
        tokio::time::timeout(Duration::from_secs(10), signals.recv()).await?;
        assert_eq!(watched.sync()?, Synced::Changes(vec![changed("a.yaml", "a: 2")]));
        Ok(())
    }

    #[tokio::test]
    async fn watch_signals_after_a_write() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _debouncer = watch(dir.path(), Duration::from_millis(50), tx)?;
        std::fs::write(dir.path().join("a.yaml"), "a: 1")?;
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?;
        Ok(())
    }
}
